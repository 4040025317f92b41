"""What ``agent.proxy_relay`` does differently for gRPC and for REST: how it follows a connection, names and
bounds its calls, turns them into the monitor's decoders, and answers when the upstream cannot be reached.

The relay itself (pumps, queue, connections, watchdog) is the same for both; it holds one of these.
"""
from __future__ import annotations

import json
import socket
import zlib
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf.message import DecodeError

from agent.errors import OutriderError
from agent.h1tap import Http1Tap, RestCall
from agent.h2tap import Tap, TappedCall, first_message
from agent.proxy import CallCounts, Decoder, ObservedCall
from agent.proxy_grpc import INFER_METHOD, STREAM_METHODS, infer_decoder
from agent.proxy_rest import rest_decoder, route
from protos import open_inference_pb2 as pb

REFUSE_SECONDS = 10.0  # how long a refused client may take to send its calls before the connection closes
READ_BYTES = 64 * 1024
REFUSE_MESSAGE_BYTES = 4 << 20  # of a refused ModelInfer call's message: read for its model's name, never decoded past
OIP_PREFIX = INFER_METHOD.rsplit("/", 1)[0] + "/"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# grpc-message is percent-encoded: everything printable but '%' goes as it is (gRPC's HTTP/2 spec)
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class RelayProtocol(Protocol):
    """One protocol the relay speaks."""

    upstream_flag: str
    greets: bool  # the server speaks first, at once (HTTP/2's SETTINGS): silence after connecting is a hang

    def tap(self, max_message_bytes: int) -> Tap | Http1Tap: ...

    def bounded(self, method: str) -> bool: ...

    def label(self, method: str) -> str: ...

    def decoders(self, calls: Sequence[Any], counts: CallCounts, model_name: str,
                 code: str | None = None) -> list[Decoder]: ...

    def refuse(self, client: socket.socket, message: str, counts: CallCounts) -> list[Decoder]: ...


