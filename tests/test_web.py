"""The collector's read-only web page over HTTP: a real collector in-process with a registered model,
windows that drift, evaluations, alerts, approvals, a retraining request, a shadow and rollouts."""
from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import grpc
import numpy as np
import pytest

from agent import examples, sketches
from agent.errors import InvalidArgument
from agent.profile import build_profile
from collector.api.server import CollectorServer, serve_collector
from collector.base.auth import AuthConfig, AuthInterceptor, TLSFiles
from collector.monitoring import alerts
from collector.monitoring.drift import DriftConfig
from collector.monitoring.evaluation import DriftEvaluator
from collector.store import audit
from collector.store.store import Store
from collector.web import WebAccess, WebServer, serve_web, throttle
from collector.web.guard import guarded
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2
from test_collector_cli import cli, one_line_error
from test_auth import pki  # noqa: F401  (a self-signed certificate, a CA and a client certificate)
from test_delivery import start, wait_until

NS = 1_000_000_000
HANG_GUARD = 60
CS = summary_pb2.ColumnSummary
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789", "vera": "vera-token-0123456789"}
ROLES = {"alice": "operator", "bob": "approver", "vera": "viewer"}
AGENT_TOKEN = "edge-agent-token-0123456789"
AUTH_TOML = "".join(f'[[operator]]\nname = "{n}"\ntoken = "{t}"\nrole = "{ROLES[n]}"\n\n' for n, t in TOKENS.items()) \
    + f'[[agent]]\nname = "edge-1"\ntoken = "{AGENT_TOKEN}"\n'
MODEL = examples.logistic_regression()
EVIL_MODEL = '<script>alert("model")</script>'
EVIL_FEATURE = '<img src=x onerror=alert(1)>'
MODEL_PLOTS = ("heatmap", "series-0", "pred-0", "performance", "shadow-diff", "shadow-latency")


def profile_of(n: int, seed: int, shift: float = 0.0, flip: bool = False, name: str = "churn"
               ) -> summary_pb2.ReferenceProfile:
    """Features, predictions and realised performance of MODEL on ``n`` rows (X[3] shifted by ``shift``
    sigma; ``flip``: the world changed and every label is the opposite)."""
    x, y = examples.tabular_data(n, seed=seed)
    x[:, 3] += shift
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "data.npz", X=x, label=1 - y if flip else y)
        return build_profile(MODEL, Path(d) / "data.npz", model_name=name)


def rename(columns, old: str, new: str) -> list[CS]:
    out = [CS.FromString(c.SerializeToString()) for c in columns]
    for c in out:
        if c.name == old:
            c.name = new
    return out


def numeric(name: str, values: np.ndarray) -> CS:
    s = sketches.NumericSketch()
    s.update(values)
    return s.to_proto(name, CS.PREDICTION, "test")


@dataclass
class Site:
    running: CollectorServer
    url: str
    ops: pb_grpc.OpsServiceStub


def call(ops: pb_grpc.OpsServiceStub, who: str, method: str, request):
    return getattr(ops, method)(request, metadata=(("authorization", f"Bearer {TOKENS[who]}"),), timeout=60)


def register(ops: pb_grpc.OpsServiceStub, profile: summary_pb2.ReferenceProfile) -> pb.ModelVersion:
    import hashlib
    import json

    meta = pb.RegisterMetadata(name="churn", metrics_json=json.dumps({"accuracy": 0.9}),
                               sha256=hashlib.sha256(MODEL).hexdigest(), size=len(MODEL))
    meta.profile.CopyFrom(profile)
    return call(ops, "alice", "RegisterModel", iter([pb.RegisterChunk(metadata=meta), pb.RegisterChunk(data=MODEL)]))


