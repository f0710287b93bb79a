"""A wire fuzzer against the real `simplepush` process (issue 6, item 4).

One well-behaved device stays connected and is sent a notification about
every 50 ms; meanwhile several sockets throw a seeded stream of malformed
WebSocket frames, JSON and HTTP at the same port. Every hostile socket must
get its reply, error reply or close; the good device must miss nothing;
`/status` must still answer and the process's RSS must stay bounded.

Beside the fuzzer: a deterministic sweep of every wrong value through
every command field; the limits (413 body, 431 headers, 400 malformed
HTTP); a hello sent in the same write as the upgrade; and two memory
bounds measured from /proc/<pid>/status on their own server: a device
that never reads its replies, and anonymous hellos that leave nothing.

Reproduce a run with SIMPLEPUSH_FUZZ_SEED=<seed> (printed at the start);
SIMPLEPUSH_FUZZ_ITEMS and SIMPLEPUSH_FUZZ_SECONDS bound the count and the
time. Timeouts below bound waits (a hang is a failure); nothing here
measures speed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import random
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simplepush.wsframes import (
    BINARY,
    CLOSE,
    CONTINUATION,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    PING,
    POLICY_VIOLATION,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    UNSUPPORTED_DATA,
)
from tests.test_cli import SCRIPT, Server, launch
from tests.wsclient import MASK, client_frame, frame_header, upgrade_request

SEED = int(os.environ.get("SIMPLEPUSH_FUZZ_SEED", "6062"))
ITEMS = int(os.environ.get("SIMPLEPUSH_FUZZ_ITEMS", "3000"))
SECONDS = float(os.environ.get("SIMPLEPUSH_FUZZ_SECONDS", "20"))
WORKERS = 4
WARMUP_ITEMS = 200  # of the ITEMS, run before the first RSS reading
# Bounds on waits, not performance thresholds: an answer that takes longer is a hang.
ANSWER_TIMEOUT = 5.0
# How long a socket that may legitimately be waiting for more bytes is listened to.
QUIET = 0.3
PUT_PERIOD = 0.05
RSS_BOUND_MB = 64
SETTLE_TIMEOUT = 10.0

MAX_MESSAGE = 256 * 1024
MAX_CHANNELS = 200
BIG_BODY = 4 * 1024 * 1024
# Over the 16 KiB default of max_header_size; the last two are also over the head the
# server holds (TORNADO_HEADER_CUT), past which it cuts the socket without an answer.
HEADER_SIZES = (20 * 1024, 48 * 1024, 96 * 1024, 1024 * 1024)
# 4 x max_header_size: heads up to this get 431, bigger ones are cut (docs/SECURITY.md).
TORNADO_HEADER_CUT = 64 * 1024
# Close codes the server may send a misbehaving device; 1011 means an exception inside it.
ALLOWED_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009}
ERROR_TEXTS = {
    401: "Invalid Command",
    413: "Too Many Channels",
    503: "Service Unavailable",
}


# --- a synchronous raw client -----------------------------------------------


class Closed(Exception):
    """The server closed TCP (FIN or RST)."""


class Silent(Exception):
    """Nothing came within the timeout."""


class Wire:
    """One TCP connection speaking whatever bytes it is given."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.port = port

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        """False when the server has already closed (or reset) the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Silent
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise Silent from None
        except ConnectionResetError:
            raise Closed from None
        if not chunk:
            raise Closed
        self.buffer += chunk

    def read_exact(self, size: int, deadline: float) -> bytes:
        while len(self.buffer) < size:
            self._fill(deadline)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buffer:
            self._fill(deadline)
        data, _, self.buffer = self.buffer.partition(marker)
        return data

    def frame(self, timeout: float = ANSWER_TIMEOUT) -> tuple[int, bytes]:
        """The next server frame; it must be final, unmasked and without RSV bits."""
        deadline = time.monotonic() + timeout
        first, second = self.read_exact(2, deadline)
        if first & 0xF0 != 0x80 or second & 0x80:
            raise AssertionError(f"malformed server frame header {first:#x} {second:#x}")
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self.read_exact(2, deadline), "big")
        elif length == 127:
            length = int.from_bytes(self.read_exact(8, deadline), "big")
        return first & 0x0F, self.read_exact(length, deadline)

    def response(self, timeout: float = ANSWER_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        """An HTTP response: status, headers (names lowercased), body by Content-Length."""
        deadline = time.monotonic() + timeout
        head = self.read_until(b"\r\n\r\n", deadline).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise AssertionError(f"not an HTTP status line: {status_line!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = self.read_exact(int(headers["content-length"]), deadline)
        return int(parts[1]), headers, body

    def upgrade(self, **headers: str | None) -> int:
        self.send(upgrade_request(self.port, **headers))
        status, _, _ = self.response()
        return status

    def text(self, text: str | bytes) -> bool:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self.send(client_frame(TEXT, data))

    def close_code(self, timeout: float = ANSWER_TIMEOUT) -> int:
        """Frames up to the server's close; return its code (texts before it must be JSON)."""
        while True:
            opcode, payload = self.frame(timeout)
            if opcode == CLOSE:
                payload[2:].decode("utf-8")
                return int.from_bytes(payload[:2], "big") if payload else 1005


