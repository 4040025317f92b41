"""``outrider agent proxy``: the agent in front of an existing Open Inference Protocol server.

Its collector, spool, window, feedback, metrics, token and TLS flags are ``agent serve``'s own
(``agent.cli.share_flags``); only the upstream and the model it watches are its own. With
``--managed`` the collector names the version (``agent.proxy_rollout``).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from agent.cli import (AGENT_ENV, UsageError, add_client_tls_flags, add_flag, check_listen, client_tls, close,
                       collector_address, configure_logging, first_line, listen_address, positive, share_flags,
                       stop_signals)
from agent.serve_cli import feedback_limits, parse_feature_names, port_access, reference_flag

# `agent serve`'s flags that mean the same for a proxy.
SHARED_FLAGS = ("--feature-names", "--listen", "--window-seconds", "--summarizer", "--agent-id", "--collector",
                "--spool-dir", "--token", "--workers", "--max-message-mb", "--log-level", "--grace-seconds",
                "--join-seconds", "--metrics", "--sample-rows", "--max-predictions", "--max-prediction-mb",
                "--max-request-id-chars", "--max-classes", "--auth-file", "--tls-cert", "--tls-key",
                "--tls-client-ca", "--reference", "--collector-tls-ca", "--collector-tls-cert", "--collector-tls-key")


def register(commands: argparse._SubParsersAction, serve: argparse.ArgumentParser) -> None:
    proxy = commands.add_parser(
        "proxy", help="monitor a model an existing OIP server (Triton, MLServer, KServe) serves, from in front of it",
        description="Forward Open Inference Protocol (gRPC) calls to an existing inference server unchanged, "
                    "summarising one model's traffic for the collector as 'agent serve' does. Calls of other "
                    "models pass through unmonitored (counted). A request without an id is kept for feedback "
                    "under the id in the reply's 'outrider-request-id' metadata. With --http-listen and "
                    "--upstream-http, OIP over HTTP/REST (/v2/...) is forwarded too, monitored into the same "
                    "windows (an id the proxy assigns comes back in the 'outrider-request-id' response header). "
                    "With --relay-listen (gRPC) and --http-relay-listen (REST), calls are also relayed byte for "
                    "byte on addresses of their own, the cheapest way through: the calls are read off a copy of "
                    "the bytes and summarised into the same windows. "
                    "With --managed, a promotion or rollback in the collector's registry loads that version on "
                    "the upstream through the OIP model-repository extension (Triton, MLServer), and the proxy "
                    "then monitors it and pins the model's inference calls that name no version to it (the one "
                    "change a managed proxy makes to a request: the upstream's own default is its newest version "
                    "loaded, which a rollback would not move); calls naming a version pass unchanged. "
                    "Stops gracefully on SIGTERM/SIGINT.",
    )
    add_flag(proxy, "--upstream", prefix=AGENT_ENV, type=collector_address, metavar="HOST:PORT",
             help="the inference server's OIP gRPC address, forwarded to from --listen; without it "
                  "--listen serves only feedback and health, and the model's schema is read over REST")
    add_flag(proxy, "--upstream-http", prefix=AGENT_ENV, type=collector_address, metavar="HOST:PORT",
             help="the inference server's OIP HTTP/REST address, forwarded to from --http-listen")
    add_client_tls_flags(proxy, "--upstream", "the inference server (--upstream and --upstream-http: https)")
    add_flag(proxy, "--http-listen", prefix=AGENT_ENV, type=listen_address, metavar="HOST:PORT",
             help="also forward OIP over HTTP/REST (every /v2/... path) on this address to --upstream-http, "
                  "with the gRPC port's --auth-file and TLS; port 0 picks a free port")
    add_flag(proxy, "--relay-listen", prefix=AGENT_ENV, type=listen_address, metavar="HOST:PORT",
             help="also relay gRPC on this address to --upstream byte for byte, the cheapest way through: "
                  "HTTP/2 is not ended, a copy of the bytes is summarised off the request path. It changes "
                  "nothing, so it checks no token, assigns no request id (send your own for feedback), pins "
                  "nothing and serves no feedback or health (those stay on --listen): not with --auth-file, "
                  "--managed, TLS on either side; port 0 picks a free port")
    add_flag(proxy, "--http-relay-listen", prefix=AGENT_ENV, type=listen_address, metavar="HOST:PORT",
             help="the same for OIP over HTTP/REST: relay HTTP/1.1 on this address to --upstream-http byte for "
                  "byte, the calls read off a copy; the same limits as --relay-listen")
    add_flag(proxy, "--model-name", prefix=AGENT_ENV, required=True, metavar="NAME",
             help="the upstream model to monitor; its schema is read from the upstream's ModelMetadata")
    add_flag(proxy, "--model-version", prefix=AGENT_ENV, metavar="V",
             help="the version to monitor (default: the last the upstream's metadata lists, else 1); replies "
                  "of other versions pass through unmonitored (counted)")
    proxy.add_argument("--managed", action="store_true",
                       help="the collector names the version (promotions, rollbacks): load it on the upstream with "
                            "the model-repository extension (over --upstream, gRPC; with only --upstream-http, over "
                            "REST), wait until it is ready, then monitor it and "
                            "pin calls naming no version to it; answers like a managed agent ('outrider rollout "
                            "show', 'outrider status'). Needs --collector; replaces --model-version")
    add_flag(proxy, "--upstream-version", prefix=AGENT_ENV, default="{version}", metavar="TEMPLATE",
             help="with --managed: the upstream's version string for a registry version, {version} (and {model}) "
                  "filled in, e.g. 'v{version}'; the upstream's repository must hold it as a version of --model-name "
                  "(MLServer: parameters.version in a model-settings.json; Triton: a numbered folder)")
    add_flag(proxy, "--upstream-load-timeout-seconds", prefix=AGENT_ENV, default="300", type=positive(float),
             metavar="S", help="with --managed: longest a version may take to load and become ready on the upstream; "
                               "then the rollout is answered failed and the version before stays")
    add_flag(proxy, "--upstream-timeout-seconds", prefix=AGENT_ENV, default="30", type=positive(float), metavar="S",
             help="longest a forwarded call waits for the upstream when the client's deadline is longer or unset; "
                  "then UNAVAILABLE, or 503 over REST (a refused connection is answered so at once)")
    share_flags(serve, proxy, SHARED_FLAGS)
    proxy.set_defaults(func=proxy_command)


def proxy_command(args: argparse.Namespace) -> int:
    from agent.errors import InvalidArgument, OutriderError
    from agent.metrics import AgentMetrics, start_for_cli
    from prometheus_client import CollectorRegistry

    from agent.proxy_grpc import proxy_calls_counter, serve_proxy
    from agent.proxy_rest import RestUpstream, serve_proxy_rest

    configure_logging(args.log_level)
    if args.upstream == args.listen:
        raise UsageError(f"--upstream {args.upstream} is the proxy's own --listen address; give the inference "
                         "server's address")
    if args.upstream is None and args.upstream_http is None:
        raise UsageError("give the inference server's address: --upstream HOST:PORT (gRPC), or --upstream-http "
                         "HOST:PORT with --http-listen HOST:PORT (REST), or both")
    if (args.http_listen is None and args.http_relay_listen is None) != (args.upstream_http is None):
        raise UsageError("--http-listen and --upstream-http go together: give both to forward OIP over REST, "
                         "or neither (--http-relay-listen may stand for --http-listen)")
    if args.http_listen is not None and args.upstream_http == args.http_listen:
        raise UsageError(f"--upstream-http {args.upstream_http} is the proxy's own --http-listen address; give the "
                         "inference server's REST address")
    relay_conflicts(args)
    if args.managed:
        from agent.proxy_rollout import check_template

        if args.collector is None:
            raise UsageError("--managed needs --collector: the collector names the version to load and monitor")
        if args.model_version is not None:
            raise UsageError("--managed and --model-version exclude each other: the collector names the version")
        try:
            check_template(args.upstream_version)
        except InvalidArgument as exc:
            raise UsageError(str(exc)) from None
    names = parse_feature_names(args.feature_names)
    check_listen(args.listen)
    for flag, listen, _, _ in relay_flags(args):
        check_listen(listen, flag)
    if args.http_listen is not None:
        check_listen(args.http_listen, "--http-listen")
    access = port_access(args)
    collector_tls = client_tls(args, "--collector")
    upstream_tls = client_tls(args, "--upstream")
    given_reference = reference_flag(args)
    limits = feedback_limits(args)

    rollout = None  # with --managed: the exporter every version's session shares, and the commands

    def open_session(model: Any, version: str, feature_names: Any = None, reference: Any = None) -> Any:
        from agent import MonitoredSession

        if rollout is not None:  # one run, one window sequence across versions; columns named as the registry does
            delivery = {**rollout.session_options(), "feature_names": feature_names or names,
                        "reference": reference if reference is not None else given_reference}
        else:
            delivery = {"agent_id": args.agent_id, "collector": args.collector, "spool_dir": args.spool_dir,
                        "collector_token": args.token, "collector_tls": collector_tls, "feature_names": names,
                        "reference": given_reference}
        return MonitoredSession(model, model_name=args.model_name, model_version=version,
                                window_seconds=args.window_seconds, summarizer=args.summarizer,
                                join_seconds=args.join_seconds, sample_rows=args.sample_rows,
                                feedback_limits=limits, **delivery)

    metrics = start_for_cli(AgentMetrics, args.metrics)
    calls = proxy_calls_counter(metrics.registry if metrics is not None else CollectorRegistry())
    with stop_signals() as stop:
        try:
            watched = None if args.upstream else RestUpstream(args.upstream_http, args.upstream_timeout_seconds,
                                                              upstream_tls)
            running = serve_proxy(args.upstream or args.upstream_http, args.model_name, open_session, args.listen,
                                  model_version=args.model_version, workers=args.workers,
                                  upstream_timeout=args.upstream_timeout_seconds,
                                  max_receive_bytes=int(args.max_message_mb * 1024 * 1024), metrics=metrics,
                                  calls=calls, watched=watched, managed=args.managed, upstream_tls=upstream_tls,
                                  **access)
        except OSError as exc:
            close(metrics)
            raise UsageError(f"{first_line(exc)}; pick a free port on a local address with --listen") from None
        except (InvalidArgument, OutriderError) as exc:
            close(metrics)
            raise UsageError(str(exc)) from None
        if args.managed:
            from agent.proxy_rollout import ProxyRollout

            try:
                rollout = ProxyRollout(args.model_name, args.collector, running.monitor, running.upstream,
                                       agent_id=args.agent_id, spool_dir=args.spool_dir, token=args.token,
                                       tls=collector_tls,
                                       version_template=args.upstream_version,
                                       load_timeout=args.upstream_load_timeout_seconds)
            except (OSError, OutriderError) as exc:  # e.g. a spool directory in use or unwritable
                running.stop(0)
                close(metrics)
                raise UsageError(f"{first_line(exc)}; pick another --spool-dir") from None
        if running.refused:  # read at start from a live upstream: a flag of ours does not fit the model
            running.stop(0)
            close(metrics)
            raise UsageError(f"cannot monitor {args.model_name}: {running.refused}")
        rest = None
        if args.http_listen is not None:
            try:
                rest = serve_proxy_rest(args.upstream_http, running.monitor, calls, args.http_listen,
                                        upstream_timeout=args.upstream_timeout_seconds, upstream_tls=upstream_tls,
                                        workers=args.workers,
                                        max_body_bytes=int(args.max_message_mb * 1024 * 1024), **access)
            except OSError as exc:
                running.stop(0)
                close(rollout)
                close(metrics)
                raise UsageError(f"{first_line(exc)}; pick a free port on a local address with --http-listen") \
                    from None
            if metrics is not None:  # refused calls of both ports under one name, as agent serve counts them
                switch = running.monitor.switch
                metrics.bind(lambda: switch.current.plane if switch.current is not None else None)
                metrics.add_refusals(rest.refusals)
        relays = []  # --relay-listen (gRPC), --http-relay-listen (REST)
        for flag, listen, upstream, protocol in relay_flags(args):
            from agent.proxy_relay import serve_relay

            try:
                relays.append(serve_relay(listen, upstream, running.monitor, calls, protocol=protocol,
                                          upstream_timeout=args.upstream_timeout_seconds,
                                          max_message_bytes=int(args.max_message_mb * 1024 * 1024)))
            except OSError as exc:
                for relay in relays:
                    relay.stop(0)
                if rest is not None:
                    rest.stop()
                running.stop(0)
                close(rollout)
                close(metrics)
                raise UsageError(f"{first_line(exc)}; pick a free port on a local address with {flag}") from None
        if relays and metrics is not None:
            from agent.proxy_relay import RelayCollector

            metrics.registry.register(RelayCollector(relays))
        session = running.monitor.session
        state = (f"monitoring version {session.model_version}" if session is not None
                 else "waiting for the collector to name a version" if rollout is not None
                 else "waiting for the upstream's metadata")
        also = "".join(f"; {'REST relay' if relay.protocol == 'rest' else 'relay'} on {relay.address}"
                       for relay in relays)
        also += f"; REST {args.upstream_http} on {rest.url}" if rest is not None else ""
        grpc_side = args.upstream or "feedback"  # without --upstream, --listen serves feedback and health only
        print(f"proxying {grpc_side} on {running.address} ({args.model_name}: {state}){also}", flush=True)
        logging.getLogger(__name__).info("proxy for %s on %s%s", grpc_side, running.address, also)
        try:
            stop.wait()
        finally:
            for relay in relays:  # first, as REST: their calls are offered to the monitor the gRPC side closes
                relay.stop(args.grace_seconds)
            if rest is not None:
                rest.stop()
            running.stop(args.grace_seconds)
            if rollout is not None:  # after the proxy: the sessions' last windows go out through its exporter
                rollout.close(args.grace_seconds)
            close(metrics)
    return 0


def relay_flags(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(flag, listen, upstream, protocol) of each relay asked for."""
    return [(flag, listen, upstream, protocol) for flag, listen, upstream, protocol in (
        ("--relay-listen", args.relay_listen, args.upstream, "grpc"),
        ("--http-relay-listen", args.http_relay_listen, args.upstream_http, "rest")) if listen is not None]


