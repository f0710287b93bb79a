"""What an app server sends and what a device is told, without I/O.

Version and data rules of PROTOCOL.md section 4 and DESIGN.md section 2,
kept apart from Tornado so they can be tested as plain functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_VERSION = 2**63 - 1
MAX_DATA_BYTES = 4096

_DIGITS = re.compile(r"[0-9]+")


@dataclass(slots=True, frozen=True)
class Update:
    """One pending notification: the channel as the device spells it."""

    channel_id: str
    version: int
    data: str | None = None


class RejectedUpdate(ValueError):
    """An app server's request we refuse; status and error go on the wire."""

    status = 400
    error = "Bad Request"


class InvalidVersion(RejectedUpdate):
    error = "Invalid Version"


class NotUTF8(RejectedUpdate):
    error = "Parameters must be UTF-8"


class DataTooLong(RejectedUpdate):
    status = 413
    error = f"Data exceeds max length of {MAX_DATA_BYTES} bytes"


def form_value(
    form: dict[str, list[bytes]], query: dict[str, list[bytes]], name: str
) -> str | None:
    """The first value of a parameter, the body's before the query's (PROTOCOL.md 4.3)."""
    values = form.get(name) or query.get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise NotUTF8(name) from None


def parse_version(text: str | None, now: int) -> int:
    """Missing or empty means now; 0..2**63-1 literally; anything else is invalid."""
    if not text:
        return now
    if len(text) > 64 or _DIGITS.fullmatch(text) is None:
        raise InvalidVersion(text)
    version = int(text)
    if version > MAX_VERSION:
        raise InvalidVersion(text)
    return version


def check_data(data: str | None) -> str | None:
    """Empty data is no data; more than 4096 UTF-8 bytes is refused."""
    if not data:
        return None
    if len(data) > MAX_DATA_BYTES // 4 and len(data.encode("utf-8")) > MAX_DATA_BYTES:
        raise DataTooLong(len(data.encode("utf-8")))
    return data
