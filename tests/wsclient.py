"""The client side of RFC 6455 framing, written for the tests.

Deliberately independent of simplepush.wsframes (byte-by-byte XOR, lengths
packed by hand) so that the codec is checked against a second
implementation rather than against itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# How long a test waits for a frame the server owes it.
FRAME_TIMEOUT = 5.0
HELLO = json.dumps({"messageType": "hello", "uaid": "", "channelIDs": []})

# RFC 6455 5.3: any 4 bytes; this one has no zero byte, so masking changes every byte.
MASK = b"\x37\xfa\x21\x3d"


def xor(mask: bytes, data: bytes) -> bytes:
    """RFC 6455 5.3 masking, literally: octet i XOR mask octet i mod 4."""
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(data))


def frame_header(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """The first bytes of a frame, up to (not including) the masking key."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = MASK
) -> bytes:
    """One frame as a client sends it; mask=None builds the forbidden unmasked frame."""
    header = frame_header(opcode, len(payload), fin=fin, rsv=rsv, masked=mask is not None)
    if mask is None:
        return header + payload
    return header + mask + xor(mask, payload)


def upgrade_request(port: int, **headers: str | None) -> bytes:
    """A valid upgrade; a keyword (underscores for dashes) replaces a header, None drops it."""
    fields: dict[str, str | None] = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    lines = ["GET / HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawDevice:
    """A device on a bare TCP socket: it writes whatever bytes a test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request_head(self, request: bytes) -> tuple[str, dict[str, str]]:
        """Send an HTTP request; return the status line and headers (names lowercased)."""
        await self.send(request)
        head = await self._read(self.reader.readuntil(b"\r\n\r\n"))
        status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return status, fields

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(client_frame(TEXT, text.encode("utf-8")))

    async def recv_frame(self) -> tuple[int, bytes]:
        """The next frame; the server's are always final, unmasked and without RSV bits."""
        first, second = await self._read(self.reader.readexactly(2))
        assert first & 0xF0 == 0x80, f"first byte {first:#x}"
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self._read(self.reader.readexactly(2)), "big")
        elif length == 127:
            length = int.from_bytes(await self._read(self.reader.readexactly(8)), "big")
        return first & 0x0F, await self._read(self.reader.readexactly(length))

    async def recv_json(self) -> Any:
        opcode, payload = await self.recv_frame()
        assert opcode == TEXT, (opcode, payload)
        return json.loads(payload)

    async def recv_close(self) -> int:
        """The next frame must be a close frame; return its code."""
        opcode, payload = await self.recv_frame()
        assert opcode == CLOSE, (opcode, payload)
        assert 2 <= len(payload) <= 125
        payload[2:].decode("utf-8")
        return int.from_bytes(payload[:2], "big")

    async def expect_eof(self, timeout: float = FRAME_TIMEOUT) -> None:
        """The server closed TCP (FIN or, after an abort, RST) with nothing more sent."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return
        assert rest == b""

    async def hello(self) -> str:
        await self.send_text(HELLO)
        reply = await self.recv_json()
        assert reply["status"] == 200, reply
        return reply["uaid"]

    async def _read(self, read: Any) -> Any:
        return await asyncio.wait_for(read, FRAME_TIMEOUT)
