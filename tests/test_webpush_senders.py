"""Real senders against the server: pywebpush, py-vapid and http_ece end to end.

An emulated device (tests/webpush_device.py) holds each subscription's
private key and auth secret, receives the notification frame and decrypts it
with http_ece; the bytes must be exactly what the app server encrypted, and
the frame's `data` exactly the body pywebpush sent. Every status the server
answers a POST with is checked with its errno and headers, for the edge
cases of docs/WEBPUSH.md.

Rules: docs/WEBPUSH.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from py_vapid import Vapid, Vapid01
from py_vapid.jwt import sign
from pywebpush import webpush

from simplepush.tokens import TokenCodec
from tests.conftest import token_of
from tests.webpush_device import (
    AES128GCM,
    MAX_TTL,
    Answer,
    Subscription,
    WebPushDevice,
    answer,
    assert_created,
    assert_error,
    b64u,
    b64u_padded,
    notification,
    now,
    post,
    post_message,
    public_raw,
    push,
    webpush_device,
)

pytestmark = pytest.mark.gen_test(timeout=15)

SUB = "mailto:test@example.com"


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
def origin(http_port: int) -> str:
    """The server's endpoint_url (the conftest's default), which is also the VAPID aud."""
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def vapid() -> Vapid:
    """The application server's VAPID key pair (RFC 8292 signer)."""
    key = Vapid()
    key.generate_keys()
    return key


@pytest.fixture
def other_vapid() -> Vapid:
    key = Vapid()
    key.generate_keys()
    return key


def vapid_key(vapid: Vapid01) -> bytes:
    return public_raw(vapid.private_key)


def claims(origin: str, **changes: Any) -> dict[str, Any]:
    """Good claims; a change of None drops the claim."""
    result: dict[str, Any] = {"sub": SUB, "aud": origin, "exp": now() + 3600}
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def raw_vapid(vapid: Vapid01, claim_set: dict[str, Any]) -> dict[str, str]:
    """An RFC 8292 header over claims py-vapid's Vapid.sign() would refuse to sign."""
    token = sign(claim_set, vapid.private_key)
    return {"Authorization": f"vapid t={token},k={b64u(vapid_key(vapid))}"}


async def registered(
    connect: Any, origin: str, key: bytes | None = None, padded: bool = True
) -> tuple[WebPushDevice, Subscription]:
    """A device with one subscription, bound to `key` (sent padded, as Firefox does) if given."""
    device = await webpush_device(connect, origin)
    text = None if key is None else (b64u_padded(key) if padded else b64u(key))
    return device, await device.register(key=text)


def expected_headers(encoding: str, sent_headers: dict[str, str]) -> dict[str, str]:
    """The crypto headers forwarded in the frame for what pywebpush sent."""
    if encoding == "aes128gcm":
        return AES128GCM
    return {
        "encoding": "aesgcm",
        "encryption": sent_headers["encryption"],
        "crypto_key": sent_headers["crypto-key"],
    }


async def assert_next_is(put: Any, device: WebPushDevice, subscription: Subscription) -> None:
    """A fresh message's frame is the next one: nothing refused before it was delivered."""
    response, body = await post_message(put, subscription, b"next")
    assert_created(response, device.origin, 60)
    await device.expect_message(subscription, body, b"next", 60)


def unauthorized(response: Answer, status: int) -> None:
    """401/403 errno 109 with `WWW-Authenticate: vapid` (docs/WEBPUSH.md)."""
    assert_error(response, status, 109)
    assert response.headers.get("www-authenticate") == "vapid", response.headers


# --- payloads end to end (docs/WEBPUSH.md) ------------------------------


