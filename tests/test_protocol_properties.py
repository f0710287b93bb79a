"""Hypothesis properties of the pure cores on hostile input (issue 6, item 4).

tests/test_protocol.py already checks `parse` on arbitrary text, on
arbitrary JSON values with arbitrary keys and on command-shaped frames
with one level of real keys; tests/test_wsframes.py checks FrameReader on
well-formed streams. This file adds what those leave out:

- JSON built with st.recursive whose objects, at every depth, mix the real
  SimplePush keys with arbitrary ones, and whose leaves include NUL bytes,
  lone surrogates, huge integers and extreme floats;
- text assembled from JSON tokens (NaN, Infinity, 1e400, 10**5000,
  unbalanced brackets, NUL) so that parsing gets past the first byte;
- arbitrary bytes decoded as text the ways a server could decode them;
- FrameReader on arbitrary byte streams and on streams of frames with
  random opcodes, flags, masks and lengths, cut at arbitrary points: it
  returns frames or raises FrameError only, never holds more than its
  limit, and gives the same result whatever the cuts.
"""

from __future__ import annotations

import contextlib
import json
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from simplepush.protocol import Drop, Reject, parse
from simplepush.wsframes import (
    BINARY,
    CLOSE,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    FrameError,
    FrameReader,
)
from tests.test_protocol import check_outcome, strict_loads
from tests.wsclient import frame_header, xor

# Small enough that every property of this file runs in well under a second or two.
FAST = settings(max_examples=150, deadline=None)

REAL_KEYS = (
    "messageType",
    "uaid",
    "channelIDs",
    "channelID",
    "updates",
    "version",
    "data",
    "status",
    "error",
    "wakeup_hostport",
    "mobilenetwork",
    "ip",
    "port",
    "mcc",
    "mnc",
    "netid",
    "pushEndpoint",
)
MESSAGE_TYPES = ("hello", "Register", "UNREGISTER", "ack", "ping", "purge", "nack", "notification")

hostile_text = st.text() | st.sampled_from(
    ["", "\x00", "a\x00b", "\ud800", "\udfff", "é" * 3, "😀", "\u2028", " ", "0" * 40]
)
hostile_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.integers(min_value=-(2**70), max_value=-(2**62))
    | st.sampled_from([10**300, -(10**300), 2**63 - 1, 2**63, -1, 0])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, 5e-324, -0.0])
    | hostile_text
    | st.sampled_from(MESSAGE_TYPES)
    | st.uuids().map(str)
)
keys = st.sampled_from(REAL_KEYS) | st.text(max_size=6)
# Objects anywhere in the tree may carry the real keys, with any type under them.
hostile_json = st.recursive(
    hostile_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=20,
)
hostile_objects = st.tuples(
    st.sampled_from(MESSAGE_TYPES) | hostile_json,
    st.dictionaries(keys, hostile_json, max_size=6),
).map(lambda parts: {**parts[1], "messageType": parts[0]})

