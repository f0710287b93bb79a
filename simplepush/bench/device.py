"""A simulated push device: a minimal RFC 6455 client on an asyncio Protocol.

Why hand-written instead of ``tornado.websocket.websocket_connect``: tornado
keeps an IOStream, an HTTP1Connection and a reading coroutine (a task) per
socket and runs its HTTP client stack for every handshake. Here a device is
one ``__slots__`` Protocol object whose frames are parsed in
``data_received`` callbacks, with no task per device. Measured on this
machine (3,000 devices doing connect + hello + register, one process):
tornado 20.5 KB and ~960 us of client CPU per device; this client 3.4 KB
and ~350 us. With 100,000 devices on 2 cores shared with the server, that
difference decides whether the bench or the server is measured.

Scope of the WebSocket client: client frames are masked; server frames may
use 7/16/64-bit lengths; text, close, ping and pong are handled; binary,
fragmented, masked or RSV-flagged server frames are protocol errors that close
the socket (SimplePush servers send small single text frames), so nothing can
hang waiting for a continuation.

A device speaks SimplePush (integer versions it is told to expect) or, when
``Shared`` has a VAPID key, WebPush: ``use_webpush`` hello, register with the
key, and one notification per frame whose server-chosen string version is
acked with code 100; the round trip is recognised by the ``data`` it carries.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import uuid
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simplepush.httpclient import HttpPool

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_FRAME = 1 << 20
MAX_HANDSHAKE = 65536
HELLO = b'{"messageType":"hello","uaid":"","channelIDs":[]}'
HELLO_WEBPUSH = b'{"messageType":"hello","use_webpush":true}'
REGISTER = b'{"messageType":"register","channelID":"%s"}'
PING = b"{}"
ACK = b'{"messageType":"ack","updates":[{"channelID":"%s","version":%d}]}'
# %s: our channel ID, then the version as a JSON string.
WEBPUSH_ACK = b'{"messageType":"ack","updates":[{"channelID":"%s","version":%s,"code":100}]}'

# Device states.
UPGRADING, HELLO_SENT, REGISTERING, READY, CLOSING, CLOSED = range(6)


class DeviceError(Exception):
    """The device closed or failed; ``args[0]`` names the kind for the report."""


class Shared:
    """Per-process state that every device points to, so a device holds one pointer, not copies."""

    __slots__ = (
        "awaiting_pong",
        "dropped",
        "endpoint",
        "hello",
        "notifications",
        "pongs",
        "protocol_errors",
        "register",
        "upgrade",
        "webpush",
    )

    def __init__(
        self,
        host: str,
        path: str,
        endpoint: Callable[[str], tuple[HttpPool, bytes, bytes]],
        webpush_key: str | None = None,
    ) -> None:
        self.upgrade = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: push-notification\r\n"
            "Sec-WebSocket-Key: "
        ).encode()
        # pushEndpoint URL -> (pool, request path, request headers); raises ValueError
        self.endpoint = endpoint
        self.webpush = webpush_key is not None  # the register ``key`` when speaking WebPush
        self.hello = HELLO_WEBPUSH if self.webpush else HELLO
        self.register = (
            REGISTER
            if webpush_key is None
            else b'{"messageType":"register","channelID":"%%s","key":"%s"}' % webpush_key.encode()
        )
        self.dropped = 0  # ready sockets the server closed
        self.protocol_errors = 0  # ready sockets we closed because the server broke the protocol
        self.pongs = 0
        self.awaiting_pong = 0  # open devices whose last ping is unanswered
        self.notifications = 0


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame. The mask comes from ``random``: its job is to stop
    cache poisoning through proxies by hostile scripts, which is moot for a load
    generator, and os.urandom would cost a syscall per frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    key = random.getrandbits(32).to_bytes(4, "big")
    stream = (key * ((n >> 2) + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


class Device(asyncio.Protocol):
    """One socket, one UAID, one channel; acks every notification it gets."""

    __slots__ = (
        "accept",
        "buf",
        "chid",
        "headers",
        "path",
        "pinged",
        "pool",
        "shared",
        "state",
        "transport",
        "waiter",
        "want",
    )

    def __init__(self, shared: Shared, waiter: asyncio.Future[float]) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.state = UPGRADING
        self.buf = b""
        self.accept = b""
        self.chid = ""
        self.pool: HttpPool | None = None
        self.path = b""
        self.headers = b""  # of every request to the endpoint (shared bytes, one per origin)
        # What a round trip waits for: a SimplePush version, or a WebPush message's data.
        self.want: int | str = -1
        self.pinged = False  # a ping is unanswered
        # Setup: resolved when registered. Later: resolved when ``want`` arrives.
        self.waiter: asyncio.Future[float] | None = waiter

    @property
    def ready(self) -> bool:
        """Registered and still connected."""
        return self.state == READY

    def expect(self, version: int | str) -> asyncio.Future[float]:
        """Future for the perf_counter() time at which ``version`` (WebPush: data) is parsed."""
        self.want = version
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def forget(self) -> None:
        """Stop waiting for a version (round trip over, or given up)."""
        self.want = -1
        self.waiter = None

    def ping(self) -> None:
        """Send the SimplePush keep-alive ``{}``."""
        if not self.pinged:
            self.pinged = True
            self.shared.awaiting_pong += 1
        self._send(PING)

    def _ponged(self) -> None:
        """A pong, or the socket is gone: this device awaits no pong any more."""
        if self.pinged:
            self.pinged = False
            self.shared.awaiting_pong -= 1

    def close(self) -> None:
        """Close from our side; not counted as a drop."""
        if self.state < CLOSING:
            self._shut("closed")

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(random.randbytes(16))
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        transport.write(self.shared.upgrade + key + b"\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == UPGRADING:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HANDSHAKE:
                    self._fail("handshake")
                else:
                    self.buf = data
                return
            if not self._upgraded(data[:end]):
                self._fail("handshake")
                return
            self.state, self.accept = HELLO_SENT, b""
            self._send(self.shared.hello)
            data = data[end + 4 :]
        pos, size = 0, len(data)
        while size - pos >= 2 and self.state < CLOSING:
            b0, b1 = data[pos], data[pos + 1]
            length, head = b1 & 0x7F, 2
            if length > 125:
                head = 4 if length == 126 else 10
                if size - pos < head:
                    break
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
            if b1 & 0x80 or b0 & 0x70 or length > MAX_FRAME:  # masked, RSV bits, or huge
                self._fail("protocol")
                return
            end = pos + head + length
            if end > size:
                break
            self._frame(b0, data[pos + head : end])
            pos = end
        if pos < size and self.state < CLOSING:
            self.buf = data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == READY:
            self.shared.dropped += 1
        self._ponged()
        self.state = CLOSED
        self.transport = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(DeviceError("closed"))

    # protocol

    def _upgraded(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        if lines[0].split(None, 2)[1:2] != [b"101"]:
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        protocol = headers.get(b"sec-websocket-protocol", b"push-notification")
        return (
            headers.get(b"sec-websocket-accept") == self.accept
            and headers.get(b"upgrade", b"").lower() == b"websocket"
            and protocol == b"push-notification"
        )

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 1 and b0 & 0x80:
            self._message(payload)
        elif opcode == 8:  # server closes: echo its code, then close the TCP side
            if self.state == READY:
                self.shared.dropped += 1
            self._send(payload[:2], 8)
            self._shut("closed")
        elif opcode == 9:
            self._send(payload, 10)
        elif opcode != 10:  # binary, continuation or fragmented text
            self._fail("protocol")

    def _message(self, payload: bytes) -> None:
        if payload == PING:
            self.shared.pongs += 1
            self._ponged()
            return
        try:
            msg: Any = json.loads(payload)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            self._fail("protocol")
            return
        kind = msg.get("messageType")
        kind = kind.lower() if isinstance(kind, str) else None
        if kind == "notification":
            if self.shared.webpush:
                self._push_message(msg)
            else:
                self._notification(msg.get("updates"))
        elif kind is None or kind == "ping":
            self.shared.pongs += 1
            self._ponged()
        elif kind == "hello" and self.state == HELLO_SENT:
            uaid = msg.get("uaid")
            if msg.get("status") != 200 or not isinstance(uaid, str) or not uaid:
                self._fail("hello")
                return
            if self.shared.webpush and msg.get("use_webpush") is not True:
                self._fail("hello: use_webpush not echoed")  # Firefox would expect SimplePush
                return
            self.state = REGISTERING
            self.chid = str(uuid.uuid4())
            self._send(self.shared.register % self.chid.encode())
        elif kind == "register" and self.state == REGISTERING:
            self._registered(msg)

    def _registered(self, msg: dict[str, Any]) -> None:
        endpoint = msg.get("pushEndpoint")
        if (
            msg.get("status") != 200
            or msg.get("channelID") != self.chid
            or not isinstance(endpoint, str)
        ):
            self._fail("register")
            return
        try:
            self.pool, self.path, self.headers = self.shared.endpoint(endpoint)
        except ValueError as exc:
            self._fail(f"endpoint: {exc}")
            return
        self.state = READY
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(perf_counter())

    def _notification(self, updates: Any) -> None:
        now = perf_counter()
        self.shared.notifications += 1
        if not isinstance(updates, list):
            return
        acks = []
        hit = False
        for update in updates:
            if isinstance(update, dict):
                chid, version = update.get("channelID"), update.get("version")
                acks.append({"channelID": chid, "version": version})
                hit = hit or (chid == self.chid and version == self.want)
        if hit and len(acks) == 1:  # the usual case, without json.dumps
            self._send(ACK % (self.chid.encode(), self.want))
        elif acks:
            self._send(json.dumps({"messageType": "ack", "updates": acks}).encode())
        waiter = self.waiter
        if hit and waiter is not None and not waiter.done() and self.state == READY:
            waiter.set_result(now)

    def _push_message(self, msg: dict[str, Any]) -> None:
        """A WebPush notification: ack it with code 100; a hit if it carries the awaited data.

        A version or channel ID that is not a string, or awaited data without the
        aes128gcm encoding header, would break Firefox: a protocol error.
        """
        now = perf_counter()
        self.shared.notifications += 1
        chid, version = msg.get("channelID"), msg.get("version")
        if not isinstance(chid, str) or not isinstance(version, str) or not version:
            self._fail("protocol")
            return
        mine = chid == self.chid
        if mine:  # the usual case, without json.dumps of the whole frame
            self._send(WEBPUSH_ACK % (self.chid.encode(), json.dumps(version).encode()))
        else:
            update = {"channelID": chid, "version": version, "code": 100}
            self._send(json.dumps({"messageType": "ack", "updates": [update]}).encode())
        data = msg.get("data")
        if not mine or not isinstance(data, str) or data.rstrip("=") != self.want:
            return
        headers = msg.get("headers")
        if not isinstance(headers, dict) or headers.get("encoding") != "aes128gcm":
            self._fail("protocol")
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done() and self.state == READY:
            waiter.set_result(now)

    def _send(self, payload: bytes, opcode: int = 1) -> None:
        if self.transport is not None and self.state < CLOSING:
            self.transport.write(mask_frame(opcode, payload))

    def _fail(self, kind: str) -> None:
        """The server broke the protocol: close, and count it once set up."""
        if self.state == READY:
            self.shared.protocol_errors += 1
        self._shut(kind)

    def _shut(self, kind: str) -> None:
        """Close our side and fail whoever waits on this device with ``kind``."""
        waiter, self.waiter = self.waiter, None
        self.state = CLOSING
        self._ponged()
        if self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(DeviceError(kind))
