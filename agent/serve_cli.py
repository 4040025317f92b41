"""``outrider agent serve``: an ONNX model over the Open Inference Protocol, summarised for the collector.

It registers the ``outrider agent`` group (``agent proxy`` joins it from ``agent.proxy_cli``, sharing the
flags that mean the same there). The helpers both commands read their shared flags with
(``parse_feature_names``, ``reference_flag``, ``feedback_limits``, ``port_access``) live here; the
command line's generic parts (flags, address types, TLS, signals, ``main``) are ``agent.cli``'s.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from agent import supervisor
from agent.cli import (AGENT_ENV, UsageError, add_client_tls_flags, add_flag, add_log_level, check_listen,
                       client_tls, close, collector_addresses, configure_logging, first_line, listen_address,
                       positive, stop_signals, whole_number, whole_number_from)
from agent.supervisor import MAX_PROCESSES, MAX_RESTARTS, RESTART_WINDOW


def register(subparsers: argparse._SubParsersAction) -> None:
    """``outrider agent serve``."""
    agent = subparsers.add_parser("agent", help="run the monitoring agent beside a model",
                                  description="Run the monitoring agent beside a model.")
    commands = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="serve an ONNX model over the Open Inference Protocol (gRPC)",
        description="Serve an ONNX model over the Open Inference Protocol (KServe V2 gRPC), "
                    "summarising its traffic for the collector. Stops gracefully on SIGTERM/SIGINT; "
                    "SIGUSR1 prints every thread's stack to stderr.",
    )
    add_flag(serve, "--model", prefix=AGENT_ENV, metavar="PATH.onnx",
             help="the ONNX model file to serve; omit it and give --model-name and --collector to serve "
                  "the version the collector names (managed: fetched, checked and swapped in at run time)")
    add_flag(serve, "--model-name", prefix=AGENT_ENV, metavar="NAME",
             help="name clients use (default: the file's stem); without --model, the registry model to serve")
    add_flag(serve, "--model-version", prefix=AGENT_ENV, default="1", metavar="V", help="version clients see")
    add_flag(serve, "--feature-names", prefix=AGENT_ENV, metavar="NAMES",
             help="names of the model's input columns, those of its reference profile ('outrider profile' prints "
                  "them): A,B,C for a one-input model, JSON {\"input\": [names]} for several, or @FILE holding "
                  "either (default: the model's feature_names metadata, else X[i]); managed agents get them from "
                  "the registry")
    add_flag(serve, "--listen", prefix=AGENT_ENV, default="127.0.0.1:8001", type=listen_address, metavar="HOST:PORT",
             help="address to serve on; port 0 picks a free port")
    add_flag(serve, "--http-listen", prefix=AGENT_ENV, type=listen_address, metavar="HOST:PORT",
             help="also serve the Open Inference Protocol over HTTP/REST here (/v2/...: JSON tensors and the binary "
                  "tensor extension), on the same model, checks, monitoring, auth file and TLS as --listen "
                  "(default: none; Triton's HTTP port is 8000)")
    add_flag(serve, "--window-seconds", prefix=AGENT_ENV, default="10", type=positive(float), metavar="S",
             help="length of each summary window")
    add_flag(serve, "--summarizer", prefix=AGENT_ENV, default="auto", choices=["auto", "process", "thread"],
             help="where summaries are computed: a helper process reading shared memory (keeps the "
                  "serving process's GIL free), a thread, or auto (process on x86-64)")
    add_flag(serve, "--agent-id", prefix="OUTRIDER_", metavar="ID",
             help="this agent's name at the collector (default: the host name); keep it across restarts")
    add_flag(serve, "--collector", prefix=AGENT_ENV, type=collector_addresses, metavar="HOST:PORT[,...]",
             help="send summaries to the collector at this address (default: none, summaries stay local); "
                  "several, comma-separated, or a name resolving to several: the agent streams to one and "
                  "moves with its spool to the next when it dies")
    add_flag(serve, "--spool-dir", prefix=AGENT_ENV, metavar="DIR",
             help="where windows wait until the collector acknowledges them; survives restarts "
                  "(default: ./outrider-spool/AGENT_ID-MODEL_NAME)")
    add_flag(serve, "--token", prefix=AGENT_ENV, metavar="TOKEN", secret=True,
             help="bearer token for the collector (prefer the environment variable: flags show in ps)")
    add_client_tls_flags(serve, "--collector", "the collector")
    add_flag(serve, "--workers", prefix=AGENT_ENV, default="8", type=positive(int), metavar="N",
             help="request worker threads: REST calls, gRPC calls other than ModelInfer, and ModelInfer "
                  "with --threaded-infer (every gRPC call on the threads server: --grpc-server)")
    serve.add_argument("--threaded-infer", action="store_true",
                       help="run gRPC ModelInfer calls side by side on the --workers threads, for models whose run "
                            "takes milliseconds (default: one at a time on the server's event loop as they arrive, "
                            "with no hand-off between threads: the cheapest for a model that runs in well under a "
                            "millisecond)")
    add_flag(serve, "--grpc-server", prefix=AGENT_ENV, default="auto", choices=["auto", "asyncio", "threads"],
             help="how the gRPC port runs calls: asyncio (an event loop; ModelInfer on it, no hand-off between "
                  "threads) or threads (grpcio's thread pool, every call on a --workers thread); auto: asyncio "
                  "for one process, threads for each of --processes N (measured cheaper there: "
                  "benchmarks/README.md)")
    add_flag(serve, "--max-message-mb", prefix=AGENT_ENV, default="64", type=positive(float), metavar="MB",
             help="largest request accepted; bigger ones get RESOURCE_EXHAUSTED")
    add_log_level(serve, AGENT_ENV)
    add_flag(serve, "--grace-seconds", prefix=AGENT_ENV, default="5", type=positive(float), metavar="S",
             help="time in-flight requests get to finish on shutdown")
    add_flag(serve, "--join-seconds", prefix=AGENT_ENV, default="3600", type=positive(float), metavar="S",
             help="how long a prediction made with a request id waits for its ground truth "
                  "(FeedbackService.Feedback); later labels count as unmatched")
    add_flag(serve, "--metrics", prefix=AGENT_ENV, type=listen_address, metavar="HOST:PORT",
             help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none); it has no auth, "
                  "so keep it on loopback or a scrape-only network")
    add_flag(serve, "--sample-rows", prefix=AGENT_ENV, default="0", type=whole_number(10_000), metavar="N",
             help="keep a uniform sample of N rows (inputs and outputs) of each window for 'outrider data export' "
                  "(0: none)")
    add_flag(serve, "--max-predictions", prefix=AGENT_ENV, default="100000", type=positive(int), metavar="N",
             help="most predictions kept for feedback (requests with an id); the oldest are evicted and counted")
    add_flag(serve, "--max-prediction-mb", prefix=AGENT_ENV, default="32", type=positive(float), metavar="MB",
             help="memory the predictions kept for feedback may take (ids, outputs, overhead); the oldest are "
                  "evicted and counted")
    add_flag(serve, "--max-request-id-chars", prefix=AGENT_ENV, default="256", type=positive(int), metavar="N",
             help="longest request id whose prediction is kept for feedback; a longer one is served as usual, "
                  "its prediction is not kept (counted)")
    add_flag(serve, "--max-classes", prefix=AGENT_ENV, default="256", type=whole_number_from(2, 1_000),
             metavar="N", help="class names per model in the confusion matrix, <other> included; labels of "
                               "further classes (and names over 128 characters) are counted under <other>")
    add_flag(serve, "--auth-file", prefix=AGENT_ENV, metavar="FILE",
             help="TOML file of [[client]] entries (name, token or token_sha256, calls = ['inference', 'feedback']); "
                  "callers of this port then need 'authorization: Bearer <token>' (health stays open). "
                  "Default: none, anyone who can reach the port may call it")
    add_flag(serve, "--tls-cert", prefix=AGENT_ENV, metavar="PEM", help="serve TLS with this certificate (needs --tls-key)")
    add_flag(serve, "--tls-key", prefix=AGENT_ENV, metavar="PEM", help="the private key of --tls-cert")
    add_flag(serve, "--tls-client-ca", prefix=AGENT_ENV, metavar="PEM",
             help="require client certificates signed by this CA (mutual TLS)")
    add_flag(serve, "--reference", prefix=AGENT_ENV, metavar="PROFILE.pb",
             help="the model's reference profile ('outrider profile'): with its PCA projection every window gets "
                  "the column @reconstruction_error (multivariate drift). With --collector the collector sends "
                  "the one attached to this version (default: none until then)")
    add_flag(serve, "--intra-op-threads", prefix=AGENT_ENV, default="1", type=whole_number(1024), metavar="N",
             help="onnxruntime threads one request's operators may use (0: one per core). gRPC ModelInfer calls "
                  "run one at a time unless --threaded-infer, REST calls side by side on --workers threads; raise it "
                  "for large batches at low concurrency")
    add_flag(serve, "--inter-op-threads", prefix=AGENT_ENV, default="1", type=whole_number(1024), metavar="N",
             help="onnxruntime threads for independent branches of the graph (0: one per core)")
    add_flag(serve, "--providers", prefix=AGENT_ENV, default="cpu", type=_providers, metavar="LIST",
             help="onnxruntime execution providers in order of preference, comma-separated (cpu, cuda, tensorrt, "
                  "openvino, ... or full names); ones this onnxruntime build lacks are skipped with a warning, "
                  "and the CPU is always the last fallback")
    add_flag(serve, "--graph-optimization", prefix=AGENT_ENV, default="all",
             choices=["disable", "basic", "extended", "all"], help="onnxruntime graph optimisation level")
    add_flag(serve, "--processes", prefix=AGENT_ENV, default="1", type=whole_number_from(1, MAX_PROCESSES),
             metavar="N", help="serving processes sharing --listen's port (SO_REUSEPORT, Linux), to use N cores: each "
                               "a whole agent with its own ring, summaries, agent id (AGENT_ID/I) and spool "
                               "(SPOOL_DIR/I); one /metrics for all, labelled process=\"I\". A process that dies is "
                               f"restarted, at most {MAX_RESTARTS} times in {RESTART_WINDOW / 60:.0f} minutes, then all "
                               "stop (exit 1)")
    serve.add_argument("--no-monitoring", action="store_true",
                       help="serve the model as plain onnxruntime and summarise nothing (no windows, no feedback; "
                            "not with --collector): the baseline for measuring what monitoring costs")
    serve.set_defaults(func=serve_command)
    from agent import proxy_cli  # `agent proxy`: the agent in front of an inference server, with serve's flags

    proxy_cli.register(commands, serve)


def _providers(text: str) -> tuple[str, ...]:
    """An argparse type: --providers as onnxruntime names them (agent.runtime)."""
    from agent.errors import InvalidArgument
    from agent.runtime import parse_providers

    try:
        return tuple(parse_providers(text))
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _runtime(args: argparse.Namespace) -> Any:
    """The onnxruntime options of every session this agent opens (agent.runtime)."""
    from agent.runtime import RuntimeOptions

    return RuntimeOptions(intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads,
                          providers=args.providers, graph_optimization=args.graph_optimization)


def serve_command(args: argparse.Namespace) -> int:
    from agent.errors import OutriderError
    from agent.metrics import AgentMetrics, start_for_cli
    from agent.server import serve

    configure_logging(args.log_level)
    if args.model is None:
        return _serve_managed(args)
    model = Path(args.model)
    if not model.is_file():
        raise UsageError(f"model file {model} does not exist; pass --model PATH.onnx (or set OUTRIDER_AGENT_MODEL)")
    name = args.model_name or model.stem
    names = parse_feature_names(args.feature_names)
    shared = _check_listen(args.listen, getattr(args, "http_listen", None))
    access = port_access(args)
    reference = reference_flag(args)
    runtime = _runtime(args)
    if args.no_monitoring and args.collector:
        raise UsageError("--no-monitoring summarises nothing, so there is nothing to send to a collector: drop "
                         "--collector (or --no-monitoring)")
    if getattr(args, "processes", 1) > 1:  # the arguments are checked: run N serving processes, watch them
        return supervisor.supervise(args)
    metrics = start_for_cli(AgentMetrics, args.metrics)  # before the model load: a bad address fails fast

    with stop_signals() as stop:  # before the (slow) model load
        if shared:
            supervisor.stop_when_orphaned(stop)
        session = _open_session(model, name, args.model_version, args.window_seconds, args.summarizer,
                                agent_id=args.agent_id, collector=args.collector, spool_dir=args.spool_dir,
                                collector_token=args.token, collector_tls=client_tls(args, "--collector"),
                                join_seconds=args.join_seconds,
                                sample_rows=args.sample_rows, feedback_limits=feedback_limits(args),
                                feature_names=names, reference=reference, monitoring=not args.no_monitoring,
                                **runtime.session_kwargs())
        logging.getLogger(__name__).info("%s%s", runtime.describe(),
                                         "; monitoring off (--no-monitoring)" if args.no_monitoring else "")
        try:
            running = serve(session, name, args.model_version, args.listen, workers=args.workers,
                            max_receive_bytes=int(args.max_message_mb * 1024 * 1024), metrics=metrics,
                            reuse_port=shared, threaded_infer=args.threaded_infer,
                            asynchronous=_asynchronous(args, shared), **access)
        except OSError as exc:
            close(session)
            raise UsageError(f"{first_line(exc)}; pick a free port on a local address with --listen") from None
        except OutriderError as exc:  # e.g. an input or output type OIP cannot carry
            close(session)
            raise UsageError(f"cannot serve {model}: {exc}") from None
        _serve_until_stopped(args, running, metrics, access, shared, stop,
                             f"serving {name} version {args.model_version} on {running.address}")
    return 0


def _serve_managed(args: argparse.Namespace) -> int:
    """No model file: serve the version of --model-name that the collector names (agent.rollout)."""
    from agent.errors import OutriderError
    from agent.metrics import AgentMetrics, start_for_cli
    from agent.rollout import RolloutController
    from agent.server import serve_switch

    if not args.collector:
        raise UsageError("no model to serve: pass --model PATH.onnx, or --model-name NAME with --collector "
                         "HOST:PORT to serve the version the collector names")
    if not args.model_name:
        raise UsageError("a managed agent (no --model) needs --model-name NAME: the registry model whose "
                         "production version the collector names")
    if getattr(args, "feature_names", None):
        raise UsageError("a managed agent (no --model) names its columns as the registry names them for each "
                         "version; drop --feature-names (register the version with its named reference: "
                         "outrider models register NAME --file M.onnx --reference DATA)")
    if getattr(args, "reference", None):
        raise UsageError("--reference goes with --model: a managed agent is sent the reference of the version "
                         f"it serves by the collector (outrider attach {args.model_name} VERSION PROFILE.pb)")
    if getattr(args, "no_monitoring", False):
        raise UsageError("--no-monitoring goes with --model: a managed agent reports to its collector")
    shared = _check_listen(args.listen, getattr(args, "http_listen", None))
    access = port_access(args)
    runtime = _runtime(args)
    if getattr(args, "processes", 1) > 1:  # the arguments are checked: run N serving processes, watch them
        return supervisor.supervise(args)
    options = {"window_seconds": args.window_seconds, "summarizer": args.summarizer,
               "join_seconds": args.join_seconds, "feedback_limits": feedback_limits(args),
               "runtime": runtime}
    if getattr(args, "sample_rows", None):  # the same monitoring options as a served file gets
        options["sample_rows"] = args.sample_rows
    metrics = start_for_cli(AgentMetrics, getattr(args, "metrics", None))
    with stop_signals() as stop:
        if shared:
            supervisor.stop_when_orphaned(stop)
        try:
            agent = RolloutController(args.model_name, args.collector, agent_id=args.agent_id,
                                      spool_dir=args.spool_dir, token=args.token,
                                      tls=client_tls(args, "--collector"), session_options=options)
        except OutriderError as exc:  # e.g. the spool directory is in use by another agent
            close(metrics)
            raise UsageError(f"{exc}; pass another --spool-dir") from None
        except OSError as exc:
            close(metrics)
            raise UsageError(f"{exc.strerror or exc}: {exc.filename}; check --spool-dir") from None
        try:
            running = serve_switch(agent.switch, args.listen, owner=agent, workers=args.workers,
                                   max_receive_bytes=int(args.max_message_mb * 1024 * 1024), metrics=metrics,
                                   reuse_port=shared, threaded_infer=args.threaded_infer,
                                   asynchronous=_asynchronous(args, shared), **access)
        except OSError as exc:
            agent.close(0)
            close(metrics)
            raise UsageError(f"{first_line(exc)}; pick a free port on a local address with --listen") from None
        current = agent.switch.current
        what = (f"version {current.version} as last time, until the collector names one" if current
                else "waiting for the collector to name the version")
        _serve_until_stopped(args, running, metrics, access, shared, stop,
                             f"serving {args.model_name} (managed by {args.collector}; {what}) on {running.address}")
    return 0


def _serve_until_stopped(args: argparse.Namespace, running: Any, metrics: Any, access: dict[str, Any], shared: bool,
                         stop: Any, ready: str) -> None:
    """Both forms of ``agent serve`` once the gRPC port serves: REST too (``--http-listen``), the ready line
    (what scripts and ``--processes`` wait for), then serve until a signal, and drain."""
    rest = _start_rest(args, running, metrics, access, shared)
    print(ready, flush=True)
    try:
        stop.wait()
    finally:
        _stop(running, rest, args.grace_seconds)
        close(metrics)


def _asynchronous(args: argparse.Namespace, shared: bool) -> bool:
    """Whether this process's gRPC port is the asyncio server (--grpc-server; auto: unless it is one of
    --processes N's, ``shared``)."""
    choice = getattr(args, "grpc_server", "auto")
    return choice == "asyncio" or (choice == "auto" and not shared)


