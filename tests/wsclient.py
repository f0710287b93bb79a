"""The client side of RFC 6455 framing, written for the tests.

Deliberately independent of simplepush.wsframes (byte-by-byte XOR, lengths
packed by hand) so that the codec is checked against a second
implementation rather than against itself.
"""

from __future__ import annotations

# RFC 6455 5.3: any 4 bytes; this one has no zero byte, so masking changes every byte.
MASK = b"\x37\xfa\x21\x3d"


def xor(mask: bytes, data: bytes) -> bytes:
    """RFC 6455 5.3 masking, literally: octet i XOR mask octet i mod 4."""
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(data))


def frame_header(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """The first bytes of a frame, up to (not including) the masking key."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = MASK
) -> bytes:
    """One frame as a client sends it; mask=None builds the forbidden unmasked frame."""
    header = frame_header(opcode, len(payload), fin=fin, rsv=rsv, masked=mask is not None)
    if mask is None:
        return header + payload
    return header + mask + xor(mask, payload)