def populate(running: CollectorServer, ops: pb_grpc.OpsServiceStub) -> None:
    """Everything the pages show, made through the collector's own paths where they exist."""
    store = running.store
    reference = profile_of(5000, seed=1)
    v1 = register(ops, reference)
    register(ops, reference)
    approval = call(ops, "alice", "RequestPromotion", pb.PromotionRequest(name="churn", version=v1.version,
                                                                          reason="first release"))
    call(ops, "bob", "Approve", pb.DecisionRequest(id=approval.id, reason="looks good"))
    call(ops, "alice", "RequestPromotion", pb.PromotionRequest(name="churn", version=2, reason="next release"))

    now = time.time_ns()
    clock = [now - 10 * 60 * NS]
    evaluator = DriftEvaluator(store, clock=lambda: clock[0], retrain_after_evaluations=2)
    policy = DriftConfig(span_seconds=150, consecutive=2)
    for name in ("churn", EVIL_MODEL):
        store.write(lambda db, name=name: alerts.set_config(db, name, policy, "test", now))
    store.record_hello(pb.Hello(agent_id="edge-1", run_id="run-1", host="web-1", model_name="churn",
                                model_version="1", agent_version="0.1.0"), now)
    evil_reference = rename(reference.columns, "X[3]", EVIL_FEATURE)
    store.attach_profile(EVIL_MODEL, "1", summary_pb2.ReferenceProfile(columns=evil_reference, rows=5000),
                         "test", now)
    rng = np.random.default_rng(3)
    for i in range(8):
        drifted = i >= 3
        current = profile_of(1000, seed=100 + i, shift=1.5 if drifted else 0.0, flip=drifted)
        start_ns, clock[0] = clock[0], clock[0] + 60 * NS
        for seq, name in enumerate(("churn", EVIL_MODEL)):
            w = summary_pb2.WindowSummary(
                agent_id="edge-1" if seq == 0 else "evil", run_id="run-1", seq=i, model_name=name, model_version="1",
                start_unix_nano=start_ns, end_unix_nano=clock[0], rows=1000, calls=100,
                columns=current.columns if seq == 0 else rename(current.columns, "X[3]", EVIL_FEATURE),
                performance=current.performance, latency=numeric("latency_us", rng.lognormal(4, 0.3, 100)))
            if i >= 5 and seq == 0:
                w.shadow.CopyFrom(summary_pb2.ShadowSummary(
                    model_version="2", calls=50, rows=500, label_rows=500, label_agree=480,
                    score_diff=numeric("score_diff", rng.normal(0.01, 0.05, 500)),
                    latency=numeric("latency_us", rng.lognormal(4.2, 0.3, 50))))
            store.submit_windows([w]).result()
            evaluator.evaluate(name, "1")

    def governance(db):
        db.execute("INSERT INTO shadows (model, version, share, started_ns, actor)"
                   " VALUES ('churn', 2, 0.25, ?, 'alice')", [now])
        for kind, version, before in (("promote", 1, 0), ("rollback", 1, 2)):
            rid = db.execute("INSERT INTO rollouts (model, version, kind, actor, reason, started_ns, from_version,"
                             " share) VALUES ('churn', ?, ?, 'bob', ?, ?, ?, 0) RETURNING id",
                             [version, kind, f"{kind} test", now, before]).fetchone()[0]
            db.execute("INSERT INTO rollout_acks (rollout_id, agent_id, run_id, state, error, at_ns)"
                       " VALUES (?, 'edge-1', 'run-1', 'ok', '', ?)", [rid, now])

    store.write(governance)


@pytest.fixture(scope="module")
def site(module_db_url: str) -> Iterator[Site]:
    running = serve_collector(module_db_url, "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), drift_interval=0,
                              rollup_interval=3600, http="127.0.0.1:0")
    channel = grpc.insecure_channel(running.address)
    try:
        ops = pb_grpc.OpsServiceStub(channel)
        populate(running, ops)
        yield Site(running, running.web.url.rstrip("/"), ops)
    finally:
        channel.close()
        running.stop(grace=0)


