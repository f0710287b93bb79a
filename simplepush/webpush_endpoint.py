"""The WebPush app-server face: what a POST or DELETE means and what it is answered.

The sibling of endpoint.py (the SimplePush PUT), kept apart from Tornado:
web.py hands over the path, a header getter and the body. The checks run
in docs/WEBPUSH.md's order on what the request alone tells (token, VAPID,
size, headers) before the one storage call that queues and routes it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from http.client import responses

from simplepush import webpush
from simplepush.endpoint import Answer
from simplepush.logs import event, log
from simplepush.node import Node
from simplepush.router import Delivery
from simplepush.store import StoreError
from simplepush.webpush import Refused, dashed

POST_PREFIX = "/wpush/"
MESSAGE_PREFIX = "/m/"
GONE_CACHE = ("Cache-Control", "max-age=86400")
_NEEDS_VAPID = ("WWW-Authenticate", "vapid")

# Each refusal's statsd counter and dashboard outcome, by status.
_REFUSALS = {
    400: ("updates.webpush.invalid", "invalid"),
    401: ("updates.webpush.unauthorized", "unauthorized"),
    403: ("updates.webpush.unauthorized", "unauthorized"),
    404: ("updates.webpush.invalid", "invalid_token"),
    413: ("updates.webpush.toolong", "too_long"),
}


def error(status: int, errno: int, message: str, *headers: tuple[str, str]) -> Answer:
    """RFC 8030 leaves error bodies open; autopush's JSON shape is what senders parse."""
    body = json.dumps(
        {"code": status, "errno": errno, "error": responses[status], "message": message},
        separators=(",", ":"),
    ).encode()
    extra = (*headers, _NEEDS_VAPID) if status in (401, 403) else headers
    return Answer(status, body, status in (429, 503), extra)


INVALID_TOKEN = error(404, 102, "Invalid endpoint")
GONE = error(410, 106, "No such subscription", GONE_CACHE)
FULL = error(429, 201, "Too many messages are waiting on this subscription; retry later")
UNAVAILABLE = error(503, 201, "Storage is unavailable; retry later")
INVALID_MESSAGE = error(404, 102, "Invalid message id")
CANCELLED = Answer(204, b"")


async def post(node: Node, path: str, get: Callable[[str], str | None], body: bytes) -> Answer:
    """Answer one POST /wpush/v1|v2/<token>; counted and logged once."""
    start = time.monotonic()
    answer, outcome = await _post(node, path, get, body, start)
    node.stats.incr(f"post.{outcome}")
    if log.isEnabledFor(logging.DEBUG):
        event(
            logging.DEBUG,
            "webpush.received",
            status=answer.status,
            outcome=outcome,
            duration_ms=round((time.monotonic() - start) * 1000, 3),
        )
    return answer


async def _post(
    node: Node, path: str, get: Callable[[str], str | None], body: bytes, start: float
) -> tuple[Answer, str]:
    metrics = node.metrics
    metrics.incr("updates.webpush.incoming")
    version, _, token = path[len(POST_PREFIX) :].partition("/")
    ids = node.tokens.decode_webpush(token, version == "v2") if version in ("v1", "v2") else None
    try:
        if ids is None:
            raise Refused(404, 102, "Invalid endpoint")
        uaid, chid, bound = ids
        node.vapid.check(get("Authorization"), get("Crypto-Key"), bound)
        push = webpush.check_post(get, body)
    except Refused as exc:
        counter, outcome = _REFUSALS[exc.status]
        metrics.incr(counter)
        if exc.status == 404:
            return INVALID_TOKEN, outcome
        event(
            logging.INFO, "webpush.refused", status=exc.status, errno=exc.errno, reason=exc.message
        )
        return error(exc.status, exc.errno, exc.message), outcome
    message = webpush.message(push, dashed(chid), uuid.uuid4().hex, time.time())
    try:
        delivery = await node.router.push(uaid, chid, message, node.max_queued)
    except StoreError as exc:
        metrics.incr("updates.webpush.error")
        node.storage_failed("enqueue", exc)
        return UNAVAILABLE, "storage_error"
    if delivery is Delivery.UNKNOWN_CHANNEL:
        metrics.incr("updates.webpush.gone")
        return GONE, delivery.value
    if delivery is Delivery.FULL:
        metrics.incr("updates.webpush.throttled")
        event(logging.INFO, "webpush.refused", status=429, errno=201, reason="queue full")
        return FULL, "throttled"
    elapsed_ms = (time.monotonic() - start) * 1000
    metrics.timing("updates.webpush.handled", elapsed_ms)
    if delivery in (Delivery.DELIVERED, Delivery.ROUTED):
        node.stats.delivered(elapsed_ms, webpush=True)
    message_token = node.tokens.encode_message(uaid, chid, message.id)
    location = f"{node.endpoint_url}{MESSAGE_PREFIX}{message_token}"
    answer = Answer(201, b"", False, (("Location", location), ("TTL", str(message.ttl))))
    # Discarded (TTL 0, nobody connected) is a success too (RFC 8030 5.2): counted as stored.
    return answer, "stored" if delivery is Delivery.DISCARDED else delivery.value


async def cancel(node: Node, path: str) -> Answer:
    """DELETE /m/<id>: an undelivered message is dropped; 204 also when it is gone already."""
    ids = node.tokens.decode_message(path[len(MESSAGE_PREFIX) :])
    if ids is None:
        return INVALID_MESSAGE
    uaid, chid, mid = ids
    try:
        await node.store.remove(uaid, [(chid, mid)])
    except StoreError as exc:
        node.storage_failed("remove", exc)
        return UNAVAILABLE
    node.metrics.incr("updates.webpush.cancelled")
    return CANCELLED
