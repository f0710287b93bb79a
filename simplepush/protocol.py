"""The device WebSocket protocol, SimplePush and WebPush, without I/O.

`parse` turns one text frame into a typed message or a rejection; the
builders turn outcomes into reply frames. Nothing here touches sockets,
storage or the clock, so every rule of PROTOCOL.md sections 2-3 and
docs/WEBPUSH.md can be tested as a plain function (the style of h11).
A hello with `use_webpush: true` makes the session WebPush; the session
passes its kind back to `parse` for every later frame.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from simplepush.updates import Update
from simplepush.webpush import Message, is_dashed_channel_id

PING_REPLY = "{}"

# UAIDs and channelIDs are UUIDs spelled as 32 hex digits or dashed 8-4-4-4-12,
# in either case (PROTOCOL.md 3.2.4 rows G/H and 3.3).
_UUID = re.compile(
    r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_MAX_VERSION = 2**63 - 1

ERROR_TEXTS = {
    401: "Invalid Command",
    413: "Too Many Channels",
    500: "An unexpected error occurred",
    503: "Service Unavailable",
}

_NEEDS_HELLO = frozenset(("register", "unregister", "ack"))


def uuid_key(value: str) -> str | None:
    """The canonical storage key (32 lowercase hex) of a UUID-shaped id, else None."""
    if _UUID.fullmatch(value) is None:
        return None
    return value.replace("-", "").lower()


@dataclass(slots=True, frozen=True)
class Ping:
    pass


@dataclass(slots=True, frozen=True)
class Ignored:
    """A message that is accepted and needs no reply (purge, nack)."""

    message_type: str


@dataclass(slots=True, frozen=True)
class Wakeup:
    """UDP wake-up details from hello, kept with the UAID for a future waker."""

    ip: str
    port: int | None
    mcc: str | None
    mnc: str | None
    netid: str | None


@dataclass(slots=True, frozen=True)
class Hello:
    raw: dict[str, Any]
    uaid: str  # as the device spells it; "" for none
    key: str  # canonical form of uaid; "" for none
    channel_count: int
    wakeup: Wakeup | None
    webpush: bool = False


@dataclass(slots=True, frozen=True)
class Register:
    raw: dict[str, Any]
    channel_id: str
    key: str
    app_key: str | None = None  # WebPush: the application server's key, as sent


@dataclass(slots=True, frozen=True)
class Unregister:
    raw: dict[str, Any]
    channel_id: str
    key: str | None  # None when the id is not UUID-shaped: nothing to remove


@dataclass(slots=True, frozen=True)
class Ack:
    acks: tuple[tuple[str, int], ...]  # (channel key, version)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # echoed in an error


@dataclass(slots=True, frozen=True)
class WebPushAck:
    """Firefox acks each message once: 100 delivered, 101 decryption failed, 102 not delivered."""

    acks: tuple[tuple[str, str, int], ...]  # (channel key, message id, code)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(slots=True, frozen=True)
class Nack:
    """A service worker's push handler failed (codes 301-303): logged, never redelivered."""

    code: int | None


@dataclass(slots=True, frozen=True)
class Reject:
    """An error reply to send, and whether the socket is closed after it."""

    reply: str
    close: bool


@dataclass(slots=True, frozen=True)
class Drop:
    """Close without a reply: the peer is not speaking SimplePush."""

    reason: str


Command = Ping | Ignored | Hello | Register | Unregister | Ack | WebPushAck | Nack
Outcome = Command | Reject | Drop

PING = Ping()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} overflows")
    return value


# Strict RFC 8259: NaN/Infinity would be echoed back as invalid JSON. One decoder for every
# frame: json.loads with these hooks would build a new decoder and scanner per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
# And one encoder for every frame written, rather than one per json.dumps call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def parse(text: str, identified: bool, webpush: bool = False) -> Outcome:
    """Parse one text frame from a device that has (or has not) said hello, of either kind."""
    try:
        if webpush:
            return _parse_webpush(text)
        return _parse(text, identified)
    except RecursionError:
        # json decodes a little deeper than it encodes: an echo can overflow too.
        return Drop("JSON nested too deeply")


