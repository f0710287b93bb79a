"""Endpoint tokens and message ids: Fernet over raw ids, one kind byte apart.

Fernet (cryptography) authenticates as well as encrypts, so a token can be
neither read nor forged; MultiFernet encrypts with the newest key and
accepts every listed key, which is how keys rotate.

A SimplePush token holds the UAID and channelID as 16 raw bytes each. The
WebPush kinds start with a kind byte, so that no token of one kind is
accepted where another is expected: a v1 endpoint adds nothing more, a v2
endpoint adds sha256 of the application server's key (docs/WEBPUSH.md), and
a message id (the `Location` of a 201) adds the message's 16-byte id.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# Only the unpadded URL-safe alphabet we emit: a re-encoded token is not ours.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,512}")


# App servers PUT to the same endpoints again and again; remembering recent
# good tokens skips an HMAC and an AES decryption per PUT (docs/PERFORMANCE.md).
CACHE_SIZE = 16384

WEBPUSH_V1 = b"\x01"
WEBPUSH_V2 = b"\x02"
MESSAGE = b"\x03"
KEY_HASH_SIZE = 32
MESSAGE_ID_SIZE = 16


class TokenCodec:
    def __init__(self, keys: list[str], cache_size: int = CACHE_SIZE) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        self._cache: dict[str, bytes] = {}
        self._cache_size = cache_size

    def _seal(self, plain: bytes) -> str:
        """'=' padding is dropped to keep URLs clean."""
        return self._fernet.encrypt(plain).rstrip(b"=").decode("ascii")

    def encode(self, uaid: str, chid: str) -> str:
        """A SimplePush endpoint token; uaid and chid are 32-hex keys."""
        return self._seal(bytes.fromhex(uaid + chid))

    def encode_webpush(self, uaid: str, chid: str, key_hash: bytes | None) -> str:
        """A v1 endpoint token, or v2 when bound to an application server key's hash."""
        ids = bytes.fromhex(uaid + chid)
        if key_hash is None:
            return self._seal(WEBPUSH_V1 + ids)
        return self._seal(WEBPUSH_V2 + ids + key_hash)

    def encode_message(self, uaid: str, chid: str, message_id: str) -> str:
        """The id in a message's `Location`: enough to find and cancel it."""
        return self._seal(MESSAGE + bytes.fromhex(uaid + chid + message_id))

    def decode(self, token: str) -> tuple[str, str] | None:
        """(uaid, chid) of a SimplePush token, or None for anything else."""
        plain = self._open(token)
        if plain is None or len(plain) != 32:
            return None
        text = plain.hex()
        return text[:32], text[32:]

    def decode_webpush(self, token: str, v2: bool) -> tuple[str, str, bytes | None] | None:
        """(uaid, chid, key hash or None) of a v1 or v2 endpoint token, else None."""
        plain = self._open(token)
        if plain is None:
            return None
        if v2:
            if len(plain) != 33 + KEY_HASH_SIZE or plain[:1] != WEBPUSH_V2:
                return None
            key_hash: bytes | None = plain[33:]
        else:
            if len(plain) != 33 or plain[:1] != WEBPUSH_V1:
                return None
            key_hash = None
        text = plain[1:33].hex()
        return text[:32], text[32:], key_hash

    def decode_message(self, token: str) -> tuple[str, str, str] | None:
        """(uaid, chid, message id) of a message's Location id, else None."""
        plain = self._decrypt(token)
        if plain is None or len(plain) != 33 + MESSAGE_ID_SIZE or plain[:1] != MESSAGE:
            return None
        text = plain[1:].hex()
        return text[:32], text[32:64], text[64:]

    def _open(self, token: str) -> bytes | None:
        """The plaintext of an endpoint token, through the cache of recent good ones."""
        plain = self._cache.get(token)
        if plain is not None:
            return plain
        plain = self._decrypt(token)
        if plain is not None:
            cache = self._cache
            if len(cache) >= self._cache_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[token] = plain
        return plain

    def _decrypt(self, token: str) -> bytes | None:
        if _TOKEN.fullmatch(token) is None:
            return None
        raw = token.encode("ascii")
        try:
            return self._fernet.decrypt(raw + b"=" * (-len(raw) % 4))
        except (InvalidToken, binascii.Error, ValueError):
            return None


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def is_valid_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
