"""Reading gRPC calls off a copy of an HTTP/2 connection's bytes: what ``agent.proxy_relay`` relays.

The relay passes a connection's bytes on unchanged and, off the request path, feeds a copy of each
chunk to a ``Tap`` in the order it came, each direction on its own: the client's bytes (the
connection preface, then frames) and the server's (frames). The tap follows the frames far enough
to give back every gRPC call that completes: its method, the request message, the reply message or
the status the server answered with, and the time between the request's first bytes and the
answer's last. Flow control, settings, pings and priorities are the two ends' business.

Header blocks are decoded by hpack (python-hyper's, what h2 is built on). Frames are cut here: the
tap needs four types and three flags of RFC 9113's fixed 9-byte header, and hyperframe's frame
objects cost a third of the tap's time (~20 of 62 µs a call). A block that leaves HPACK's table as
it found it (the usual case once a client's headers are in the table) decodes the same while the
table stays so; such blocks are kept, keyed by the table's generation, and not decoded again.

HPACK keeps a table per direction that every header block updates, so a tap that misses a chunk
cannot read what follows; the relay then stops feeding that connection (``broken``) and counts it.
What a tap holds is bounded: a stream whose messages pass ``max_message_bytes`` is followed no
further (its call is not given back), and the tap holds at most ``max_streams`` open streams.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from urllib.parse import unquote

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
MAX_HEADER_LIST = 1 << 20  # the decoded size of one header block the tap accepts (gRPC's default limit is 8-16 KiB)
MAX_STREAMS = 1024
MAX_CACHED_BLOCKS = 256  # decoded header blocks kept per direction
DATA, HEADERS, RST_STREAM, CONTINUATION = 0x0, 0x1, 0x3, 0x9  # frame types the tap reads
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20


class TapError(Exception):
    """The bytes are not HTTP/2 as the tap can follow it: the connection is observed no further."""


@dataclass
class TappedCall:
    """One gRPC call as it crossed the connection."""

    method: str                 # the request's :path, e.g. /inference.GRPCInferenceService/ModelInfer
    request: bytes | None       # the first request message (None: none, or it could not be read)
    reply: bytes | None         # the first reply message (None: none)
    status: int                 # gRPC status code the server answered (-1: the stream was reset)
    message: str                # grpc-message
    latency_ns: int


@dataclass
class _Stream:
    method: str = ""
    started_ns: int = 0
    encoding: str = ""          # grpc-encoding of the request
    reply_encoding: str = ""
    request: bytearray = field(default_factory=bytearray)
    reply: bytearray = field(default_factory=bytearray)
    status: int | None = None
    message: str = ""
    too_big: bool = False


class _Side:
    """One direction's bytes: frames are cut from ``buffer`` as they complete."""

    def __init__(self, preface: bool) -> None:
        self.buffer = bytearray()
        self.preface = preface  # the client's side starts with the connection preface
        self.decoder = hpack.Decoder()
        # The encoder on the other end announces table size changes inline (RFC 7541 6.3); the ceiling is
        # the receiver's SETTINGS, which the tap has no need to check.
        self.decoder.max_allowed_table_size = 1 << 32
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.block: bytearray | None = None  # a header block awaiting CONTINUATION frames
        self.block_stream = 0
        self.block_end = False
        self.generation = 0  # bumped whenever a block changes the decoder's table
        self.cache: dict[bytes, dict[str, str]] = {}  # blocks that left the table unchanged, this generation

    def headers(self, block: bytes) -> dict[str, str]:
        """A header block decoded; every block goes through the decoder unless one like it left the table as it was."""
        known = self.cache.get(block)
        if known is not None:
            return known
        table = self.decoder.header_table
        before = (len(table.dynamic_entries), table.maxsize, table.dynamic_entries[0] if table.dynamic_entries else None)
        headers = dict(self.decoder.decode(block, raw=False))
        after = (len(table.dynamic_entries), table.maxsize, table.dynamic_entries[0] if table.dynamic_entries else None)
        # an insertion puts a new tuple at the head (compared by identity); a size update changes the size, and
        # the entries when it evicts some
        if after[:2] != before[:2] or after[2] is not before[2]:
            self.generation += 1
            self.cache.clear()
        elif len(self.cache) < MAX_CACHED_BLOCKS:
            self.cache[block] = headers
        return headers