def fetch(site_url: str, path: str, *, token: str = "", cookie: str = "", method: str = "GET", form: dict | None = None,
          host: str = "") -> tuple[int, dict[str, str], str]:
    address = site_url.split("://", 1)[1].rstrip("/")
    conn = http.client.HTTPConnection(address, timeout=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if cookie:
        headers["Cookie"] = cookie
    if host:
        headers["Host"] = host
    body = urlencode(form).encode() if form is not None else None
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read().decode("utf-8")
    finally:
        conn.close()


def svg_ids(page: str) -> set[str]:
    return set(re.findall(r'<svg id="([^"]+)"', page))


# ------------------------------------------------------------------ pages


@pytest.mark.parametrize("path, words, plots", [
    ("/", ["churn", "edge-1", "0.1.0", "X[3]"], {"fleet-rows"}),
    ("/models/churn", ["production", "schema", "v2 → v1", "version 2 shadows production"], set(MODEL_PLOTS)),
    ("/approvals", ["next release", "pending", "rollback test"], set()),
    ("/retraining", ["open", "churn"], set()),
    ("/audit", ["model.register", "approval"], set()),
])
def test_every_page_loads_for_a_viewer_with_its_plots(site, path, words, plots):
    status, headers, page = fetch(site.url, path, token=TOKENS["vera"])
    assert status == 200, page
    assert headers["content-type"].startswith("text/html")
    assert "script-src" not in headers["content-security-policy"] and "default-src 'none'" in \
        headers["content-security-policy"]
    for word in words:
        assert word in page, word
    assert plots <= svg_ids(page), svg_ids(page)
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_model_page_shows_the_drifted_feature_and_one_series_per_column(site):
    _, _, page = fetch(site.url, "/models/churn", token=TOKENS["vera"])
    series = {i for i in svg_ids(page) if i.startswith("series-")}
    assert len(series) == 25  # 20 features, label, two probabilities, @reconstruction_error, @confidence
    heat = page[page.index('<svg id="heatmap"'):]
    heat = heat[:heat.index("</svg>")]
    assert "X[3] at" in heat and "drifted" in heat
    assert re.search(r"X\[0\] at [^<]*— drifted", heat) is None  # only the shifted column is marked
    assert "accuracy" in page and "open" in page


def test_versions_and_audit_are_paged(site):
    status, _, page = fetch(site.url, "/models/churn?version=1", token=TOKENS["vera"])
    assert status == 200 and "<strong>1</strong>" in page
    _, _, first = fetch(site.url, "/audit", token=TOKENS["vera"])
    ids = [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", first)]
    assert ids == sorted(ids, reverse=True) and ids
    status, _, older = fetch(site.url, f"/audit?before={ids[0]}&model=churn", token=TOKENS["vera"])
    assert status == 200 and f"<td>{ids[0]}</td>" not in older
    assert fetch(site.url, "/audit?before=x", token=TOKENS["vera"])[0] == 400
    assert fetch(site.url, "/models/nope", token=TOKENS["vera"])[0] == 404
    assert fetch(site.url, "/nothing-here", token=TOKENS["vera"])[0] == 404


def test_names_are_escaped_everywhere(site):
    path = "/models/" + quote(EVIL_MODEL, safe="")
    status, _, page = fetch(site.url, path, token=TOKENS["vera"])
    assert status == 200
    assert "heatmap" in svg_ids(page)
    for raw in (EVIL_MODEL, EVIL_FEATURE):
        assert raw not in page
    assert "&lt;script&gt;alert(&quot;model&quot;)&lt;/script&gt;" in page and "&lt;img src=x" in page
    _, _, fleet = fetch(site.url, "/", token=TOKENS["vera"])
    assert EVIL_MODEL not in fleet and "&lt;script&gt;" in fleet and quote(EVIL_MODEL, safe="") in fleet


# ------------------------------------------------------------------ who may read


def failures(site: Site) -> int:
    return site.running.auth.failures


def test_without_a_token_the_page_asks_to_log_in_and_health_is_open(site):
    status, headers, page = fetch(site.url, "/models/churn")
    assert status == 401 and 'name="token"' in page and headers["www-authenticate"].startswith("Bearer")
    assert "X[3]" not in page
    assert fetch(site.url, "/healthz")[:1] == (200,)


def test_bad_tokens_are_refused_counted_and_audited(site):
    before = failures(site)
    assert fetch(site.url, "/", token="not-a-token-at-all-0000")[0] == 401
    status, _, page = fetch(site.url, "/", token=AGENT_TOKEN)  # an agent is not an operator
    assert status == 403 and "operator token" in page
    assert failures(site) == before + 2

    def audited() -> list[pb.AuditEntry]:
        return [e for e in audit.entries(site.running.store.read(), limit=50)
                if e.action == "auth.failure" and e.object == "http/"]

    site.running.auth.on_refusal.flush(everything=True)  # at the end of the minute, or now
    wait_until(lambda: len(audited()) >= 2, timeout=60, what="the refusals in the audit trail")
    assert "edge-1" in {e.actor for e in audited()}
    assert {json.loads(e.after)["peer"] for e in audited()} == {"127.0.0.1"}


def test_login_sets_a_strict_http_only_cookie_that_opens_the_pages(site):
    before = failures(site)
    status, _, page = fetch(site.url, "/login", method="POST", form={"token": "wrong-token-0123456789", "next": "/"})
    assert status == 401 and "unknown token" in page and failures(site) == before + 1
    status, headers, _ = fetch(site.url, "/login", method="POST",
                               form={"token": TOKENS["vera"], "next": "/approvals"})
    assert status == 303 and headers["location"] == "/approvals"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKENS["vera"] not in cookie
    session = cookie.split(";", 1)[0]
    status, _, page = fetch(site.url, "/approvals", cookie=session)
    assert status == 200 and "vera" in page
    evil_next = fetch(site.url, "/login", method="POST", form={"token": TOKENS["vera"], "next": "//evil.example/"})
    assert evil_next[1]["location"] == "/"  # never sent elsewhere
    assert fetch(site.url, "/logout", method="POST", cookie=session)[0] == 303
    assert fetch(site.url, "/approvals", cookie=session)[0] == 401


def test_the_page_only_reads(site):
    for method in ("POST", "PUT", "DELETE"):
        status, _, _ = fetch(site.url, "/models/churn", token=TOKENS["alice"], method=method, form={})
        assert status in (405, 501)
    before = [e.id for e in audit.entries(site.running.store.read(), limit=5)]
    for path in ("/", "/models/churn", "/approvals", "/retraining", "/audit"):
        fetch(site.url, path, token=TOKENS["alice"])
    assert [e.id for e in audit.entries(site.running.store.read(), limit=5)] == before


# ------------------------------------------------------------------ without an auth file


def test_without_an_auth_file_loopback_only(tmp_path):
    with pytest.raises(InvalidArgument, match="without an auth file"):
        serve_collector(tmp_path / "a.db", "127.0.0.1:0", drift_interval=0, http="0.0.0.0:0")
    running = serve_collector(tmp_path / "b.db", "127.0.0.1:0", drift_interval=0, http="127.0.0.1:0")
    try:
        status, _, page = fetch(running.web.url, "/")
        assert status == 200 and "no models yet" in page
        assert fetch(running.web.url, "/", host="rebound.example.com")[0] == 403  # DNS rebinding
        assert fetch(running.web.url, "/", host=f"localhost:{running.web.port}")[0] == 200
    finally:
        running.stop(grace=0)


def test_cli_serves_the_page_and_refuses_a_public_one_without_tokens(tmp_path):
    line = one_line_error(cli("collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
                              "--http", "0.0.0.0:8080"))
    assert "refusing to serve the web page on 0.0.0.0:8080 without --auth-file" in line
    assert "nowhere" in one_line_error(cli("collector", "serve", "--http", "nowhere"))
    proc, url = start(["collector", "serve", "--db", str(tmp_path / "d.db"), "--listen", "127.0.0.1:0",
                       "--http", "127.0.0.1:0"], r"web page on (\S+)")
    try:
        assert fetch(url.rstrip("/"), "/healthz")[0] == 200
        assert fetch(url.rstrip("/"), "/")[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


# ------------------------------------------------------------------ what callers cannot do to the page


@pytest.mark.parametrize("method, path, form, status", [
    ("GET", "/audit?before=99999999999999999999999", None, 400),  # past SQLite's INTEGER: was a 500
    ("GET", "/audit?before=-1", None, 400),
    ("GET", "/audit?before=%D9%A1%D9%A2", None, 400),  # Arabic-Indic digits: isdigit() says yes
    ("GET", "/audit?model=%00%ff&before=9223372036854775807", None, 200),
    ("GET", "/models/%00", None, 404),
    ("GET", "/models/%ff%fe", None, 404),
    ("GET", "/models/" + "m" * 20_000, None, 404),
    ("GET", "/models/churn?version=%00", None, 200),
    ("GET", "/models/churn?version=" + "9" * 30, None, 200),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", None, 404),
    ("OPTIONS", "/", None, 405),
    ("PATCH", "/login", {}, 405),
    ("POST", "/login", {"token": TOKENS["vera"], "next": "/\r\nSet-Cookie: x=1"}, 303),
    ("POST", "/login", {"token": TOKENS["vera"], "next": "/caf\u00e9"}, 303),
    ("POST", "/login", {"token": "t" * 9000}, 413),
])
def test_no_request_makes_the_page_fail(site, method, path, form, status):
    got, headers, page = fetch(site.url, path, token=TOKENS["vera"], method=method, form=form)
    assert got == status, page
    if status == 303:
        assert headers["location"] == "/"  # not a header of the caller's making


def test_head_answers_the_headers_of_get_without_a_body(site):
    address = site.url.split("://", 1)[1]
    conn = http.client.HTTPConnection(address, timeout=60)
    try:
        conn.request("HEAD", "/approvals", headers={"Authorization": f"Bearer {TOKENS['vera']}"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read() == b""
        assert int(reply.getheader("content-length")) > 1000 and "default-src 'none'" in reply.getheader(
            "content-security-policy")
    finally:
        conn.close()


def _connect(url: str) -> socket.socket:
    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=HANG_GUARD)


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's timeout is the hang guard)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_idle_and_half_sent_connections_do_not_starve_the_page(site):
    """The old page (8 workers, each held by a connection that sent nothing) answered 503 to everyone
    with 64 such connections open, and took 8.5 s with 8."""
    idle = [_connect(site.url) for _ in range(100)]
    try:
        for i, sock in enumerate(idle):
            if i % 2:  # half of them start a request and stop mid-headers
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ")
        for path in ("/healthz", "/", "/models/churn"):
            status, _, page = fetch(site.url, path, token=TOKENS["vera"])
            assert status == 200, page
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture
def bounded_page(tmp_path) -> Iterator[WebServer]:
    """A page on its own, with bounds short enough to watch them act."""
    with Store(tmp_path / "c.db") as store:
        page = serve_web("127.0.0.1:0", store, WebAccess(None),
                         protocol=guarded(request_seconds=0.5, max_connections=8))
        try:
            yield page
        finally:
            page.stop()


def test_a_client_that_sends_nothing_or_trickles_is_closed(bounded_page):
    silent = _connect(bounded_page.url)
    trickle = _connect(bounded_page.url)
    try:
        assert _read_all(silent).startswith(b"HTTP/1.1 408 ")
        request, answer = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400, b""
        for byte in request:  # one byte at a time, each within the deadline: the request never completes
            try:
                trickle.sendall(bytes([byte]))
            except OSError:  # closed under us
                break
            time.sleep(0.05)
        answer = _read_all(trickle)
        assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""
        assert fetch(bounded_page.url, "/healthz")[0] == 200
    finally:
        silent.close()
        trickle.close()


def test_connections_past_the_bound_get_503_at_once(tmp_path):
    with Store(tmp_path / "c.db") as store:
        page = serve_web("127.0.0.1:0", store, WebAccess(None), protocol=guarded(max_connections=8))
        held = [_connect(page.url) for _ in range(8)]
        try:
            # the server has taken them all (uvicorn's own count of open connections)
            wait_until(lambda: len(page._server.server_state.connections) == 8, timeout=HANG_GUARD,
                       what="8 open connections")
            extra = _connect(page.url)
            assert _read_all(extra).startswith(b"HTTP/1.1 503 ")
            extra.close()
            held.pop().close()
            wait_until(lambda: fetch(page.url, "/healthz")[0] == 200, timeout=HANG_GUARD, what="a free slot")
        finally:
            for sock in held:
                sock.close()
            page.stop()


def test_unknown_tokens_are_throttled_per_address(tmp_path):
    with Store(tmp_path / "c.db") as store:
        interceptor = AuthInterceptor(AuthConfig.from_toml(AUTH_TOML))
        page = serve_web("127.0.0.1:0", store, WebAccess(interceptor.config, interceptor))
        try:
            for i in range(throttle.FAILED_LOGINS):
                status, _, _ = fetch(page.url, "/login", method="POST", form={"token": f"guess-{i:020d}"})
                assert status == 401
            status, headers, body = fetch(page.url, "/login", method="POST", form={"token": TOKENS["vera"]})
            assert status == 429 and 0 < int(headers["retry-after"]) <= 60 and "try again" in body
            assert fetch(page.url, "/", token=TOKENS["vera"])[0] == 429  # the header path too; token not looked at
            assert interceptor.failures == throttle.FAILED_LOGINS + 2
        finally:
            page.stop()


def test_the_throttle_forgets_after_its_window_and_bounds_its_table():
    clock = [0.0]
    limit = throttle.LoginThrottle(limit=2, window=60, max_clients=100, clock=lambda: clock[0])
    limit.failed("10.0.0.1")
    assert limit.wait("10.0.0.1") == 0
    clock[0] = 10.0
    limit.failed("10.0.0.1")
    assert limit.wait("10.0.0.1") == 50.0 and limit.wait("10.0.0.2") == 0
    clock[0] = 61.0
    assert limit.wait("10.0.0.1") == 0  # the first failure left the window
    limit.failed("2001:db8::1")
    limit.failed("2001:db8::2")  # the same /64
    assert limit.wait("2001:db8::99") > 0 and limit.wait("2001:db8:0:1::1") == 0
    for i in range(1000):
        limit.failed(f"10.1.{i // 250}.{i % 250}")
    assert len(limit) == 100


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_page_over_tls(tmp_path, pki, mutual):
    tls = TLSFiles(pki["server_cert"], pki["server_key"], client_ca=pki["ca"] if mutual else None)
    with Store(tmp_path / "c.db") as store:
        page = serve_web("127.0.0.1:0", store, WebAccess(AuthConfig.from_toml(AUTH_TOML)), tls=tls)
        try:
            assert page.url.startswith("https://")
            context = ssl.create_default_context(cafile=str(pki["server_cert"]))
            if mutual:
                context.load_cert_chain(pki["client_cert"], pki["client_key"])
            conn = http.client.HTTPSConnection(page.address, timeout=HANG_GUARD, context=context)
            try:
                conn.request("POST", "/login", body=urlencode({"token": TOKENS["vera"]}),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
                reply = conn.getresponse()
                assert reply.status == 303 and "; Secure" in reply.getheader("set-cookie")
            finally:
                conn.close()
            with pytest.raises(http.client.RemoteDisconnected):  # plain HTTP to a TLS port
                fetch(page.url.replace("https://", "http://"), "/healthz")
            if mutual:
                without = ssl.create_default_context(cafile=str(pki["server_cert"]))
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    conn = http.client.HTTPSConnection(page.address, timeout=HANG_GUARD, context=without)
                    try:
                        conn.request("GET", "/healthz")
                        conn.getresponse()
                    finally:
                        conn.close()
        finally:
            page.stop()


def missing_drift(effect: float) -> pb.ColumnDrift:
    """A column that drifted by its missing rate alone (0 -> 10 %): its distribution barely moved."""
    nan = float("nan")
    return pb.ColumnDrift(name="income", kind=summary_pb2.ColumnSummary.NUMERIC, method="numeric", drifted=True,
                          psi=0.01, ks_d=0.02, ks_p=0.4, wasserstein=0.02, chi2=nan, chi2_p=nan, js=nan,
                          p_adjusted=1e-9, missing_rate=0.1, reference_missing_rate=0.0, missing_p=1e-12,
                          missing_diff=0.1, missing_effect=effect, span_seconds=300,
                          reason="missing 0 % -> 10 % (h 0.644 >= 0.2); missing-rate p_adjusted 1e-09 <= q 0.01")


def test_a_missing_rate_verdict_shows_its_effect_over_the_missing_threshold():
    from collector.monitoring.effect import ratio
    from collector.web.model_page import _verdicts_table

    config = DriftConfig(missing_threshold=0.2)
    assert ratio(missing_drift(0.644), config) == pytest.approx(0.644 / 0.2)  # Cohen's h over its threshold
    assert ratio(missing_drift(0.644), DriftConfig(missing_threshold=0.4)) == pytest.approx(0.644 / 0.4)
    assert ratio(missing_drift(0.0), config) == 2.0  # stored before the field existed: "past it", no figure
    clean = missing_drift(0.1)
    clean.drifted = False
    assert ratio(clean, config) == pytest.approx(0.5)  # the largest effect, the missing rate's included
    untouched = pb.ColumnDrift(name="old", kind=summary_pb2.ColumnSummary.NUMERIC, psi=float("nan"),
                               wasserstein=float("nan"), p_adjusted=float("nan"))
    assert np.isnan(ratio(untouched, config))  # not compared, its unset missing fields read nothing
    latest = pb.DriftEvaluation(model_name="m", model_version="1", evaluated=True, columns=[missing_drift(0.644)])
    row = re.search(r"<tr><td>income</td>.*?</tr>", str(_verdicts_table(latest, config)), re.S).group(0)
    assert "<td>3.22</td>" in row
