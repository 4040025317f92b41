"""The collector's floor: what every room needs before anything is stored.

``ingest`` validates every field the collector receives and holds ``Limits``;
``auth`` says who is calling and what their role lets them do (identities,
roles, the gRPC interceptor, TLS files). Imports only ``agent`` and ``protos``.
"""