@pytest.mark.parametrize(
    ("encoding", "size"),
    [
        *(("aes128gcm", size) for size in (0, 1, 100, 3993)),
        *(("aesgcm", size) for size in (0, 1, 100, 3993, 4078)),
    ],
)
async def test_pywebpush_payload_arrives_byte_for_byte(connect, origin, encoding, size):
    """3993 is aes128gcm's largest plaintext in 4096 bytes of body; 4078 is aesgcm's."""
    device, subscription = await registered(connect, origin)
    payload = os.urandom(size)
    response, sent = await push(subscription, payload, ttl=60, content_encoding=encoding)
    assert len(sent.body) <= 4096
    assert_created(response, origin, 60)
    frame = await device.notification()
    if size == 0:
        # pywebpush sends no body and no Content-Encoding for an empty payload.
        assert sent.body == b"" and "content-encoding" not in sent.headers
        assert frame == notification(subscription.channel_id, frame["version"], 60)
    else:
        assert sent.headers["content-encoding"] == encoding
        headers = expected_headers(encoding, sent.headers)
        assert frame == notification(
            subscription.channel_id, frame["version"], 60, sent.body, headers
        )
    assert subscription.decrypt(frame) == (payload if size else None)
    await device.ack_frame(frame)
    await device.ping()


async def test_an_encrypted_empty_plaintext_arrives_empty(connect, origin, put):
    device, subscription = await registered(connect, origin)
    response, body = await post_message(put, subscription, b"")
    assert_created(response, origin, 60)
    await device.expect_message(subscription, body, b"", 60)


@pytest.mark.parametrize(("encoding", "size"), [("aes128gcm", 3994), ("aesgcm", 4079)])
async def test_pywebpush_body_over_4096_bytes_is_413(connect, origin, put, encoding, size):
    device, subscription = await registered(connect, origin)
    response, sent = await push(subscription, os.urandom(size), content_encoding=encoding)
    assert len(sent.body) == 4097
    assert_error(response, 413, 104)
    await assert_next_is(put, device, subscription)


async def test_the_top_level_webpush_call_with_vapid(connect, origin, vapid):
    """pywebpush's one-call API: it derives aud from the endpoint and sets exp itself."""
    device, subscription = await registered(connect, origin, vapid_key(vapid))
    session = requests.Session()
    session.trust_env = False

    def send() -> requests.Response:
        with session:
            return webpush(
                subscription.info(),
                "hello",
                vapid_private_key=vapid,
                vapid_claims={"sub": SUB},
                ttl=60,
                requests_session=session,
            )

    assert_created(answer(await asyncio.to_thread(send)), origin, 60)
    frame = await device.notification()
    assert subscription.decrypt(frame) == b"hello"


# --- VAPID accepted (docs/WEBPUSH.md) -----------------------------------


@pytest.mark.parametrize("scheme", ["rfc8292", "draft-01"])
@pytest.mark.parametrize("encoding", ["aes128gcm", "aesgcm"])
async def test_valid_vapid_on_a_v1_endpoint_is_201(connect, origin, vapid, scheme, encoding):
    device, subscription = await registered(connect, origin)
    signer = vapid if scheme == "rfc8292" else Vapid01(private_key=vapid.private_key)
    headers = signer.sign(claims(origin))
    response, sent = await push(subscription, b"signed", headers=headers, content_encoding=encoding)
    assert_created(response, origin, 60)
    frame = await device.notification()
    assert frame["data"] == b64u(sent.body)
    assert frame["headers"]["encoding"] == encoding
    assert subscription.decrypt(frame) == b"signed"


