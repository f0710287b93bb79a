"""One device's conversation: the state machine between frames and the store.

A session starts unidentified, becomes identified by hello, and from then
on owns its UAID in the node's registry. Its hello fixes its kind:
SimplePush (versions per channel) or WebPush (a queue of messages, each
acked by id). It sees the Store interface and the registry only; the
socket is a Transport it writes to and closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Protocol

from simplepush import protocol, wakeup
from simplepush.logs import event, log
from simplepush.node import Node
from simplepush.protocol import (
    Ack,
    Drop,
    Hello,
    Ignored,
    Nack,
    Ping,
    Register,
    Reject,
    Unregister,
    WebPushAck,
)
from simplepush.registry import SUPERSEDED
from simplepush.store import Fresh, Holder, StoreError, WrongUAID
from simplepush.updates import Update
from simplepush.vapid import key_hash
from simplepush.webpush import Message
from simplepush.wsframes import (
    INVALID_PAYLOAD,
    POLICY_VIOLATION,
    SERVER_ERROR,
    UNSUPPORTED_DATA,
)


class Transport(Protocol):
    def send(self, text: str) -> bool:
        """Queue one text frame; False when the socket is already closed."""

    def close(self, code: int, reason: str) -> None:
        """Close the socket (idempotent)."""


class _Gone:
    """The transport of a closed session: writes nothing, closes nothing.

    The socket's protocol holds the session and the session held it: once
    closed, the session lets go, so that both are freed when their last use
    ends rather than at the collector's next full pass.
    """

    def send(self, text: str) -> bool:
        return False

    def close(self, code: int, reason: str) -> None:
        pass


_GONE = _Gone()


def new_uaid() -> str:
    return uuid.uuid4().hex


# [wakeup] close_after_hello: seconds without a frame either way before a sleeping device's
# 4774 close (Session._rest): the registers that follow a new device's hello fit in it.
QUIET_BEFORE_SLEEP = 1.0
# WebPush messages a flush sends before it waits for acks: what waits beyond it follows as
# acks come in, so a long queue never fills the socket's write buffer (connection.py).
FLUSH_WINDOW = 64
_NO_IDS: set[str] = frozenset()  # type: ignore[assignment]  # never written to


class Session:
    __slots__ = (
        "_fresh",
        "_last_ping",
        "_more",
        "_nap",
        "_node",
        "_sent",
        "_sleeps",
        "_transport",
        "_unacked",
        "closed",
        "connected_at",
        "key",
        "uaid",
        "webpush",
    )

    def __init__(self, node: Node, transport: Transport, connected_at: float) -> None:
        self._node = node
        self._transport = transport
        self.connected_at = connected_at
        self.uaid = ""  # as the device spells it
        self.key: str | None = None  # canonical UAID once identified
        self.closed = False
        self._last_ping = 0.0
        # Versions written from the hello's flush on, by channel, until the device's first
        # ack: an update both stored before the flush read it and routed live goes out once.
        self._sent: dict[str, int] | None = None
        self.webpush = False
        # WebPush: ids of stored messages written since hello and not acked (never twice), and
        # whether the flush left some for later (FLUSH_WINDOW). Made at a WebPush hello only:
        # a SimplePush socket does not pay for the set.
        self._unacked: set[str] = _NO_IDS
        self._more = False
        # A UAID made up at hello, until its first register writes it (store.Fresh).
        self._fresh: Fresh | None = None
        # [wakeup] close_after_hello, for a device that gave a usable wake-up address.
        self._sleeps = False
        self._nap: asyncio.TimerHandle | None = None  # the coming 4774 close, see _rest

    async def receive(self, text: str) -> None:
        """Handle one text frame; storage trouble becomes a 503 and a close."""
        outcome = protocol.parse(text, self.key is not None, self.webpush)
        kind = type(outcome)
        if self._nap is not None:  # awake: no 4774 while this frame is handled
            self._nap.cancel()
            self._nap = None
        try:
            if kind is WebPushAck:
                await self._webpush_ack(outcome)
            elif kind is Ack:
                await self._ack(outcome)
            elif kind is Ping:
                self._ping()
            elif kind is Hello:
                await self._hello(outcome)
            elif kind is Register:
                await self._register(outcome)
            elif kind is Unregister:
                await self._unregister(outcome)
            elif kind is Reject:
                self._reject(outcome)
            elif kind is Nack:
                self._node.metrics.incr("updates.client.nack")
                event(logging.INFO, "websocket.nack", code=outcome.code)
            elif kind is Ignored:
                if self.webpush and log.isEnabledFor(logging.DEBUG):
                    event(logging.DEBUG, "websocket.ignored", messageType=outcome.message_type)
            elif kind is Drop:
                event(logging.INFO, "websocket.dropped", reason=outcome.reason)
                self.close(INVALID_PAYLOAD, outcome.reason)
        except StoreError as exc:
            self._node.storage_failed(kind.__name__.lower(), exc)
            raw: dict[str, Any] = outcome.raw  # only commands with a frame reach the store
            self._transport.send(protocol.error_reply(raw, 503))
            self.close(SERVER_ERROR, "storage unavailable")
        if self._sleeps:
            self._rest()

    def _ping(self) -> None:
        node = self._node
        node.metrics.incr("updates.client.ping")
        if node.min_ping_interval:
            now = time.monotonic()
            too_soon = now - self._last_ping < node.min_ping_interval
            self._last_ping = now
            if too_soon:
                # pushgo's answer to a ping flood (PROTOCOL.md 2.4): 401, then close.
                event(logging.INFO, "websocket.ping_flood", interval=node.min_ping_interval)
                self._transport.send(protocol.error_reply({"messageType": "ping"}, 401))
                self.close(POLICY_VIOLATION, "too many pings")
                return
        self._transport.send(protocol.PING_REPLY)

    def receive_binary(self) -> None:
        self.close(UNSUPPORTED_DATA, "binary frames are not SimplePush")

    def _reject(self, reject: Reject) -> None:
        self._transport.send(reject.reply)
        if reject.close:
            self.close(POLICY_VIOLATION, "protocol error")

    async def _hello(self, hello: Hello) -> None:
        node = self._node
        webpush = hello.webpush
        if self.key is not None:
            if hello.key in ("", self.key) and webpush == self.webpush:
                self._transport.send(protocol.hello_reply(self.uaid, webpush))
                await self._flush()
            else:
                self._reject(Reject(protocol.error_reply(hello.raw, 503), close=True))
            return
        key, uaid, outcome = hello.key, hello.uaid, "known"
        store = node.store
        if not key:
            outcome = "new"
        elif hello.channel_count > node.max_channels:
            await store.drop(key)
            outcome = "reset"
        holder = Holder(node.router.url, self.connected_at)
        registry = node.registry
        other = None
        if outcome == "known":
            registry.arrive(key, self)
            try:
                # A UAID is echoed only if the server knows it when the device has
                # subscriptions under it: a SimplePush device that lists channels, and
                # every WebPush one (Firefox keeps its subscriptions exactly when it gets
                # its own UAID back, docs/WEBPUSH.md). Any other may bring its own UAID.
                create = not (webpush or hello.channel_count)
                other = await store.hello(key, hello.wakeup, holder, webpush, create)
            except WrongUAID:
                # Unknown, or of the other kind: start over under a new UAID (docs/WEBPUSH.md).
                outcome = "reset"
            finally:
                registry.arrived(key, self)
            if outcome == "reset":
                await store.drop(key)
        if outcome != "known":
            # The store first hears of a UAID made up here at its first register.
            key = uaid = new_uaid()
            self._fresh = Fresh(holder, webpush, hello.wakeup)
        if self.closed:
            if self._fresh is None:
                await store.release(key, holder)
            return
        newer = other is not None and other.connected_at > self.connected_at
        if newer or not registry.claim(key, self):
            self.close(*SUPERSEDED)
            return
        if other is not None:
            node.router.displaced(key, other)
        self.key, self.uaid, self.webpush = key, uaid, webpush
        if webpush:
            self._unacked = set()
        node.devices += 1
        node.metrics.incr("updates.client.hello")
        event(
            logging.INFO,
            "websocket.hello",
            uaid_state=outcome,
            channels=hello.channel_count,
            webpush=webpush,
        )
        # The UAID names a device: it goes only into debug logs.
        event(logging.DEBUG, "websocket.identified", uaid=uaid, uaid_state=outcome)
        self._transport.send(protocol.hello_reply(uaid, webpush))
        await self._flush()
        waker = node.router.waker
        if waker is not None and waker.sleeps(hello.wakeup):
            self._sleeps = True

    async def _register(self, register: Register) -> None:
        node = self._node
        bound = None
        if register.app_key is not None:
            bound = key_hash(register.app_key)
            if bound is None:
                event(logging.INFO, "websocket.bad_key", channelID=register.channel_id)
                self._transport.send(protocol.error_reply(register.raw, 401, "Invalid Key"))
                return
        # Cleared first: whatever the outcome, the store may now hold the UAID's record.
        fresh, self._fresh = self._fresh, None
        registered = await node.store.register(
            self.key, register.key, register.channel_id, node.max_channels, fresh
        )
        event(
            logging.DEBUG,
            "websocket.register",
            uaid=self.uaid,
            channelID=register.channel_id,
            status=200 if registered else 413,
        )
        if not registered:
            # A limit was hit: said at info, without the UAID (debug only, above).
            event(logging.INFO, "websocket.too_many_channels", max_channels=node.max_channels)
            self._transport.send(protocol.error_reply(register.raw, 413))
            return
        node.metrics.incr("updates.client.register")
        if self.webpush:
            endpoint = node.webpush_endpoint(self.key, register.key, bound)
        else:
            endpoint = node.endpoint(self.key, register.key)
        self._transport.send(protocol.register_reply(register.channel_id, self.uaid, endpoint))

    async def _unregister(self, unregister: Unregister) -> None:
        if unregister.key is not None:
            await self._node.store.unregister(self.key, unregister.key)
        self._node.metrics.incr("updates.client.unregister")
        event(
            logging.DEBUG,
            "websocket.unregister",
            uaid=self.uaid,
            channelID=unregister.channel_id,
            status=200,
        )
        self._transport.send(protocol.unregister_reply(unregister.channel_id))

    async def _ack(self, ack: Ack) -> None:
        metrics = self._node.metrics
        metrics.incr("updates.client.ack")
        self._sent = None
        start = time.monotonic() if metrics.enabled else 0.0
        remaining = await self._node.store.ack(self.key, ack.acks)
        if remaining:
            self._send_updates(remaining)
        if metrics.enabled:
            metrics.timing("client.flush", (time.monotonic() - start) * 1000)
        if log.isEnabledFor(logging.DEBUG):
            event(
                logging.DEBUG,
                "websocket.ack",
                uaid=self.uaid,
                acked=len(ack.acks),
                resent=len(remaining),
            )

    async def _webpush_ack(self, ack: WebPushAck) -> None:
        """Every code removes the message: a retry would fail again (docs/WEBPUSH.md)."""
        node = self._node
        node.metrics.incr("updates.client.ack")
        unacked = self._unacked
        removals = []
        for chid, mid, code in ack.acks:
            unacked.discard(mid)
            removals.append((chid, mid))
            if code != 100:
                node.metrics.incr("updates.client.ack.undelivered")
                event(logging.INFO, "websocket.ack_undelivered", code=code)
        if removals:
            await node.store.remove(self.key, removals)
        if log.isEnabledFor(logging.DEBUG):
            codes = sorted({code for _, _, code in ack.acks})
            event(logging.DEBUG, "websocket.ack", uaid=self.uaid, acked=len(removals), codes=codes)
        if self._more and len(unacked) <= FLUSH_WINDOW // 2:
            await self._flush()

    def _rest(self) -> None:
        """(Re)start the count to a sleeping device's 4774 close, if nothing waits for its ack.

        It then stays away until a UDP datagram wakes it (docs/PROTOCOL.md). The
        close waits for QUIET_BEFORE_SLEEP s without a frame either way: closed
        before its acks, it would be sent the same updates at every wake-up, and
        closed straight after its hello, a new device could never register.
        """
        if self._nap is not None:
            self._nap.cancel()
            self._nap = None
        idle = not self._unacked and not self._more if self.webpush else not self._sent
        if idle and not self.closed:
            loop = asyncio.get_running_loop()
            self._nap = loop.call_later(QUIET_BEFORE_SLEEP, self._sleep)

    def _sleep(self) -> None:
        self._nap = None
        self.close(wakeup.CLOSE_CODE, wakeup.CLOSE_REASON)

    async def _flush_messages(self) -> int:
        """Send the queued WebPush messages not yet on the wire, up to FLUSH_WINDOW unacked."""
        unacked = self._unacked
        stored = [] if self._fresh is not None else await self._node.store.messages(self.key)
        fresh = [m for m in stored if m.id not in unacked]
        batch = fresh[: max(FLUSH_WINDOW - len(unacked), 0)]
        self._more = len(fresh) > len(batch)
        for message in batch:
            self._send_message(message)
        return len(batch)

    def _send_message(self, message: Message) -> bool:
        if not self._transport.send(protocol.webpush_notification(message)):
            return False
        if message.ttl > 0:
            self._unacked.add(message.id)
        self._node.metrics.incr("updates.sent")
        if log.isEnabledFor(logging.DEBUG):
            event(logging.DEBUG, "websocket.notification", uaid=self.uaid, updates=1)
        return True

    async def _flush(self) -> None:
        """Send what was stored while the device was away; `client.flush` times it.

        What was delivered live while the store was read is not sent again,
        nor is what the flush sent when the router delivers it live next.
        """
        metrics = self._node.metrics
        start = time.monotonic() if metrics.enabled else 0.0
        if self.webpush:
            sent = await self._flush_messages()
            if metrics.enabled:
                metrics.timing("client.flush", (time.monotonic() - start) * 1000)
            if sent:
                event(logging.DEBUG, "websocket.flush", uaid=self.uaid, updates=sent)
            return
        self._sent = sent = {}
        pending = [] if self._fresh is not None else await self._node.store.pending(self.key)
        pending = [u for u in pending if sent.get(u.channel_id, -1) < u.version]
        for update in pending:
            sent[update.channel_id] = update.version
        if pending:
            self._send_updates(pending)
        if metrics.enabled:
            metrics.timing("client.flush", (time.monotonic() - start) * 1000)
        if pending:
            event(logging.DEBUG, "websocket.flush", uaid=self.uaid, updates=len(pending))

    def _send_updates(self, updates: list[Update]) -> None:
        if self._transport.send(protocol.notification(updates)):
            self._node.metrics.incr("updates.sent", len(updates))
            if log.isEnabledFor(logging.DEBUG):
                event(logging.DEBUG, "websocket.notification", uaid=self.uaid, updates=len(updates))

    def deliver(self, update: Update | Message) -> bool:
        """A live update or message from the router; False if the socket is gone."""
        if self._nap is not None:  # a sleeping device: a second more, to ack this
            self._rest()
        if type(update) is Message:
            if not self.webpush or update.id in self._unacked:
                return not self.closed  # written already (or not for this kind of session)
            return not self.closed and self._send_message(update)
        sent = self._sent
        if sent is not None and sent.get(update.channel_id, -1) >= update.version:
            return not self.closed  # written already, by the flush or live
        if self.closed or not self._transport.send(protocol.notification((update,))):
            return False
        if sent is not None:
            sent[update.channel_id] = update.version
        self._node.metrics.incr("updates.sent")
        if log.isEnabledFor(logging.DEBUG):
            event(logging.DEBUG, "websocket.notification", uaid=self.uaid, updates=1)
        return True

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self._transport.close(code, reason)
            self.on_closed()

    def on_closed(self) -> None:
        """The socket is gone, by our close or the peer's: give the UAID back."""
        if self.closed:
            return
        self.closed = True
        self._transport = _GONE
        if self._nap is not None:
            self._nap.cancel()
        if self.key is not None:
            self._node.devices -= 1
            self._node.registry.release(self.key, self)
            if self._fresh is None:
                self._node.router.disconnected(self.key, self.connected_at)
