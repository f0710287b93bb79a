"""VAPID (RFC 8292 and its draft-01 form): who signed a POST, checked with PyJWT.

The header is parsed here; the JWT (ES256 signature, `aud`, `exp`) is
verified by PyJWT over cryptography rather than by code of our own. Senders
reuse one signed header for hours, so a verified header is remembered until
its `exp`, keyed by the whole header text: a cached answer can never outlive
the token it came from.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from simplepush.webpush import Refused, b64url_decode

MAX_AHEAD = 86400  # RFC 8292 2: exp no more than 24 hours from now
SKEW = 60  # seconds of clock difference allowed on both bounds of exp
CACHE_SIZE = 4096
_ERRNO = 109


def _missing(message: str) -> Refused:
    return Refused(401, _ERRNO, message)


def _invalid(message: str) -> Refused:
    return Refused(403, _ERRNO, message)


def parse_header(authorization: str, crypto_key: str | None) -> tuple[str, str]:
    """(jwt, base64url public key) from either header form; 401 if unparseable."""
    scheme, _, rest = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "vapid":
        params = {}
        for part in rest.split(","):
            name, sep, value = part.strip().partition("=")
            if sep:
                params[name.strip().lower()] = value.strip()
        if not params.get("t") or not params.get("k"):
            raise _missing("VAPID header needs t= and k=")
        return params["t"], params["k"]
    if scheme in ("webpush", "bearer"):
        key = None
        for chunk in (crypto_key or "").replace(",", ";").split(";"):
            name, sep, value = chunk.strip().partition("=")
            if sep and name.strip().lower() == "p256ecdsa":
                key = value.strip().strip('"')
        if not key or not rest.strip():
            raise _missing("WebPush authorization needs a Crypto-Key p256ecdsa= key")
        return rest.strip(), key
    raise _missing("Authorization must be a VAPID or WebPush scheme")


class Verifier:
    """Checks VAPID headers against the origin senders address (`aud`)."""

    def __init__(self, audience: str, cache_size: int = CACHE_SIZE) -> None:
        self.audience = audience
        # header text -> (sha256 of the signer's raw key, exp)
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._cache_size = cache_size
        self.verified = 0  # signatures checked (not answered from the cache), for the bench

    def check(self, authorization: str | None, crypto_key: str | None, bound: bytes | None) -> None:
        """Return if the POST may go on; Refused(401/403) if not (docs/WEBPUSH.md).

        bound is the key hash of a v2 endpoint, which makes VAPID mandatory.
        """
        if authorization is None:
            if bound is not None:
                raise _missing("VAPID authorization is required for this subscription")
            return
        now = time.time()
        cache_key = authorization if crypto_key is None else f"{authorization}\n{crypto_key}"
        cached = self._cache.get(cache_key)
        if cached is None or cached[1] + SKEW < now:
            cached = self._verify(authorization, crypto_key, now)
            cache = self._cache
            if len(cache) >= self._cache_size:
                del cache[next(iter(cache))]
            cache[cache_key] = cached
        if bound is not None and not hmac.compare_digest(cached[0], bound):
            raise _invalid("VAPID key does not match the subscription's key")

    def _verify(
        self, authorization: str, crypto_key: str | None, now: float
    ) -> tuple[bytes, float]:
        token, key_text = parse_header(authorization, crypto_key)
        try:
            raw = b64url_decode(key_text)
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise _invalid("VAPID key is not a P-256 public key") from None
        self.verified += 1
        try:
            claims = jwt.decode(
                token,
                public_key,
                algorithms=["ES256"],
                audience=self.audience,
                options={"require": ["exp", "aud"]},
                leeway=SKEW,
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"VAPID token rejected: {exc}") from None
        exp = int(claims["exp"])  # PyJWT has checked it is a number (it accepts numeric strings)
        if exp > now + MAX_AHEAD + SKEW:
            raise _invalid("VAPID exp is more than 24 hours ahead")
        sub = claims.get("sub")
        if sub is not None and not (type(sub) is str and sub.startswith(("mailto:", "https:"))):
            raise _invalid("VAPID sub must be a mailto: or https: URI")
        return hashlib.sha256(raw).digest(), float(exp)


def key_hash(key_text: str) -> bytes | None:
    """sha256 of a register's `key` (a P-256 point, padded or not), or None if it is not one."""
    try:
        raw = b64url_decode(key_text)
    except ValueError:
        return None
    if len(raw) != 65 or raw[0] != 4:
        return None
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        return None
    return hashlib.sha256(raw).digest()
