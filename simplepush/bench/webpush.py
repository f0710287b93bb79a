"""WebPush mode: the run's VAPID key pair and JWT, and aes128gcm-shaped message bodies.

One key pair serves the whole run: the coordinator makes it and every worker
gets it, so every device registers the same ``key``. A worker signs one JWT
per endpoint origin it meets (in practice one) and reuses the Authorization
header for every POST, as an app server does; no signature is made inside a
measured round trip, and a server that caches verified headers can.

The bodies are not real ciphertext (the server only relays them) but carry
the aes128gcm header (RFC 8188) a real one has, so what the server stores
and forwards is realistically sized and shaped. Their tail holds the round
trip's sequence number: WebPush versions are chosen by the server, so the
device recognises its message by the ``data`` it carries instead.
"""

from __future__ import annotations

import base64
import random
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SUBJECT = "mailto:bench@example.com"
JWT_LIFETIME = 12 * 3600  # well inside the 24 h a server accepts, and longer than any run
TTL = 60
BODY_SIZE = 100
RECORD_SIZE = 4096
SALT_SIZE = 16
POINT_SIZE = 65  # uncompressed P-256 point: 0x04 | X | Y
SEQ_SIZE = 8
# salt | rs (4 bytes) | idlen (1 byte) | keyid (the sender's ephemeral public point)
HEADER_SIZE = SALT_SIZE + 4 + 1 + POINT_SIZE


def b64url(data: bytes) -> str:
    """Unpadded base64url, as VAPID ``k=`` and the notification ``data`` use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_point() -> bytes:
    """The uncompressed public point of a fresh P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass(frozen=True, slots=True)
class Vapid:
    """The run's VAPID key pair and JWT expiry; picklable, sent to every worker at spawn."""

    private_pem: bytes
    public_point: bytes
    exp: int  # JWT ``exp``, seconds since the epoch

    @classmethod
    def generate(cls) -> Vapid:
        """A new key pair, with a JWT expiry 12 h from now."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return cls(pem, point, int(time.time()) + JWT_LIFETIME)

    @property
    def register_key(self) -> str:
        """The register frame's ``key``: padded base64url, as Firefox sends it."""
        return base64.urlsafe_b64encode(self.public_point).decode()

    def headers(self, origin: str) -> bytes:
        """The preformatted headers of every POST to endpoints of ``origin`` (scheme://host[:port]).

        Signs a JWT (ES256, PyJWT) with ``aud`` = ``origin``; called once per origin.
        """
        claims = {"aud": origin, "exp": self.exp, "sub": SUBJECT}
        token = jwt.encode(claims, self.private_pem, algorithm="ES256")
        return (
            f"TTL: {TTL}\r\nContent-Encoding: aes128gcm\r\n"
            f"Authorization: vapid t={token},k={b64url(self.public_point)}\r\n"
        ).encode()


class Bodies:
    """Makes each round trip's 100-byte body and the ``data`` string the device will get."""

    __slots__ = ("middle",)

    def __init__(self) -> None:
        # rs, idlen and one ephemeral point per process: a real sender makes a point per
        # message, but that would be client CPU spent on bytes the server never reads.
        self.middle = RECORD_SIZE.to_bytes(4, "big") + bytes((POINT_SIZE,)) + new_point()

    def make(self, seq: int) -> tuple[bytes, str]:
        """(body, its unpadded base64url); ``seq`` makes both unique within the process.

        ``random`` rather than os.urandom: the salt and filler only need to look
        random, and a syscall per message would be client CPU for nothing.
        """
        body = (
            random.randbytes(SALT_SIZE)
            + self.middle
            + seq.to_bytes(SEQ_SIZE, "big")
            + random.randbytes(BODY_SIZE - HEADER_SIZE - SEQ_SIZE)
        )
        return body, b64url(body)