def _check_listen(listen: str, http_listen: str | None = None) -> bool:
    """Bind-test --listen (and --http-listen), unless this process is one of ``--processes N``'s
    (agent.supervisor): its siblings hold the ports and the supervisor tested them. Whether this process
    shares the ports with them."""
    if supervisor.member() is not None:
        return True
    check_listen(listen)
    if http_listen:
        check_listen(http_listen, "--http-listen")
    return False


def _start_rest(args: argparse.Namespace, running: Any, metrics: Any, access: dict[str, Any], shared: bool) -> Any:
    """--http-listen's REST endpoint on what ``running`` (the gRPC server) serves; None without the flag.
    Prints where it is (before the "serving" line, which the supervisor of --processes waits for)."""
    from agent.rest import SwitchBackend, serve_rest

    if not getattr(args, "http_listen", None):
        return None
    servicer = running.servicer
    try:
        rest = serve_rest(SwitchBackend(servicer.switch, servicer.shutting_down), args.http_listen,
                          workers=args.workers, max_body_bytes=int(args.max_message_mb * 1024 * 1024),
                          metrics=metrics, reuse_port=shared, **access)
    except OSError as exc:
        running.stop(0)
        close(metrics)
        raise UsageError(f"{first_line(exc)}; pick a free port on a local address with --http-listen") from None
    if metrics is not None:  # refused calls of both ports, under one name
        metrics.bind(lambda: servicer.plane, running.refusals)
        metrics.add_refusals(rest.refusals)
    print(f"rest on {rest.url}", flush=True)
    return rest


