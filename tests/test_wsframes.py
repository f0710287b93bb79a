"""The server-side RFC 6455 codec (simplepush/wsframes.py) without sockets.

Client frames come from tests/wsclient.py, a separate implementation, so a
mistake shared by encoder and decoder cannot hide itself.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simplepush.wsframes import (
    BINARY,
    CLOSE,
    CONTINUATION,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    NO_STATUS,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    FrameError,
    FrameReader,
    accept_key,
    encode,
    encode_close,
    parse_close,
    unmask,
)
from tests.wsclient import MASK, client_frame, frame_header, xor

MAX = 1 << 20


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    messages = []
    for chunk in chunks:
        messages += reader.feed(chunk)
    return messages


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """data cut at the given offsets (sorted, repeats give empty pieces)."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


def refused(data: bytes, max_message: int = MAX) -> int:
    """The close code FrameReader raises for data."""
    with pytest.raises(FrameError) as caught:
        FrameReader(max_message).feed(data)
    return caught.value.code


# --- handshake and encoding ------------------------------------------------


def test_accept_key_matches_rfc_6455_example():
    """RFC 6455 1.3 gives this key and its answer."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_encode_uses_the_minimal_length_form(length, header):
    """RFC 6455 5.2: 7-bit, then 16-bit, then 64-bit lengths; servers never mask."""
    payload = bytes(i % 251 for i in range(length))
    assert encode(TEXT, payload) == header + payload


@pytest.mark.parametrize("opcode", [BINARY, CLOSE, PING, PONG])
def test_encode_sets_fin_and_opcode(opcode):
    assert encode(opcode, b"ab") == bytes((0x80 | opcode, 2)) + b"ab"


def test_encode_close_is_code_then_reason():
    assert encode_close(1000) == b"\x88\x02\x03\xe8"
    assert encode_close(1002, "bad") == b"\x88\x05\x03\xeabad"


def test_encode_close_keeps_a_long_reason_within_a_control_frame_and_utf8():
    """RFC 6455 5.5 and 5.5.1: at most 125 bytes of payload, and the reason is UTF-8.

    "x" then two-byte characters puts the 120th byte in the middle of one.
    """
    reason = "x" + "é" * 100
    frame = encode_close(1000, reason)
    assert frame[:2] == bytes((0x88, len(frame) - 2))
    assert len(frame) - 2 <= 125
    code, kept = parse_close(frame[2:])
    assert code == 1000
    assert kept and reason.startswith(kept)


# --- unmask ----------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 9, 1021])
@pytest.mark.parametrize("mask", [MASK, b"\x00\x00\x00\x00", b"\xff\x00\x80\x01"])
def test_unmask_is_bytewise_xor_and_its_own_inverse(length, mask):
    payload = bytes((i * 7 + 3) % 256 for i in range(length))
    masked = unmask(mask, payload)
    assert masked == xor(mask, payload)
    assert unmask(mask, masked) == payload


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_unmask_agrees_with_the_reference_xor(mask, payload):
    assert unmask(mask, payload) == xor(mask, payload)


# --- parse_close -----------------------------------------------------------


def test_parse_close_without_payload_is_no_status():
    """RFC 6455 7.1.5: an empty close frame means 1005, which is never sent."""
    assert parse_close(b"") == (NO_STATUS, "")


def test_parse_close_of_one_byte_is_a_protocol_error():
    """RFC 6455 5.5.1: a body starts with a two-byte code."""
    with pytest.raises(FrameError) as caught:
        parse_close(b"\x03")
    assert caught.value.code == PROTOCOL_ERROR


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_parse_close_refuses_codes_a_peer_may_not_send(code):
    """RFC 6455 7.4.1-7.4.2: reserved, unassigned or 'must not be sent' codes."""
    with pytest.raises(FrameError) as caught:
        parse_close(code.to_bytes(2, "big") + b"why")
    assert caught.value.code == PROTOCOL_ERROR


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999])
def test_parse_close_accepts_sendable_codes(code):
    assert parse_close(code.to_bytes(2, "big") + "bye é".encode()) == (code, "bye é")


def test_parse_close_with_non_utf8_reason_is_invalid_payload():
    """RFC 6455 8.1: invalid UTF-8 fails the connection with 1007."""
    with pytest.raises(FrameError) as caught:
        parse_close(b"\x03\xe8\xc3")
    assert caught.value.code == INVALID_PAYLOAD


# --- FrameReader: well-formed streams --------------------------------------


def test_feed_returns_a_whole_frame():
    assert FrameReader(MAX).feed(client_frame(TEXT, b"hello")) == [(TEXT, b"hello")]


def test_feed_gives_the_same_messages_whatever_the_split():
    """TCP may cut anywhere: in the header, the extended length, the mask or the payload."""
    stream = (
        client_frame(TEXT, b"first")
        + client_frame(PING, b"p")
        + client_frame(BINARY, bytes(300))
        + client_frame(CLOSE, b"\x03\xe8")
    )
    expected = [(TEXT, b"first"), (PING, b"p"), (BINARY, bytes(300)), (CLOSE, b"\x03\xe8")]
    for cut in range(len(stream) + 1):
        assert feed_all(FrameReader(MAX), split_at(stream, [cut])) == expected, cut
    byte_by_byte = [stream[i : i + 1] for i in range(len(stream))]
    assert feed_all(FrameReader(MAX), byte_by_byte) == expected


def test_feed_holds_a_partial_frame_until_it_is_complete():
    frame = client_frame(TEXT, b"hello")
    reader = FrameReader(MAX)
    assert reader.feed(frame[:-1]) == []
    assert reader.feed(frame[-1:]) == [(TEXT, b"hello")]


def test_feed_returns_several_frames_of_one_chunk_in_order():
    chunk = b"".join(client_frame(TEXT, f"m{i}".encode()) for i in range(5))
    assert FrameReader(MAX).feed(chunk) == [(TEXT, f"m{i}".encode()) for i in range(5)]


@pytest.mark.parametrize(("length", "marker"), [(126, 126), (65535, 126), (65536, 127)])
def test_feed_reads_extended_lengths(length, marker):
    payload = bytes(i % 253 for i in range(length))
    frame = client_frame(TEXT, payload)
    assert frame[1] == 0x80 | marker
    assert FrameReader(MAX).feed(frame) == [(TEXT, payload)]


def test_fragmented_text_with_a_ping_between_fragments():
    """RFC 6455 5.4: control frames may come between fragments and are answered at once."""
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(TEXT, b"hel", fin=False)) == []
    assert reader.feed(client_frame(PING, b"now")) == [(PING, b"now")]
    assert reader.feed(client_frame(CONTINUATION, b"", fin=False)) == []
    assert reader.feed(client_frame(CONTINUATION, b"lo")) == [(TEXT, b"hello")]
    # the reader is back to whole messages
    assert reader.feed(client_frame(TEXT, b"next")) == [(TEXT, b"next")]


def test_fragments_and_control_frame_in_one_chunk():
    chunk = (
        client_frame(TEXT, b"a", fin=False)
        + client_frame(PONG, b"")
        + client_frame(CONTINUATION, b"b")
    )
    assert FrameReader(MAX).feed(chunk) == [(PONG, b""), (TEXT, b"ab")]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_fragmentation_and_chunking_gives_back_the_messages(data):
    """Whatever the fragment and TCP boundaries, feed yields exactly the texts sent."""
    texts = data.draw(st.lists(st.text(st.characters(codec="utf-8"), max_size=200), max_size=6))
    stream = b""
    for text in texts:
        payload = text.encode("utf-8")
        cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=3))
        fragments = split_at(payload, cuts)
        for index, fragment in enumerate(fragments):
            stream += client_frame(
                CONTINUATION if index else TEXT,
                fragment,
                fin=index == len(fragments) - 1,
                mask=data.draw(st.binary(min_size=4, max_size=4)),
            )
    chunk_cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    messages = feed_all(FrameReader(MAX), split_at(stream, chunk_cuts))
    assert messages == [(TEXT, text.encode("utf-8")) for text in texts]


# --- FrameReader: protocol errors ------------------------------------------


def test_continuation_without_a_first_fragment_is_refused():
    assert refused(client_frame(CONTINUATION, b"x")) == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_new_message_inside_a_fragmented_one_is_refused(opcode):
    """RFC 6455 5.4: fragments of one message may not interleave with another."""
    stream = client_frame(TEXT, b"a", fin=False) + client_frame(opcode, b"b")
    assert refused(stream) == PROTOCOL_ERROR


def test_unmasked_client_frame_is_refused():
    """RFC 6455 5.1: a server must close on an unmasked client frame."""
    assert refused(client_frame(TEXT, b"hello", mask=None)) == PROTOCOL_ERROR


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
def test_reserved_bits_are_refused(rsv):
    """RFC 6455 5.2: no extension was negotiated, so RSV1-3 must be 0."""
    assert refused(client_frame(TEXT, b"x", rsv=rsv)) == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_refused(opcode):
    assert refused(client_frame(opcode, b"")) == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [CLOSE, PING, PONG])
def test_control_frame_over_125_bytes_is_refused(opcode):
    """RFC 6455 5.5: control payloads are at most 125 bytes."""
    assert refused(client_frame(opcode, b"\x03\xe8" + bytes(124))) == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [CLOSE, PING, PONG])
def test_fragmented_control_frame_is_refused(opcode):
    """RFC 6455 5.5: control frames must not be fragmented."""
    assert refused(client_frame(opcode, b"", fin=False)) == PROTOCOL_ERROR


def test_frame_of_max_message_bytes_is_read():
    assert FrameReader(300).feed(client_frame(TEXT, bytes(300))) == [(TEXT, bytes(300))]


@pytest.mark.parametrize("length", [301, 65536, 1 << 40])
def test_frame_over_max_message_is_refused_on_its_header(length):
    """Only the header is fed: the reader must not wait for (and buffer) the payload."""
    header = frame_header(TEXT, length) + MASK
    assert refused(header, max_message=300) == MESSAGE_TOO_BIG


def test_fragmented_message_over_max_message_is_refused():
    """Each fragment fits, their sum does not."""
    stream = client_frame(TEXT, bytes(200), fin=False) + client_frame(CONTINUATION, bytes(101))
    assert refused(stream, max_message=300) == MESSAGE_TOO_BIG
