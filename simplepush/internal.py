"""The internal listener: other nodes asking this one to act on its own sockets.

    PUT    /push/<uaid>                  {"channelID", "version", "data"} (SimplePush) or a
                                         WebPush message's fields ("id", ...): write it to
                                         the device's socket (200) or 404
    DELETE /notif/<uaid>/<connected_at>  close that socket if it is not newer
    GET    /stats?since=<t>              this worker's dashboard samples after second t,
                                         for the worker serving the admin listener

Every request carries `Authorization: Bearer <secret>` (peers.router_secrets).

Why not Tornado here: only simplepush's own peers talk to this port, always
with keep-alive HTTP/1.1 and Content-Length bodies, and it sits on the path
of every routed notification; Tornado's HTTP/1.1 connection and handlers
cost about a third of a worker's CPU in that path (docs/PERFORMANCE.md).
Anything else (chunked bodies, oversized heads) is refused and the
connection closed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from typing import cast

import orjson

from simplepush.logs import event
from simplepush.node import Node
from simplepush.registry import SUPERSEDED
from simplepush.updates import Update
from simplepush.webpush import Message

MAX_HEAD = 8192
MAX_BODY = 64 * 1024
_REASONS = {
    200: b"OK",
    202: b"Accepted",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
}
_NOT_HERE = b'{"status":404,"error":"Not Connected Here"}'
# Its hello is under way here: the update goes out in that hello's flush (registry.arriving).
_ARRIVING = b'{"status":202}'


class InternalConnection(asyncio.Protocol):
    __slots__ = ("_buffer", "_node", "_secrets", "_transport")

    def __init__(self, node: Node, secrets: list[bytes]) -> None:
        self._node = node
        self._secrets = secrets
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Every request that arrived whole, answered in order in one write (peers.py
        pipelines its requests on one connection)."""
        transport = self._transport
        if transport is None:
            return
        self._buffer += data
        answers, close = self._answer_whole_requests()
        if answers:
            transport.write(b"".join(answers))
        if close:
            transport.close()

    def _answer_whole_requests(self) -> tuple[list[bytes], bool]:
        """The answers to the whole requests in the buffer, and whether to close after them."""
        buffer = self._buffer
        answers: list[bytes] = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    return self._refused(answers, b"request head too large")
                return answers, False
            request = _Request.parse(bytes(buffer[:end]))
            if request is None:
                return self._refused(answers, b"malformed request")
            start = end + 4
            if len(buffer) < start + request.length:
                return answers, False
            body = bytes(buffer[start : start + request.length])
            del buffer[: start + request.length]
            status, reply = self._handle(request, body)
            answers.append(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                b"\r\n\r\n%s" % (status, _REASONS[status], len(reply), reply)
            )
            if request.close:
                return answers, True

    def _handle(self, request: _Request, body: bytes) -> tuple[int, bytes]:
        if not any(hmac.compare_digest(request.auth, secret) for secret in self._secrets):
            event(logging.WARNING, "router.unauthorized")
            return 401, b'{"status":401,"error":"Unauthorized"}'
        parts = request.target.split(b"/")
        if request.method == b"PUT" and len(parts) == 3 and parts[1] == b"push":
            return self._push(parts[2].decode("ascii", "replace"), body)
        if request.method == b"DELETE" and len(parts) == 4 and parts[1] == b"notif":
            return self._kick(parts[2].decode("ascii", "replace"), parts[3])
        path, _, query = request.target.partition(b"?")
        if request.method == b"GET" and path == b"/stats":
            return self._stats(query)
        return 404, b'{"status":404,"error":"Not Found"}'

    def _push(self, uaid: str, body: bytes) -> tuple[int, bytes]:
        node = self._node
        node.metrics.incr("updates.routed.incoming")
        item = _item(body)
        if item is None:
            return 400, b'{"status":400,"error":"Bad Update"}'
        node.store.changed_elsewhere(uaid)
        session = node.registry.get(uaid)
        if session is not None and session.deliver(item):
            return 200, b"{}"
        if node.registry.arriving(uaid):
            return 202, _ARRIVING
        return 404, _NOT_HERE

    def _kick(self, uaid: str, connected_at: bytes) -> tuple[int, bytes]:
        try:
            since = float(connected_at)
        except ValueError:
            return 400, b'{"status":400,"error":"Bad Connection Time"}'
        session = self._node.registry.get(uaid)
        if session is None or session.connected_at > since:
            return 404, _NOT_HERE
        session.close(*SUPERSEDED)
        return 200, b"{}"

    def _stats(self, query: bytes) -> tuple[int, bytes]:
        since = query.removeprefix(b"since=")
        if not since.isdigit():
            return 400, b'{"status":400,"error":"Bad Since"}'
        export = self._node.stats.export(int(since), os.getpid())
        return 200, json.dumps(export, separators=(",", ":")).encode("ascii")

    def _refused(self, answers: list[bytes], reason: bytes) -> tuple[list[bytes], bool]:
        """The answers so far, then 400 and the end of the connection."""
        event(logging.WARNING, "router.bad_request", error=reason.decode())
        answers.append(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        return answers, True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def _item(body: bytes) -> Update | Message | None:
    """A routed SimplePush update or WebPush message, or None if malformed."""
    try:
        fields = orjson.loads(body)
    except ValueError:
        return None
    if type(fields) is not dict:
        return None
    if "id" in fields:
        return Message.from_fields(fields)
    channel_id, version, data = fields.get("channelID"), fields.get("version"), fields.get("data")
    if type(channel_id) is not str or type(version) is not int:
        return None
    if data is not None and type(data) is not str:
        return None
    return Update(channel_id, version, data)


class _Request:
    __slots__ = ("auth", "close", "length", "method", "target")

    def __init__(self, method: bytes, target: bytes) -> None:
        self.method = method
        self.target = target
        self.auth = b""
        self.length = 0
        self.close = False

    @classmethod
    def parse(cls, head: bytes) -> _Request | None:
        """The request line and the few headers this listener reads, or None if malformed."""
        lines = head.split(b"\r\n")
        words = lines[0].split(b" ")
        if len(words) != 3 or words[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return None
        request = cls(words[0], words[1])
        request.close = words[2] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if not value.isdigit() or int(value) > MAX_BODY:
                    return None
                request.length = int(value)
            elif name == b"authorization":
                request.auth = value.removeprefix(b"Bearer ")
            elif name == b"transfer-encoding":
                return None
            elif name == b"connection":
                request.close = value.lower() == b"close"
        return request


async def serve_internal(node: Node, secrets: list[str], sockets: list) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    keys = [secret.encode("ascii") for secret in secrets]
    return [
        await loop.create_server(lambda: InternalConnection(node, keys), sock=sock)
        for sock in sockets
    ]
