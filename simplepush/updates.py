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


class InvalidVersion(ValueError):
    pass


class DataTooLong(ValueError):
    pass


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
