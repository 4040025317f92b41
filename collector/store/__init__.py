"""Everything written to and read from the collector's database.

The ``Store`` (one writer thread, readers), the schema and its migrations,
rollups and retention, the audit chain, row samples, keyset paging. May import
``collector.base`` (plus ``agent`` and ``protos``); never a room above it.
"""
