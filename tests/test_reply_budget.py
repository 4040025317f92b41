"""Every operators' reply stays within the collector's byte budget; list calls continue with page tokens.

A real collector on loopback over a real SQLite file, with more of everything than one reply may hold
(a small budget keeps the data small); then a real ``collector serve`` process under the case that once
took it from 67 MB to 904 MB (``ListWindows(include_summaries, limit=10000)``: a 181 MB reply).
"""
from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from agent.sketches import NumericSketch
from collector.api.server import CollectorServer, serve_collector
from collector.store import audit, paging
from collector.store.rollup import RetentionPolicy
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2
from test_delivery import exit_code, start

NS = 1_000_000_000
BUDGET = 64 * 1024
HANG_GUARD = 120
T0 = time.time_ns() - 3 * 86400 * NS  # old enough for some windows to be rolled up into minutes


def window(seq: int, end_ns: int, *, columns: int = 2, agent: str = "edge-1") -> summary_pb2.WindowSummary:
    rng = np.random.default_rng(seq)
    cols = []
    for i in range(columns):
        sketch = NumericSketch()
        sketch.update(rng.normal(size=500))
        cols.append(sketch.to_proto(f"x{i}", summary_pb2.ColumnSummary.FEATURE, "X"))
    return summary_pb2.WindowSummary(agent_id=agent, run_id="run-1", seq=seq, model_name="m", model_version="1",
                                     model_sha256="ab" * 32, start_unix_nano=end_ns - NS, end_unix_nano=end_ns,
                                     rows=500, calls=5, columns=cols)


