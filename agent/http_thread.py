"""uvicorn on a thread of our process, on a socket we bound: the agent's REST endpoint and the
collector's web page start it the same way.

The socket is bound by the caller, so a bad address fails there with OSError and port 0 becomes a
concrete port; certificate errors surface here, in the caller's thread, before anything listens.
"""
from __future__ import annotations

import concurrent.futures
import logging
import socket
import ssl
import threading
import time
from typing import Any

import uvicorn

START_SECONDS = 30.0  # a hang guard: uvicorn starts in well under a second


def tls_options(tls: Any) -> dict[str, Any]:
    """uvicorn's TLS settings for our TLSFiles (None: plaintext). ``ssl_ciphers=""`` keeps OpenSSL's
    defaults rather than uvicorn's "TLSv1" list."""
    if tls is None:
        return {}
    return dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key), ssl_ciphers="",
                ssl_ca_certs=str(tls.client_ca) if tls.client_ca else None,
                ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE)


def start(app: Any, sock: socket.socket, pool: concurrent.futures.Executor, *, what: str, thread_name: str,
          tls: Any = None, **config: Any) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve ``app`` on ``sock`` from a daemon thread; returns once it accepts. ``what`` names the endpoint in
    errors ("the web page on HOST:PORT"); ``config``: more ``uvicorn.Config`` settings. On failure the
    socket is closed, ``pool`` shut down and OSError raised."""
    settings = uvicorn.Config(app, loop="asyncio", log_config=None, access_log=False, server_header=False,
                              timeout_graceful_shutdown=5, **tls_options(tls), **config)
    try:
        settings.load()
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        pool.shutdown()
        raise OSError(f"cannot serve {what} over TLS: {exc}") from None
    # uvicorn's info lines speak of a server process ("Started server process [pid]"); here it is a thread,
    # and the caller says where it serves. Its warnings still show.
    if logging.getLogger("uvicorn.error").level == logging.NOTSET:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=thread_name, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            sock.close()
            pool.shutdown()
            raise OSError(f"{what} did not start; the log says why")
        time.sleep(0.01)
    return server, thread