@pytest.mark.parametrize("scheme", ["rfc8292", "draft-01"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded-key", "unpadded-key"])
async def test_vapid_with_the_bound_key_on_a_v2_endpoint_is_201(
    connect, origin, vapid, scheme, padded
):
    device, subscription = await registered(connect, origin, vapid_key(vapid), padded)
    signer = vapid if scheme == "rfc8292" else Vapid01(private_key=vapid.private_key)
    response, sent = await push(subscription, b"bound", headers=signer.sign(claims(origin)))
    assert_created(response, origin, 60)
    frame = await device.notification()
    assert frame == notification(
        subscription.channel_id, frame["version"], 60, sent.body, frame["headers"]
    )
    assert frame["headers"]["encoding"] == "aes128gcm"
    assert subscription.decrypt(frame) == b"bound"


def good_claims(case: str, origin: str) -> dict[str, Any]:
    t = now()
    change: dict[str, Any] = {
        "exp-23h": {"exp": t + 23 * 3600},
        "exp-1min": {"exp": t + 60},
        "exp-30s-ago": {"exp": t - 30},  # within the 60 s of clock skew (6.15)
        "exp-24h-30s": {"exp": t + 86400 + 30},
        "exp-numeric-string": {"exp": str(t + 3600)},  # accepted (docs/WEBPUSH.md)
        "sub-https": {"sub": "https://example.com"},
        "sub-mailto": {"sub": "mailto:ops@example.com"},
        "no-sub": {"sub": None},
    }[case]
    return claims(origin, **change)


@pytest.mark.parametrize(
    "case",
    [
        "exp-23h",
        "exp-1min",
        "exp-30s-ago",
        "exp-24h-30s",
        "exp-numeric-string",
        "sub-https",
        "sub-mailto",
        "no-sub",
    ],
)
async def test_valid_claims_are_accepted(connect, origin, put, vapid, case):
    """sub is optional (docs/WEBPUSH.md); exp from now to 24 h ahead, give or take skew."""
    device, subscription = await registered(connect, origin, vapid_key(vapid))
    body = subscription.encrypt(b"claims ok")
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm"}
    headers.update(raw_vapid(vapid, good_claims(case, origin)))
    response = await post(put, subscription.endpoint, body, headers)
    assert_created(response, origin, 60)
    await device.expect_message(subscription, body, b"claims ok", 60)


@pytest.mark.parametrize(
    "case",
    ["scheme-upper", "scheme-spaces", "k-first", "k-padded", "draft-01-k-padded"],
)
async def test_vapid_header_spellings_are_accepted(connect, origin, put, vapid, case):
    """Scheme case-insensitive, spaces optional, padded keys tolerated (docs/WEBPUSH.md)."""
    device, subscription = await registered(connect, origin, vapid_key(vapid))
    token = sign(claims(origin), vapid.private_key)
    key, padded = b64u(vapid_key(vapid)), b64u_padded(vapid_key(vapid))
    auth = {
        "scheme-upper": {"Authorization": f"VAPID t={token},k={key}"},
        "scheme-spaces": {"Authorization": f"Vapid t={token}, k={key}"},
        "k-first": {"Authorization": f"vapid k={key},t={token}"},
        "k-padded": {"Authorization": f"vapid t={token},k={padded}"},
        "draft-01-k-padded": {
            "Authorization": f"WebPush {token}",
            "Crypto-Key": f"p256ecdsa={padded}",
        },
    }[case]
    body = subscription.encrypt(b"spelling")
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm", **auth}
    assert_created(await post(put, subscription.endpoint, body, headers), origin, 60)
    frame = await device.notification()
    assert frame["data"] == b64u(body)
    assert subscription.decrypt(frame) == b"spelling"


@pytest.mark.parametrize("urgency", ["very-low", "low", "normal", "high"])
async def test_urgency_is_accepted(connect, origin, urgency):
    """Stored and ignored for delivery (docs/WEBPUSH.md)."""
    device, subscription = await registered(connect, origin)
    response, _ = await push(subscription, b"urgent", headers={"Urgency": urgency})
    assert_created(response, origin, 60)
    assert subscription.decrypt(await device.notification()) == b"urgent"


def jwt_with_header(header: dict[str, Any], claim_set: dict[str, Any], vapid: Vapid01) -> str:
    """A JWT with any JOSE header, ES256-signed all the same (or unsigned for alg none)."""
    head = b64u(json.dumps(header).encode())
    body = b64u(json.dumps(claim_set).encode())
    signing_input = f"{head}.{body}"
    if header.get("alg") == "none":
        return f"{signing_input}."
    der = vapid.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# --- VAPID refused (docs/WEBPUSH.md) --------------------------------------------


async def test_v2_without_vapid_is_401(connect, origin, put, vapid):
    device, subscription = await registered(connect, origin, vapid_key(vapid))
    response, _ = await push(subscription, b"unsigned")
    unauthorized(response, 401)
    response, _ = await push(subscription, b"signed", headers=vapid.sign(claims(origin)))
    assert_created(response, origin, 60)
    frame = await device.notification()
    assert subscription.decrypt(frame) == b"signed"  # the unsigned one never came


@pytest.mark.parametrize("scheme", ["rfc8292", "draft-01"])
async def test_v2_with_another_key_is_403(connect, origin, vapid, other_vapid, scheme):
    device, subscription = await registered(connect, origin, vapid_key(vapid))
    signer = other_vapid if scheme == "rfc8292" else Vapid01(private_key=other_vapid.private_key)
    response, _ = await push(subscription, b"wrong key", headers=signer.sign(claims(origin)))
    unauthorized(response, 403)
    await device.ping()


def bad_vapid(case: str, origin: str, vapid: Vapid, other: Vapid) -> dict[str, str]:
    """The headers of one invalid VAPID assertion made with `vapid`'s public key."""
    port = int(origin.rsplit(":", 1)[1])
    signed = {
        "aud-other-host": {"aud": "https://example.com"},
        "aud-other-port": {"aud": f"http://127.0.0.1:{port + 1}"},
        "aud-https": {"aud": origin.replace("http:", "https:")},
        "aud-localhost": {"aud": f"http://localhost:{port}"},
        "exp-past": {"exp": now() - 3600},
        "exp-over-24h": {"exp": now() + 86400 + 3600},
    }
    if case in signed:
        return vapid.sign(claims(origin, **signed[case]))
    if case == "sub-not-a-uri":
        return Vapid(private_key=vapid.private_key, conf={"no-strict": True}).sign(
            claims(origin, sub="admin")
        )
    raw = {
        "aud-trailing-slash": {"aud": origin + "/"},
        "aud-with-path": {"aud": origin + "/wpush"},
        "no-aud": {"aud": None},
        "no-exp": {"exp": None},
        "exp-not-a-number": {"exp": "soon"},
        "sub-http": {"sub": "http://example.com"},
    }
    if case in raw:
        return raw_vapid(vapid, claims(origin, **raw[case]))
    if case in ("alg-hs256", "alg-none"):
        alg = {"alg-hs256": "HS256", "alg-none": "none"}[case]
        token = jwt_with_header({"typ": "JWT", "alg": alg}, claims(origin), vapid)
        return {"Authorization": f"vapid t={token},k={b64u(vapid_key(vapid))}"}
    assert case == "bad-signature"
    # Signed by another key, presented with ours.
    token = sign(claims(origin), other.private_key)
    return {"Authorization": f"vapid t={token},k={b64u(vapid_key(vapid))}"}


BAD_VAPID = [
    "aud-other-host",
    "aud-other-port",
    "aud-https",
    "aud-localhost",
    "aud-trailing-slash",
    "aud-with-path",
    "no-aud",
    "exp-past",
    "exp-over-24h",
    "no-exp",
    "exp-not-a-number",
    "sub-not-a-uri",
    "sub-http",
    "bad-signature",
    "alg-hs256",
    "alg-none",
]


@pytest.mark.parametrize("bound", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", BAD_VAPID)
async def test_invalid_vapid_is_403(connect, origin, vapid, other_vapid, case, bound):
    """On v1 VAPID is optional, but one that is sent is verified (docs/WEBPUSH.md)."""
    device, subscription = await registered(connect, origin, vapid_key(vapid) if bound else None)
    headers = bad_vapid(case, origin, vapid, other_vapid)
    response, _ = await push(subscription, b"refused", headers=headers)
    unauthorized(response, 403)
    await device.ping()


@pytest.mark.parametrize("bound", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize(
    "case", ["basic", "vapid-no-k", "vapid-no-t", "vapid-empty", "webpush-no-crypto-key"]
)
async def test_an_unparseable_authorization_is_401(connect, origin, vapid, put, case, bound):
    device, subscription = await registered(connect, origin, vapid_key(vapid) if bound else None)
    token = sign(claims(origin), vapid.private_key)
    authorization = {
        "basic": "Basic dXNlcjpwYXNz",
        "vapid-no-k": f"vapid t={token}",
        "vapid-no-t": f"vapid k={b64u(vapid_key(vapid))}",
        "vapid-empty": "vapid",
        "webpush-no-crypto-key": f"WebPush {token}",
    }[case]
    body = subscription.encrypt(b"refused")
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm", "Authorization": authorization}
    unauthorized(await post(put, subscription.endpoint, body, headers), 401)
    await device.ping()


# --- tokens: 404 and 410 (docs/WEBPUSH.md) -------------------------------------------


def flip(token: str, at: int) -> str:
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "flipped",
        "truncated",
        "simplepush-token",
        "v2-token-on-v1",
        "v1-token-on-v2",
        "message-id",
        "unknown-version",
    ],
)
async def test_a_token_that_does_not_decode_is_404(connect, origin, put, vapid, case):
    device, v1 = await registered(connect, origin)
    v2 = await device.register(key=b64u_padded(vapid_key(vapid)))
    legacy = await connect()
    await legacy.hello()
    simplepush_token = token_of(await legacy.register())
    one, two = token_of(v1.endpoint), token_of(v2.endpoint)
    path = {
        "garbage": "/wpush/v1/garbage",
        "flipped": f"/wpush/v1/{flip(one, len(one) // 2)}",
        "truncated": f"/wpush/v1/{one[:-4]}",
        "simplepush-token": f"/wpush/v1/{simplepush_token}",
        "v2-token-on-v1": f"/wpush/v1/{two}",
        "v1-token-on-v2": f"/wpush/v2/{one}",
        "message-id": "",
        "unknown-version": f"/wpush/v3/{one}",
    }[case]
    if case == "message-id":
        response, _ = await post_message(put, v1, b"for its location", ttl=0)
        location = assert_created(response, origin, 0)
        path = f"/wpush/v1/{token_of(location)}"
        await device.notification()
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm"}
    headers.update(vapid.sign(claims(origin)))
    response = await post(put, origin + path, v1.encrypt(b"nowhere"), headers)
    assert_error(response, 404, 102)
    await device.ping()


@pytest.mark.parametrize("case", ["unregistered-channel", "unknown-uaid", "unknown-channel"])
async def test_a_subscription_that_is_gone_is_410(connect, origin, put, server_settings, case):
    device, subscription = await registered(connect, origin)
    endpoint = subscription.endpoint
    codec = TokenCodec(list(server_settings.server.token_key))
    if case == "unregistered-channel":
        await device.unregister(subscription.channel_id)
    elif case == "unknown-uaid":
        endpoint = f"{origin}/wpush/v1/" + codec.encode_webpush(
            uuid.uuid4().hex, uuid.uuid4().hex, None
        )
    else:
        endpoint = f"{origin}/wpush/v1/" + codec.encode_webpush(device.uaid, uuid.uuid4().hex, None)
    response = await post(
        put, endpoint, subscription.encrypt(b"gone"), {"TTL": "60", "Content-Encoding": "aes128gcm"}
    )
    assert_error(response, 410, 106)
    assert response.headers.get("cache-control") == "max-age=86400", response.headers
    await device.ping()


# --- TTL (docs/WEBPUSH.md-6.9) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "errno"),
    [
        (None, 111),
        ("abc", 112),
        ("1.5", 112),
        ("1e3", 112),
        ("0x10", 112),
        ("-1", 114),
        ("-86400", 114),
    ],
    ids=["missing", "abc", "float", "exponent", "hex", "minus-1", "minus-day"],
)
async def test_a_bad_ttl_is_400(connect, origin, put, ttl, errno):
    device, subscription = await registered(connect, origin)
    headers = {"Content-Encoding": "aes128gcm"}
    if ttl is not None:
        headers["TTL"] = ttl
    response = await post(put, subscription.endpoint, subscription.encrypt(b"x"), headers)
    assert_error(response, 400, errno)
    await assert_next_is(put, device, subscription)


@pytest.mark.parametrize(
    ("ttl", "used"),
    [(0, 0), (1, 1), (MAX_TTL, MAX_TTL), (MAX_TTL + 1, MAX_TTL), (2**63, MAX_TTL)],
    ids=["zero", "one", "cap", "cap+1", "huge"],
)
async def test_ttl_is_echoed_clamped_to_60_days(connect, origin, ttl, used):
    device, subscription = await registered(connect, origin)
    response, sent = await push(subscription, b"ttl", ttl=ttl)
    assert sent.headers["ttl"] == str(ttl)
    assert_created(response, origin, used)
    frame = await device.notification()
    assert frame["ttl"] == used
    assert subscription.decrypt(frame) == b"ttl"


async def test_ttl_0_to_an_offline_device_is_201_with_pywebpush_defaults(connect, origin, node):
    """pywebpush's default TTL is 0: accepted, answered `TTL: 0`, then dropped."""
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    response, sent = await push(subscription, b"default ttl", ttl=0)
    assert sent.headers["ttl"] == "0"
    assert_created(response, origin, 0)
    device = await device.reconnect(connect)
    await device.expect_silence()


# --- Topic (docs/WEBPUSH.md) ------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["a" * 33, "a b", "a.b", "score=", "sc/ore", "~"],
    ids=["33-chars", "space", "dot", "padding", "slash", "tilde"],
)
async def test_a_bad_topic_is_400(connect, origin, put, topic):
    device, subscription = await registered(connect, origin)
    response, _ = await push(subscription, b"topic", headers={"Topic": topic})
    assert_error(response, 400, 113)
    await assert_next_is(put, device, subscription)


