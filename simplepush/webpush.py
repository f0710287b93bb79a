"""WebPush messages and the rules of an app server's POST, without I/O.

What RFC 8030 and RFC 8291 ask of the push service (docs/WEBPUSH.md
2.2-2.6 and 7): the TTL, Topic, Urgency and crypto headers of a POST,
checked and turned into the Message that is stored and sent to the device.
The server never decrypts: the body is relayed as it came.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_BODY = 4096  # RFC 8030 7.2: a push service must accept bodies up to 4096 bytes
MAX_TTL = 60 * 86400  # longer TTLs are clamped and the clamped value answered (section 7.3)
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TTL = re.compile(r"-?[0-9]{1,20}")
URGENCIES = frozenset(("very-low", "low", "normal", "high"))
# Quotes and trailing '=' of each parameter value: Firefox decodes dh and salt with
# padding "reject" (docs/WEBPUSH.md).
_PARAMETER_PADDING = re.compile(r"=+(?=\s*[,;]|\s*$)")
_UUID_DASHED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(slots=True, frozen=True)
class Message:
    """One WebPush message as stored and as the device sees it."""

    channel_id: str  # the dashed form Firefox requires
    id: str  # 32 hex; the notification's `version`, unique per message
    ttl: int
    expires_at: float  # unix seconds
    topic: str | None = None
    headers: dict[str, str] | None = None  # cleaned crypto headers, only with data
    data: str | None = None  # base64url of the body, unpadded

    def fields(self) -> dict[str, Any]:
        """As JSON between nodes and in memcached records."""
        return {
            "channelID": self.channel_id,
            "id": self.id,
            "ttl": self.ttl,
            "exp": self.expires_at,
            "topic": self.topic,
            "headers": self.headers,
            "data": self.data,
        }

    @classmethod
    def from_fields(cls, fields: Any) -> Message | None:
        """The inverse of fields(), or None for anything malformed."""
        if type(fields) is not dict:
            return None
        get = fields.get
        chid, mid, ttl, exp = get("channelID"), get("id"), get("ttl"), get("exp")
        topic, headers, data = get("topic"), get("headers"), get("data")
        if type(chid) is not str or type(mid) is not str or type(ttl) is not int:
            return None
        if type(exp) not in (int, float) or (topic is not None and type(topic) is not str):
            return None
        if headers is not None and (
            type(headers) is not dict or any(type(v) is not str for v in headers.values())
        ):
            return None
        if data is not None and type(data) is not str:
            return None
        return cls(chid, mid, ttl, float(exp), topic, headers, data)


def is_dashed_channel_id(value: str) -> bool:
    """WebPush channelIDs are lowercase dashed UUIDs: Firefox requires the dashed form back."""
    return _UUID_DASHED.fullmatch(value) is not None


def dashed(key: str) -> str:
    """The dashed spelling of a 32-hex channel key."""
    return f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:]}"


class Refused(Exception):
    """A POST we answer with an error: the status, errno and message of the JSON body."""

    def __init__(self, status: int, errno: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.errno = errno
        self.message = message


@dataclass(slots=True, frozen=True)
class Push:
    """A POST's checked headers and body, before it becomes a Message."""

    ttl: int
    topic: str | None
    urgency: str
    headers: dict[str, str] | None
    data: str | None


def b64url_decode(text: str) -> bytes:
    """Padded or unpadded base64url, as senders and Firefox spell it; ValueError if not."""
    text = text.strip().rstrip("=")
    if not text or len(text) % 4 == 1 or re.fullmatch(r"[A-Za-z0-9_-]+", text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def check_post(get: Callable[[str], str | None], body: bytes) -> Push:
    """Check a POST in docs/WEBPUSH.md's order after the token and VAPID; Refused if bad.

    `get` reads a request header by name (case-insensitive).
    """
    if len(body) > MAX_BODY:
        raise Refused(413, 104, f"Body exceeds max length of {MAX_BODY} bytes")
    ttl = _ttl(get("TTL"))
    topic = get("Topic")
    if topic is not None and _TOPIC.fullmatch(topic) is None:
        raise Refused(400, 113, "Topic must be at most 32 characters of [A-Za-z0-9_-]")
    urgency = (get("Urgency") or "normal").lower()
    if urgency not in URGENCIES:
        raise Refused(400, 110, "Urgency must be very-low, low, normal or high")
    if not body:
        return Push(ttl, topic, urgency, None, None)
    return Push(ttl, topic, urgency, crypto_headers(get), b64url_encode(body))


def _ttl(text: str | None) -> int:
    if text is None:
        raise Refused(400, 111, "Missing TTL header")
    text = text.strip()
    if _TTL.fullmatch(text) is None:
        raise Refused(400, 112, "TTL must be an integer number of seconds")
    ttl = int(text)
    if ttl < 0:
        raise Refused(400, 114, "TTL must not be negative")
    return min(ttl, MAX_TTL)


def _params(value: str) -> dict[str, str]:
    """`a=1;b=2` (or comma-separated) as a dict of lowercased names."""
    params = {}
    for part in value.replace(",", ";").split(";"):
        name, sep, val = part.strip().partition("=")
        if sep:
            params[name.strip().lower()] = val.strip()
    return params


def _clean(value: str) -> str:
    """Quotes first, so that padding inside them (`salt="...=="`) is found too."""
    return _PARAMETER_PADDING.sub("", value.replace('"', "")).strip()


def crypto_headers(get: Callable[[str], str | None]) -> dict[str, str]:
    """The headers a device needs to decrypt, cleaned for Firefox (docs/WEBPUSH.md)."""
    encoding = (get("Content-Encoding") or "").strip().lower()
    if not encoding:
        raise Refused(400, 110, "Missing Content-Encoding header")
    if get("Encryption-Key") is not None:
        raise Refused(400, 110, "Encryption-Key is not supported: use aes128gcm")
    encryption, crypto_key = get("Encryption"), get("Crypto-Key")
    if encoding == "aes128gcm":
        if encryption is not None and "salt" in _params(encryption):
            raise Refused(400, 110, "aes128gcm carries its salt in the body, not in Encryption")
        if crypto_key is not None and "dh" in _params(crypto_key):
            raise Refused(400, 110, "aes128gcm carries its key in the body, not in Crypto-Key")
        return {"encoding": "aes128gcm"}
    if encoding == "aesgcm":
        if encryption is None or "salt" not in _params(encryption):
            raise Refused(400, 110, "aesgcm needs an Encryption header with a salt")
        if crypto_key is None or "dh" not in _params(crypto_key):
            raise Refused(400, 110, "aesgcm needs a Crypto-Key header with a dh")
        return {
            "encoding": "aesgcm",
            "encryption": _clean(encryption),
            "crypto_key": _clean(crypto_key),
        }
    raise Refused(400, 110, f"Unknown Content-Encoding {encoding!r}: use aes128gcm")


def message(push: Push, channel_id: str, message_id: str, now: float) -> Message:
    return Message(
        channel_id, message_id, push.ttl, now + push.ttl, push.topic, push.headers, push.data
    )
