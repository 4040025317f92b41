"""``outrider health``: ask an agent or a collector whether it serves, through gRPC's health service.

Both servers answer the standard ``grpc.health.v1.Health/Check`` (overall, and per gRPC service), which Kubernetes probes natively (``grpc:`` probes); this
command is the same question for a container's HEALTHCHECK, a shell, or an on-call person, in the
CLI's contract: exit 0 when SERVING, 1 when the server answers anything else, 3 when nothing answers.
"""
from __future__ import annotations

import argparse
import os

from agent.cli import add_flag, client_credentials, collector_address, pem_path, positive
from agent.cli_contract import Refused, Unreachable, UsageError, print_json

DEFAULT_ADDRESS = "127.0.0.1:8001"  # `agent serve`'s default --listen


def register(subparsers: argparse._SubParsersAction) -> None:
    health = subparsers.add_parser(
        "health", help="check that an agent or a collector is serving (gRPC health service)",
        description="Ask a server's gRPC health service whether it serves: exit 0 and print SERVING when it does, "
                    "1 when it answers otherwise (NOT_SERVING, an unknown --service), 3 when nothing answers. "
                    "For container health checks and scripts; Kubernetes can ask the same service with a grpc probe.")
    add_flag(health, "--address", prefix="OUTRIDER_HEALTH_", default=DEFAULT_ADDRESS, type=collector_address,
             metavar="HOST:PORT", help="the agent's --listen or the collector's --listen")
    add_flag(health, "--service", prefix="OUTRIDER_HEALTH_", default="", metavar="NAME",
             help="the service to ask about: empty for the whole server, or a gRPC service it serves "
                  "(an agent: inference.GRPCInferenceService)")
    add_flag(health, "--timeout", prefix="OUTRIDER_HEALTH_", default="5", type=positive(float), metavar="SECONDS",
             help="how long to wait for the answer")
    add_flag(health, "--tls-ca", prefix="OUTRIDER_HEALTH_", metavar="PEM",
             help="connect with TLS, trusting this CA's certificates")
    add_flag(health, "--tls-client-cert", prefix="OUTRIDER_HEALTH_", metavar="PEM",
             help="this client's certificate, for a server that requires one (mutual TLS)")
    add_flag(health, "--tls-client-key", prefix="OUTRIDER_HEALTH_", metavar="PEM",
             help="the private key of --tls-client-cert")
    health.add_argument("--json", action="store_true", help='print {"address", "service", "status"} as JSON')
    health.set_defaults(func=health_command)


def health_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines would break the one-line errors
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert, key = args.tls_client_cert, args.tls_client_key
    if bool(cert) != bool(key):
        raise UsageError("--tls-client-cert and --tls-client-key go together: pass both PEM files")
    if args.tls_ca or cert:
        for flag, value in (("--tls-ca", args.tls_ca), ("--tls-client-cert", cert), ("--tls-client-key", key)):
            pem_path(flag, value)
        channel = grpc.secure_channel(args.address, client_credentials(args.tls_ca, cert, key))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unreachable(f"nothing answered at {args.address} within {args.timeout:g} s; is the server "
                                  "running there (--address), and does it serve TLS (--tls-ca)?") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise Refused(f"the server at {args.address} does not know the service {args.service!r}; leave "
                              "--service empty, or name a gRPC service the server serves") from None
            raise Refused(f"the server at {args.address} failed the health check: "
                          f"{(exc.details() or 'no details').splitlines()[0]}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.json:
        print_json({"address": args.address, "service": args.service, "status": status})
    else:
        print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        what = f"the service {args.service!r}" if args.service else "it"
        raise Refused(f"the server at {args.address} answers, but says {what} is {status}")
    return 0