@pytest.mark.parametrize("topic", ["a" * 32, "Az09-_", "x"])
async def test_a_good_topic_is_accepted(connect, origin, topic):
    device, subscription = await registered(connect, origin)
    response, _ = await push(subscription, b"topic", headers={"Topic": topic})
    assert_created(response, origin, 60)
    assert subscription.decrypt(await device.notification()) == b"topic"


async def test_pywebpush_topic_replaces_the_stored_message(connect, origin, node):
    device, subscription = await registered(connect, origin)
    await device.hang_up(node)
    for payload in (b"first", b"second"):
        response, _ = await push(subscription, payload, ttl=300, headers={"Topic": "score"})
        assert_created(response, origin, 300)
    device = await device.reconnect(connect)
    frame = await device.notification()
    assert subscription.decrypt(frame) == b"second"
    await device.expect_silence()


# --- crypto headers (docs/WEBPUSH.md) ------------------------------------------


def crypto_case(case: str, subscription: Subscription) -> tuple[bytes, dict[str, str]]:
    """A request body and crypto headers that break one rule of docs/WEBPUSH.md."""
    aes128gcm = subscription.encrypt(b"x")
    body, salt, dh = subscription.encrypt_aesgcm(b"x")
    aesgcm = {"Content-Encoding": "aesgcm", "Encryption": f"salt={b64u(salt)}"}
    aesgcm["Crypto-Key"] = f"dh={b64u(dh)}"
    if case == "aesgcm128":
        return body, {**aesgcm, "Content-Encoding": "aesgcm128"}
    if case == "aesgcm128-encryption-key":
        return body, {
            "Content-Encoding": "aesgcm128",
            "Encryption": f"salt={b64u(salt)}",
            "Encryption-Key": f"dh={b64u(dh)}",
        }
    if case == "aesgcm-with-encryption-key":
        return body, {**aesgcm, "Encryption-Key": f"dh={b64u(dh)}"}
    if case == "aes128gcm-with-salt":
        return aes128gcm, {"Content-Encoding": "aes128gcm", "Encryption": f"salt={b64u(salt)}"}
    if case == "aes128gcm-with-dh":
        return aes128gcm, {"Content-Encoding": "aes128gcm", "Crypto-Key": f"dh={b64u(dh)}"}
    if case == "aesgcm-no-encryption":
        return body, {"Content-Encoding": "aesgcm", "Crypto-Key": aesgcm["Crypto-Key"]}
    if case == "aesgcm-no-salt":
        return body, {**aesgcm, "Encryption": "rs=4096"}
    if case == "aesgcm-no-crypto-key":
        return body, {"Content-Encoding": "aesgcm", "Encryption": aesgcm["Encryption"]}
    if case == "aesgcm-no-dh":
        return body, {**aesgcm, "Crypto-Key": f"p256ecdsa={b64u(dh)}"}
    if case == "no-content-encoding":
        return aes128gcm, {}
    assert case == "unknown-encoding"
    return aes128gcm, {"Content-Encoding": "gzip"}