class Tap:
    """One connection, both directions; feed each chunk in order, get the calls that completed."""

    def __init__(self, *, max_message_bytes: int = 64 << 20, max_streams: int = MAX_STREAMS) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_streams = max_streams
        self.broken = False  # a chunk was missed or the bytes could not be followed: nothing more is read
        self.skipped = 0     # calls not given back: too big to follow, or beyond max_streams
        self._client = _Side(preface=True)
        self._server = _Side(preface=False)
        self._streams: dict[int, _Stream] = {}

    def client(self, chunk: bytes, now_ns: int) -> list[TappedCall]:
        """Bytes the client sent (received at ``now_ns``)."""
        return self._feed(self._client, chunk, now_ns, True)

    def server(self, chunk: bytes, now_ns: int) -> list[TappedCall]:
        """Bytes the server sent (received at ``now_ns``)."""
        return self._feed(self._server, chunk, now_ns, False)

    def pending(self) -> list[tuple[int, str, int]]:
        """(stream, method, started_ns) of the calls sent and not yet answered."""
        return [(sid, s.method, s.started_ns) for sid, s in list(self._streams.items()) if s.status is None]

    def abandon(self, now_ns: int) -> list[TappedCall]:
        """The calls sent and never answered (the connection ended first), as calls that failed UNAVAILABLE."""
        calls = [TappedCall(s.method, None if s.too_big else first_message(s.request, s.encoding), None, 14,
                            "the connection ended before the call was answered", now_ns - s.started_ns)
                 for s in self._streams.values() if s.status is None]
        self._streams.clear()
        return calls

    def _feed(self, side: _Side, chunk: bytes, now_ns: int, from_client: bool) -> list[TappedCall]:
        if self.broken:
            return []
        side.buffer += chunk
        done: list[TappedCall] = []
        try:
            if side.preface:
                if len(side.buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(side.buffer)):
                        raise TapError("the client did not open with HTTP/2's connection preface")
                    return done
                if not side.buffer.startswith(PREFACE):
                    raise TapError("the client did not open with HTTP/2's connection preface")
                del side.buffer[:len(PREFACE)]
                side.preface = False
            buffer, at, size = side.buffer, 0, len(side.buffer)
            while size - at >= FRAME_HEADER:
                length = int.from_bytes(buffer[at:at + 3], "big")
                end = at + FRAME_HEADER + length
                if end > size:
                    break
                kind, flags = buffer[at + 3], buffer[at + 4]
                if kind in (DATA, HEADERS, RST_STREAM, CONTINUATION):
                    stream_id = int.from_bytes(buffer[at + 5:at + 9], "big") & 0x7FFFFFFF
                    call = self._frame(side, kind, flags, stream_id, bytes(buffer[at + FRAME_HEADER:end]), now_ns,
                                       from_client)
                    if call is not None:
                        done.append(call)
                at = end
            del buffer[:at]
        except (TapError, hpack.HPACKError, ValueError, IndexError, UnicodeDecodeError) as exc:
            self.broken = True
            self._streams.clear()
            raise TapError(str(exc) or type(exc).__name__) from None
        return done

    def _frame(self, side: _Side, kind: int, flags: int, stream_id: int, payload: bytes, now_ns: int,
               from_client: bool) -> TappedCall | None:
        if kind in (DATA, HEADERS) and flags & PADDED:
            payload = payload[1:len(payload) - payload[0]] if payload else b""
        if kind == HEADERS:
            side.block, side.block_stream = bytearray(payload[5:] if flags & PRIORITY else payload), stream_id
            side.block_end = bool(flags & END_STREAM)
            if not flags & END_HEADERS:
                return None
        elif kind == CONTINUATION:
            if side.block is None or stream_id != side.block_stream:
                raise TapError("a CONTINUATION frame that continues no header block")
            side.block += payload
            if not flags & END_HEADERS:
                return None
        elif kind == DATA:
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.too_big:
                body = stream.request if from_client else stream.reply
                if len(body) + len(payload) > self.max_message_bytes + 5:
                    stream.too_big = True
                    body.clear()
                else:
                    body += payload
            if flags & END_STREAM and not from_client and stream is not None:
                return self._close(stream_id, now_ns)  # a reply without trailers: not gRPC's way; kept
            return None
        else:  # RST_STREAM
            stream = self._streams.pop(stream_id, None)
            if stream is not None and stream.method:
                code = int.from_bytes(payload[:4], "big")
                return TappedCall(stream.method, None, None, -1, f"stream reset (HTTP/2 error {code})",
                                  now_ns - stream.started_ns)
            return None
        block, stream_id, end = bytes(side.block), side.block_stream, side.block_end
        side.block = None
        headers = side.headers(block)  # every block: the table must follow them all
        if from_client:
            if stream_id not in self._streams:
                if len(self._streams) >= self.max_streams:
                    self.skipped += 1
                    return None
                self._streams[stream_id] = _Stream(method=headers.get(":path", ""), started_ns=now_ns,
                                                   encoding=headers.get("grpc-encoding", ""))
            return None
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        if "grpc-status" in headers:  # trailers, or a trailers-only answer
            try:
                stream.status = int(headers["grpc-status"])
            except ValueError:
                stream.status = 2  # UNKNOWN, as a client would read it
            message = headers.get("grpc-message", "")
            stream.message = unquote(message) if "%" in message else message
        elif ":status" in headers:
            stream.reply_encoding = headers.get("grpc-encoding", "")
            if headers[":status"] != "200":
                stream.status, stream.message = 14, f"HTTP status {headers[':status']}"
        if end:
            return self._close(stream_id, now_ns)
        return None

    def _close(self, stream_id: int, now_ns: int) -> TappedCall | None:
        stream = self._streams.pop(stream_id)
        if stream.too_big:
            self.skipped += 1
            return None
        return TappedCall(stream.method, first_message(stream.request, stream.encoding),
                          first_message(stream.reply, stream.reply_encoding),
                          stream.status if stream.status is not None else 2, stream.message,
                          now_ns - stream.started_ns)


def first_message(body: bytearray, encoding: str) -> bytes | None:
    """The first gRPC length-prefixed message of a stream's DATA (unary calls carry one)."""
    if len(body) < 5:
        return None
    size = int.from_bytes(body[1:5], "big")
    if len(body) < 5 + size:
        return None
    payload = bytes(body[5:5 + size])
    if body[0]:  # compressed, as grpc-encoding says
        if encoding == "gzip":
            return zlib.decompress(payload, wbits=31)
        if encoding == "deflate":
            return zlib.decompress(payload)
        return None
    return payload