def http_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def strict_json(payload: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for pid {pid}")


def hello(wire: Wire) -> str:
    wire.text(json.dumps({"messageType": "hello", "uaid": "", "channelIDs": []}))
    opcode, payload = wire.frame()
    reply = strict_json(payload)
    assert opcode == TEXT and reply["status"] == 200, reply
    return reply["uaid"]


def register(wire: Wire, channel_id: str) -> str:
    wire.text(json.dumps({"messageType": "register", "channelID": channel_id}))
    opcode, payload = wire.frame()
    reply = strict_json(payload)
    assert opcode == TEXT and reply["status"] == 200, reply
    return reply["pushEndpoint"]


def put(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="PUT", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- bookkeeping ------------------------------------------------------------


@dataclass
class Ledger:
    """What was sent and seen, shared by the threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    # Answers that the limits being added (413 body, 431 headers, 400 malformed) should change.
    limits: list[str] = field(default_factory=list)

    def count(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.outcomes[f"{kind}:{outcome}"] += 1

    def fail(self, kind: str, detail: str) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {detail}")

    def limit(self, kind: str, detail: str) -> None:
        with self.lock:
            self.limits.append(f"{kind}: {detail}")


@dataclass
class Target:
    server: Server
    good_endpoint: str
    parked_endpoint: str  # a channel of a device that went away: PUTs are stored (202)


# --- the hostile items ------------------------------------------------------
#
# Each takes (rng, target, item label) and returns an outcome word for the
# counts; it raises AssertionError, Silent or Closed when the answer is wrong.


def expect_close(wire: Wire, codes: set[int]) -> str:
    code = wire.close_code()
    assert code in codes, f"close code {code}, expected one of {sorted(codes)}"
    return f"close{code}"


def ws_framing(rng: random.Random, target: Target) -> str:
    """A frame RFC 6455 forbids, after the upgrade and maybe a hello: its close code is pinned."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        if rng.random() < 0.5:
            hello(wire)
        case = rng.choice(
            [
                "unmasked",
                "rsv",
                "opcode",
                "lone_continuation",
                "fragmented_control",
                "long_control",
                "interleaved",
                "bad_close_code",
                "one_byte_close",
                "oversize",
                "oversize_fragments",
                "binary",
                "invalid_utf8",
                "invalid_utf8_fragments",
                "close_reason_not_utf8",
            ]
        )
        payload = json.dumps({"messageType": "ping"}).encode()
        code = PROTOCOL_ERROR
        if case == "unmasked":
            data = client_frame(rng.choice([TEXT, BINARY, PING]), payload, mask=None)
        elif case == "rsv":
            data = client_frame(TEXT, payload, rsv=rng.choice([0x10, 0x20, 0x40, 0x70]))
        elif case == "opcode":
            data = client_frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), payload)
        elif case == "lone_continuation":
            data = client_frame(CONTINUATION, payload, fin=rng.random() < 0.5)
        elif case == "fragmented_control":
            data = client_frame(rng.choice([PING, PONG, CLOSE]), b"", fin=False)
        elif case == "long_control":
            data = client_frame(rng.choice([PING, PONG, CLOSE]), b"\x03\xe8" + rng.randbytes(130))
        elif case == "interleaved":
            data = client_frame(TEXT, payload[:3], fin=False) + client_frame(
                rng.choice([TEXT, BINARY]), payload
            )
        elif case == "bad_close_code":
            bad = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
            data = client_frame(CLOSE, bad.to_bytes(2, "big"))
        elif case == "one_byte_close":
            data = client_frame(CLOSE, b"\x03")
        elif case == "oversize":
            length = rng.choice([MAX_MESSAGE + 1, 1 << 20, 1 << 32, (1 << 63) - 1, 1 << 63])
            data = frame_header(rng.choice([TEXT, BINARY, CONTINUATION]), length) + MASK
            code = MESSAGE_TOO_BIG
        elif case == "oversize_fragments":
            data = client_frame(TEXT, b" " * (MAX_MESSAGE // 2), fin=False)
            data += client_frame(CONTINUATION, b" " * (MAX_MESSAGE // 2), fin=False)
            data += client_frame(CONTINUATION, b" {}")
            code = MESSAGE_TOO_BIG
        elif case == "binary":
            data = client_frame(BINARY, rng.randbytes(rng.randrange(0, 200)))
            code = UNSUPPORTED_DATA
        elif case == "invalid_utf8":
            bad = rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8"])
            text = payload[: rng.randrange(len(payload))]
            data = client_frame(TEXT, text + bad + payload)
            code = INVALID_PAYLOAD
        elif case == "invalid_utf8_fragments":
            data = client_frame(TEXT, b'{"messageType":"\xe2', fin=False)
            data += client_frame(CONTINUATION, b'\x28\xa1"}')
            code = INVALID_PAYLOAD
        else:  # close_reason_not_utf8
            data = client_frame(CLOSE, b"\x03\xe8\xff\xfe")
            code = INVALID_PAYLOAD
        assert wire.send(data) or case.startswith("oversize"), "server closed before the frame"
        return f"{case}:" + expect_close(wire, {code})


def ws_random_bytes(rng: random.Random, target: Target) -> str:
    """Random bytes after the upgrade: a close (any allowed code), a cut, or waiting for more."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        wire.send(rng.randbytes(rng.randrange(1, 600)))
        try:
            while True:
                opcode, payload = wire.frame(QUIET)
                if opcode == CLOSE:
                    code = int.from_bytes(payload[:2], "big")
                    assert code in ALLOWED_CLOSE_CODES, f"close code {code}"
                    return "close"
                if opcode == TEXT:
                    strict_json(payload)
        except Silent:
            return "waiting"  # an incomplete frame: the server may wait for the rest
        except Closed:
            return "cut"


def ws_bad_lengths(rng: random.Random, target: Target) -> str:
    """Non-minimal length encodings (allowed by the reader) and lengths that lie."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        payload = b"{}"
        case = rng.choice(["16bit", "64bit", "short"])
        if case == "short":
            # Claims more than it sends: the server must wait, not crash, and stay quiet.
            wire.send(frame_header(TEXT, 100) + MASK + b"{}")
            try:
                opcode, data = wire.frame(QUIET)
            except Silent:
                return "short:waiting"
            raise AssertionError(f"answered an incomplete frame: {opcode} {data!r}")
        marker = 126 if case == "16bit" else 127
        size = 2 if case == "16bit" else 8
        header = bytes((0x80 | TEXT, 0x80 | marker)) + len(payload).to_bytes(size, "big")
        wire.send(header + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload)))
        opcode, data = wire.frame()
        if opcode == CLOSE:
            code = int.from_bytes(data[:2], "big")
            assert code == PROTOCOL_ERROR, f"close code {code}"
            return f"{case}:close1002"
        assert (opcode, data) == (TEXT, b"{}"), (opcode, data)
        return f"{case}:answered"


BAD_JSON = [
    "",
    "{",
    "}",
    "hello",
    "{'messageType': 'hello'}",
    '{"messageType": }',
    '{"messageType":"hello",}',
    '{"messageType":"hello"',
    "[]",
    '"hello"',
    "1",
    "null",
    "true",
    '[{"messageType":"ping"}]',
    '{"messageType":"ping","x":NaN}',
    '{"messageType":"ping","x":Infinity}',
    '{"messageType":"ping","x":-Infinity}',
    '{"messageType":"ping","x":1e400}',
    '{"messageType":"ping","x":-1e999}',
    '{"messageType":"hello","uaid":"\x00","channelIDs":[]}',  # raw control character
    '{"messageType":"ping"}\x00',
    "\x00",
    '{"messageType":"ping","x":' + "1" * 5000 + "}",
    '{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
    "[" * 200_000,
    '{"a":' * 50_000,
]


def json_bad(rng: random.Random, target: Target) -> str:
    """Not RFC 8259 JSON, or not an object: closed 1007 without any reply (PROTOCOL.md 2.3)."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        if rng.random() < 0.5:
            hello(wire)
        text = rng.choice(BAD_JSON)
        wire.text(text)
        opcode, payload = wire.frame()
        assert opcode == CLOSE, f"{text[:60]!r} answered {opcode} {payload[:100]!r}"
        code = int.from_bytes(payload[:2], "big")
        assert code == INVALID_PAYLOAD, f"{text[:60]!r} closed {code}"
        return "close1007"


def uuid_spelling(rng: random.Random) -> str:
    value = uuid.UUID(int=rng.getrandbits(128))
    return rng.choice([value.hex, str(value), value.hex.upper()])


# Wrong values by family, so that each family turns up often in every field.
WRONG_VALUES: dict[str, list[Any]] = {
    "number": [0, -1, 2**63 - 1, 2**63, 2**64 + 1, -(2**70), 10**300, 1.5, 1e308, -0.0, 5e-324],
    "string": ["", "\x00", "a\x00b", "\ud800", "x" * 1000, "not-a-uuid", "😀", "0" * 32],
    "container": [[], [None], [1, 2], {}, {"channelID": 1}, {"messageType": "hello"}],
    "constant": [None, True, False],
}
# The fields of each command, nested ones with a dot.
FIELDS = {
    "hello": [
        "uaid",
        "channelIDs",
        "channelIDs.0",
        "wakeup_hostport",
        "wakeup_hostport.ip",
        "wakeup_hostport.port",
        "mobilenetwork",
        "mobilenetwork.mcc",
        "mobilenetwork.netid",
    ],
    "register": ["channelID"],
    "unregister": ["channelID"],
    "ack": ["updates", "updates.0", "updates.0.channelID", "updates.0.version"],
    "ping": ["channelIDs", "uaid"],
    "bogus": ["channelID"],
}


def wrong_value(rng: random.Random) -> Any:
    # A copy: a later mutation of this command must not reach the shared table (or other threads).
    value = copy.deepcopy(rng.choice(WRONG_VALUES[rng.choice(list(WRONG_VALUES))]))
    for _ in range(rng.choice([0, 0, 0, 0, 1, 3, 50])):
        value = rng.choice([[value], {"k": value}])
    return value


def command(rng: random.Random, kind: str) -> dict[str, Any]:
    spelled = rng.choice([kind, kind, kind.upper(), kind.capitalize()])
    if kind == "hello":
        return {
            "messageType": spelled,
            "uaid": "",
            "channelIDs": [uuid_spelling(rng)],
            "wakeup_hostport": {"ip": "10.0.0.1", "port": 4000},
            "mobilenetwork": {"mcc": "310", "mnc": "410", "netid": "x"},
        }
    if kind in ("register", "unregister", "bogus"):
        return {"messageType": spelled, "channelID": uuid_spelling(rng)}
    if kind == "ack":
        return {
            "messageType": spelled,
            "updates": [{"channelID": uuid_spelling(rng), "version": 1}],
        }
    return {"messageType": spelled}


def wrong_command(rng: random.Random) -> dict[str, Any]:
    """A command with a wrong value in one field (nested ones too), sometimes a second one."""
    kind = rng.choice(list(FIELDS))
    obj = command(rng, kind)
    for _ in range(rng.choice([1, 1, 1, 2])):
        path = rng.choice([*FIELDS[kind], "messageType"] if rng.random() < 0.1 else FIELDS[kind])
        *parents, last = path.split(".")
        holder: Any = obj
        for part in [*parents, last]:
            if not isinstance(holder, (dict, list)) or (isinstance(holder, list) and not holder):
                break  # an earlier wrong value replaced the container: nothing nested to spoil
            if part is last:
                if isinstance(holder, list):
                    holder[0] = wrong_value(rng)
                else:
                    holder[last] = wrong_value(rng)
            else:
                holder = holder[0] if isinstance(holder, list) else holder.get(part)
    if rng.random() < 0.2:
        obj[rng.choice(["x\x00", "UAID", "messagetype", "status", "error"])] = wrong_value(rng)
    return obj


def check_frames_until_ping_or_close(wire: Wire, sent: dict[str, Any]) -> str:
    """Replies are strict JSON; errors echo with a known status; it ends in the ping or a close."""
    while True:
        opcode, payload = wire.frame()
        if opcode == CLOSE:
            code = int.from_bytes(payload[:2], "big")
            assert code in (POLICY_VIOLATION, INVALID_PAYLOAD), f"close {code} after {sent!r:.200}"
            return f"close{code}"
        assert opcode == TEXT, (opcode, payload)
        reply = strict_json(payload)
        assert type(reply) is dict, reply
        if reply == {}:
            return "alive"
        if "error" in reply:
            status = reply["status"]
            assert ERROR_TEXTS.get(status) == reply["error"], reply
            echoed = {k: v for k, v in reply.items() if k not in ("status", "error", "messageType")}
            original = {
                k: v for k, v in sent.items() if k not in ("status", "error", "messageType")
            }
            assert echoed == original, f"echo {reply!r:.200} of {sent!r:.200}"
        else:
            assert reply.get("status") == 200, reply


def json_wrong_types(rng: random.Random, target: Target) -> str:
    """Commands with wrong types in their fields, before or after hello, then a ping."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        identified = rng.random() < 0.75
        if identified:
            hello(wire)
        obj = wrong_command(rng)
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        if not wire.text(text.encode("utf-8", "surrogatepass")):
            raise Closed
        wire.text("{}")
        return check_frames_until_ping_or_close(wire, obj)


def ping_flood(rng: random.Random, target: Target) -> str:
    """Hundreds of `{}` pings in one write: each is answered `{}`, in order."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        if rng.random() < 0.5:
            hello(wire)
        count = rng.randrange(100, 1500)
        wire.send(client_frame(TEXT, b"{}") * count)
        for index in range(count):
            opcode, payload = wire.frame()
            if opcode == CLOSE:
                return f"closed{int.from_bytes(payload[:2], 'big')}@{index}"
            assert (opcode, payload) == (TEXT, b"{}"), (index, opcode, payload)
        return "all-answered"


def control_ping_flood(rng: random.Random, target: Target) -> str:
    """WebSocket PINGs in one write: a PONG for each, with its payload, in order (RFC 6455 5.5.3)"""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        payloads = [rng.randbytes(rng.randrange(0, 126)) for _ in range(rng.randrange(50, 800))]
        wire.send(b"".join(client_frame(PING, payload) for payload in payloads))
        for payload in payloads:
            assert wire.frame() == (PONG, payload)
        return "all-ponged"


def register_flood(rng: random.Random, target: Target) -> str:
    """max_channels + 20 registers in one write: 200 accepted, then 413 echoes (DESIGN.md 3)."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        uaid = hello(wire)
        frames = [
            {"messageType": "register", "channelID": str(uuid.UUID(int=rng.getrandbits(128)))}
            for _ in range(MAX_CHANNELS + 20)
        ]
        wire.send(b"".join(client_frame(TEXT, json.dumps(f).encode()) for f in frames))
        for index, sent in enumerate(frames):
            opcode, payload = wire.frame()
            assert opcode == TEXT, (opcode, payload)
            reply = strict_json(payload)
            if index < MAX_CHANNELS:
                assert reply["status"] == 200 and reply["uaid"] == uaid, reply
            else:
                assert reply == {**sent, "status": 413, "error": "Too Many Channels"}, reply
        return "200+413"


def unread_flood(rng: random.Random, target: Target) -> str:
    """Pings the device never reads the answers to, then it hangs up."""
    with Wire(target.server.port) as wire:
        assert wire.upgrade() == 101
        frame = client_frame(rng.choice([TEXT, PING]), b"{}")
        wire.sock.settimeout(2.0)
        try:
            wire.sock.sendall(frame * rng.randrange(10_000, 60_000))
        except TimeoutError:
            return "server-stopped-reading"
        except (BrokenPipeError, ConnectionResetError):
            return "cut"
        return "sent"


GARBAGE_HTTP = [
    b"NOT-A-REQUEST\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / FTP/1.1\r\n\r\n",
    b"GET  HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET / HTTP/1.1\r\nNoColonHere\r\n\r\n",
    b"GET / HTTP/1.1\r\n folded: header\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nxx",
    b"PUT /update/x HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nversion=1\r\n0\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nversion=1XX0\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"ffffffffffffffffffff\r\n\r\n",
]


def random_request_line(rng: random.Random) -> bytes:
    alphabet = bytes(range(33, 127))
    token = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
    return token + b"\r\n\r\n"


def http_malformed(rng: random.Random, target: Target) -> str:
    """Malformed HTTP: expected 400; a close without one fails the run."""
    request = rng.choice([*GARBAGE_HTTP, random_request_line(rng)])
    with Wire(target.server.port) as wire:
        wire.send(request)
        try:
            status, _, _ = wire.response()
        except Closed:
            raise AssertionError(f"closed without a response to {request[:80]!r}") from None
        if status != 400:
            raise LimitMismatch(f"{request[:80]!r} answered {status}, expected 400")
        return "400"


class LimitMismatch(Exception):
    """A limit answered with something other than its status (413, 431, 400)."""


def huge_header(target: Target, name: str, method: str, path: str, size: int) -> str:
    """One header of `size` bytes, over the limit: expected 431 (RFC 6585 5)."""
    request = http_request(method, path, {name: "a" * size, "Content-Length": "0"})
    what = f"{size} B {name} on {method} {path}"
    with Wire(target.server.port) as wire:
        wire.send(request)
        try:
            status, _, _ = wire.response()
        except Closed:
            raise LimitMismatch(f"{what}: closed without a response, expected 431") from None
        if status != 431:
            raise LimitMismatch(f"{what}: answered {status}, expected 431")
        return "431"


def http_huge_header(rng: random.Random, target: Target) -> str:
    """Strict 431 up to Tornado's cut; past it a cut is tolerated here (and pinned elsewhere)."""
    size = rng.choice(HEADER_SIZES)
    try:
        return huge_header(
            target,
            rng.choice(["X-Junk", "Cookie", "Sec-WebSocket-Key", "Content-Type"]),
            rng.choice(["GET", "PUT"]),
            rng.choice(["/", "/status", "/update/x"]),
            size,
        )
    except LimitMismatch as exc:
        if size >= TORNADO_HEADER_CUT and "closed without a response" in str(exc):
            return f"{size // 1024}KiB:cut"
        raise


def http_many_headers(rng: random.Random, target: Target) -> str:
    """Thousands of small headers adding up to more than 16 KiB: expected 431."""
    count = rng.randrange(3000, 8000)
    request = http_request("GET", "/status", {f"X-{i}": "v" for i in range(count)})
    with Wire(target.server.port) as wire:
        wire.send(request)
        try:
            status, _, _ = wire.response()
        except Closed:
            if len(request) >= TORNADO_HEADER_CUT:
                return "cut"
            raise LimitMismatch(f"{count} headers: closed without a response") from None
        if status != 431:
            raise LimitMismatch(f"{count} headers ({len(request)} B): {status}, expected 431")
        return "431"


ODD_HTTP = [
    b"GET /status HTTP/1.0\r\n\r\n",
    b"GET http://127.0.0.1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /update/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /update/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /status?x=%ZZ&&&== HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /realstatus HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /update/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"PUT /update/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
]


def http_odd(rng: random.Random, target: Target) -> str:
    """Odd but parseable requests: some answer below 500 (the body need not follow)."""
    request = rng.choice(ODD_HTTP)
    with Wire(target.server.port) as wire:
        wire.send(request)
        status, _, _ = wire.response()
        if status == 100:  # Expect: 100-continue, then the body
            wire.send(b"version=1")
            status, _, _ = wire.response()
        assert status < 500, f"{request[:80]!r} answered {status}"
        return str(status)


def http_pipelined(rng: random.Random, target: Target) -> str:
    """Many requests in one write, good and bad: each answered, in order, on one connection."""
    good = "/update/" + target.parked_endpoint.rsplit("/", 1)[1]
    requests = []
    for _ in range(rng.randrange(20, 300)):
        path, body, status = rng.choice(
            [
                ("/update/AAAA", b"version=1", 404),
                (good, b"version=-5", 400),
                (good, b"version=%d" % rng.randrange(1, 10**6), 202),
                ("/status", None, 200),
            ]
        )
        if body is None:
            requests.append((http_request("GET", path, {}), status))
        else:
            headers = {"Content-Length": str(len(body))}
            requests.append((http_request("PUT", path, headers, body), status))
    with Wire(target.server.port) as wire:
        wire.send(b"".join(request for request, _ in requests))
        for index, (_, status) in enumerate(requests):
            got, _, _ = wire.response()
            assert got == status, f"request {index}: {got}, expected {status}"
        return "all-answered"


def big_put(target: Target, size: int = BIG_BODY) -> str:
    """A multi-megabyte PUT: expected 413 with a JSON body naming 413."""
    body = b"version=1&pad=" + b"x" * size
    path = "/update/" + target.parked_endpoint.rsplit("/", 1)[1]
    with Wire(target.server.port) as wire:
        head = http_request(
            "PUT",
            path,
            {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body))},
        )
        complete = wire.send(head + body)
        try:
            status, _, answer = wire.response()
        except Closed:
            raise LimitMismatch(
                f"{size} B body: closed before a response (whole body sent: {complete})"
            ) from None
        if status != 413:
            raise LimitMismatch(f"{size} B body: answered {status} {answer[:80]!r}, expected 413")
        reply = json.loads(answer)
        assert reply["status"] == 413, reply
        return "413"


