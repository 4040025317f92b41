"""Failed logins per client address: a few a minute, then the address waits (HTTP 429).

Tokens are long and random, so this is not what keeps them secret; it keeps a
script from turning the login form into a token-guessing loop that fills the
log and the audit trail's counters, and answers it cheaply. Memory is bounded:
at most ``max_clients`` addresses are remembered, the least recently seen
forgotten first. IPv6 clients count per /64 network, since one host commonly
holds a whole /64.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

FAILED_LOGINS = 5  # per client address and WINDOW_SECONDS
WINDOW_SECONDS = 60.0
MAX_CLIENTS = 10_000


def client_key(address: str) -> str:
    """The throttled unit: an IPv4 address, or an IPv6 address's /64 network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    def __init__(self, limit: int = FAILED_LOGINS, window: float = WINDOW_SECONDS, *,
                 max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.max_clients, self._clock = limit, window, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # oldest seen first
        self._lock = threading.Lock()

    def wait(self, address: str) -> float:
        """Seconds before ``address`` may try a token again (0: now)."""
        with self._lock:
            times = self._failures.get(client_key(address))
            if times is None or len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window - self._clock())

    def failed(self, address: str) -> None:
        """``address`` tried a token that is not in the auth file."""
        key, now = client_key(address), self._clock()
        with self._lock:
            times = self._failures.pop(key, None) or deque(maxlen=self.limit)
            times.append(now)  # the oldest falls out: only the last `limit` failures matter
            self._failures[key] = times
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)