JSON_TOKENS = [
    *("{", "}", "[", "]", ",", ":", " ", "\n", "\x00"),
    *('"messageType"', '"hello"', '"register"', '"ack"', '"uaid"', '"channelID"'),
    *('"channelIDs"', '"updates"', '"version"', '"\\u0000"', '"\\ud800"', '"\x00"'),
    *("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000, "-0", "0.5e-400"),
    *("true", "false", "null", "9223372036854775808", "01", "1.", ".5", "'x'", '"'),
]
json_soup = st.lists(st.sampled_from(JSON_TOKENS), max_size=40).map("".join)


def check_text(text: str, identified: bool) -> None:
    """Any text: a typed outcome; a Reject is strict JSON that echoes with status and error."""
    outcome = parse(text, identified)
    try:
        obj = strict_loads(text)
    except (ValueError, RecursionError):
        # Not RFC 8259 JSON (or beyond what the json module reads): never answered.
        assert type(outcome) is Drop, (text, outcome)
        return
    check_outcome(obj, identified, outcome)


@FAST
@given(hostile_objects, st.booleans())
def test_parse_of_objects_with_real_keys_at_every_depth(obj, identified):
    check_text(json.dumps(obj), identified)


@FAST
@given(hostile_json, st.booleans())
def test_parse_of_any_hostile_json_value(value, identified):
    check_text(json.dumps(value), identified)


@FAST
@given(hostile_objects, st.booleans())
def test_parse_of_objects_written_without_ascii_escapes(obj, identified):
    """Raw NULs, lone surrogates and non-ASCII on the wire rather than \\u escapes."""
    check_text(json.dumps(obj, ensure_ascii=False), identified)


@FAST
@given(json_soup, st.booleans())
def test_parse_of_json_token_soup(text, identified):
    check_text(text, identified)


@FAST
@given(st.binary(max_size=300), st.booleans())
def test_parse_of_arbitrary_bytes_decoded_every_way(data, identified):
    """What a text frame could become: strict UTF-8 when valid, else the lenient decodings."""
    texts = [
        data.decode("utf-8", "replace"),
        data.decode("utf-8", "surrogateescape"),
        data.decode("latin-1"),
    ]
    with contextlib.suppress(UnicodeDecodeError):
        texts.append(data.decode("utf-8"))
    for text in texts:
        check_text(text, identified)


@FAST
@given(hostile_objects, st.integers(0, 40), st.booleans())
def test_error_replies_are_strict_json_echoing_the_frame(obj, cut, identified):
    """Every Reject, even for a frame wrapped in an object, echoes exactly with status+error."""
    text = json.dumps(obj)
    outcome = parse(text, identified)
    if type(outcome) is Reject:
        reply = strict_loads(outcome.reply)
        assert set(reply) == set(obj) | {"status", "error"}
        assert isinstance(reply["status"], int) and isinstance(reply["error"], str)
        assert {k: v for k, v in reply.items() if k not in ("status", "error", "messageType")} == {
            k: v for k, v in obj.items() if k not in ("status", "error", "messageType")
        }
    # A truncated frame is never half-understood.
    if cut and cut < len(text):
        assert type(parse(text[:cut], identified)) is Drop


# --- FrameReader on hostile streams -----------------------------------------

LIMIT = 300
DELIVERED = (TEXT, BINARY, PING, PONG, CLOSE)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


def held(reader: FrameReader) -> int:
    """Bytes the reader keeps between feeds: the partial frame and the fragments so far."""
    fragments = reader._fragments or []
    return len(reader._buffer) + sum(len(part) for part in fragments)


def run_reader(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], int | None]:
    """Feed chunk by chunk; the messages returned and the close code raised (None if none)."""
    reader = FrameReader(LIMIT)
    messages: list[tuple[int, bytes]] = []
    for chunk in chunks:
        try:
            got = reader.feed(chunk)
        except FrameError as exc:
            assert exc.code in (PROTOCOL_ERROR, MESSAGE_TOO_BIG, INVALID_PAYLOAD), exc.code
            return messages, exc.code
        for opcode, payload in got:
            assert opcode in DELIVERED
            assert isinstance(payload, bytes)
            assert len(payload) <= (125 if opcode >= CLOSE else LIMIT)
        messages += got
        # A header (at most 14 bytes) plus one payload, plus the fragments: never more.
        assert held(reader) <= 2 * LIMIT + 14
        assert len(reader._buffer) < 14 + LIMIT
    return messages, None


@st.composite
def hostile_frames(draw) -> bytes:
    """One frame with any opcode, FIN/RSV bits, mask and payload; the length may lie."""
    opcode = draw(st.integers(0, 15))
    payload = draw(st.binary(max_size=140) | st.just(b"\x03\xe8") | st.just(b"{}"))
    declared = draw(
        st.just(len(payload))
        | st.integers(0, 200)
        | st.sampled_from([LIMIT, LIMIT + 1, 65535, 65536, 2**63, 2**64 - 1])
    )
    masked = draw(st.sampled_from([True, True, True, False]))
    header = frame_header(
        opcode,
        declared,
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from([0, 0, 0, 0x10, 0x20, 0x40])),
        masked=masked,
    )
    if not masked:
        return header + payload
    mask = draw(st.binary(min_size=4, max_size=4))
    return header + mask + xor(mask, payload)


frame_streams = st.lists(hostile_frames(), max_size=8).map(b"".join) | st.binary(max_size=600)


@FAST
@given(frame_streams, st.data())
def test_frame_reader_on_hostile_streams_cut_anywhere(stream, data):
    """Frames or FrameError only, bounded holding, and the same result whatever the cuts."""
    whole = run_reader([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    pieces = run_reader(split_at(stream, cuts))
    bytewise = run_reader([stream[i : i + 1] for i in range(len(stream))])
    assert pieces[1] == bytewise[1] == whole[1]
    if whole[1] is None:
        assert pieces[0] == bytewise[0] == whole[0]
    else:
        # Messages completed in the chunk that raises are lost with it; fed byte by byte,
        # none are, so every other cut gives a prefix of those.
        assert pieces[0] == bytewise[0][: len(pieces[0])]


@FAST
@given(st.lists(st.binary(max_size=64), max_size=30))
def test_frame_reader_after_an_error_does_not_grow(chunks):
    """A server that kept feeding after FrameError (it should not) still holds no more."""
    reader = FrameReader(LIMIT)
    for chunk in chunks:
        with contextlib.suppress(FrameError):
            reader.feed(chunk)
        assert held(reader) <= 2 * LIMIT + 14
