"""The app-server face: what a PUT to an endpoint means and what it is answered.

Kept apart from Tornado so the rules of PROTOCOL.md section 4 read in one
place; web.py only moves bytes in and out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tornado.httputil import parse_qs_bytes

from simplepush.logs import event, log
from simplepush.node import Node
from simplepush.router import Delivery
from simplepush.store import StoreError
from simplepush.updates import DataTooLong, RejectedUpdate, check_data, form_value, parse_version

FORM = "application/x-www-form-urlencoded"
RETRY_AFTER = "5"


@dataclass(slots=True, frozen=True)
class Answer:
    status: int
    body: bytes
    retry_after: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (WebPush: Location, TTL)


DELIVERED = Answer(200, b"{}")
ACCEPTED = {
    Delivery.DELIVERED: DELIVERED,
    Delivery.ROUTED: DELIVERED,
    Delivery.STORED: Answer(202, b"{}"),
}


def _error(status: int, text: str, retry_after: bool = False) -> Answer:
    return Answer(status, b'{"status":%d,"error":"%s"}' % (status, text.encode()), retry_after)


INVALID_TOKEN = _error(404, "Invalid Token")
UNKNOWN_CHANNEL = _error(404, "Unknown Channel")
UNAVAILABLE = _error(503, "Service Unavailable", retry_after=True)

# The dashboard's counter for each outcome (stats.RATES, stats.REJECTED), named once.
_COUNTERS = {
    outcome: f"put.{outcome}"
    for outcome in (
        *(delivery.value for delivery in Delivery),
        "invalid",
        "invalid_token",
        "too_long",
        "storage_error",
    )
}


def form(content_type: str | None, body: bytes) -> dict[str, list[bytes]]:
    """The body counts when Content-Type is absent or form (PROTOCOL.md 4.3)."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() == FORM:
        return parse_qs_bytes(body, keep_blank_values=True)
    return {}


async def update(
    node: Node, token: str, content_type: str | None, body: bytes, query: str
) -> Answer:
    """Validate, store, deliver; the version is checked before the token (as pushgo)."""
    start = time.monotonic()
    answer, outcome = await _update(node, token, content_type, body, query, start)
    node.stats.incr(_COUNTERS[outcome])
    if log.isEnabledFor(logging.DEBUG):
        event(
            logging.DEBUG,
            "update.received",
            status=answer.status,
            outcome=outcome,
            duration_ms=round((time.monotonic() - start) * 1000, 3),
        )
    return answer


async def _update(
    node: Node, token: str, content_type: str | None, body: bytes, query: str, start: float
) -> tuple[Answer, str]:
    """The answer and a one-word outcome for the debug log."""
    metrics = node.metrics
    metrics.incr("updates.appserver.incoming")
    try:
        fields = form(content_type, body)
        args = parse_qs_bytes(query, keep_blank_values=True) if query else {}
        version = parse_version(form_value(fields, args, "version"), int(time.time()))
        data = check_data(form_value(fields, args, "data"))
    except RejectedUpdate as exc:
        too_long = isinstance(exc, DataTooLong)
        metrics.incr("updates.appserver.toolong" if too_long else "updates.appserver.invalid")
        return _error(exc.status, exc.error), "too_long" if too_long else "invalid"
    ids = node.tokens.decode(token)
    if ids is None:
        metrics.incr("updates.appserver.invalid")
        return INVALID_TOKEN, "invalid_token"
    try:
        delivery = await node.router.notify(ids[0], ids[1], version, data)
    except StoreError as exc:
        metrics.incr("updates.appserver.error")
        node.storage_failed("update", exc)
        return UNAVAILABLE, "storage_error"
    if delivery is Delivery.UNKNOWN_CHANNEL:
        metrics.incr("updates.appserver.rejected")
        return UNKNOWN_CHANNEL, delivery.value
    elapsed_ms = (time.monotonic() - start) * 1000
    metrics.timing("updates.handled", elapsed_ms)
    if delivery is not Delivery.STORED:
        # PUT received to frame written here, or to the holding node saying it wrote it.
        node.stats.delivered(elapsed_ms)
    return ACCEPTED[delivery], delivery.value
