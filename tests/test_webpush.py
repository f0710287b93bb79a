"""WebPush sessions: what a WebPush device sees on its socket.

Every test drives a real server over 127.0.0.1 (tests/conftest.py) with the
WebPush device of tests/webpush_device.py, on the memory and memcached
backends. App-server POSTs here are raw requests with aes128gcm bodies made
by http_ece (pywebpush itself is exercised in test_webpush_senders.py).

Rules: docs/WEBPUSH.md.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import new_id, token_of
from tests.webpush_device import (
    MAX_TTL,
    Subscription,
    WebPushDevice,
    assert_created,
    assert_error,
    assert_retry_after,
    b64u,
    b64u_padded,
    notification,
    open_device,
    post,
    post_message,
    public_raw,
    released,
    webpush_device,
)

pytestmark = pytest.mark.gen_test(timeout=15)

SUPERSEDED = 4000  # the close code of a socket a newer connection took over


@pytest.fixture
def origin(http_port: int) -> str:
    """The server's endpoint_url (the conftest's default)."""
    return f"http://127.0.0.1:{http_port}"


def app_key() -> bytes:
    """A fresh application server (VAPID) public key, 65 raw bytes."""
    return public_raw(ec.generate_private_key(ec.SECP256R1()))


async def registered(
    connect: Any, origin: str, key: str | None = None
) -> tuple[WebPushDevice, Subscription]:
    device = await webpush_device(connect, origin)
    return device, await device.register(key=key)


def assert_gone(response: Any) -> None:
    """410 errno 106, cached for a day by the sender (docs/WEBPUSH.md)."""
    assert_error(response, 410, 106)
    assert response.headers.get("cache-control") == "max-age=86400", response.headers


# --- hello (docs/WEBPUSH.md) ----------------------------------------------


async def test_hello_without_uaid_gets_a_new_uaid(connect, origin):
    first = await webpush_device(connect, origin)
    second = await webpush_device(connect, origin)
    assert first.uaid != second.uaid


async def test_firefox_hello_with_a_known_uaid_is_echoed(connect, origin, node):
    device, _ = await registered(connect, origin)
    await device.hang_up(node)
    again = await open_device(connect, origin)
    # Firefox's own hello: broadcasts map, uaid last; the reply's broadcasts stay {}.
    reply = await again.hello(
        device.uaid, broadcasts={"remote-settings/monitor_changes": '"1700000000000"'}
    )
    assert reply["uaid"] == device.uaid


@pytest.mark.parametrize(
    "kind", ["unknown", "unknown-dashed", "unknown-upper", "not-a-uuid", "too-long", "empty"]
)
async def test_hello_with_an_unknown_or_malformed_uaid_gets_a_new_uaid(connect, origin, kind):
    uaid = {
        "unknown": uuid.uuid4().hex,
        "unknown-dashed": str(uuid.uuid4()),
        "unknown-upper": uuid.uuid4().hex.upper(),
        "not-a-uuid": "not-a-uuid",
        "too-long": "f" * 129,
        "empty": "",
    }[kind]
    device = await open_device(connect, origin)
    reply = await device.hello(uaid)
    assert reply["uaid"] != uaid


async def test_legacy_channel_ids_in_a_webpush_hello_are_ignored(connect, origin):
    device = await open_device(connect, origin)
    await device.hello(channelIDs=[new_id()])
    await device.register()


async def test_ping_is_answered(connect, origin):
    device = await webpush_device(connect, origin)
    await device.ping()
    await device.send({"messageType": "ping"})
    assert await device.recv() == {}


# --- register (docs/WEBPUSH.md) ----------------------------------------


async def test_register_without_key_gets_a_v1_endpoint(connect, origin):
    _, subscription = await registered(connect, origin)
    assert "/wpush/v1/" in subscription.endpoint


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
async def test_register_with_a_key_gets_a_v2_endpoint(connect, origin, padded):
    raw = app_key()
    key = b64u_padded(raw) if padded else b64u(raw)
    assert key.endswith("=") is padded
    _, subscription = await registered(connect, origin, key)
    assert "/wpush/v2/" in subscription.endpoint


def bad_key(kind: str) -> Any:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {
        "raw-64": b64u(os.urandom(64)),
        "prefix-05": b64u(b"\x05" + os.urandom(64)),
        "compressed": b64u(public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)),
        "spki": b64u(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)),
        "not-base64": "not base64 at all!",
        "number": 42,
    }[kind]


@pytest.mark.parametrize(
    "kind", ["raw-64", "prefix-05", "compressed", "spki", "not-base64", "number"]
)
async def test_register_with_a_bad_key_is_401_and_the_socket_stays_open(connect, origin, kind):
    device = await webpush_device(connect, origin)
    request = {"messageType": "register", "channelID": new_id(), "key": bad_key(kind)}
    reply = await device.request(request)
    assert reply == {**request, "status": 401, "error": "Invalid Key"}
    await device.register()


@pytest.mark.parametrize(
    "channel_id", ["undashed", "upper", "not-a-uuid"], ids=["undashed", "upper", "not-a-uuid"]
)
async def test_register_with_a_channel_id_firefox_would_not_send_is_401(
    connect, origin, channel_id
):
    """Firefox matches replies and notifications by the dashed lowercase form (1.4, 1.5)."""
    chid = {
        "undashed": uuid.uuid4().hex,
        "upper": str(uuid.uuid4()).upper(),
        "not-a-uuid": "not-a-uuid",
    }[channel_id]
    device = await webpush_device(connect, origin)
    request = {"messageType": "register", "channelID": chid}
    reply = await device.request(request)
    assert reply.get("status") == 401, reply
    assert {k: v for k, v in reply.items() if k not in ("status", "error", "reason")} == request
    await device.register()


async def test_register_again_is_idempotent_and_follows_the_key(connect, origin, put):
    device = await webpush_device(connect, origin)
    channel_id = new_id()
    first = await device.register(channel_id)
    bound = await device.register(channel_id, key=b64u_padded(app_key()))
    assert "/wpush/v2/" in bound.endpoint
    unbound = await device.register(channel_id)
    assert "/wpush/v1/" in first.endpoint and "/wpush/v1/" in unbound.endpoint
    response, body = await post_message(put, unbound, b"still there")
    assert_created(response, origin, 60)
    await device.expect_message(unbound, body, b"still there", 60)


# --- notifications (docs/WEBPUSH.md) -------------------------------------------


async def test_notification_carries_the_exact_body(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"\x00\xffbinary payload")
    assert_created(response, origin, 60)
    frame = await device.expect_message(subscription, body, b"\x00\xffbinary payload", 60)
    assert "=" not in frame["data"]


async def test_an_empty_post_is_a_notification_without_data(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response = await post(put, subscription.endpoint, b"", {"TTL": "60"})
    assert_created(response, origin, 60)
    frame = await device.notification()
    assert frame == notification(subscription.channel_id, frame["version"], 60)


async def test_every_message_has_its_own_version(connect, origin, put):
    device, subscription = await registered(connect, origin)
    versions = set()
    for plain in (b"same", b"same", b"same"):
        response, body = await post_message(put, subscription, plain)
        assert_created(response, origin, 60)
        versions.add((await device.expect_message(subscription, body, plain, 60))["version"])
    assert len(versions) == 3


# --- ack and nack (docs/WEBPUSH.md) -----------------------------------


async def test_acks_with_codes_100_101_102_remove_the_messages(connect, origin, put):
    device = await webpush_device(connect, origin)
    subscriptions = [await device.register() for _ in range(3)]
    frames = []
    for subscription in subscriptions:
        response, body = await post_message(put, subscription, b"to ack")
        assert_created(response, origin, 60)
        frames.append(await device.expect_message(subscription, body, b"to ack", 60))
    for frame, code in zip(frames, (100, 101, 102), strict=True):
        await device.ack_frame(frame, code)
    await device.ping()  # no reply to any ack, and all three are handled
    again = await device.reconnect(connect)
    await again.expect_silence()


async def test_unknown_and_duplicate_acks_are_ignored(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"once")
    assert_created(response, origin, 60)
    frame = await device.expect_message(subscription, body, b"once", 60)
    other = await device.register()
    await device.ack(subscription.channel_id, "no-such-version")
    await device.ack(other.channel_id, frame["version"])  # the right id on another channel
    await device.ack(new_id(), frame["version"])
    await device.send({"messageType": "ack", "updates": [{"channelID": 5}, "x"]})
    await device.send({"messageType": "ack", "updates": []})
    assert await device.frames_until_pong() == []
    # None of these removed it.
    device = await device.reconnect(connect)
    assert await device.expect_message(subscription, body, b"once", 60) == frame
    await device.ack_frame(frame)
    await device.ack_frame(frame)
    await device.ping()
    device = await device.reconnect(connect)
    await device.expect_silence()


@pytest.mark.parametrize("code", [301, 302, 303])
async def test_nack_gets_no_reply_and_neither_removes_nor_resends(connect, origin, put, code):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"handler failed")
    assert_created(response, origin, 60)
    frame = await device.expect_message(subscription, body, b"handler failed", 60)
    await device.nack(frame["version"], code)
    assert await device.frames_until_pong() == []
    # Not acked: the next hello sends it again, same version.
    again = await device.reconnect(connect)
    assert await again.expect_message(subscription, body, b"handler failed", 60) == frame


# --- frames a WebPush session ignores (docs/WEBPUSH.md) ---------------


@pytest.mark.parametrize(
    "frame",
    [
        {"messageType": "broadcast_subscribe", "broadcasts": {"remote-settings/x": '"1"'}},
        {"messageType": "broadcast_subscribe", "broadcasts": {}},
        {"messageType": "urgency", "urgency": "low"},
        {"messageType": "no-such-type"},
    ],
    ids=["broadcast_subscribe", "broadcast_subscribe-empty", "urgency", "unknown"],
)
async def test_ignored_frames_get_no_reply_and_keep_the_socket(connect, origin, put, frame):
    device, subscription = await registered(connect, origin)
    await device.send(frame)
    assert await device.frames_until_pong() == []
    response, body = await post_message(put, subscription, b"after")
    assert_created(response, origin, 60)
    await device.expect_message(subscription, body, b"after", 60)


# --- unregister (docs/WEBPUSH.md) ------------------------------------------------


@pytest.mark.parametrize("code", [200, 201, 202])
async def test_unregister_is_answered_and_the_endpoint_is_gone(connect, origin, put, code):
    device, subscription = await registered(connect, origin)
    await device.unregister(subscription.channel_id, code)
    response, _ = await post_message(put, subscription, b"too late")
    assert_gone(response)


async def test_unregister_drops_the_queued_messages(connect, origin, put, node):
    device = await webpush_device(connect, origin)
    dropped, kept = await device.register(), await device.register()
    await device.hang_up(node)
    _, dropped_body = await post_message(put, dropped, b"dropped")
    _, kept_body = await post_message(put, kept, b"kept")
    device = await device.reconnect(connect)
    await device.expect_message(dropped, dropped_body, b"dropped", 60)
    await device.expect_message(kept, kept_body, b"kept", 60)
    await device.unregister(dropped.channel_id)
    device = await device.reconnect(connect)
    await device.expect_message(kept, kept_body, b"kept", 60)
    await device.expect_silence()


# --- SimplePush and WebPush side by side (docs/WEBPUSH.md) ----------------


async def test_a_simplepush_uaid_saying_use_webpush_gets_a_new_uaid(connect, origin, put, node):
    legacy = await connect()
    await legacy.hello()
    endpoint = await legacy.register(new_id())
    uaid = legacy.uaid
    legacy.close()
    await released(node, uaid)
    device = await open_device(connect, origin)
    reply = await device.hello(uaid)
    assert reply["uaid"] != uaid
    # The SimplePush UAID's data is deleted.
    response = await put(endpoint, "version=5")
    assert response.code == 404, response.body
    assert response.body == b'{"status":404,"error":"Unknown Channel"}'


async def test_a_webpush_uaid_in_a_simplepush_hello_gets_a_new_uaid(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    legacy = await connect()
    reply = await legacy.hello(device.uaid)
    assert reply == {"messageType": "hello", "uaid": reply["uaid"], "status": 200}
    assert reply["uaid"] != device.uaid
    # The WebPush UAID's data is deleted.
    response, _ = await post_message(put, subscription, b"orphan")
    assert_gone(response)


async def test_use_webpush_false_is_a_simplepush_session(connect, origin):
    device = await connect()
    reply = await device.request({"messageType": "hello", "use_webpush": False, "channelIDs": []})
    assert reply == {"messageType": "hello", "uaid": reply["uaid"], "status": 200}
    endpoint = await device.register(new_id())
    assert endpoint.startswith(f"{origin}/update/")


async def test_simplepush_sessions_keep_their_updates_beside_webpush(connect, origin, put):
    device, subscription = await registered(connect, origin)
    legacy = await connect()
    await legacy.hello()
    channel_id = new_id()
    endpoint = await legacy.register(channel_id)
    response = await put(endpoint, "version=7")
    assert response.code == 200, response.body
    assert await legacy.recv() == {
        "messageType": "notification",
        "updates": [{"channelID": channel_id, "version": 7}],
    }
    # Tokens of one kind are not accepted by the other's endpoint.
    response = await put(f"{origin}/update/{token_of(subscription.endpoint)}", "version=8")
    assert response.code == 404, response.body
    assert response.body == b'{"status":404,"error":"Invalid Token"}'
    answer = await post(put, f"{origin}/wpush/v1/{token_of(endpoint)}", b"", {"TTL": "60"})
    assert_error(answer, 404, 102)
    await device.ping()  # the WebPush device saw none of it


# --- one socket per UAID (docs/WEBPUSH.md) --------------------------------------


async def test_the_newest_connection_wins(connect, origin, put):
    old, subscription = await registered(connect, origin)
    new = await old.reconnect(connect)
    assert await old.expect_closed() == SUPERSEDED
    response, body = await post_message(put, subscription, b"to the new one")
    assert_created(response, origin, 60)
    await new.expect_message(subscription, body, b"to the new one", 60)


# --- store and forward (docs/WEBPUSH.md) ------------------------------


async def test_stored_messages_are_sent_after_every_hello_until_acked(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, body = await post_message(put, subscription, b"while away", ttl=300)
    assert_created(response, origin, 300)
    device = await device.reconnect(connect)
    frame = await device.expect_message(subscription, body, b"while away", 300)
    device = await device.reconnect(connect)
    assert await device.expect_message(subscription, body, b"while away", 300) == frame
    await device.ack_frame(frame)
    await device.ping()
    device = await device.reconnect(connect)
    await device.expect_silence()


async def test_a_message_sent_live_is_stored_until_acked(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"live")
    assert_created(response, origin, 60)
    frame = await device.expect_message(subscription, body, b"live", 60)
    device = await device.reconnect(connect)
    assert await device.expect_message(subscription, body, b"live", 60) == frame


async def test_messages_arrive_in_the_order_they_were_accepted(connect, origin, put, node):
    device = await webpush_device(connect, origin)
    first, second = await device.register(), await device.register()
    await device.hang_up(node)
    sent = []
    for i, subscription in enumerate([first, second, first, second, first]):
        plain = f"stored {i}".encode()
        response, body = await post_message(put, subscription, plain)
        assert_created(response, origin, 60)
        sent.append((subscription, body, plain))
    device = await device.reconnect(connect)
    for subscription, body, plain in sent:
        await device.expect_message(subscription, body, plain, 60)
    for i, subscription in enumerate([second, first, second]):
        plain = f"live {i}".encode()
        response, body = await post_message(put, subscription, plain)
        assert_created(response, origin, 60)
        sent.append((subscription, body, plain))
    for subscription, body, plain in sent[5:]:
        await device.expect_message(subscription, body, plain, 60)


async def test_more_stored_messages_than_one_flush_all_arrive_in_order(connect, origin, put, node):
    """However the server windows its flush (autopush: 10, then wait for acks)."""
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    sent = []
    for i in range(25):
        plain = f"backlog {i}".encode()
        response, body = await post_message(put, subscription, plain)
        assert_created(response, origin, 60)
        sent.append((body, plain))
    device = await device.reconnect(connect)
    for body, plain in sent:
        await device.ack_frame(await device.expect_message(subscription, body, plain, 60))
    await device.ping()
    device = await device.reconnect(connect)
    await device.expect_silence()


@pytest.mark.server(max_queued=1)
async def test_an_expired_message_is_not_delivered_and_frees_its_place(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, _ = await post_message(put, subscription, b"short-lived", ttl=1)
    assert_created(response, origin, 1)
    response, _ = await post_message(put, subscription, b"no room")
    assert_error(response, 429, None)
    await asyncio.sleep(1.1)  # the TTL runs out: time itself is under test
    response, body = await post_message(put, subscription, b"fresh")
    assert_created(response, origin, 60)
    device = await device.reconnect(connect)
    await device.expect_message(subscription, body, b"fresh", 60)
    await device.expect_silence()


# --- TTL 0 (docs/WEBPUSH.md) -------------------------------------------


async def test_ttl_0_to_an_offline_device_is_201_and_never_delivered(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, _ = await post_message(put, subscription, b"now or never", ttl=0)
    assert_created(response, origin, 0)
    device = await device.reconnect(connect)
    await device.expect_silence()


async def test_ttl_0_to_a_connected_device_is_delivered_once(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"now", ttl=0)
    assert_created(response, origin, 0)
    await device.expect_message(subscription, body, b"now", 0)
    # Never stored: not acked, yet not sent again.
    device = await device.reconnect(connect)
    await device.expect_silence()


async def test_ttl_above_60_days_is_clamped(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"long", ttl=10**9)
    assert_created(response, origin, MAX_TTL)
    await device.expect_message(subscription, body, b"long", MAX_TTL)


# --- Topic (docs/WEBPUSH.md) ------------------------------------------------


async def test_a_topic_replaces_the_stored_message_and_takes_its_latest_position(
    connect, origin, put, node
):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    messages = []
    for plain, topic in ((b"old score", "score"), (b"news", None), (b"new score", "score")):
        headers = {"Topic": topic} if topic else {}
        response, body = await post_message(put, subscription, plain, **headers)
        assert_created(response, origin, 60)
        messages.append((body, plain))
    device = await device.reconnect(connect)
    for body, plain in messages[1:]:
        await device.expect_message(subscription, body, plain, 60)
    await device.expect_silence()


async def test_an_ack_of_the_replaced_version_does_not_delete_the_new_one(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, old_body = await post_message(put, subscription, b"1-0", Topic="score")
    assert_created(response, origin, 60)
    old = await device.expect_message(subscription, old_body, b"1-0", 60)
    # The old one is on the wire, unacked, when its replacement comes.
    response, new_body = await post_message(put, subscription, b"2-0", Topic="score")
    assert_created(response, origin, 60)
    await device.ack_frame(old)
    # Sent live at once or after the ack freed the window: either way before the pong.
    frames = await device.frames_until_pong()
    assert len(frames) == 1, frames
    new = frames[0]
    assert new == notification(
        subscription.channel_id, new["version"], 60, new_body, {"encoding": "aes128gcm"}
    )
    assert new["version"] != old["version"]
    assert subscription.decrypt(new) == b"2-0"
    device = await device.reconnect(connect)
    assert await device.expect_message(subscription, new_body, b"2-0", 60) == new
    await device.ack_frame(new)
    await device.ping()
    device = await device.reconnect(connect)
    await device.expect_silence()


# --- the queue cap (docs/WEBPUSH.md) ---------------------------------------------------


@pytest.mark.server(max_queued=3)
async def test_more_than_max_queued_undelivered_is_429(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    accepted = []
    for i in range(3):
        plain = f"queued {i}".encode()
        response, body = await post_message(put, subscription, plain)
        assert_created(response, origin, 60)
        accepted.append((body, plain))
    response, _ = await post_message(put, subscription, b"one too many")
    assert_error(response, 429, None)
    assert_retry_after(response)
    device = await device.reconnect(connect)
    frames = [await device.expect_message(subscription, b, p, 60) for b, p in accepted]
    await device.expect_silence()  # nothing accepted was evicted, nothing refused was kept
    for frame in frames:
        await device.ack_frame(frame)
    await device.ping()
    response, body = await post_message(put, subscription, b"room again")
    assert_created(response, origin, 60)
    await device.expect_message(subscription, body, b"room again", 60)


# --- DELETE /m/<id> (docs/WEBPUSH.md) --------------------------------------------------


async def test_delete_before_delivery_cancels_the_message(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, _ = await post_message(put, subscription, b"cancelled")
    location = assert_created(response, origin, 60)
    response, kept_body = await post_message(put, subscription, b"kept")
    assert_created(response, origin, 60)
    for _ in range(2):  # idempotent
        deleted = await post(put, location, method="DELETE")
        assert (deleted.status, deleted.body) == (204, b"")
    device = await device.reconnect(connect)
    await device.expect_message(subscription, kept_body, b"kept", 60)
    await device.expect_silence()


async def test_delete_of_a_replaced_topic_message_keeps_its_replacement(connect, origin, put, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, _ = await post_message(put, subscription, b"old", Topic="score")
    old_location = assert_created(response, origin, 60)
    response, body = await post_message(put, subscription, b"new", Topic="score")
    assert_created(response, origin, 60)
    deleted = await post(put, old_location, method="DELETE")
    assert (deleted.status, deleted.body) == (204, b"")
    device = await device.reconnect(connect)
    await device.expect_message(subscription, body, b"new", 60)


async def test_delete_after_delivery_is_204(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"delivered")
    location = assert_created(response, origin, 60)
    await device.ack_frame(await device.expect_message(subscription, body, b"delivered", 60))
    await device.ping()
    deleted = await post(put, location, method="DELETE")
    assert (deleted.status, deleted.body) == (204, b"")


@pytest.mark.parametrize("message_id", ["garbage", "endpoint-token"])
async def test_delete_of_an_id_that_does_not_decode_is_404(connect, origin, put, message_id):
    _, subscription = await registered(connect, origin)
    if message_id == "endpoint-token":
        message_id = token_of(subscription.endpoint)
    response = await post(put, f"{origin}/m/{message_id}", method="DELETE")
    assert_error(response, 404, 102)
