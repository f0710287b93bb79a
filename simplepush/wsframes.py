"""RFC 6455 framing for the server side, without I/O.

Why by hand rather than Tornado's WebSocketHandler: Tornado keeps an
IOStream, an HTTP1Connection, a handler and a chain of suspended coroutines
per socket and awaits a future for every piece of every frame. Measured with
simplepush-bench that is most of a device's memory (about 15 KB) and of a
notification's CPU. SimplePush needs little of WebSocket (small text frames,
ping, close), so after the upgrade (http1.py) the socket's transport is
handed to an asyncio Protocol that parses frames with this module. wsproto
and websockets' sans-I/O protocol were measured in its place: as fast
within the noise, but 1.4x the memory per device (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import base64
import hashlib
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA

# Close codes (RFC 6455 7.4.1)
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
SERVER_ERROR = 1011

# Codes a peer may send in a close frame (RFC 6455 7.4.1-7.4.2).
_SENDABLE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

_SHORT = struct.Struct("!BB")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(Exception):
    """The peer broke the protocol: close with this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def encode(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (servers never mask)."""
    length = len(payload)
    if length < 126:
        return _SHORT.pack(0x80 | opcode, length) + payload
    if length < 65536:
        return _SHORT.pack(0x80 | opcode, 126) + _U16.pack(length) + payload
    return _SHORT.pack(0x80 | opcode, 127) + _U64.pack(length) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame without splitting a character."""
    text = reason.encode("utf-8")[:120].decode("utf-8", "ignore").encode("utf-8")
    return encode(CLOSE, _U16.pack(code) + text)


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR with the 4-byte mask, done on one big integer so the loop runs in C."""
    length = len(payload)
    if not length:
        return payload
    key = mask * (length // 4 + 1)
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key[:length], "little")
    return value.to_bytes(length, "little")


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a peer's close frame, validated."""
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = _U16.unpack_from(payload)[0]
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Turns the bytes of a client's stream into whole messages.

    `feed` returns (opcode, payload) pairs: TEXT and BINARY messages with
    fragments joined, and PING, PONG and CLOSE control frames as they come.
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_opcode", "_fragments_size", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragments_opcode = 0
        self._fragments_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[tuple[int, bytes]] = []
        offset, end = 0, len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            if not second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set")
            length = second & 0x7F
            header = 6
            if length == 126:
                if end - offset < 4:
                    break
                length = _U16.unpack_from(buffer, offset + 2)[0]
                header = 8
            elif length == 127:
                if end - offset < 10:
                    break
                length = _U64.unpack_from(buffer, offset + 2)[0]
                header = 14
            if length > self.max_message:
                raise FrameError(MESSAGE_TOO_BIG, f"frame of {length} bytes is too big")
            if end - offset < header + length:
                break
            start = offset + header
            payload = unmask(buffer[start - 4 : start], buffer[start : start + length])
            offset = start + length
            message = self._message(first & 0x0F, bool(first & 0x80), payload)
            if message is not None:
                messages.append(message)
        self._buffer = buffer[offset:] if offset < end else b""
        return messages

    def _message(self, opcode: int, final: bool, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= CLOSE:
            if not final or len(payload) > 125 or opcode > PONG:
                raise FrameError(PROTOCOL_ERROR, "bad control frame")
            return opcode, payload
        if opcode == CONTINUATION:
            if self._fragments is None:
                raise FrameError(PROTOCOL_ERROR, "continuation without a first fragment")
        elif opcode in (TEXT, BINARY):
            if self._fragments is not None:
                raise FrameError(PROTOCOL_ERROR, "new message inside a fragmented one")
            if final:
                return opcode, payload
            self._fragments, self._fragments_opcode, self._fragments_size = [], opcode, 0
        else:
            raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        self._fragments_size += len(payload)
        if self._fragments_size > self.max_message:
            raise FrameError(MESSAGE_TOO_BIG, "message is too big")
        self._fragments.append(payload)
        if not final:
            return None
        message = (self._fragments_opcode, b"".join(self._fragments))
        self._fragments = None
        return message