def _stop(running: Any, rest: Any, grace: float) -> None:
    """Drain REST too before the session closes: not ready first, then its requests in flight."""
    if rest is not None:
        running.servicer.shutting_down.set()
        rest.stop()
    running.stop(grace)


def parse_feature_names(text: str | None) -> Any:
    """--feature-names read and checked as names (their fit to the model is checked when it loads)."""
    from agent import feature_names
    from agent.errors import InvalidArgument

    if not text:
        return None
    try:
        return feature_names.parse(text)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None


def reference_flag(args: argparse.Namespace) -> Any:
    """--reference's projection (None without one), read and checked before anything starts."""
    from agent.errors import OutriderError
    from agent.reference import load_projection

    if not getattr(args, "reference", None):
        return None
    try:
        projection = load_projection(args.reference)
    except OutriderError as exc:
        raise UsageError(f"--reference: {exc}") from None
    if projection is None:
        logging.getLogger(__name__).warning("--reference %s has no projection (its notes say why: outrider "
                                            "profile); windows have no @reconstruction_error", args.reference)
    return projection


def feedback_limits(args: argparse.Namespace) -> Any:
    """The budgets of what callers can make the agent keep for feedback (agent.feedback)."""
    from agent.feedback import FeedbackLimits

    return FeedbackLimits(max_requests=args.max_predictions, max_bytes=int(args.max_prediction_mb * 1024 * 1024),
                          max_request_id_chars=args.max_request_id_chars, max_classes=args.max_classes)