def populate(store: Store) -> None:
    """More windows, rollups, audit rows, alerts, versions, approvals, retraining requests and rollouts
    than one reply of BUDGET bytes holds; several windows share an end time (the cursor's tie-break)."""
    ends = [T0 + (i // 3) * 10 * NS for i in range(240)]  # three windows per end time
    store.submit_windows([window(i, end, columns=4) for i, end in enumerate(ends)]).result()
    store.rollup(T0 + 2200 * NS, RetentionPolicy(raw_seconds=1800))  # the oldest third into minute rollups
    reason = "r" * 1200

    def rows(db) -> None:
        for i in range(200):
            audit.append(db, "alice", "test.entry", f"thing/{i}", model_name="m", reason=reason, now_ns=T0 + i)
            db.execute("INSERT INTO alerts (model_name, model_version, \"column\", kind, state, opened_ns, summary)"
                       " VALUES ('m', '1', ?, 'drift', ?, ?, ?)", [f"x{i}", "open" if i % 2 else "resolved",
                                                                   T0 + i, reason])
            db.execute("INSERT INTO model_versions (name, version, sha256, size, schema, registered_by,"
                       " registered_ns, metrics) VALUES (?, ?, ?, 1, ?, 'alice', ?, '{}')",
                       [f"model-{i % 7}", i, "cd" * 32, json.dumps({"inputs": [reason]}), T0 + i])
            db.execute("INSERT INTO approvals (model, version, requested_by, requested_at, reason, state)"
                       " VALUES ('m', ?, 'alice', ?, ?, ?)", [i, T0 + i, reason, "pending" if i % 2 else "rejected"])
            db.execute("INSERT INTO retraining_requests (model, version, state, opened_by, opened_ns, reason)"
                       " VALUES ('m', ?, ?, 'alice', ?, ?)", [str(i), "open" if i % 2 else "rejected", T0 + i,
                                                               reason])
            rollout = db.execute("INSERT INTO rollouts (model, version, kind, actor, reason, started_ns)"
                                 " VALUES ('m', ?, 'promote', 'bob', ?, ?) RETURNING id",
                                 [i, reason, T0 + i]).fetchone()[0]
            db.execute("INSERT INTO rollout_acks (rollout_id, agent_id, run_id, state) VALUES (?, 'edge-1', 'r', 'ok')",
                       [rollout])

    store.write(rows)


@dataclass
class Site:
    running: CollectorServer
    ops: pb_grpc.OpsServiceStub


@pytest.fixture(scope="module")
def site(module_db_url: str) -> Iterator[Site]:
    store = Store(module_db_url)
    populate(store)
    running = serve_collector(store.path, "127.0.0.1:0", store=store, drift_interval=0, rollup_interval=3600,
                              max_reply_bytes=BUDGET)
    channel = grpc.insecure_channel(running.address)
    try:
        yield Site(running, pb_grpc.OpsServiceStub(channel))
    finally:
        channel.close()
        running.stop(grace=0)


@dataclass
class Listing:
    method: str
    request: Callable[[], object]
    field: str
    key: Callable[[object], object]  # what identifies one item


LISTINGS = [
    Listing("ListWindows", lambda: pb.ListWindowsRequest(model_name="m", include_summaries=True, limit=10_000),
            "windows", lambda w: (w.level, w.agent_id, w.seq, w.start_unix_nano)),
    Listing("ListAudit", lambda: pb.ListAuditRequest(limit=10_000), "entries", lambda e: e.id),
    Listing("ListAlerts", lambda: pb.ListAlertsRequest(include_resolved=True, limit=10_000), "alerts", lambda a: a.id),
    Listing("ListModels", lambda: pb.ListModelsRequest(), "versions", lambda v: (v.name, v.version)),
    Listing("ListApprovals", lambda: pb.ListApprovalsRequest(include_decided=True), "approvals", lambda a: a.id),
    Listing("ListRetraining", lambda: pb.ListRetrainingRequest(include_closed=True), "requests", lambda r: r.id),
    Listing("ListRollouts", lambda: pb.ListRolloutsRequest(limit=1000), "rollouts", lambda r: r.id),
]


def follow(ops: pb_grpc.OpsServiceStub, listing: Listing, between: Callable[[int], None] = lambda page: None
           ) -> list[list]:
    """Every page of a listing, following next_page_token; ``between(n)`` runs after page n."""
    pages, token = [], ""
    while True:
        request = listing.request()
        request.page_token = token
        reply = getattr(ops, listing.method)(request, timeout=HANG_GUARD)
        assert reply.ByteSize() <= BUDGET, (listing.method, len(pages), reply.ByteSize())
        pages.append(list(getattr(reply, listing.field)))
        token = reply.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "the tokens never end"
        between(len(pages))


@pytest.mark.parametrize("listing", LISTINGS, ids=lambda x: x.method)
def test_every_list_reply_stays_within_the_budget_and_the_tokens_return_every_item_once(site, listing):
    pages = follow(site.ops, listing)
    items = [listing.key(i) for page in pages for i in page]
    assert len(items) == len(set(items)), "an item came twice"
    store = site.running.store
    expected = {
        "ListWindows": lambda: [listing.key(w) for w in store.windows("m", limit=10_000, include_summaries=True)],
        "ListAudit": lambda: [e.id for e in audit.entries(store.read(), limit=10_000)],
        "ListAlerts": lambda: [r[0] for r in store.read().execute("SELECT id FROM alerts ORDER BY id DESC")],
        "ListModels": lambda: [tuple(r) for r in store.read().execute(
            "SELECT name, version FROM model_versions ORDER BY name, version")],
        "ListApprovals": lambda: [r[0] for r in store.read().execute("SELECT id FROM approvals ORDER BY id")],
        "ListRetraining": lambda: [r[0] for r in store.read().execute(
            "SELECT id FROM retraining_requests ORDER BY id")],
        "ListRollouts": lambda: [r[0] for r in store.read().execute("SELECT id FROM rollouts ORDER BY id DESC")],
    }[listing.method]()
    assert items == expected  # all of them, in the listing's order
    assert len(pages) >= 3  # the old single reply was several budgets' worth
    if listing.method == "ListWindows":
        assert {w.level for page in pages for w in page} == {"raw", "minute"}


def test_the_first_page_and_a_limit_give_tokens_too(site):
    first = site.ops.ListWindows(pb.ListWindowsRequest(model_name="m", limit=7), timeout=HANG_GUARD)
    assert len(first.windows) == 7 and first.next_page_token  # the limit stopped it, more is left
    rest = site.ops.ListWindows(pb.ListWindowsRequest(model_name="m", limit=10_000, page_token=first.next_page_token),
                                timeout=HANG_GUARD)
    assert rest.next_page_token == ""  # scalars only: the rest fits
    assert len(first.windows) + len(rest.windows) == len(site.running.store.windows("m", limit=10_000))
    everything = site.ops.ListAudit(pb.ListAuditRequest(model_name="nothing"), timeout=HANG_GUARD)
    assert (list(everything.entries), everything.next_page_token) == ([], "")


def test_windows_arriving_between_pages_are_neither_skipped_nor_repeated(tmp_path):
    store = Store(tmp_path / "c.db")
    store.submit_windows([window(i, T0 + i * 10 * NS) for i in range(60)]).result()
    running = serve_collector(store.path, "127.0.0.1:0", store=store, drift_interval=0, rollup_interval=3600,
                              max_reply_bytes=BUDGET)
    try:
        with grpc.insecure_channel(running.address) as channel:
            ops = pb_grpc.OpsServiceStub(channel)
            listing = LISTINGS[0]

            def arrive(page: int) -> None:  # newer than the first page and older than everything (a late spool)
                store.submit_windows([window(1000 + page, T0 + 10_000 * NS, agent="late"),
                                      window(2000 + page, T0 - page * NS, agent="late")]).result()

            pages = follow(ops, listing, between=arrive)
        seen = [(w.agent_id, w.seq) for page in pages for w in page]
        assert len(seen) == len(set(seen))
        assert {s for a, s in seen if a == "edge-1"} == set(range(60))
        late = {s for a, s in seen if a == "late"}
        assert late == {2000 + p for p in range(1, len(pages))}  # the older ones, behind the cursor; no newer
    finally:
        running.stop(grace=0)


def _forged(*value) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(value)).encode()).decode().rstrip("=")


