"""A WebPush device and a WebPush app server, for tests against a real server.

`WebPushDevice` speaks the WebPush dialect of the WebSocket protocol over the
conftest's `connect` fixture: hello with `use_webpush`, register with or
without an application server key, notification frames, ack and nack. Like
Firefox, it makes one P-256 key pair and auth secret per subscription and
decrypts what arrives with http_ece.

The app-server side sends with pywebpush's `WebPusher` in a worker thread (it
blocks on requests) while the in-process Tornado server keeps running, and
records the exact bytes it put on the wire.

Wire rules: docs/WEBPUSH.md.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import http_ece
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pywebpush import WebPusher
from tornado.httpclient import HTTPResponse

from tests.conftest import Device, new_id
from tests.wsclient import FRAME_TIMEOUT

UAID = re.compile(r"[0-9a-f]{32}")
SUBPROTOCOL = "push-notification"
MAX_TTL = 5_184_000  # 60 days (docs/WEBPUSH.md)
AES128GCM = {"encoding": "aes128gcm"}

Connect = Callable[..., Awaitable[Device]]


def b64u(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_padded(data: bytes) -> str:
    """base64url with '=' padding, as Firefox sends `key`."""
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_raw(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 65-byte uncompressed point of a P-256 key."""
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def header_param(value: str, name: str) -> str:
    """One `name=value` parameter of an Encryption or Crypto-Key header."""
    for part in re.split(r"[;,]", value):
        key, sep, val = part.strip().partition("=")
        if sep and key.strip() == name:
            return val.strip()
    raise AssertionError(f"no {name}= in {value!r}")


@dataclass
class Subscription:
    """One push subscription as the user agent holds it: endpoint and decryption keys."""

    channel_id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def info(self) -> dict[str, Any]:
        """The subscription JSON an app server stores (PushSubscription.toJSON())."""
        return {
            "endpoint": self.endpoint,
            "keys": {"p256dh": b64u(public_raw(self.private_key)), "auth": b64u(self.auth)},
        }

    def encrypt(self, plain: bytes) -> bytes:
        """An aes128gcm body for this subscription, as an app server builds it (RFC 8291)."""
        return http_ece.encrypt(
            plain,
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=public_raw(self.private_key),
            auth_secret=self.auth,
            version="aes128gcm",
        )

    def encrypt_aesgcm(self, plain: bytes) -> tuple[bytes, bytes, bytes]:
        """A legacy aesgcm body for this subscription: (body, salt, sender's public key)."""
        sender = ec.generate_private_key(ec.SECP256R1())
        salt = os.urandom(16)
        body = http_ece.encrypt(
            plain,
            salt=salt,
            private_key=sender,
            dh=public_raw(self.private_key),
            auth_secret=self.auth,
            version="aesgcm",
        )
        return body, salt, public_raw(sender)

    def decrypt(self, frame: dict[str, Any]) -> bytes | None:
        """The plaintext of a notification frame; None for a push without data."""
        if "data" not in frame:
            assert "headers" not in frame, frame
            return None
        body = b64u_decode(frame["data"])
        headers = frame["headers"]
        if headers["encoding"] == "aes128gcm":
            return http_ece.decrypt(
                body, private_key=self.private_key, auth_secret=self.auth, version="aes128gcm"
            )
        assert headers["encoding"] == "aesgcm", headers
        # Firefox decodes salt and dh with padding "reject" (docs/WEBPUSH.md).
        salt = header_param(headers["encryption"], "salt")
        dh = header_param(headers["crypto_key"], "dh")
        for value in (salt, dh):
            assert re.fullmatch(r"[A-Za-z0-9_-]+", value), headers
        return http_ece.decrypt(
            body,
            salt=b64u_decode(salt),
            private_key=self.private_key,
            dh=b64u_decode(dh),
            auth_secret=self.auth,
            version="aesgcm",
        )