@pytest.mark.parametrize(
    "case",
    [
        "aesgcm128",
        "aesgcm128-encryption-key",
        "aesgcm-with-encryption-key",
        "aes128gcm-with-salt",
        "aes128gcm-with-dh",
        "aesgcm-no-encryption",
        "aesgcm-no-salt",
        "aesgcm-no-crypto-key",
        "aesgcm-no-dh",
        "no-content-encoding",
        "unknown-encoding",
    ],
)
async def test_bad_crypto_headers_are_400(connect, origin, put, case):
    device, subscription = await registered(connect, origin)
    body, headers = crypto_case(case, subscription)
    response = await post(put, subscription.endpoint, body, {"TTL": "60", **headers})
    assert_error(response, 400, 110)
    await assert_next_is(put, device, subscription)


@pytest.mark.parametrize(
    ("quoted", "padded"),
    [(True, True), (False, True), (True, False)],
    ids=["quoted-padded", "padded", "quoted"],
)
async def test_aesgcm_quotes_and_padding_are_stripped_before_forwarding(
    connect, origin, put, quoted, padded
):
    """Firefox decodes salt and dh with padding "reject" (docs/WEBPUSH.md)."""
    device, subscription = await registered(connect, origin)
    body, salt, dh = subscription.encrypt_aesgcm(b"quoted")
    assert b64u_padded(salt).endswith("==") and b64u_padded(dh).endswith("=")
    encode = b64u_padded if padded else b64u
    quote = '"' if quoted else ""
    headers = {
        "TTL": "60",
        "Content-Encoding": "aesgcm",
        "Encryption": f"salt={quote}{encode(salt)}{quote}",
        "Crypto-Key": f"dh={quote}{encode(dh)}{quote}",
    }
    assert_created(await post(put, subscription.endpoint, body, headers), origin, 60)
    forwarded = {"encoding": "aesgcm", "encryption": f"salt={b64u(salt)}"}
    forwarded["crypto_key"] = f"dh={b64u(dh)}"
    await device.expect_message(subscription, body, b"quoted", 60, forwarded)