def relay_conflicts(args: argparse.Namespace) -> None:
    """A relay changes no byte: what needs a change, or the end of HTTP/2 or TLS, cannot go with it."""
    for flag, listen, upstream, protocol in relay_flags(args):
        if upstream is None:
            upstream_flag = "--upstream" if protocol == "grpc" else "--upstream-http"
            raise UsageError(f"{flag} relays {'gRPC' if protocol == 'grpc' else 'REST'} to {upstream_flag} "
                             "HOST:PORT: give the inference server's address")
        for other, given, why in (
                ("--auth-file", args.auth_file, "it cannot check tokens; check them on the upstream, or use --listen"),
                ("--managed", args.managed, "it cannot pin calls to the registry's version; use --listen"),
                ("--tls-cert", args.tls_cert, "it does not end TLS; put it on a loopback address beside the server"),
                ("--upstream-tls-ca", args.upstream_tls_ca, "it does not start TLS to the upstream; use --listen")):
            if given:
                raise UsageError(f"{flag} and {other} exclude each other: {why}")
        taken = (args.listen, args.http_listen, args.upstream, args.upstream_http, args.relay_listen,
                 args.http_relay_listen)
        if not listen.endswith(":0") and taken.count(listen) > 1:
            raise UsageError(f"{flag} {listen} is already taken by another flag; give it a port of its own")