@pytest.mark.parametrize("token", ["not a token", "x" * 5000, _forged("elsewhere", 5), _forged("windows", 1, 2),
                                   _forged("windows", "a", 1, 2), _forged("windows", 2**70, 1, 2),
                                   _forged("windows", True, 1, 2), base64.b64encode(b"\xff\xfe").decode()],
                         ids=["garbage", "long", "other-listing", "short", "string", "huge", "bool", "not-utf8"])
def test_a_malformed_page_token_is_invalid_argument(site, token):
    for listing in LISTINGS:
        request = listing.request()
        request.page_token = token
        with pytest.raises(grpc.RpcError) as info:
            getattr(site.ops, listing.method)(request, timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, listing.method
        assert "page_token" in info.value.details() and token not in info.value.details()


def test_status_and_drift_history_stay_within_the_budget(tmp_path):
    store = Store(tmp_path / "c.db")
    for run in range(400):  # runs are never deleted: a long-lived fleet's list only grows
        store.record_hello(pb.Hello(agent_id=f"agent-{run % 40:02d}", run_id=f"run-{run:04d}", host="h" * 200,
                                    model_name="m", model_version="1", started_unix_nano=T0 + run * NS), T0 + run * NS)

    def evaluations(db) -> None:
        columns = [pb.ColumnDrift(name=f"x{i}", reason="r" * 100) for i in range(30)]
        for i in range(100):
            body = pb.DriftEvaluation(id=i + 1, model_name="m", model_version="1", evaluated_unix_nano=T0 + i,
                                      evaluated=True, columns=columns).SerializeToString()
            db.execute("INSERT INTO evaluations (id, model_name, model_version, evaluated_ns, evaluated,"
                       " drifted_columns, body) VALUES (?, 'm', '1', ?, 1, 0, ?)", [i + 1, T0 + i, body])
        db.execute("INSERT INTO profiles (model_name, model_version, body, data_sha256, rows, attached_ns,"
                   " attached_by) VALUES ('m', '1', x'', '', 0, 0, 'test')")

    store.write(evaluations)
    running = serve_collector(store.path, "127.0.0.1:0", store=store, drift_interval=0, rollup_interval=3600,
                              max_reply_bytes=BUDGET)
    try:
        with grpc.insecure_channel(running.address) as channel:
            ops = pb_grpc.OpsServiceStub(channel)
            status = ops.Status(pb.StatusRequest(), timeout=HANG_GUARD)
            assert status.ByteSize() <= BUDGET and 40 <= len(status.agents) < 400
            latest = {a.agent_id: a.run_id for a in status.agents if a.restarts == max(
                b.restarts for b in status.agents if b.agent_id == a.agent_id)}
            assert latest == {f"agent-{i:02d}": f"run-{360 + i:04d}" for i in range(40)}  # every agent's newest run
            keys = [(a.agent_id, a.restarts) for a in status.agents]
            assert keys == sorted(keys)
            drift = ops.Drift(pb.DriftRequest(model_name="m", history=1000), timeout=HANG_GUARD)
            assert drift.ByteSize() <= BUDGET and 10 < len(drift.history) < 99
            assert drift.latest[0].evaluated_unix_nano == T0 + 99
            assert [e.evaluated_unix_nano for e in drift.history] == [T0 + 98 - i for i in range(len(drift.history))]
    finally:
        running.stop(grace=0)


def test_paging_core():
    rows = [((i,), pb.AuditEntry(id=i, reason="r" * 100)) for i in range(100)]
    page = paging.take(iter(rows), "audit", max_bytes=paging.RESERVED_BYTES + 1000)
    assert len(page.items) == 9 and paging.cursor("audit", page.next_token, (int,)) == (8,)
    huge = pb.AuditEntry(id=1, reason="r" * 10_000)
    assert paging.take([((1,), huge)], "audit", max_bytes=100).items == [huge]  # progress, always
    assert paging.take([((1,), huge)], "audit", max_bytes=100, at_least_one=False).items == []
    assert paging.take(iter(rows), "audit", max_bytes=10**9, limit=100) == paging.Page([r for _, r in rows], "")
    assert paging.cursor("audit", "", (int,)) is None


# ------------------------------------------------------------------ a real collector process


def _vm_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.slow
def test_a_collector_process_answers_the_181_mb_listing_in_pages_with_bounded_memory(tmp_path):
    """10,000 windows of ~18 KB: one unpaged reply was 174 MiB and took `collector serve` to a VmHWM of
    955 MB (measured on the code before paging). Now every reply is within --max-reply-mb."""
    db = tmp_path / "c.db"
    template = [window(i, 0, columns=15) for i in range(5)]  # ~18 KB each: 181 MB in all
    with Store(db) as store:
        for first in range(0, 10_000, 500):
            batch = []
            for seq in range(first, first + 500):
                w = summary_pb2.WindowSummary()
                w.CopyFrom(template[seq % 5])
                w.seq, w.end_unix_nano, w.start_unix_nano = seq, T0 + seq * NS, T0 + seq * NS - NS
                batch.append(w)
            store.submit_windows(batch).result()
    size, budget = template[0].ByteSize(), 2 * 1024 * 1024
    assert 10_000 * size > 50 * paging.DEFAULT_MAX_REPLY_BYTES
    proc, address = start(["collector", "serve", "--db", str(db), "--listen", "127.0.0.1:0", "--drift-interval", "0",
                           "--max-reply-mb", "2"], r"collector listening on (\S+)")
    try:
        before = _vm_kb(proc.pid, "VmHWM")
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # so an oversized reply would arrive
        with grpc.insecure_channel(address, options=options) as channel:
            ops = pb_grpc.OpsServiceStub(channel)
            seen, token, pages = set(), "", 0
            while True:
                reply = ops.ListWindows(pb.ListWindowsRequest(model_name="m", include_summaries=True, limit=10_000,
                                                              page_token=token), timeout=HANG_GUARD)
                assert reply.ByteSize() <= budget
                pages += 1
                seen.update(w.seq for w in reply.windows)
                token = reply.next_page_token
                if not token:
                    break
        assert seen == set(range(10_000)) and pages >= 50
        peak = _vm_kb(proc.pid, "VmHWM")
        # generous: a few replies in flight and SQLite's cache, far below the 955 MB of one unpaged reply
        assert peak - before < 200 * 1024, (before, peak)
    finally:
        proc.terminate()
        assert exit_code(proc) == 0
