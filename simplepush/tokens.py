"""Endpoint tokens: Fernet over the UAID and channelID as 16 raw bytes each.

Fernet (cryptography) authenticates as well as encrypts, so a token can be
neither read nor forged; MultiFernet encrypts with the newest key and
accepts every listed key, which is how keys rotate.
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


class TokenCodec:
    def __init__(self, keys: list[str], cache_size: int = CACHE_SIZE) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        self._cache: dict[str, tuple[str, str]] = {}
        self._cache_size = cache_size

    def encode(self, uaid: str, chid: str) -> str:
        """uaid and chid are 32-hex keys; '=' padding is dropped to keep URLs clean."""
        token = self._fernet.encrypt(bytes.fromhex(uaid + chid))
        return token.rstrip(b"=").decode("ascii")

    def decode(self, token: str) -> tuple[str, str] | None:
        """(uaid, chid) or None for anything that is not a token we issued."""
        ids = self._cache.get(token)
        if ids is not None:
            return ids
        ids = self._decrypt(token)
        if ids is not None:
            cache = self._cache
            if len(cache) >= self._cache_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[token] = ids
        return ids

    def _decrypt(self, token: str) -> tuple[str, str] | None:
        if _TOKEN.fullmatch(token) is None:
            return None
        raw = token.encode("ascii")
        try:
            plain = self._fernet.decrypt(raw + b"=" * (-len(raw) % 4))
        except (InvalidToken, binascii.Error, ValueError):
            return None
        if len(plain) != 32:
            return None
        text = plain.hex()
        return text[:32], text[32:]


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def is_valid_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
