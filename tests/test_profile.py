"""Reference profiles: the same columns the agent builds, from files; attached through a real collector."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix

from agent import examples, sketches
from agent.errors import InvalidArgument
from agent.profile import build_profile
from agent.session import MonitoredSession
from agent.sketches import joint
from collector.api.server import CollectorServer, serve_collector
from collector.base.auth import AuthConfig
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
N = 3000
OPERATOR_TOKEN = "operator-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
AUTH_TOML = f"""
[[operator]]
name = "olga"
token = "{OPERATOR_TOKEN}"
role = "operator"

[[operator]]
name = "vera"
token = "{VIEWER_TOKEN}"
role = "viewer"
"""


# ------------------------------------------------------------------ helpers


def agent_window(model: Path, feeds: list[dict[str, np.ndarray]], **kw) -> summary_pb2.WindowSummary:
    """What the agent summarises of this traffic: one window holding every row."""
    session = MonitoredSession(str(model), summarizer="thread", window_seconds=None, **kw)
    for feed in feeds:
        session.run(None, feed)
    session.close()
    (window,) = session.sink.windows
    assert window.dropped_rows == 0
    return window


def assert_same_columns(profile: summary_pb2.ReferenceProfile, window: summary_pb2.WindowSummary) -> None:
    assert [(c.name, c.kind, c.role, c.source) for c in profile.columns] == \
        [(c.name, c.kind, c.role, c.source) for c in window.columns]
    for ours, theirs in zip(profile.columns, window.columns):
        if ours.name == joint.RECONSTRUCTION_ERROR:  # the profile's is over the rows its PCA did not see
            assert ours.count == profile.rows - profile.rows // 2 and theirs.count == window.rows
            continue
        assert (ours.count, ours.missing, ours.infinite) == (theirs.count, theirs.missing, theirs.infinite), ours.name
        if ours.kind == summary_pb2.ColumnSummary.NUMERIC:
            assert ours.mean == pytest.approx(theirs.mean, abs=1e-9), ours.name
            assert (ours.min, ours.max) == (theirs.min, theirs.max), ours.name
            assert sketches.from_proto(ours).k == sketches.REFERENCE_K  # the profile's larger sketch
        else:
            assert sketches.from_proto(ours).frequent_items() == sketches.from_proto(theirs).frequent_items()
    assert profile.rows == window.rows


def batches(feed: dict[str, np.ndarray], size: int = 700) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feed.values())))
    return [{k: v[i:i + size] for k, v in feed.items()} for i in range(0, n, size)]


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        # %.9g round-trips float32 exactly
        cells = [[f"{v:.9g}" if isinstance(v, float) else str(v) for v in row]
                 for row in zip(*(c.tolist() for c in columns.values()))]
        writer.writerows(cells)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lr_columns(x: np.ndarray, y: np.ndarray | None = None, label: str = "y") -> dict[str, np.ndarray]:
    cols = {f"X[{i}]": x[:, i] for i in range(x.shape[1])}
    return {**cols, label: y} if y is not None else cols


# ------------------------------------------------------------------ the profile equals the agent's summary


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv"])
def test_profile_has_the_agents_columns(lr_model: Path, tmp_path: Path, fmt: str) -> None:
    x, y = examples.tabular_data(N, seed=7)
    x[5, 3] = np.nan  # missing values count the same way too
    data = tmp_path / f"ref.{fmt}"
    if fmt == "npy":
        np.save(data, x)
    elif fmt == "npz":
        np.savez(data, X=x)
    else:
        write_csv(data, lr_columns(x))
    profile = build_profile(lr_model, data, batch_rows=1000)
    assert_same_columns(profile, agent_window(lr_model, batches({"X": x}), reference=profile))
    assert profile.rows == N and profile.data_name == data.name and profile.data_sha256 == sha256(data)
    assert profile.model_sha256 == sha256(lr_model) and profile.model_name == "lr"
    assert not profile.HasField("performance")


def test_mixed_inputs_from_a_csv_with_a_string_column(mixed_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    num = rng.standard_normal((N, 3)).astype(np.float32)
    city = rng.choice([*examples.CITIES, "berlin", ""], N)  # an unknown city and missing ones
    data = write_csv(tmp_path / "ref.csv", {"city": city, **{f"num[{i}]": num[:, i] for i in range(3)}})
    profile = build_profile(mixed_model, data)
    window = agent_window(mixed_model, batches({"num": num, "city": city.reshape(-1, 1).astype(object)}),
                          reference=profile)
    assert_same_columns(profile, window)
    (city_col,) = [c for c in profile.columns if c.name == "city"]
    assert city_col.kind == summary_pb2.ColumnSummary.CATEGORICAL and city_col.missing == (city == "").sum()


def test_parquet_when_pyarrow_is_installed(mixed_model: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(8)
    num = rng.standard_normal((500, 3)).astype(np.float32)
    city = rng.choice(examples.CITIES, 500).tolist()
    city[3] = None  # a Parquet null is a missing category
    pq.write_table(pa.table({**{f"num[{i}]": num[:, i] for i in range(3)}, "city": city}), tmp_path / "ref.parquet")
    profile = build_profile(mixed_model, tmp_path / "ref.parquet")
    feed = {"num": num, "city": np.array([c or "" for c in city], dtype=object).reshape(-1, 1)}
    assert_same_columns(profile, agent_window(mixed_model, [feed], reference=profile))


def test_feature_names_name_the_columns_as_they_do_in_the_agent(lr_model: Path, tmp_path: Path) -> None:
    x, _ = examples.tabular_data(500, n_features=20, seed=2)
    names = [f"f{i}" for i in range(20)]
    data = write_csv(tmp_path / "ref.csv", dict(zip(names, x.T)))
    profile = build_profile(lr_model, data, feature_names=names)
    assert_same_columns(profile, agent_window(lr_model, [{"X": x}], feature_names=names, reference=profile))
    with pytest.raises(InvalidArgument, match="3 feature names given for input 'X', which has 20 columns"):
        build_profile(lr_model, data, feature_names=["a", "b", "c"])


# ------------------------------------------------------------------ the data's names name the columns

NAMES = [f"feat_{i}" for i in range(20)]


def test_a_named_header_names_the_columns_by_position(lr_model: Path, tmp_path: Path) -> None:
    """The most common reference: a CSV whose header names the features, and a label column."""
    x, y = examples.tabular_data(600, seed=12)
    data = write_csv(tmp_path / "ref.csv", {"target": y, **dict(zip(NAMES, x.T))})  # label first: excluded
    profile = build_profile(lr_model, data, label_column="target")
    assert {k: list(v.names) for k, v in profile.feature_names.items()} == {"X": NAMES}
    assert [c.name for c in profile.columns][:20] == NAMES and profile.performance.labeled == 600
    # an agent given the same names summarises the traffic into the same columns
    assert_same_columns(profile, agent_window(lr_model, [{"X": x}], feature_names=NAMES, reference=profile))


def test_a_header_with_the_agents_names_is_matched_by_name_in_any_order(lr_model: Path, tmp_path: Path) -> None:
    x, _ = examples.tabular_data(300, seed=13)
    order = [7, 3, *[j for j in range(20) if j not in (7, 3)]]
    data = write_csv(tmp_path / "ref.csv", {f"X[{j}]": x[:, j] for j in order})
    profile = build_profile(lr_model, data)
    assert list(profile.feature_names["X"].names) == [f"X[{i}]" for i in range(20)]  # as the agent names them
    assert_same_columns(profile, agent_window(lr_model, [{"X": x}], reference=profile))


def test_npz_names_the_columns_with_a_feature_names_array(lr_model: Path, mixed_model: Path, tmp_path: Path) -> None:
    x, y = examples.tabular_data(300, seed=14)
    np.savez(tmp_path / "ref.npz", X=x, label=y, feature_names=np.array(NAMES))
    profile = build_profile(lr_model, tmp_path / "ref.npz")
    assert list(profile.feature_names["X"].names) == NAMES and profile.performance.labeled == 300
    assert_same_columns(profile, agent_window(lr_model, [{"X": x}], feature_names=NAMES, reference=profile))
    np.savez(tmp_path / "short.npz", X=x, feature_names=np.array(NAMES[:19]))
    with pytest.raises(InvalidArgument, match="19 feature names for input 'X', but short.npz gives it 20 columns"):
        build_profile(lr_model, tmp_path / "short.npz")
    with pytest.raises(InvalidArgument, match="differ from those ref.npz holds"):
        build_profile(lr_model, tmp_path / "ref.npz", feature_names=[f"f{i}" for i in range(20)])
    # several inputs: one array per input, feature_names.<input>
    num, city = np.zeros((10, 3), np.float32), np.array([["paris"]] * 10)
    np.savez(tmp_path / "mixed.npz", num=num, city=city, **{"feature_names.num": np.array(["a", "b", "c"])})
    profile = build_profile(mixed_model, tmp_path / "mixed.npz")
    assert list(profile.feature_names["num"].names) == ["a", "b", "c"]
    assert list(profile.feature_names["city"].names) == ["city"]
    np.savez(tmp_path / "bad.npz", num=num, city=city, feature_names=np.array(["a", "b", "c"]))
    with pytest.raises(InvalidArgument, match="name them feature_names.<input>"):
        build_profile(mixed_model, tmp_path / "bad.npz")


def test_parquet_column_names_name_the_columns(lr_model: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x, _ = examples.tabular_data(200, seed=15)
    pq.write_table(pa.table(dict(zip(NAMES, x.T))), tmp_path / "ref.parquet")
    profile = build_profile(lr_model, tmp_path / "ref.parquet")
    assert list(profile.feature_names["X"].names) == NAMES


def test_names_that_do_not_fit_say_what_to_change(lr_model: Path, mixed_model: Path, tmp_path: Path) -> None:
    x, _ = examples.tabular_data(100, seed=16)
    named = write_csv(tmp_path / "named.csv", dict(zip(NAMES, x.T)))
    with pytest.raises(InvalidArgument, match=r"missing \[f0, .*the --feature-names given must be the header's"):
        build_profile(lr_model, named, feature_names=[f"f{i}" for i in range(20)])
    narrow = write_csv(tmp_path / "narrow.csv", dict(zip(NAMES[:19], x.T)))
    with pytest.raises(InvalidArgument, match="narrow.csv has 19 columns .* but input 'X' takes 20 columns"):
        build_profile(lr_model, narrow)
    # a feature named like an output column would be summarised twice under one name
    clash = write_csv(tmp_path / "clash.csv", {**dict(zip(NAMES[:19], x.T)), "label": x[:, 19]})
    with pytest.raises(InvalidArgument, match=r"\[label\] would be used twice"):
        build_profile(lr_model, clash)
    # several inputs are matched by name only: positions cannot say which input a column belongs to
    rng = np.random.default_rng(3)
    mixed = write_csv(tmp_path / "mixed.csv", {"town": rng.choice(examples.CITIES, 20),
                                               **{f"n{i}": rng.standard_normal(20) for i in range(3)}})
    with pytest.raises(InvalidArgument, match=r"missing \[num\[0\].*--feature-names '\{\"input\""):
        build_profile(mixed_model, mixed)
    profile = build_profile(mixed_model, mixed, feature_names={"num": ["n0", "n1", "n2"], "city": ["town"]})
    assert [c.name for c in profile.columns][:4] == ["n0", "n1", "n2", "town"]


def test_zipmap_probabilities_are_columns_per_class(lr_zipmap_model: Path, tmp_path: Path) -> None:
    x, _ = examples.tabular_data(800, seed=4)
    np.save(tmp_path / "ref.npy", x)
    profile = build_profile(lr_zipmap_model, tmp_path / "ref.npy")
    assert_same_columns(profile, agent_window(lr_zipmap_model, batches({"X": x}, 300), reference=profile))


# ------------------------------------------------------------------ labels -> performance


def predictions(model: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_labels_give_the_models_accuracy_and_confusion(lr_model: Path, tmp_path: Path, fmt: str) -> None:
    x, y = examples.tabular_data(N, seed=11)
    if fmt == "npz":
        np.savez(tmp_path / "ref.npz", X=x, label=y)
        profile = build_profile(lr_model, tmp_path / "ref.npz", batch_rows=512)
    else:
        data = write_csv(tmp_path / "ref.csv", lr_columns(x, y, label="target"))
        profile = build_profile(lr_model, data, label_column="target", batch_rows=512)
    pred = predictions(lr_model, {"X": x})[0]
    perf = profile.performance
    assert list(perf.classes) == ["0", "1"] and perf.labeled == N and perf.unmatched == 0
    assert np.array(perf.confusion).reshape(2, 2).tolist() == confusion_matrix(y, pred).tolist()
    assert (perf.confusion[0] + perf.confusion[3]) / perf.labeled == accuracy_score(y, pred)


def test_regression_labels_give_error_sums(tmp_path: Path) -> None:
    model = tmp_path / "reg.onnx"
    model.write_bytes(examples.linear_regression(n_features=5))
    x, _ = examples.tabular_data(1000, n_features=5, seed=5)
    y = x.sum(axis=1).astype(np.float64)
    np.savez(tmp_path / "ref.npz", X=x, label=y)
    perf = build_profile(model, tmp_path / "ref.npz").performance
    error = predictions(model, {"X": x})[0].reshape(-1).astype(np.float64) - y
    assert perf.labeled == 1000 and not perf.classes
    assert perf.error_sum == pytest.approx(error.sum())
    assert perf.abs_error_sum == pytest.approx(np.abs(error).sum())
    assert perf.sq_error_sum == pytest.approx((error ** 2).sum())


# ------------------------------------------------------------------ the CLI


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=HANG_GUARD)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_says_which_names_the_columns_got(lr_model: Path, tmp_path: Path) -> None:
    x, y = examples.tabular_data(200, seed=17)
    data = write_csv(tmp_path / "named.csv", {**dict(zip(NAMES, x.T)), "y": y})
    out = tmp_path / "p.pb"
    shown = cli("profile", "--model", str(lr_model), "--data", str(data), "--label", "y", "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    assert f"columns of input X: {', '.join(NAMES)}" in shown.stdout and "--feature-names" in shown.stdout
    # the names, from a file, as an agent would be given them
    (tmp_path / "names.txt").write_text("\n".join(f"f{i}" for i in range(20)) + "\n")
    write_csv(tmp_path / "f.csv", {f"f{i}": x[:, i] for i in range(20)})
    as_json = cli("profile", "--model", str(lr_model), "--data", str(tmp_path / "f.csv"), "--out", str(out),
                  "--feature-names", f"@{tmp_path / 'names.txt'}", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["feature_names"] == {"X": [f"f{i}" for i in range(20)]}


def test_cli_writes_the_profile_and_says_what_it_holds(lr_model: Path, tmp_path: Path) -> None:
    x, y = examples.tabular_data(1000, seed=9)
    data = write_csv(tmp_path / "train.csv", lr_columns(x, y))
    out = tmp_path / "lr.profile.pb"
    result = cli("profile", "--model", str(lr_model), "--data", str(data), "--out", str(out), "--label", "y")
    assert result.returncode == 0, result.stderr
    assert "1000 rows" in result.stdout and sha256(data)[:16] in result.stdout and "accuracy" in result.stdout
    profile = summary_pb2.ReferenceProfile.FromString(out.read_bytes())
    # 20 features, 3 outputs, @reconstruction_error and @confidence
    assert profile.rows == 1000 and len(profile.columns) == 25 and profile.performance.labeled == 1000


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    x, y = examples.tabular_data(50, seed=1)
    np.save(d / "narrow.npy", x[:, :10])
    write_csv(d / "narrow.csv", {f"col{i}": x[:, i] for i in range(19)})
    cols = lr_columns(x)
    cols["X[4]"] = np.array(["oops"] + [str(v) for v in x[1:, 4]])
    write_csv(d / "text.csv", cols)
    write_csv(d / "ok.csv", lr_columns(x))
    np.savez(d / "other.npz", features=x)
    (d / "data.json").write_text("{}")
    (d / "data.parquet").write_bytes(b"PAR1")
    (d / "broken.onnx").write_bytes(b"not a model")
    return d


@pytest.mark.parametrize("case, words", [
    (("--data", "missing.csv"), "does not exist"),
    (("--data", "narrow.npy"), "takes shape [N, 20]"),
    (("--data", "narrow.csv"), "input 'X' takes 20 columns"),
    (("--data", "ok.csv", "--feature-names", ",".join(f"f{i}" for i in range(20))), "missing [f0"),
    (("--data", "ok.csv", "--feature-names", "a,,b"), "name 2 is empty"),
    (("--data", "ok.csv", "--feature-names", "@no-such-names.txt"), "cannot read"),
    (("--data", "ok.csv", "--feature-names", '{"X": ["a"], "Y": ["b"]}'), "the model's inputs are ['X']"),
    (("--data", "text.csv"), "'oops' is not a number"),
    (("--data", "ok.csv", "--label", "y"), "no label column 'y'"),
    (("--data", "other.npz"), "do not match the model's inputs ['X']"),
    (("--data", "data.json"), "is not one of .csv"),
    (("--data", "ok.csv", "--feature-names", "a,b"), "2 feature names given"),
    (("--data", "ok.csv", "--model", "broken.onnx"), "cannot load the model"),
    pytest.param(("--data", "data.parquet"), "needs pyarrow",
                 marks=pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None,
                                          reason="pyarrow is installed")),
])
def test_cli_bad_input_is_one_line_and_exit_2(lr_model: Path, bad_inputs: Path, tmp_path: Path,
                                               case: tuple[str, ...], words: str) -> None:
    args = dict(zip(case[::2], case[1::2]))
    model = str(bad_inputs / args.pop("--model")) if "--model" in args else str(lr_model)
    data = str(bad_inputs / args.pop("--data"))
    out = tmp_path / "p.pb"
    extra = [part for kv in args.items() for part in kv]
    line = one_line_error(cli("profile", "--model", model, "--data", data, "--out", str(out), *extra))
    assert words in line
    assert not out.exists()


# ------------------------------------------------------------------ attaching to the collector


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorServer]:
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML),
                             rollup_interval=3600)
    try:
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def lr_profile(tmp_path_factory: pytest.TempPathFactory) -> summary_pb2.ReferenceProfile:
    d = tmp_path_factory.mktemp("profile")
    (d / "lr.onnx").write_bytes(examples.logistic_regression())
    x, y = examples.tabular_data(500, seed=6)
    np.savez(d / "ref.npz", X=x, label=y)
    return build_profile(d / "lr.onnx", d / "ref.npz")


def attach(server: CollectorServer, profile: summary_pb2.ReferenceProfile, token: str = OPERATOR_TOKEN,
           version: str = "3") -> pb.AttachProfileResponse:
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.OpsServiceStub(channel).AttachProfile(
            pb.AttachProfileRequest(model_name="credit", model_version=version, profile=profile),
            metadata=(("authorization", f"Bearer {token}"),), timeout=HANG_GUARD)


def attach_error(server: CollectorServer, profile: summary_pb2.ReferenceProfile, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        attach(server, profile, **kw)
    return info.value


def test_attach_stores_and_replaces_the_profile(collector: CollectorServer,
                                                lr_profile: summary_pb2.ReferenceProfile) -> None:
    first = attach(collector, lr_profile)
    assert (first.model_name, first.model_version, first.columns, first.replaced) == ("credit", "3", 25, False)
    assert len(first.warnings) == 1 and "could not be checked against its traffic" in first.warnings[0]
    assert collector.store.profile("credit", "3") == lr_profile
    newer = summary_pb2.ReferenceProfile()
    newer.CopyFrom(lr_profile)
    newer.rows, newer.data_name = 499, "other.npz"
    assert attach(collector, newer).replaced is True
    assert collector.store.profile("credit", "3") == newer
    assert collector.store.profile("credit", "4") is None
    assert collector.store.profiles() == [("credit", "3")]


def test_a_bad_profile_is_invalid_argument_and_changes_nothing(collector: CollectorServer,
                                                               lr_profile: summary_pb2.ReferenceProfile) -> None:
    corrupt = summary_pb2.ReferenceProfile()
    corrupt.CopyFrom(lr_profile)
    corrupt.columns[0].kll = b"\x05garbage"
    twice = summary_pb2.ReferenceProfile()
    twice.CopyFrom(lr_profile)
    twice.columns.append(lr_profile.columns[0])
    misnamed = summary_pb2.ReferenceProfile()
    misnamed.CopyFrom(lr_profile)
    misnamed.feature_names["X"].names[3] = "not-a-column"  # the names it would give the agents
    for bad, words in ((corrupt, "X[0]"), (twice, "appears more than once"),
                       (summary_pb2.ReferenceProfile(rows=3), "no columns"),
                       (misnamed, "feature_names of input 'X' (20 names) are not the 20 feature columns")):
        err = attach_error(collector, bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()
    err = attach_error(collector, lr_profile, version="")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_version" in err.details()
    assert collector.store.profiles() == []


def test_a_viewer_may_not_attach(collector: CollectorServer, lr_profile: summary_pb2.ReferenceProfile) -> None:
    err = attach_error(collector, lr_profile, token=VIEWER_TOKEN)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "operator" in err.details()
    assert collector.store.profiles() == []


def test_cli_attach(collector: CollectorServer, lr_profile: summary_pb2.ReferenceProfile, tmp_path: Path) -> None:
    path = tmp_path / "lr.pb"
    path.write_bytes(lr_profile.SerializeToString())
    flags = ("--collector", collector.address, "--token", OPERATOR_TOKEN)
    result = cli("attach", "credit", "7", str(path), *flags)
    assert result.returncode == 0, result.stderr
    assert "credit version 7" in result.stdout and "25 columns" in result.stdout and "500 rows" in result.stdout
    # nothing to check the names against yet (not registered, no traffic): attached, with a warning on stderr
    assert result.stderr.startswith("outrider: warning: credit version 7 is not registered and no agent has")
    assert "replaced" in cli("attach", "credit", "7", str(path), *flags).stdout
    assert collector.store.profile("credit", "7") == lr_profile
    (tmp_path / "junk.pb").write_bytes(b"\xff\xff not a profile")
    assert "not a reference profile" in one_line_error(cli("attach", "credit", "7", str(tmp_path / "junk.pb"), *flags))
    refused = one_line_error(cli("attach", "credit", "7", str(path), "--collector", collector.address,
                                 "--token", VIEWER_TOKEN), 1)
    assert "refused" in refused and "operator" in refused