def http_big_put(rng: random.Random, target: Target) -> str:
    return big_put(target, rng.choice([2, 3, 4]) * 1024 * 1024)


def bad_upgrade(rng: random.Random, target: Target) -> str:
    """Refused upgrades keep their pinned statuses (RFC 6455 4.2.1, 4.4)."""
    case, headers, status = rng.choice(
        [
            ("no-key", {"Sec_WebSocket_Key": None}, 400),
            ("version-8", {"Sec_WebSocket_Version": "8"}, 426),
            ("no-version", {"Sec_WebSocket_Version": None}, 426),
            ("upgrade-h2c", {"Upgrade": "h2c"}, 400),
            ("no-upgrade", {"Upgrade": None}, 400),
            ("connection-close", {"Connection": "close"}, 400),
            ("key-not-ascii", {"Sec_WebSocket_Key": "\xe9\xe9\xe9"}, 400),
        ]
    )
    with Wire(target.server.port) as wire:
        got = wire.upgrade(**headers)
        assert got == status, f"{case}: {got}, expected {status}"
        return case


def bad_put(rng: random.Random, target: Target) -> str:
    """Bad PUTs to the good device's endpoint and others: pinned statuses, nothing delivered."""
    good = target.good_endpoint
    case, url, body, status = rng.choice(
        [
            ("negative", good, b"version=-1", 400),
            ("word", good, b"version=abc", 400),
            ("float", good, b"version=1.5", 400),
            ("exponent", good, b"version=1e5", 400),
            ("nul", good, b"version=1%00", 400),
            ("too-big", good, b"version=" + b"9" * 30, 400),
            ("data-too-long", good, b"version=1&data=" + b"d" * 5000, 413),
            ("bad-token", good.rsplit("/", 1)[0] + "/AAAA", b"version=1", 404),
            ("garbage-token", good.rsplit("/", 1)[0] + "/%00%ff", b"version=1", 404),
            ("parked", target.parked_endpoint, b"version=%d" % rng.randrange(1, 10**9), 202),
        ]
    )
    got, answer = put(url, body)
    assert got == status, f"{case}: {got} {answer[:100]!r}, expected {status}"
    if status != 202:
        reply = json.loads(answer)
        assert reply["status"] == status and isinstance(reply["error"], str), reply
    return case


