"""Memory bounds: a real ``outrider agent serve`` process under hostile request ids and feedback.

What a caller can make the agent keep -- predictions under request ids, labels
of ever new classes -- has byte budgets (``agent.feedback.FeedbackLimits``,
the defaults of ``agent serve``). Here one process, with default budgets and
its summaries in a thread (so everything is in the process measured), gets
hundreds of megabyte-long request ids, tens of thousands of distinct class
labels in one go, enough batched predictions to pass the byte budget, and many
feedback calls; its peak resident memory (VmHWM, read from /proc) must stay
under 256 MB. Before the budgets, the ids alone took it past 400 MB and the
labels past 600 MB. An inference request made while the largest feedback call
runs must still be answered correctly (no timing is asserted).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2_grpc as pb_grpc
from test_agent_cli import ROOT, cli_env, read_line
from test_server import decode, raw_request

BOUND_MB = 256
HANG_GUARD = 120
MB = 1 << 20


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB
    return values


def assert_under_bound(pid: int, after: str, started: dict[str, float]) -> None:
    """Checked after every phase: a process past the bound would only grow in the next one."""
    now = memory_mb(pid)
    assert now["VmHWM"] < BOUND_MB, f"after {after}: {now} (at start: {started})"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=HANG_GUARD).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def agent(lr_model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model), "--model-name", "lr",
         "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--summarizer", "thread", "--window-seconds", "1",
         "--log-level", "warning"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [read_line(proc, HANG_GUARD), read_line(proc, HANG_GUARD)]
    try:
        metrics = next(line.split()[-1] for line in lines if line.startswith("metrics on "))
        address = next(line.strip().rsplit(" ", 1)[1] for line in lines if line.startswith("serving "))
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            yield proc, channel, metrics
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_hostile_ids_and_feedback_stay_under_the_memory_bound(agent, lr_model):
    proc, channel, metrics_url = agent
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    feedback = agent_pb2_grpc.FeedbackServiceStub(channel)
    reference = ort.InferenceSession(str(lr_model))
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 20)).astype(np.float32)
    started = memory_mb(proc.pid)

    # 1. Hundreds of requests with megabyte-long ids: served, not kept.
    for i in range(300):
        reply = infer.ModelInfer(raw_request("lr", {"X": one}, id=f"{i:06d}" + "i" * MB), timeout=HANG_GUARD)
        assert len(reply.id) == MB + 6
    assert_under_bound(proc.pid, "300 requests with 1 MB ids", started)

    # 2. More batched predictions than the byte budget (32 MB by default) holds: the oldest go.
    batch = rng.standard_normal((50_000, 20)).astype(np.float32)
    for i in range(100):
        infer.ModelInfer(raw_request("lr", {"X": batch}, id=f"batch-{i}"), timeout=HANG_GUARD)
    assert_under_bound(proc.pid, "100 predictions of 50,000 rows", started)

    # 3. Tens of thousands of distinct classes for the newest batches, in calls of 10,000 labels (the most
    #    one call takes), then names of 5,000 characters in as large a call as is taken (one larger comes
    #    last); an inference request runs during each call.
    def labels(first: int, count: int, name: str = "class-{}") -> agent_pb2.FeedbackRequest:
        return agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(
            request_id=f"batch-{99 - i // 50_000}", class_label=name.format(i), row=i % 50_000)
            for i in range(first, first + count)])

    answered = []

    def meanwhile() -> None:
        feeds = {"X": rng.standard_normal((3, 20)).astype(np.float32)}
        reply = infer.ModelInfer(raw_request("lr", feeds), timeout=HANG_GUARD)
        answered.append((decode(reply), reference.run(None, feeds)))

    calls = [labels(first, 10_000) for first in range(0, 40_000, 10_000)]
    calls.append(labels(40_000, 1_500, "class-{}-" + "c" * 5000))  # 7.5 MB
    matched = 0
    for request in calls:
        during = threading.Thread(target=meanwhile)
        during.start()
        matched += feedback.Feedback(request, timeout=HANG_GUARD).matched
        during.join(HANG_GUARD)
        assert_under_bound(proc.pid, f"{len(request.labels)} labels", started)
    assert matched == 41_500
    assert len(answered) == len(calls)
    for got, (label, probabilities) in answered:
        np.testing.assert_array_equal(got["label"], label)
        np.testing.assert_array_equal(got["probabilities"], probabilities)

    # 4. Many small feedback calls for ids that were never kept.
    for i in range(300):
        feedback.Feedback(agent_pb2.FeedbackRequest(labels=[
            agent_pb2.Label(request_id=f"{i:06d}" + "i" * 1000, class_label=f"late-{i}")]), timeout=HANG_GUARD)

    # Windows close every second: traffic for a few of them turns the labels into a confusion matrix.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        infer.ModelInfer(raw_request("lr", {"X": one}), timeout=HANG_GUARD)
        time.sleep(0.05)

    assert_under_bound(proc.pid, "many feedback calls and windows", started)
    with pytest.raises(grpc.RpcError) as too_large:  # 10 MB of labels: refused before it is parsed
        feedback.Feedback(labels(50_000, 2_000, "class-{}-" + "c" * 5000), timeout=HANG_GUARD)
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_under_bound(proc.pid, "a feedback call over the size limit", started)
    got = scrape(metrics_url)
    dropped = {reason: got[("outrider_agent_predictions_dropped_total", (("reason", reason),))]
               for reason in ("evicted", "id_too_long")}
    assert dropped["id_too_long"] == 300 and dropped["evicted"] > 0
    assert got[("outrider_agent_predictions_held_bytes", ())] <= 32 * MB
    assert got[("outrider_agent_label_problems_total", (("reason", "other_class"),))] >= 41_500 - 256
    assert got[("outrider_agent_refused_calls_total", (("reason", "too_large"),))] == 1
