"""The alert webhook: signed JSON POSTs to a real HTTP server on loopback, retried on failure."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from collector.monitoring.webhook import SIGNATURE_HEADER, Webhook, verify


class Receiver:
    """An HTTP server on 127.0.0.1:0 answering with the statuses it is given, in order."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(Receiver(list(statuses)))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_events_are_posted_as_signed_json(receiver):
    r = receiver()
    hook = Webhook(r.url, "s3cret")
    hook.notify({"event": "alert.opened", "alert": {"id": 7, "column": "age"}})
    wait_until(lambda: hook.stats.sent == 1)
    hook.close()
    headers, body = r.requests[0]
    assert json.loads(body)["alert"] == {"id": 7, "column": "age"}
    assert verify("s3cret", body, headers[SIGNATURE_HEADER])
    assert not verify("other", body, headers[SIGNATURE_HEADER])


def test_server_errors_are_retried_then_delivered(receiver):
    r = receiver([503, 500, 200])
    hook = Webhook(r.url, "k", initial_backoff=0.01)
    hook.notify({"event": "alert.opened"})
    wait_until(lambda: hook.stats.sent == 1)
    hook.close()
    assert len(r.requests) == 3 and hook.stats.retried == 2 and hook.stats.failed == 0
    assert r.requests[0][1] != b"" and json.loads(r.requests[2][1])["event"] == "alert.opened"


def test_a_client_error_is_not_retried_and_is_counted(receiver):
    r = receiver([400])
    hook = Webhook(r.url, "k", initial_backoff=0.01)
    hook.notify({"event": "alert.opened"})
    wait_until(lambda: hook.stats.failed == 1)
    hook.close()
    assert len(r.requests) == 1 and hook.stats.by_status == {400: 1}


def test_an_unreachable_receiver_never_blocks_notify(receiver):
    r = receiver()
    url = r.url
    r.close()  # nothing listens any more
    hook = Webhook(url, "k", attempts=2, initial_backoff=0.01, queue_max=3)
    for i in range(10):
        hook.notify({"event": "alert.opened", "n": i})  # returns at once, never raises
    wait_until(lambda: hook.stats.failed + hook.stats.dropped >= 10 or hook.stats.failed >= 3)
    hook.close(timeout=2)
    assert hook.stats.sent == 0 and hook.stats.dropped >= 1 and hook.stats.last_error
