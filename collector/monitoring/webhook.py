"""Alert notifications: JSON POSTs to an operator's webhook, signed and retried.

Sending happens on one background thread fed by a bounded queue, so the
evaluation loop never waits for a slow receiver; a full queue drops the
oldest event and counts it. Each body is signed with HMAC-SHA256 of the raw
bytes under a shared secret, sent as ``X-Outrider-Signature: sha256=<hex>``
(the GitHub convention receivers already know how to check); the signed body
carries ``sent_at``, so a replayed request is detectable. Failures (network, 5xx, 429) are retried with
exponential backoff and jitter; a 4xx other than 429 is not retried.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Outrider-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(sign(secret, body), header)


@dataclass
class WebhookStats:
    sent: int = 0
    failed: int = 0      # gave up after the last attempt
    retried: int = 0
    dropped: int = 0     # evicted from a full queue
    last_error: str = ""
    by_status: dict[int, int] = field(default_factory=dict)


class Webhook:
    """POSTs events to ``url``; ``notify`` never blocks and never raises."""

    def __init__(self, url: str, secret: str = "", *, attempts: int = 5, timeout: float = 5.0,
                 initial_backoff: float = 1.0, max_backoff: float = 60.0, queue_max: int = 1000) -> None:
        self.url, self.secret = url, secret
        self.attempts, self.timeout = attempts, timeout
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.stats = WebhookStats()
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_max)
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="outrider-webhook", daemon=True)
        self._thread.start()

    def notify(self, event: dict[str, Any]) -> None:
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                self.stats.dropped += 1  # deque drops the oldest on append
            self._queue.append(event)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                event = self._queue.popleft()
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps({**event, "sent_at": time.time()}, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "outrider-collector"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        backoff = self.initial_backoff
        for attempt in range(1, self.attempts + 1):
            retry = self._post(body, headers)
            if retry is None:
                self.stats.sent += 1
                return
            if not retry or attempt == self.attempts:
                break
            self.stats.retried += 1
            with self._wake:  # an interruptible sleep: close() cuts it short
                if self._wake.wait_for(lambda: self._closing, backoff * random.uniform(0.8, 1.2)):
                    break
            backoff = min(self.max_backoff, backoff * 2)
        self.stats.failed += 1
        log.warning("webhook %s: gave up on %s event after %d attempt(s): %s", self.url,
                    event.get("event", "?"), attempt, self.stats.last_error)

    def _post(self, body: bytes, headers: dict[str, str]) -> bool | None:
        """None: delivered. True: worth retrying. False: the receiver refused it for good."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                self._count(reply.status)
                return None
        except urllib.error.HTTPError as exc:
            self._count(exc.code)
            self.stats.last_error = f"HTTP {exc.code}"
            return exc.code == 429 or exc.code >= 500
        except (OSError, ValueError) as exc:  # refused, timeout, DNS, bad URL
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            return True

    def _count(self, status: int) -> None:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued until ``timeout``, then stop (retry waits are cut short)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._wake.wait_for(lambda: not self._queue, max(0.0, deadline - time.monotonic()))
            self._closing = True
            self._wake.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