async def test_aes128gcm_with_only_a_p256ecdsa_crypto_key_is_accepted(connect, origin, put, vapid):
    device, subscription = await registered(connect, origin)
    body = subscription.encrypt(b"ecdsa only")
    headers = {
        "TTL": "60",
        "Content-Encoding": "aes128gcm",
        "Crypto-Key": f"p256ecdsa={b64u(vapid_key(vapid))}",
    }
    assert_created(await post(put, subscription.endpoint, body, headers), origin, 60)
    frame = await device.notification()
    assert frame["data"] == b64u(body)
    assert subscription.decrypt(frame) == b"ecdsa only"


@pytest.mark.parametrize("encoding", ["aes128gcm", "aesgcm"])
async def test_an_empty_body_ignores_crypto_headers(connect, origin, put, encoding):
    device, subscription = await registered(connect, origin)
    headers = {"TTL": "60", "Content-Encoding": encoding}
    if encoding == "aesgcm":
        headers.update({"Encryption": "salt=c2FsdHNhbHRzYWx0c2FsdA", "Crypto-Key": "dh=AAAA"})
    assert_created(await post(put, subscription.endpoint, b"", headers), origin, 60)
    frame = await device.notification()
    assert frame == notification(subscription.channel_id, frame["version"], 60)


async def test_a_raw_body_of_4097_bytes_is_413_and_4096_is_not(connect, origin, put):
    device, subscription = await registered(connect, origin)
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm"}
    too_long = subscription.encrypt(os.urandom(3994))
    assert len(too_long) == 4097
    assert_error(await post(put, subscription.endpoint, too_long, headers), 413, 104)
    await assert_next_is(put, device, subscription)
    longest = subscription.encrypt(os.urandom(3993))
    assert len(longest) == 4096
    assert_created(await post(put, subscription.endpoint, longest, headers), origin, 60)