class Grpc:
    """OIP over gRPC: HTTP/2 followed by ``agent.h2tap``."""

    upstream_flag = "--upstream"
    greets = True

    def tap(self, max_message_bytes: int) -> Tap:
        return Tap(max_message_bytes=max_message_bytes)

    def bounded(self, method: str) -> bool:
        """A unary OIP call waits at most the upstream timeout; streams live as long as their clients."""
        return method.startswith(OIP_PREFIX) and method not in STREAM_METHODS

    def label(self, method: str) -> str:
        """``outrider_proxy_calls{method}``: the method's name, as the gRPC front counts it."""
        return method.rsplit("/", 1)[-1]

    def decoders(self, calls: Sequence[TappedCall], counts: CallCounts, model_name: str,
                 code: str | None = None) -> list[Decoder]:
        """Each call counted by method and status (or as ``code``: the relay's verdict on calls the upstream never
        answered); the monitor's decoders of the ModelInfer calls, a failed one an error in the windows."""
        found: list[Decoder] = []
        for call in calls:
            counts.count(self.label(call.method),
                         code or CODE_NAMES.get(call.status, "CANCELLED" if call.status == -1 else "UNKNOWN"))
            if call.method != INFER_METHOD or call.request is None:
                continue
            try:
                request = pb.ModelInferRequest.FromString(call.request)
            except DecodeError:  # the upstream said what was wrong with it; nothing to summarise
                continue
            if call.status == 0 and call.reply is None:
                found.append(undecodable("a reply without a message"))
                continue
            found.append(infer_decoder(request, call.reply if call.status == 0 else None, call.latency_ns, request.id))
        return found

    def refuse(self, client: socket.socket, message: str, counts: CallCounts) -> list[Decoder]:
        """Every call on ``client`` answered UNAVAILABLE with ``message``, then GOAWAY: a fresh connection for the
        next calls, to an upstream that may be back by then. A ModelInfer call is answered once its message is
        in, so that it can be told which model failed: its decoder is returned (an error in the windows)."""
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        connection.initiate_connection()
        infers: dict[int, tuple[str, bytearray]] = {}  # ModelInfer streams still sending: grpc-encoding, message
        failed: list[Decoder] = []
        answered = 0

        def answer(stream_id: int, path: str) -> None:
            nonlocal answered
            connection.send_headers(stream_id, [
                (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"),
                ("grpc-message", quote(message, safe=_MESSAGE_SAFE))], end_stream=True)
            counts.count(self.label(path), "UNREACHABLE")
            answered += 1

        try:
            client.settimeout(REFUSE_SECONDS)
            client.sendall(connection.data_to_send())
            while not answered:
                data = client.recv(READ_BYTES)
                if not data:
                    break
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        path = headers.get(":path", "")
                        if path == INFER_METHOD and event.stream_ended is None:
                            infers[event.stream_id] = (headers.get("grpc-encoding", ""), bytearray())
                        else:
                            answer(event.stream_id, path)
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id in infers:
                            body = infers[event.stream_id][1]
                            body += event.data[:max(0, REFUSE_MESSAGE_BYTES - len(body))]
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in infers:
                        encoding, body = infers.pop(event.stream_id)
                        answer(event.stream_id, INFER_METHOD)
                        failed += _failed_infer(first_message(body, encoding))
                    elif isinstance(event, h2.events.StreamReset):
                        infers.pop(event.stream_id, None)
                if answered:
                    connection.close_connection()
                client.sendall(connection.data_to_send())
            _close_after_reading(client)
        except (OSError, h2.exceptions.ProtocolError, zlib.error):
            client.close()
        return failed


class Rest:
    """OIP over HTTP/REST: HTTP/1.1 followed by ``agent.h1tap``."""

    upstream_flag = "--upstream-http"
    greets = False  # an HTTP/1.1 server says nothing until asked

    def tap(self, max_message_bytes: int) -> Http1Tap:
        return Http1Tap(max_message_bytes=max_message_bytes)

    def bounded(self, method: str) -> bool:
        return True  # OIP over REST has no streams

    def label(self, method: str) -> str:
        """``outrider_proxy_calls{method}`` of a request target: the OIP method's name, as the REST front counts it."""
        return route(method.split("?", 1)[0].strip("/").split("/"))[0]

    def decoders(self, calls: Sequence[RestCall], counts: CallCounts, model_name: str,
                 code: str | None = None) -> list[Decoder]:
        """Each call counted by route and HTTP status (or as ``code``, as ``Grpc.decoders``); the monitor's
        decoders of the infer calls."""
        found: list[Decoder] = []
        for call in calls:
            method, model, action = route(call.path.split("?", 1)[0].strip("/").split("/"))
            counts.count(method, code or str(call.status))
            if action != "infer" or call.method != "POST":
                continue
            if call.request is None or (call.status == 200 and call.reply is None):
                found.append(undecodable("a body over --max-message-mb passed through unsummarised"))
                continue
            found.append(rest_decoder(model, call.request, call.request_length, call.status, call.reply,
                                      call.reply_length, call.latency_ns, "", model == model_name))
        return found

    def refuse(self, client: socket.socket, message: str, counts: CallCounts) -> list[Decoder]:
        """The first request on ``client`` answered 503 ``{"error": message}``, then the connection closed; an
        infer call's decoder is returned (an error in the windows of the model its path names)."""
        body = json.dumps({"error": message}).encode()
        head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        try:
            client.settimeout(REFUSE_SECONDS)
            seen = b""
            while b"\r\n\r\n" not in seen and len(seen) < READ_BYTES:  # the request's head, then the answer
                data = client.recv(READ_BYTES)
                if not data:
                    client.close()
                    return []
                seen += data
            parts = seen.split(b" ", 2)
            verb, target = (parts[0], parts[1].decode("latin-1")) if len(parts) == 3 else (b"", "")
            counts.count(self.label(target), "UNREACHABLE")
            client.sendall(head + body)
            _close_after_reading(client)
        except OSError:
            client.close()
            return []
        _, model, action = route(target.split("?", 1)[0].strip("/").split("/"))
        failed = ObservedCall(model, "", "", [], None, 0)
        return [lambda: failed] if action == "infer" and verb == b"POST" else []


PROTOCOLS: dict[str, RelayProtocol] = {"grpc": Grpc(), "rest": Rest()}


def _failed_infer(message: bytes | None) -> list[Decoder]:
    """The decoder of a ModelInfer call the upstream never saw (none when its message cannot be read)."""
    try:
        request = pb.ModelInferRequest.FromString(message) if message is not None else None
    except DecodeError:
        return []
    return [] if request is None else [infer_decoder(request, None, 0, request.id)]


def undecodable(why: str) -> Decoder:
    def decode() -> Any:
        raise OutriderError(why)

    return decode


def _close_after_reading(client: socket.socket) -> None:
    """Close once the client has closed too: closing with unread bytes resets the connection, and the client
    could lose the answer."""
    try:
        client.shutdown(socket.SHUT_WR)
        while client.recv(READ_BYTES):
            pass
    except OSError:
        pass
    finally:
        client.close()
