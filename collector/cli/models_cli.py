"""Operators' ``outrider models register | list | show | gate``: the model registry and its evaluation gate.

``register`` does the model work on the client: it builds the reference
profile (``agent.profile.build_profile``) and computes the holdout metrics by
running the model on the labelled holdout, then streams the ONNX file to the
collector, which checks its size and sha256, stores it, and runs the gate.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.cli import UsageError, add_flag
from agent.cli_contract import EXIT_FAILED, say
from collector.cli.cli import _ask, _ask_pages, _client_flags, age, listing, plain, print_json, table

CHUNK_BYTES = 1 << 20  # the collector's limit per chunk


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser(
        "models", help="register model versions, list them, run their evaluation gate",
        description="The model registry: immutable, numbered versions of each model with their ONNX file, "
                    "schema, reference profile (data lineage), holdout metrics and evaluation gate result.")
    actions = models.add_subparsers(dest="models_action", metavar="ACTION", required=True)

    reg = actions.add_parser(
        "register", help="store a new version of a model and run its evaluation gate",
        description="Upload an ONNX file as the next version of NAME. With --reference, a reference profile is "
                    "built from DATA here (as 'outrider profile' does) and becomes the version's drift reference; "
                    "with --holdout, the model is run on labelled holdout data and its accuracy (classifiers) or "
                    "MAE/RMSE (regressors) are stored for the gate to compare.")
    reg.add_argument("name", metavar="NAME", help="model name")
    reg.add_argument("--file", required=True, metavar="M.onnx", help="the ONNX model file")
    source = reg.add_mutually_exclusive_group()
    source.add_argument("--reference", metavar="DATA", help="reference data to profile (csv, parquet, npy, npz)")
    source.add_argument("--profile", metavar="PROFILE.pb", help="a profile made by 'outrider profile'")
    reg.add_argument("--holdout", metavar="DATA", help="labelled holdout data for the version's metrics")
    reg.add_argument("--label", metavar="COLUMN",
                     help="the label column of --holdout, and of --reference when it has one (.npz: array; "
                          "default 'label')")
    add_flag(reg, "--feature-names", metavar="NAMES",
             help="names of the input's columns in --reference DATA (default: its header or .npz 'feature_names'): "
                  "A,B,C, JSON {\"input\": [names]}, or @FILE; they become the version's column names, which "
                  "managed agents are given")
    _client_flags(reg)
    reg.set_defaults(func=register_command)

    lister = actions.add_parser("list", help="list registered versions",
                                description="List registered model versions (of NAME, or of every model).")
    lister.add_argument("name", nargs="?", metavar="NAME", help="only this model")
    _client_flags(lister)
    lister.set_defaults(func=list_command, json_list="versions")

    show = actions.add_parser("show", help="show one version: lineage, metrics, gate checks",
                              description="Show a model version (default: the newest) with its schema, data "
                                          "lineage, holdout metrics and every gate check.")
    show.add_argument("name", metavar="NAME", help="model name")
    show.add_argument("version", nargs="?", type=int, default=0, metavar="VERSION",
                      help="version number (default: the newest)")
    _client_flags(show)
    show.set_defaults(func=show_command)

    run = actions.add_parser("gate", help="run a version's evaluation gate again",
                             description="Run the evaluation gate on a stored version again and store the result; "
                                         "exit 1 when it fails.")
    run.add_argument("name", metavar="NAME", help="model name")
    run.add_argument("version", type=int, metavar="VERSION", help="version number")
    _client_flags(run)
    run.set_defaults(func=gate_command)

    stage = actions.add_parser("stage", help="move a version between candidate and staging",
                               description="Set a version's stage to staging (from candidate) or back to candidate. "
                                           "Production is reached only with 'models promote' and an approval.")
    stage.add_argument("name", metavar="NAME", help="model name")
    stage.add_argument("version", type=int, metavar="VERSION", help="version number")
    stage.add_argument("stage", choices=("candidate", "staging"), metavar="STAGE", help="candidate or staging")
    stage.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(stage)
    stage.set_defaults(func=stage_command)

    promote = actions.add_parser(
        "promote", help="request that a version become production (another approver must approve)",
        description="Open a request to make VERSION the production version of NAME. It takes effect when a "
                    "different person with the approver role runs 'outrider approve ID'; the previous production "
                    "version is then archived. A version whose evaluation gate failed cannot be requested, unless "
                    "an admin passes --override-gate with a written reason.")
    promote.add_argument("name", metavar="NAME", help="model name")
    promote.add_argument("version", type=int, metavar="VERSION", help="version number")
    promote.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    promote.add_argument("--override-gate", metavar="REASON", default="",
                         help="admins only: request although the gate failed, saying why (audited)")
    _client_flags(promote)
    promote.set_defaults(func=promote_command)

    retire = actions.add_parser(
        "retire", help="retire an archived version for good",
        description="Retire archived VERSION of NAME: it can never be promoted, served or rolled back to again. "
                    "Its record and audit trail stay forever; its artifact file is removed after the collector's "
                    "--retired-artifact-retention period.")
    retire.add_argument("name", metavar="NAME", help="model name")
    retire.add_argument("version", type=int, metavar="VERSION", help="version number (must be archived)")
    retire.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the audit trail)")
    _client_flags(retire)
    retire.set_defaults(func=retire_command)


# ------------------------------------------------------------------ register


def _profile(args: argparse.Namespace, model: bytes) -> Any:
    from google.protobuf.message import DecodeError

    from agent import feature_names
    from agent.errors import InvalidArgument
    from agent.profile import build_profile
    from agent.reference_data import column_names
    from protos import summary_pb2

    if args.feature_names and not args.reference:
        raise UsageError("--feature-names names the columns of --reference DATA: pass --reference too (a --profile "
                         "holds the names it was built with)")
    if args.reference:
        try:
            names = feature_names.parse(args.feature_names) if args.feature_names else None
        except InvalidArgument as exc:
            raise UsageError(str(exc)) from None
        # the reference's labels give the profile the model's performance on it; they are no feature
        label = args.label if args.label and args.label in column_names(args.reference) else None
        try:
            return build_profile(model, args.reference, feature_names=names, label_column=label,
                                 model_name=args.name)
        except InvalidArgument as exc:
            raise UsageError(f"--reference {args.reference}: {exc}") from None
    if args.profile:
        path = Path(args.profile)
        try:
            profile = summary_pb2.ReferenceProfile.FromString(path.read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read --profile {path}: {exc.strerror or exc}") from None
        except DecodeError:
            raise UsageError(f"--profile {path} is not a reference profile; make one with 'outrider profile'") from None
        if not profile.columns:
            raise UsageError(f"--profile {path} is not a reference profile (it has no columns)")
        return profile
    return None


def holdout_metrics(model: bytes, data: str, label: str | None) -> dict[str, float]:
    """The model's accuracy (classifier) or MAE and RMSE (regressor) on labelled data, and the rows counted."""
    from agent.errors import InvalidArgument
    from agent.profile import build_profile

    try:
        perf = build_profile(model, data, label_column=label).performance
    except InvalidArgument as exc:
        raise UsageError(f"--holdout {data}: {exc}") from None
    if not perf.labeled:
        raise UsageError(f"--holdout {data} has no labelled rows; name its label column with --label")
    if perf.classes:
        n = len(perf.classes)
        right = sum(perf.confusion[i * n + i] for i in range(n))
        return {"accuracy": right / perf.labeled, "labeled": float(perf.labeled)}
    return {"mae": perf.abs_error_sum / perf.labeled, "rmse": (perf.sq_error_sum / perf.labeled) ** 0.5,
            "labeled": float(perf.labeled)}