def _load(text: str) -> dict[str, Any] | Drop:
    """The frame's JSON object, or why the socket is dropped (both kinds of session)."""
    try:
        obj = _DECODER.decode(text)
    except ValueError:
        return Drop("invalid JSON")
    if type(obj) is not dict:
        return Drop("frame is not a JSON object")
    return obj


def _parse(text: str, identified: bool) -> Outcome:
    obj = _load(text)
    if type(obj) is Drop:
        return obj
    if not obj:
        return PING
    mtype = obj.get("messageType")
    if type(mtype) is not str or not mtype.isascii():
        return Reject(error_reply(obj, 401), close=True)
    mtype = mtype.lower()
    if mtype == "ack" and identified:
        return _parse_ack(obj)
    if mtype == "ping":
        return PING
    if mtype in ("purge", "nack"):
        return Ignored(mtype)
    if mtype == "hello":
        return _parse_hello(obj)
    if mtype in _NEEDS_HELLO:
        if not identified:
            return Reject(error_reply(obj, 401), close=True)
        return _parse_channel_command(obj, mtype)
    return Reject(error_reply(obj, 401), close=True)


def _parse_webpush(text: str) -> Outcome:
    """A frame after a WebPush hello: nothing Firefox sends closes the socket (docs/WEBPUSH.md).

    Unknown or malformed commands are ignored; only frames that are not JSON
    objects close, as in SimplePush.
    """
    obj = _load(text)
    if type(obj) is Drop:
        return obj
    if not obj:
        return PING
    mtype = obj.get("messageType")
    if type(mtype) is not str:
        return Ignored("invalid")
    mtype = mtype.lower()
    if mtype == "ack":
        return _parse_webpush_ack(obj)
    if mtype == "ping":
        return PING
    if mtype == "hello":
        return _parse_hello(obj)
    if mtype == "nack":
        code = obj.get("code")
        return Nack(code if type(code) is int else None)
    if mtype in ("register", "unregister"):
        return _parse_channel_command(obj, mtype, webpush=True)
    return Ignored(mtype if mtype.isascii() and len(mtype) <= 32 else "unknown")


def _parse_webpush_ack(obj: dict[str, Any]) -> WebPushAck:
    """Keep the well-formed entries: a string version; a missing code counts as 100."""
    updates = obj.get("updates")
    acks: list[tuple[str, str, int]] = []
    if type(updates) is list:
        for item in updates:
            if type(item) is not dict:
                continue
            channel_id, version, code = item.get("channelID"), item.get("version"), item.get("code")
            if type(channel_id) is not str or type(version) is not str:
                continue
            key = uuid_key(channel_id)
            if key is not None:
                acks.append((key, version, code if type(code) is int else 100))
    return WebPushAck(tuple(acks), obj)


def _parse_hello(obj: dict[str, Any]) -> Outcome:
    webpush = obj.get("use_webpush") is True
    channel_ids = obj.get("channelIDs")
    if webpush and channel_ids is None:
        channel_ids = []  # Firefox sends none: its channels are known to the server
    if type(channel_ids) is not list or any(type(c) is not str for c in channel_ids):
        return Reject(error_reply(obj, 401), close=True)
    uaid = obj.get("uaid")
    if uaid is None:
        uaid = ""
    elif type(uaid) is not str:
        return Reject(error_reply(obj, 401), close=True)
    key = ""
    if uaid:
        key = uuid_key(uaid)
        if key is None:
            if not webpush:
                return Reject(error_reply(obj, 503), close=True)
            # Firefox cannot be told to retry: it gets a new UAID (docs/WEBPUSH.md).
            uaid = key = ""
    return Hello(obj, uaid, key, len(channel_ids), _parse_wakeup(obj), webpush)


def _parse_wakeup(obj: dict[str, Any]) -> Wakeup | None:
    """Validated wake-up fields, or None when absent or unusable (PROTOCOL.md 3.2.6: ignore)."""
    hostport = obj.get("wakeup_hostport")
    if type(hostport) is not dict:
        return None
    ip = hostport.get("ip")
    if type(ip) is not str or not _is_ip_literal(ip):
        return None
    port = hostport.get("port")
    if port is not None and (type(port) is not int or not 1 <= port < 65535):
        return None
    mcc = mnc = netid = None
    network = obj.get("mobilenetwork")
    if type(network) is dict:
        mcc, mnc, netid = network.get("mcc"), network.get("mnc"), network.get("netid")
        if not (_is_numeric(mcc) and _is_numeric(mnc)):
            return None
        if netid is not None and not _is_printable_ascii(netid):
            return None
    return Wakeup(ip, port, mcc, mnc, netid)


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_printable_ascii(value: object) -> bool:
    """A network id every store can keep: no control characters, nothing UTF-8 cannot encode."""
    return type(value) is str and len(value) <= 64 and value.isascii() and value.isprintable()