def notification(
    channel_id: str,
    version: str,
    ttl: int,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The exact notification frame the contract promises for one message."""
    frame: dict[str, Any] = {
        "messageType": "notification",
        "channelID": channel_id,
        "version": version,
        "ttl": ttl,
    }
    if data:
        frame["data"] = b64u(data)
        frame["headers"] = headers
    return frame


class WebPushDevice:
    """A WebPush user agent on one socket; its subscriptions outlive the socket."""

    def __init__(self, device: Device, origin: str) -> None:
        self.device = device
        self.origin = origin  # the server's endpoint_url
        self.uaid = ""
        self.subscriptions: dict[str, Subscription] = {}

    # --- raw frames, delegated -------------------------------------------------

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.device.send(frame)

    async def recv(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        return await self.device.recv(timeout)

    async def request(self, frame: dict[str, Any] | str) -> dict[str, Any]:
        return await self.device.request(frame)

    async def expect_silence(self) -> None:
        await self.device.expect_silence()

    async def expect_closed(self) -> int | None:
        return await self.device.expect_closed()

    async def ping(self) -> None:
        """A ping whose `{}` is the very next frame: nothing else was queued before it."""
        assert await self.request({}) == {}

    def close(self) -> None:
        self.device.close()

    # --- the protocol ------------------------------------------------------------

    async def hello(self, uaid: str | None = None, **extra: Any) -> dict[str, Any]:
        """hello with use_webpush; checks the reply's exact shape and keeps the UAID."""
        frame: dict[str, Any] = {"messageType": "hello", "use_webpush": True}
        if uaid is not None:
            frame["uaid"] = uaid
        frame.update(extra)
        reply = await self.request(frame)
        assert reply == {
            "messageType": "hello",
            "uaid": reply.get("uaid"),
            "status": 200,
            "use_webpush": True,
            "broadcasts": {},
        }, reply
        assert UAID.fullmatch(reply["uaid"]), reply
        self.uaid = reply["uaid"]
        return reply

    async def register(self, channel_id: str | None = None, key: str | None = None) -> Subscription:
        """register (with `key` when given); checks the exact reply, returns the subscription."""
        channel_id = channel_id or new_id()
        frame: dict[str, Any] = {"messageType": "register", "channelID": channel_id}
        if key is not None:
            frame["key"] = key
        reply = await self.request(frame)
        endpoint = reply.get("pushEndpoint", "")
        assert reply == {
            "messageType": "register",
            "channelID": channel_id,
            "status": 200,
            "uaid": self.uaid,
            "pushEndpoint": endpoint,
        }, reply
        kind = "v1" if key is None else "v2"
        assert re.fullmatch(re.escape(f"{self.origin}/wpush/{kind}/") + r"[A-Za-z0-9_-]+", endpoint)
        subscription = Subscription(channel_id, endpoint)
        self.subscriptions[channel_id] = subscription
        return subscription

    async def unregister(self, channel_id: str, code: int = 200) -> None:
        frame = {"messageType": "unregister", "channelID": channel_id, "code": code}
        reply = await self.request(frame)
        assert reply == {"messageType": "unregister", "channelID": channel_id, "status": 200}

    async def notification(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        """The next frame, which must be a notification for one of our subscriptions."""
        frame = await self.recv(timeout)
        assert frame.get("messageType") == "notification", frame
        assert frame.get("channelID") in self.subscriptions, frame
        version = frame.get("version")
        assert isinstance(version, str) and version, frame
        return frame

    async def receive(self) -> tuple[dict[str, Any], bytes | None]:
        """The next notification and its decrypted payload."""
        frame = await self.notification()
        return frame, self.subscriptions[frame["channelID"]].decrypt(frame)

    async def expect_message(
        self,
        subscription: Subscription,
        body: bytes,
        plain: bytes | None,
        ttl: int,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The next frame is exactly this message's, and it decrypts to `plain`."""
        frame = await self.notification()
        if body and headers is None:
            headers = AES128GCM
        expected = notification(subscription.channel_id, frame["version"], ttl, body, headers)
        assert frame == expected, (frame, expected)
        assert subscription.decrypt(frame) == plain
        return frame

    async def frames_until_pong(self) -> list[dict[str, Any]]:
        """Ping; every frame the server sent before its `{}` reply."""
        await self.send({})
        frames = []
        while (frame := await self.recv()) != {}:
            frames.append(frame)
        return frames

    async def ack(self, channel_id: str, version: str, code: int = 100) -> None:
        """Ack one message (no reply is expected)."""
        update = {"channelID": channel_id, "version": version, "code": code}
        await self.send({"messageType": "ack", "updates": [update]})

    async def ack_frame(self, frame: dict[str, Any], code: int = 100) -> None:
        await self.ack(frame["channelID"], frame["version"], code)

    async def nack(self, version: str, code: int = 301) -> None:
        await self.send({"messageType": "nack", "version": version, "code": code})

    async def hang_up(self, node: Any) -> None:
        """Close and wait until the server let go of the UAID, so POSTs find it offline."""
        self.close()
        await released(node, self.uaid)

    async def reconnect(self, connect: Connect) -> WebPushDevice:
        """The same user agent on a new socket: hello with its UAID, which must be echoed."""
        device = await open_device(connect, self.origin)
        device.subscriptions = self.subscriptions
        reply = await device.hello(self.uaid)
        assert reply["uaid"] == self.uaid
        return device


async def released(node: Any, uaid: str) -> None:
    """Wait until no socket of this node holds `uaid`."""

    async def poll() -> None:
        while node.registry.get(uaid) is not None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), FRAME_TIMEOUT)


async def open_device(connect: Connect, origin: str) -> WebPushDevice:
    """A new socket offering Firefox's sub-protocol, not yet identified."""
    return WebPushDevice(await connect([SUBPROTOCOL]), origin)


async def webpush_device(connect: Connect, origin: str, uaid: str | None = None) -> WebPushDevice:
    """A device that has said hello."""
    device = await open_device(connect, origin)
    await device.hello(uaid)
    return device


# --- the app-server side ---------------------------------------------------------


@dataclass
class Sent:
    """What the sender put on the wire: headers (lower-cased names) and body bytes."""

    headers: dict[str, str]
    body: bytes


class RecordingSession(requests.Session):
    """A requests session that keeps each POST's headers and body, ignoring proxy settings."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.sent: list[Sent] = []

    def post(self, url: Any, data: Any = None, json: Any = None, **kwargs: Any) -> Any:
        headers = {str(k).lower(): str(v) for k, v in (kwargs.get("headers") or {}).items()}
        self.sent.append(Sent(headers, data or b""))
        return super().post(url, data=data, json=json, **kwargs)


@dataclass
class Answer:
    """An HTTP response from either client, in one shape."""

    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def answer(response: requests.Response | HTTPResponse) -> Answer:
    if isinstance(response, requests.Response):
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Answer(response.status_code, response.reason, headers, response.content)
    headers = {k.lower(): v for k, v in response.headers.get_all()}
    return Answer(response.code, response.reason, headers, response.body or b"")


async def push(
    subscription: Subscription | dict[str, Any],
    data: bytes = b"",
    *,
    ttl: int = 60,
    content_encoding: str = "aes128gcm",
    headers: dict[str, str] | None = None,
) -> tuple[Answer, Sent]:
    """Send with pywebpush's WebPusher in a thread; the answer and the exact request sent."""
    info = subscription.info() if isinstance(subscription, Subscription) else subscription
    session = RecordingSession()

    def send() -> requests.Response:
        with session:
            return WebPusher(info, requests_session=session).send(
                data,
                dict(headers or {}),
                ttl=ttl,
                content_encoding=content_encoding,
                timeout=FRAME_TIMEOUT,
            )

    response = await asyncio.to_thread(send)
    assert len(session.sent) == 1
    return answer(response), session.sent[0]


async def post(
    put: Callable[..., Awaitable[HTTPResponse]],
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> Answer:
    """A raw request with exactly these headers (the conftest's `put`, never raising)."""
    return answer(await put(url, body, dict(headers or {}), method=method))


async def post_message(
    put: Callable[..., Awaitable[HTTPResponse]],
    subscription: Subscription,
    plain: bytes,
    ttl: int | None = 60,
    **headers: str,
) -> tuple[Answer, bytes]:
    """POST `plain` encrypted with aes128gcm; the answer and the exact body sent."""
    body = subscription.encrypt(plain)
    fields = {"Content-Encoding": "aes128gcm", **headers}
    if ttl is not None:
        fields["TTL"] = str(ttl)
    return await post(put, subscription.endpoint, body, fields), body


def assert_created(response: Answer, origin: str, ttl: int) -> str:
    """201, empty body, Location under /m/ and the TTL used; returns the Location."""
    assert response.status == 201, (response.status, response.body)
    assert response.body == b""
    location = response.headers.get("location", "")
    assert re.fullmatch(re.escape(f"{origin}/m/") + r"[A-Za-z0-9_-]+", location), location
    assert response.headers.get("ttl") == str(ttl), response.headers
    return location


def assert_error(response: Answer, status: int, errno: int | None) -> dict[str, Any]:
    """The JSON error of the contract: code, errno, reason phrase, a message; returns it.

    errno None means "any integer" (the contract leaves the 429 errno open).
    """
    assert response.status == status, (response.status, response.body)
    assert response.headers.get("content-type", "").split(";")[0] == "application/json"
    body = response.json()
    assert set(body) == {"code", "errno", "error", "message"}, body
    assert body["code"] == status, body
    if errno is None:
        assert type(body["errno"]) is int, body
    else:
        assert body["errno"] == errno, body
    phrase = http.client.responses[status]
    assert body["error"] == phrase == response.reason, (body, response.reason)
    assert isinstance(body["message"], str) and body["message"], body
    return body


def assert_retry_after(response: Answer) -> None:
    retry = response.headers.get("retry-after", "")
    assert retry.isdigit() and int(retry) > 0, response.headers


def now() -> int:
    return int(time.time())
