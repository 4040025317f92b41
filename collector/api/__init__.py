"""The gRPC face of the collector: servicers, the agents' live streams, Prometheus metrics.

Servicers stay thin: check the request, call a plain core in lifecycle,
monitoring or store, reply. ``server.serve_collector`` wires the rooms
together (and starts ``collector.web`` when asked). May import every room below
it and ``collector.web``; nothing imports this room except ``collector.cli``.
"""