KINDS: list[tuple[str, Callable[[random.Random, Target], str], int]] = [
    ("ws_framing", ws_framing, 20),
    ("ws_random_bytes", ws_random_bytes, 12),
    ("ws_bad_lengths", ws_bad_lengths, 4),
    ("json_bad", json_bad, 12),
    ("json_wrong_types", json_wrong_types, 30),
    ("ping_flood", ping_flood, 2),
    ("control_ping_flood", control_ping_flood, 2),
    ("register_flood", register_flood, 1),
    ("unread_flood", unread_flood, 1),
    ("http_malformed", http_malformed, 8),
    ("http_huge_header", http_huge_header, 2),
    ("http_many_headers", http_many_headers, 1),
    ("http_odd", http_odd, 4),
    ("http_pipelined", http_pipelined, 2),
    ("http_big_put", http_big_put, 1),
    ("bad_upgrade", bad_upgrade, 4),
    ("bad_put", bad_put, 8),
]
# A few multi-megabyte bodies are enough; more would only measure the machine.
BIG_PUT_CAP = 6


def hostile(seed: int, target: Target, ledger: Ledger, quota: int, deadline: float) -> None:
    rng = random.Random(seed)
    names = [name for name, _, _ in KINDS]
    weights = [weight for _, _, weight in KINDS]
    functions = {name: function for name, function, _ in KINDS}
    for index in range(quota):
        if time.monotonic() > deadline:
            return
        kind = rng.choices(names, weights)[0]
        if kind == "http_big_put":
            with ledger.lock:
                if ledger.sent["http_big_put"] >= BIG_PUT_CAP:
                    kind = "bad_put"
        item_rng = random.Random(rng.getrandbits(64))  # each item reproducible on its own
        label = f"seed={seed} item={index}"
        try:
            outcome = functions[kind](item_rng, target)
        except LimitMismatch as exc:
            ledger.limit(kind, f"{label}: {exc}")
            outcome = "limit-mismatch"
        except Silent:
            ledger.fail(kind, f"{label}: no answer within {ANSWER_TIMEOUT} s")
            outcome = "silent"
        except Closed:
            ledger.fail(kind, f"{label}: connection cut without the expected answer")
            outcome = "cut"
        except (AssertionError, ValueError, OSError) as exc:
            ledger.fail(kind, f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
            outcome = "wrong"
        except Exception as exc:  # a bug of this file: it must fail the test too
            ledger.fail(kind, f"{label}: fuzzer error {type(exc).__name__}: {exc}")
            outcome = "fuzzer-error"
        ledger.count(kind, outcome)


def slow_clients(target: Target, ledger: Ledger, deadline: float, done: threading.Event) -> None:
    """One byte per 100 ms for about 2 s, then the rest: each request is still answered.

    Three at a time (a request head, a PUT body, a hello frame), round after
    round until the deadline.
    """
    port = target.server.port
    token = target.parked_endpoint.rsplit("/", 1)[1]
    status_head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 20
    body = b"version=12345&pad=" + b"p" * 20
    put_head = http_request(
        "PUT",
        f"/update/{token}",
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body))},
    )
    hello_frame = client_frame(TEXT, b'{"messageType":"hello","uaid":"","channelIDs":[]}')
    cases = [
        ("slow_http_head", b"", status_head[:20], status_head[20:] + b"\r\n\r\n", 200),
        ("slow_put_body", put_head, body[:20], body[20:], 202),
        ("slow_ws_hello", None, hello_frame[:20], hello_frame[20:], 200),
    ]

    def one(kind: str, head: bytes | None, before: bytes, after: bytes, status: int) -> None:
        try:
            with Wire(port) as wire:
                if head is None:
                    assert wire.upgrade() == 101
                else:
                    wire.send(head)
                for byte in before:
                    wire.send(bytes((byte,)))
                    time.sleep(0.1)
                wire.send(after)
                if head is None:
                    opcode, payload = wire.frame()
                    reply = strict_json(payload)
                    assert opcode == TEXT and reply["status"] == status, payload
                else:
                    got, _, answer = wire.response()
                    assert got == status, (got, answer)
            ledger.count(kind, "answered")
        except (AssertionError, Silent, Closed, OSError, ValueError) as exc:
            ledger.fail(kind, f"{type(exc).__name__}: {exc}")
            ledger.count(kind, "wrong")

    while True:
        threads = [threading.Thread(target=one, args=case) for case in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if done.is_set() or time.monotonic() + 3 > deadline:
            return


@dataclass
class GoodDevice:
    """Hello, one channel, and a PUT about every 50 ms, each answered 200 and delivered."""

    target_port: int
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    received: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    redelivered: int = 0
    wire: Wire | None = None
    channel_id: str = ""
    endpoint: str = ""

    def connect(self) -> None:
        self.wire = Wire(self.target_port)
        assert self.wire.upgrade() == 101
        hello(self.wire)
        self.channel_id = str(uuid.uuid4())
        self.endpoint = register(self.wire, self.channel_id)

    def _await_version(self, wire: Wire, version: int) -> bool:
        """Frames until this version's notification.

        A version already seen may come again: when the ack of the one before
        reaches the server after this PUT, the server re-sends what is still
        pending (PROTOCOL.md: re-deliver until acked). Anything else is wrong.
        """
        while True:
            opcode, payload = wire.frame()
            reply = strict_json(payload) if opcode == TEXT else None
            updates = reply.get("updates") if isinstance(reply, dict) else None
            if (
                reply is None
                or reply.get("messageType") != "notification"
                or not isinstance(updates, list)
                or len(updates) != 1
                or set(updates[0]) != {"channelID", "version"}
                or updates[0]["channelID"] != self.channel_id
                or not isinstance(updates[0]["version"], int)
                or updates[0]["version"] > version
            ):
                self.failures.append(f"version={version}: got {opcode} {payload[:200]!r}")
                return False
            if updates[0]["version"] == version:
                return True
            self.redelivered += 1

    def run(self) -> None:
        wire = self.wire
        version = 0
        while not self.stop.is_set() and len(self.failures) < 5:
            version += 1
            started = time.monotonic()
            try:
                status, body = put(self.endpoint, b"version=%d" % version)
                self.sent += 1
                if (status, body) != (200, b"{}"):
                    self.failures.append(f"PUT version={version}: {status} {body[:100]!r}")
                    continue
                if not self._await_version(wire, version):
                    continue
                self.received += 1
                ack = {
                    "messageType": "ack",
                    "updates": [{"channelID": self.channel_id, "version": version}],
                }
                wire.text(json.dumps(ack))
            except (Silent, Closed, OSError, ValueError) as exc:
                self.failures.append(f"version={version}: {type(exc).__name__} {exc}")
                continue
            elapsed = time.monotonic() - started
            self.slowest = max(self.slowest, elapsed)
            time.sleep(max(0.0, PUT_PERIOD - elapsed))


def status_of(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.url("/status"), timeout=ANSWER_TIMEOUT) as response:
        assert response.status == 200
        return json.loads(response.read())


def error_logs(server: Server) -> list[str]:
    """Log lines at error severity or worse (mozlog Severity <= 3), and tracebacks."""
    bad = []
    for line in server.output():
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if entry.get("Severity", 7) <= 3:
            bad.append(line[:400])
    stderr = server.stderr.read_text(encoding="utf-8", errors="replace")
    if "Traceback" in stderr:
        bad.append(stderr[-2000:])
    return bad


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not SCRIPT.is_file():
        pytest.fail(f"console script {SCRIPT} is missing: run `pip install -e .` in this venv")
    launched = launch(SCRIPT, tmp_path_factory.mktemp("fuzz"), format="json", level="warning")
    yield launched
    if launched.proc.poll() is None:
        launched.proc.kill()
        launched.proc.wait(timeout=5)


def parked_endpoint(port: int) -> str:
    """A channel whose device has hung up: PUTs to it are stored and answered 202."""
    with Wire(port) as wire:
        assert wire.upgrade() == 101
        hello(wire)
        return register(wire, str(uuid.uuid4()))


# --- the tests --------------------------------------------------------------


def test_wire_fuzz_while_a_good_device_keeps_receiving(server: Server):
    print(
        f"\nfuzz seed {SEED} (SIMPLEPUSH_FUZZ_SEED), {ITEMS} items, {SECONDS} s,"
        f" pid {server.proc.pid}"
    )
    good = GoodDevice(server.port)
    good.connect()
    target = Target(server, good.endpoint, parked_endpoint(server.port))
    ledger = Ledger()
    good_thread = threading.Thread(target=good.run, name="good-device")
    good_thread.start()
    started = time.monotonic()
    deadline = started + SECONDS
    try:
        # Warm-up: every kind of item a few times, so that first-use allocations are not counted.
        warm = [
            threading.Thread(
                target=hostile,
                args=(SEED * 1000 + 900 + i, target, ledger, WARMUP_ITEMS // WORKERS, deadline),
            )
            for i in range(WORKERS)
        ]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        rss_before = rss_kb(server.proc.pid)
        done = threading.Event()
        slow = threading.Thread(target=slow_clients, args=(target, ledger, deadline, done))
        slow.start()
        quota = (ITEMS - WARMUP_ITEMS) // WORKERS
        workers = [
            threading.Thread(
                target=hostile, args=(SEED * 1000 + i, target, ledger, quota, deadline)
            )
            for i in range(WORKERS)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        slow.join()
    finally:
        good.stop.set()
        good_thread.join(timeout=2 * ANSWER_TIMEOUT)
    elapsed = time.monotonic() - started
    assert server.proc.poll() is None, f"server exited {server.proc.returncode}"

    # Every hostile socket is closed on our side: the server must let them all go.
    settle = time.monotonic() + SETTLE_TIMEOUT
    while (clients := status_of(server)["clients"]) != 1 and time.monotonic() < settle:
        time.sleep(0.1)
    rss_after = rss_kb(server.proc.pid)
    peak = rss_kb(server.proc.pid, "VmHWM")

    total = sum(ledger.sent.values())
    print(f"items sent: {total} in {elapsed:.1f} s")
    for kind, count in sorted(ledger.sent.items()):
        print(f"  {kind:22} {count}")
    print("outcomes:")
    for outcome, count in sorted(ledger.outcomes.items()):
        print(f"  {outcome:50} {count}")
    print(
        f"good device: {good.sent} PUTs, {good.received} notifications"
        f" (+{good.redelivered} re-deliveries of acked versions),"
        f" slowest {good.slowest:.3f} s"
    )
    print(f"RSS after warm-up {rss_before} kB, at the end {rss_after} kB, peak {peak} kB")
    print(f"clients after settling: {clients}")
    for line in ledger.limits[:10]:
        print(f"limit: {line}")

    problems = []
    if good.failures or good.received != good.sent or good.sent < 10:
        problems.append(f"good device: {good.sent} sent, {good.received} received: {good.failures}")
    if clients != 1:
        problems.append(f"{clients} clients still counted after all hostile sockets closed")
    if rss_after - rss_before > RSS_BOUND_MB * 1024:
        problems.append(f"RSS grew {(rss_after - rss_before) // 1024} MB (bound {RSS_BOUND_MB} MB)")
    problems += [f"hostile {line}" for line in ledger.failures[:40]]
    problems += [f"server log: {line}" for line in error_logs(server)[:10]]
    if ledger.limits:
        kinds = collections.Counter(line.split(":", 1)[0] for line in ledger.limits)
        problems.append(f"limits not enforced yet ({dict(kinds)}): {ledger.limits[:5]}")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems)


def sweep_cases() -> list[tuple[str, str, Any]]:
    """Every field of every command with every wrong value (nested ones once each)."""
    values = [value for family in WRONG_VALUES.values() for value in family]
    return [
        (kind, path, value) for kind, paths in FIELDS.items() for path in paths for value in values
    ]


def spoil(kind: str, path: str, value: Any) -> dict[str, Any]:
    obj = command(random.Random(f"{kind}.{path}"), kind)
    *parents, last = path.split(".")
    holder: Any = obj
    for part in parents:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    holder[int(last) if isinstance(holder, list) else last] = copy.deepcopy(value)
    return obj


def test_every_field_of_every_command_with_every_wrong_value(server: Server):
    """The deterministic half of the fuzzer: each wrong value in each field, after hello.

    Each frame is followed by a ping: the socket answers with its reply or error
    reply and the `{}`, or closes with 1007/1008 (never 1011, an internal error).
    """
    cases = sweep_cases()
    failures: list[str] = []
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def run(chunk: list[tuple[str, str, Any]]) -> None:
        for kind, path, value in chunk:
            obj = spoil(kind, path, value)
            try:
                with Wire(server.port) as wire:
                    assert wire.upgrade() == 101
                    if kind != "hello":
                        hello(wire)
                    wire.text(json.dumps(obj).encode("utf-8", "surrogatepass"))
                    wire.text("{}")
                    outcome = check_frames_until_ping_or_close(wire, obj)
            except (AssertionError, Silent, Closed, OSError, ValueError) as exc:
                outcome = "wrong"
                with lock:
                    failures.append(f"{kind}.{path}={value!r:.60}: {type(exc).__name__} {exc}")
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=run, args=(cases[i::WORKERS],)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"\n{len(cases)} spoiled commands: {dict(outcomes)}")
    assert sum(outcomes.values()) == len(cases)
    assert not failures, "\n".join(failures[:20])
    assert not error_logs(server), error_logs(server)[:5]


def test_multi_megabyte_put_is_413(server: Server):
    """The body limit (default 64 KiB) answers a 4 MiB PUT 413 with a JSON body."""
    target = Target(server, "", parked_endpoint(server.port))
    try:
        assert big_put(target) == "413"
    except LimitMismatch as exc:
        pytest.fail(str(exc))


HEADER_ROUTES = [
    ("X-Junk", "GET", "/status"),
    ("Cookie", "GET", "/"),
    ("X-Junk", "PUT", "/update/x"),
]


@pytest.mark.parametrize("size", [size for size in HEADER_SIZES if size < TORNADO_HEADER_CUT])
@pytest.mark.parametrize(("name", "method", "path"), HEADER_ROUTES)
def test_headers_over_the_limit_are_431(
    server: Server, name: str, method: str, path: str, size: int
):
    try:
        assert huge_header(Target(server, "", ""), name, method, path, size) == "431"
    except LimitMismatch as exc:
        pytest.fail(str(exc))
    assert status_of(server)["status"] == "OK"


@pytest.mark.parametrize("size", [size for size in HEADER_SIZES if size >= TORNADO_HEADER_CUT])
@pytest.mark.parametrize(("name", "method", "path"), HEADER_ROUTES)
def test_headers_too_big_to_hold_are_cut_and_nothing_else_is_affected(
    server: Server, name: str, method: str, path: str, size: int
):
    """Past four times max_header_size the server stops reading the head and drops it."""
    with pytest.raises(LimitMismatch, match="closed without a response"):
        huge_header(Target(server, "", ""), name, method, path, size)
    assert status_of(server)["status"] == "OK"


def test_frame_sent_with_the_upgrade_is_answered(server: Server):
    """A hello pipelined behind the upgrade request, in the same TCP write.

    RFC 6455 4.1 tells clients to wait for the 101, but one that does not
    loses nothing: its hello is answered after the 101.
    """
    hello_frame = client_frame(TEXT, b'{"messageType":"hello","uaid":"","channelIDs":[]}')
    with Wire(server.port) as wire:
        wire.send(upgrade_request(server.port) + hello_frame + client_frame(TEXT, b"{}"))
        status, _, _ = wire.response()
        assert status == 101
        try:
            opcode, payload = wire.frame()
            assert opcode == TEXT, (opcode, payload)
            assert strict_json(payload)["status"] == 200, payload
            assert wire.frame() == (TEXT, b"{}")
        except Silent:
            pytest.fail(f"no answer to a hello sent with the upgrade within {ANSWER_TIMEOUT} s")


@pytest.mark.parametrize("request_bytes", GARBAGE_HTTP, ids=range(len(GARBAGE_HTTP)))
def test_malformed_http_is_400(server: Server, request_bytes: bytes):
    with Wire(server.port) as wire:
        wire.send(request_bytes)
        try:
            status, _, _ = wire.response()
        except Closed:
            pytest.fail(f"closed without a response to {request_bytes[:80]!r}")
    assert status == 400


def test_device_that_never_reads_does_not_grow_server_memory(tmp_path: Path):
    """Pings whose pongs and replies are never read: the server must stop reading, not buffer.

    64 MiB of pings would be answered with about as many bytes; without
    write backpressure they all sit in the server's memory.
    """
    own = launch(SCRIPT, tmp_path, format="json", level="warning")
    try:
        with Wire(own.port) as wire:
            assert wire.upgrade() == 101
            hello(wire)
            time.sleep(0.2)
            before = rss_kb(own.proc.pid)
            payload = b"p" * 125
            chunk = client_frame(PING, payload) * 4096 + client_frame(TEXT, b"{}") * 4096
            wire.sock.settimeout(2.0)
            pushed = 0
            stopped = "sent everything"
            try:
                while pushed < 64 * 1024 * 1024:
                    wire.sock.sendall(chunk)
                    pushed += len(chunk)
            except TimeoutError:
                stopped = "server stopped reading"
            except (BrokenPipeError, ConnectionResetError):
                stopped = "server cut the socket"
            time.sleep(0.5)
            after = rss_kb(own.proc.pid)
            print(f"\npushed {pushed // 1024} KiB ({stopped}); RSS {before} -> {after} kB")
            assert own.proc.poll() is None
            assert status_of(own)["status"] == "OK"
            assert after - before < 32 * 1024, (
                f"RSS grew {(after - before) // 1024} MB while the device did not read ({stopped})"
            )
    finally:
        own.proc.kill()
        own.proc.wait(timeout=5)


def test_anonymous_hellos_do_not_grow_server_memory(tmp_path: Path):
    """Devices that say hello, register nothing and leave must not cost memory for ever.

    A store that kept a record for every UAID it ever handed out (about 340
    bytes each) would let any client grow the server without bound by
    connecting, saying hello and hanging up. Measured over a second batch,
    after a first one has warmed up the allocator.
    """
    own = launch(SCRIPT, tmp_path, format="json", level="warning")
    batch = 10_000

    def hellos(count: int) -> None:
        for _ in range(count):
            with Wire(own.port) as wire:
                assert wire.upgrade() == 101
                hello(wire)

    def run_batch() -> None:
        threads = [
            threading.Thread(target=hellos, args=(batch // WORKERS,)) for _ in range(WORKERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        run_batch()
        time.sleep(0.5)
        before = rss_kb(own.proc.pid)
        run_batch()
        time.sleep(0.5)
        after = rss_kb(own.proc.pid)
        print(f"\n{batch} anonymous hellos: RSS {before} -> {after} kB")
        assert status_of(own)["clients"] == 0
        assert after - before < 1536, (
            f"RSS grew {after - before} kB over {batch} hellos that left nothing behind"
        )
    finally:
        own.proc.kill()
        own.proc.wait(timeout=5)