def _chunks(metadata: Any, model: bytes) -> Iterator[Any]:
    from protos import collector_pb2 as pb

    yield pb.RegisterChunk(metadata=metadata)
    for start in range(0, len(model), CHUNK_BYTES):
        yield pb.RegisterChunk(data=model[start:start + CHUNK_BYTES])


def register_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    if args.label and not (args.holdout or args.reference):
        raise UsageError("--label names the label column of --holdout DATA (and --reference DATA): pass them too")
    path = Path(args.file)
    try:
        model = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    if not model:
        raise UsageError(f"--file {path} is empty")
    profile = _profile(args, model)
    metrics = holdout_metrics(model, args.holdout, args.label) if args.holdout else {}
    metadata = pb.RegisterMetadata(name=args.name, metrics_json=json.dumps(metrics) if metrics else "",
                                   sha256=hashlib.sha256(model).hexdigest(), size=len(model))
    if profile is not None:
        metadata.profile.CopyFrom(profile)
    reply = _ask(args, "RegisterModel", _chunks(metadata, model))
    if args.json:
        print_json(_plain(reply))
        return 0
    print(f"registered {reply.name} version {reply.version} (sha256 {reply.sha256}, {reply.size} bytes)")
    _print_gate(reply)
    return 0


# ------------------------------------------------------------------ list, show, gate


def _plain(version: Any) -> dict[str, Any]:
    """A version as JSON with its JSON fields parsed."""
    out = plain(version)
    for field, key in (("schema_json", "schema"), ("metrics_json", "metrics"), ("gate_json", "gate")):
        text = out.pop(field, "")
        out[key] = json.loads(text) if text else None
    out["feature_names"] = {name: list(columns.names) for name, columns in version.feature_names.items()}
    return out


