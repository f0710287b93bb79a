"""A device's WebSocket after the upgrade: an asyncio Protocol that is the session's Transport.

One small object per socket, fed by `data_received` callbacks: no stream
object, no coroutine waiting per socket (see wsframes.py for why). Frames
of one socket are handled strictly in order, one at a time, because a
session's state (hello, then commands) depends on that order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

from simplepush import logs, wsframes
from simplepush.logs import event
from simplepush.node import Node
from simplepush.session import Session
from simplepush.wsframes import CLOSE, PING, TEXT, FrameError, FrameReader

# How long a closing socket waits for the device's close frame before it is cut.
CLOSE_TIMEOUT = 5.0

_OPEN, _CLOSING, _CLOSED = 0, 1, 2
# The close code of a socket cut without a close frame (RFC 6455 7.1.5).
ABNORMAL = 1006
# Frames read but not yet handled; past this the socket is not read until the session catches up.
MAX_INBOX = 32
# Bytes written but not taken by the device. Replies stop at asyncio's high-water mark (64 KiB,
# reading pauses); updates from app servers keep coming, so past this the device is cut. What it
# missed stays pending in the store and is sent again when it reconnects.
MAX_WRITE_BUFFER = 1024 * 1024
# Why reading is paused: the inbox is full, or the device is not reading our replies.
_INBOX_FULL, _NOT_READING = 1, 2


class DeviceConnection(asyncio.Protocol):
    __slots__ = (
        "_close_code",
        "_close_reason",
        "_close_timer",
        "_handshake",
        "_hello_timer",
        "_holds",
        "_inbox",
        "_node",
        "_reader",
        "_state",
        "_task",
        "_transport",
        "session",
    )

    def __init__(self, node: Node, handshake: bytes) -> None:
        self._node = node
        self._handshake = handshake  # the 101, written first
        self._reader = FrameReader(node.max_message_size)
        self._transport: asyncio.Transport | None = None
        self._state = _OPEN
        self._task: asyncio.Future[None] | None = None  # the one handling frames now
        self._inbox: deque[str | None] | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._holds = 0
        # Why the socket ended, for the websocket.close event: the first close frame wins.
        self._close_code = ABNORMAL
        self._close_reason = "connection lost"
        self.session = Session(node, self, time.time())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.write(self._handshake)
        self._handshake = b""
        node = self._node
        connections = node.registry.connections
        connections.add(self.session)
        node.metrics.incr("client.socket.connect")
        node.metrics.gauge("update.client.connections", len(connections))
        event(logging.DEBUG, "websocket.open", clients=len(connections))
        if node.hello_timeout > 0:
            self._hello_timer = asyncio.get_running_loop().call_later(
                node.hello_timeout, self._hello_expired
            )

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self.session.key is None:
            self.session.close(wsframes.POLICY_VIOLATION, "hello timeout")

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        try:
            messages = self._reader.feed(data)
            for opcode, payload in messages:
                if opcode == TEXT:
                    if self._state == _OPEN:
                        self._enqueue(payload.decode("utf-8"))
                elif opcode == CLOSE:
                    self._peer_closed(payload)
                elif opcode == PING:
                    self._transport.write(wsframes.encode(wsframes.PONG, payload))
                elif opcode == wsframes.BINARY and self._state == _OPEN:
                    self._enqueue(None)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)
        except UnicodeDecodeError:
            self._fail(wsframes.INVALID_PAYLOAD, "text frame is not UTF-8")

    def _enqueue(self, text: str | None) -> None:
        """None stands for a binary frame, which the session refuses in its turn."""
        if self._task is not None:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(text)
            if len(self._inbox) >= MAX_INBOX:
                self._hold(_INBOX_FULL, True)
            return
        self._task = asyncio.ensure_future(self._drain(text))

    async def _drain(self, text: str | None) -> None:
        session = self.session
        try:
            while True:
                if text is None:
                    session.receive_binary()
                else:
                    await session.receive(text)
                if self._hello_timer is not None and session.key is not None:
                    self._hello_timer.cancel()
                    self._hello_timer = None
                if not self._inbox or self._state != _OPEN:
                    return
                text = self._inbox.popleft()
                if self._holds & _INBOX_FULL and len(self._inbox) <= MAX_INBOX // 2:
                    self._hold(_INBOX_FULL, False)
        except Exception:
            logs.exception("websocket.error")
            session.close(wsframes.SERVER_ERROR, "internal error")
        finally:
            self._task = None

    def send(self, text: str) -> bool:
        if self._state != _OPEN:
            return False
        transport = self._transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # A close frame would wait behind what the device is not reading: cut at once.
            reason = "device is not reading"
            event(logging.WARNING, "websocket.dropped", reason=reason, code=ABNORMAL)
            self._close_reason = reason
            self._state = _CLOSED
            transport.abort()
            return False
        transport.write(wsframes.encode(TEXT, text.encode("utf-8")))
        return True

    def pause_writing(self) -> None:
        self._hold(_NOT_READING, True)

    def resume_writing(self) -> None:
        self._hold(_NOT_READING, False)

    def _hold(self, reason: int, held: bool) -> None:
        """Stop reading a device that sends faster than it is served or than it reads replies.

        Its frames then wait in the kernel and TCP slows it down, instead of
        queueing here without bound.
        """
        before = self._holds
        self._holds = before | reason if held else before & ~reason
        if self._state == _CLOSED or bool(before) == bool(self._holds):
            return
        if self._holds:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket is cut if the device does not answer."""
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._close_code, self._close_reason = code, reason
        self._inbox = None
        self._transport.write(wsframes.encode_close(code, reason))
        self._close_timer = asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT, self._transport.abort
        )

    def _peer_closed(self, payload: bytes) -> None:
        code, _reason = wsframes.parse_close(payload)
        if self._state == _OPEN:
            # The device's own reason text is not logged: it is whatever the device sent.
            self._close_code, self._close_reason = code, "closed by device"
            reply = b"" if code == wsframes.NO_STATUS else payload[:2]
            self._transport.write(wsframes.encode(CLOSE, reply))
            event(logging.DEBUG, "websocket.closed_by_device", code=code)
        self._state = _CLOSED
        self._transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """The device broke framing: nothing more it sends can be trusted, so cut now."""
        event(logging.INFO, "websocket.dropped", reason=reason, code=code)
        if self._state == _OPEN:
            self._close_code, self._close_reason = code, reason
            self._transport.write(wsframes.encode_close(code, reason))
        self._state = _CLOSED
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._inbox = None
        for timer in (self._hello_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._hello_timer = self._close_timer = None
        session = self.session
        identified = session.key is not None
        session.on_closed()
        node = self._node
        connections = node.registry.connections
        connections.discard(session)
        # The transport holds this protocol: letting go of it leaves no cycle to collect.
        self._transport = None
        lifespan = time.time() - session.connected_at
        metrics = node.metrics
        metrics.incr("client.socket.disconnect")
        metrics.gauge("update.client.connections", len(connections))
        metrics.timing("client.socket.lifespan", lifespan * 1000)
        event(
            logging.INFO,
            "websocket.close",
            duration_s=round(lifespan, 3),
            code=self._close_code,
            reason=self._close_reason,
            identified=identified,
        )
