"""Updates racing a hello: sent once, and never left stored for a connected device.

A hello names its node in the store, then (on a later loop turn) claims the
UAID in the registry. An update routed in between finds no session; if the
router then cleared the holder record, the device, once connected, would
have its updates stored (202) and never sent until it reconnected. And an
update stored just before the hello's flush read the store may also be
routed live right after: the device must get it once.
"""

from __future__ import annotations

import json
import uuid

import pytest

from simplepush.router import Delivery
from simplepush.session import Session
from simplepush.store import Holder
from simplepush.updates import Update

pytestmark = pytest.mark.gen_test


class Socket:
    """Stands in for a session's socket; the router, registry and store are real."""

    def __init__(self, connected_at: float) -> None:
        self.connected_at = connected_at
        self.written: list[Update] = []

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed with {code} {reason}")

    def deliver(self, update: Update) -> bool:
        self.written.append(update)
        return True


async def arriving_device(node) -> tuple[str, str, Socket]:
    """A UAID with a channel whose holder record names this node, not yet claimed here."""
    uaid, chid = uuid.uuid4().hex, uuid.uuid4().hex
    socket = Socket(1000.5)
    await node.store.register(uaid, chid, chid, 200)
    await node.store.hello(uaid, None, Holder(node.router.url, socket.connected_at))
    return uaid, chid, socket


async def test_an_update_for_an_arriving_device_keeps_its_holder(node):
    uaid, chid, socket = await arriving_device(node)
    node.registry.arrive(uaid, socket)
    assert await node.router.notify(uaid, chid, 1, None) == Delivery.STORED
    node.registry.arrived(uaid, socket)
    assert node.registry.claim(uaid, socket)
    assert await node.store.pending(uaid) == [Update(chid, 1)]  # what the flush sends
    assert await node.router.notify(uaid, chid, 2, None) == Delivery.DELIVERED
    assert socket.written == [Update(chid, 2)]


async def test_an_update_for_a_device_not_here_clears_the_holder(node):
    """The other side of the rule: a holder that is really gone is forgotten."""
    uaid, chid, socket = await arriving_device(node)
    assert await node.router.notify(uaid, chid, 1, None) == Delivery.STORED
    assert node.registry.claim(uaid, socket)
    assert await node.router.notify(uaid, chid, 2, None) == Delivery.STORED
    assert socket.written == []


class Transport:
    def __init__(self) -> None:
        self.frames: list[dict] = []

    def send(self, text: str) -> bool:
        self.frames.append(json.loads(text))
        return True

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed with {code} {reason}")


async def test_an_update_the_flush_sent_is_not_written_again_when_it_comes_live(node):
    uaid, chid = uuid.uuid4().hex, uuid.uuid4().hex
    await node.store.register(uaid, chid, chid, 200)
    await node.store.update(uaid, chid, 1, None)
    transport = Transport()
    session = Session(node, transport, 1000.5)
    await session.receive(json.dumps({"messageType": "hello", "uaid": uaid, "channelIDs": [chid]}))
    notification = {"messageType": "notification", "updates": [{"channelID": chid, "version": 1}]}
    assert transport.frames[1:] == [notification]
    assert session.deliver(Update(chid, 1)) is True  # routed live just after: already written
    assert session.deliver(Update(chid, 2)) is True
    assert len(transport.frames) == 3 and transport.frames[2]["updates"][0]["version"] == 2