def _is_numeric(value: object) -> bool:
    return type(value) is str and value.isascii() and value.isdigit()


def _parse_channel_command(obj: dict[str, Any], mtype: str, webpush: bool = False) -> Outcome:
    channel_id = obj.get("channelID")
    if type(channel_id) is not str or not channel_id:
        return Reject(error_reply(obj, 401), close=False)
    key = uuid_key(channel_id)
    if mtype == "unregister":
        return Unregister(obj, channel_id, key)
    if key is None:
        return Reject(error_reply(obj, 401), close=False)
    if not webpush:
        return Register(obj, channel_id, key)
    if not is_dashed_channel_id(channel_id):
        # Firefox requires the dashed lowercase form in notifications: only that is accepted.
        return Reject(error_reply(obj, 401), close=False)
    app_key = obj.get("key")
    if app_key is not None and (type(app_key) is not str or not app_key):
        return Reject(error_reply(obj, 401, "Invalid Key"), close=False)
    return Register(obj, channel_id, key, app_key)


def _parse_ack(obj: dict[str, Any]) -> Ack:
    """Keep the well-formed entries; an empty or odd list is tolerated (PROTOCOL.md 8 #19)."""
    updates = obj.get("updates")
    acks: list[tuple[str, int]] = []
    if type(updates) is list:
        for item in updates:
            if type(item) is not dict:
                continue
            channel_id, version = item.get("channelID"), item.get("version")
            if type(channel_id) is not str or type(version) is not int:
                continue
            key = uuid_key(channel_id)
            if key is not None and 0 <= version <= _MAX_VERSION:
                acks.append((key, version))
    return Ack(tuple(acks), obj)


def _dump(obj: dict[str, Any]) -> str:
    return _ENCODER.encode(obj)


def error_reply(request: dict[str, Any], status: int, error: str | None = None) -> str:
    """Echo the device's object with `status` and `error` (DESIGN.md 2.3)."""
    reply = dict(request)
    mtype = reply.get("messageType")
    if type(mtype) is str:
        reply["messageType"] = mtype.lower()
    reply["status"] = status
    reply["error"] = error or ERROR_TEXTS[status]
    return _dump(reply)


def hello_reply(uaid: str, webpush: bool = False) -> str:
    if webpush:
        # Firefox turns data on from use_webpush; broadcasts: none served (docs/WEBPUSH.md).
        return _dump(
            {
                "messageType": "hello",
                "uaid": uaid,
                "status": 200,
                "use_webpush": True,
                "broadcasts": {},
            }
        )
    return _dump({"messageType": "hello", "uaid": uaid, "status": 200})


def register_reply(channel_id: str, uaid: str, endpoint: str) -> str:
    return _dump(
        {
            "messageType": "register",
            "channelID": channel_id,
            "status": 200,
            "uaid": uaid,
            "pushEndpoint": endpoint,
        }
    )


def unregister_reply(channel_id: str) -> str:
    return _dump({"messageType": "unregister", "channelID": channel_id, "status": 200})


def webpush_notification(message: Message) -> str:
    """One message per frame; `data` and `headers` only when the POST had a body."""
    frame: dict[str, Any] = {
        "messageType": "notification",
        "channelID": message.channel_id,
        "version": message.id,
        "ttl": message.ttl,
    }
    if message.data is not None:
        frame["data"] = message.data
        frame["headers"] = message.headers
    return _dump(frame)


def notification(updates: Iterable[Update]) -> str:
    """One frame for any number of updates; `data` only where the app server sent some."""
    entries = []
    for update in updates:
        entry: dict[str, Any] = {"channelID": update.channel_id, "version": update.version}
        if update.data is not None:
            entry["data"] = update.data
        entries.append(entry)
    return _dump({"messageType": "notification", "updates": entries})