def _metrics(text: str) -> str:
    metrics = json.loads(text or "{}")
    shown = [f"{k} {v:.4g}" for k, v in metrics.items() if k != "labeled"]
    return ", ".join(shown) or "-"


def _gate_state(v: Any) -> str:
    return "not run" if not v.gate_json else "passed" if v.gate_passed else "FAILED"


def list_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    page = _ask_pages(args, "ListModels", pb.ListModelsRequest(name=args.name or ""), "versions")
    if args.json:
        print_json(listing("versions", [_plain(v) for v in page.items], page.next_page_token))
        return 0
    if not page.items:
        print("no model versions registered" + (f" for {args.name}" if args.name else ""))
        return 0
    now = time.time_ns()
    print(table(["MODEL", "VERSION", "SHA256", "GATE", "STAGE", "METRICS", "REFERENCE", "BY", "REGISTERED"],
                [[v.name, v.version, v.sha256[:12], _gate_state(v), v.stage or "-", _metrics(v.metrics_json),
                  f"{v.data_name or 'profile'} ({v.data_rows} rows)" if v.has_profile else "-", v.registered_by,
                  age(v.registered_unix_nano, now)] for v in page.items]))
    return 0


def _print_gate(v: Any) -> None:
    if not v.gate_json:
        print("gate: not run")
        return
    gate = json.loads(v.gate_json)
    against = f" (baseline: version {gate['baseline_version']})" if gate.get("baseline_version") else ""
    print(f"gate: {'passed' if v.gate_passed else 'FAILED'}{against}")
    for check in gate["checks"]:
        print(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['name']}: {check['detail']}")


def show_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "ShowModel", pb.ModelVersionRequest(name=args.name, version=args.version))
    if args.json:
        print_json(_plain(reply))
        return 0
    _print_version(reply)
    return 0


def _print_version(v: Any) -> None:
    schema = json.loads(v.schema_json or "{}")

    def args(side: str) -> str:
        return ", ".join(f"{a['name']} {a['type']}[{', '.join('N' if d is None else str(d) for d in a['shape'])}]"
                         for a in schema.get(side, []))

    print(f"{v.name} version {v.version}")
    print(f"  stage:      {v.stage or '-'}" + (f" (since {age(v.stage_unix_nano, time.time_ns())})"
                                              if v.stage_unix_nano else ""))
    print(f"  sha256:     {v.sha256} ({v.size} bytes)")
    print(f"  registered: by {v.registered_by}, {age(v.registered_unix_nano, time.time_ns())}")
    print(f"  inputs:     {args('inputs')}")
    print(f"  outputs:    {args('outputs')}")
    names = v.feature_names
    for name, columns in names.items():
        print(f"  columns of {name}: {', '.join(columns.names)}")
    if not names:
        print("  columns:    no names registered (agents name them by the model's metadata, else <input>[i])")
    print("  reference:  " + (f"{v.data_name} (sha256 {v.data_sha256}, {v.data_rows} rows)"
                               if v.has_profile else "none"))
    print(f"  metrics:    {_metrics(v.metrics_json)}")
    if v.retired_unix_nano:
        print(f"  retired:    {age(v.retired_unix_nano, time.time_ns())}: {v.retire_reason}"
              + ("; artifact removed" if v.artifact_removed_unix_nano else ""))
    _print_gate(v)


def gate_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "RunGate", pb.ModelVersionRequest(name=args.name, version=args.version))
    if args.json:
        print_json(_plain(reply))
    else:
        _print_gate(reply)
    if reply.gate_passed:
        return 0
    say(f"outrider: error: the evaluation gate of {reply.name} version {reply.version} failed; fix the model, or an "
        "admin may promote it with --override-gate REASON")
    return EXIT_FAILED


# ------------------------------------------------------------------ stage, promote


def stage_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "SetStage", pb.SetStageRequest(name=args.name, version=args.version, stage=args.stage,
                                                       reason=args.reason))
    if args.json:
        print_json(_plain(reply))
        return 0
    print(f"{reply.name} version {reply.version} is now {reply.stage}")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "RequestPromotion", pb.PromotionRequest(name=args.name, version=args.version,
                                                                reason=args.reason,
                                                                override_gate_reason=args.override_gate))
    if args.json:
        print_json(plain(reply))
        return 0
    print(f"promotion of {reply.model_name} version {reply.version} to production requested: approval {reply.id} "
          f"is pending; another approver runs: outrider approve {reply.id}")
    if reply.gate_override_reason:
        print(f"  the failed evaluation gate was overridden: {reply.gate_override_reason}")
    return 0


def retire_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "RetireModel", pb.RetireRequest(name=args.name, version=args.version, reason=args.reason))
    if args.json:
        print_json(_plain(reply))
        return 0
    print(f"{reply.name} version {reply.version} is now retired: it can never be promoted or served again")
    return 0