def port_access(args: argparse.Namespace) -> dict[str, Any]:
    """``auth`` and ``tls`` for the agent's own port, read and checked before anything starts."""
    from agent.errors import OutriderError
    from agent.tokens import ClientAuth, TLSFiles

    try:
        auth = ClientAuth.from_file(args.auth_file) if args.auth_file else None
    except OutriderError as exc:
        raise UsageError(f"{exc}; fix --auth-file (see 'outrider agent serve --help')") from None
    try:
        tls = TLSFiles.from_paths(args.tls_cert, args.tls_key, args.tls_client_ca)
    except OutriderError as exc:
        raise UsageError(str(exc)) from None
    return {"auth": auth, "tls": tls}


def _open_session(model: Path, name: str, version: str, window_seconds: float, summarizer: str,
                  **monitoring: Any) -> Any:
    from agent import MonitoredSession
    from agent.errors import InvalidArgument, OutriderError

    try:
        return MonitoredSession(str(model), model_name=name, model_version=version,
                                window_seconds=window_seconds, summarizer=summarizer, **monitoring)
    except InvalidArgument as exc:  # names that do not fit the inputs, or a --reference whose columns do not
        flag = "--feature-names: " if monitoring.get("feature_names") and not monitoring.get("reference") else ""
        raise UsageError(f"{flag}{exc}") from None
    except OutriderError as exc:  # e.g. the spool directory is in use by another agent
        raise UsageError(f"{exc}; pass another --spool-dir") from None
    except OSError as exc:  # e.g. a spool directory we may not create
        raise UsageError(f"{exc.strerror or exc}: {exc.filename}; check --model and --spool-dir") from None
    except Exception as exc:  # onnxruntime's load errors have no common base class
        raise UsageError(
            f"cannot load {model} as an ONNX model: {first_line(exc)}; pass a valid .onnx file with --model"
        ) from None
