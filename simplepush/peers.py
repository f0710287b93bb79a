"""The client side of node-to-node routing: this node asking another to act.

A node that stores an update for a device held elsewhere asks the holding
node (named in the store's Holder record) to write it to the socket; a node
that takes over a UAID asks the old holder to close its stale socket. Both
go to the other node's internal listener over HTTP, authenticated with a
secret derived from the token key that every node shares, on one keep-alive
connection per peer: the requests of one loop turn share a write and their
answers come back in order (simplepush/pipeline.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from urllib.parse import urlsplit

import orjson

from simplepush.httpclient import MAX_HEAD, HttpError, header_value
from simplepush.logs import event
from simplepush.pipeline import Pipelined, Server
from simplepush.updates import Update
from simplepush.webpush import Message

# A peer that does not answer within this is treated as gone (PROTOCOL.md 6.3).
TIMEOUT = 3.0
_CONTEXT = b"simplepush internal router v1"


class LinkLost(HttpError):
    """The connection to a peer closed under a request (the peer restarted, or went away)."""


def router_secrets(token_keys: list[str]) -> list[str]:
    """One secret per token key, newest first: a node sends the first, accepts any.

    Deriving from the token key means no second secret to distribute, and a
    key rotation that adds the new key last everywhere, then moves it first,
    never leaves two nodes without a secret in common.
    """
    return [
        hmac.new(base64.urlsafe_b64decode(key), _CONTEXT, hashlib.sha256).hexdigest()
        for key in token_keys
    ]


class _Link(Pipelined):
    """The answers of another node's internal listener, in the order of the requests: each
    a status line and headers with Content-Length (internal.py always sends one), then a body
    that nothing here reads."""

    __slots__ = ()
    failure = HttpError
    closed = LinkLost

    def _parse(self) -> None:
        buffer, pending = self._buffer, self._pending
        while pending:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise HttpError("answer head too large")
                return
            head = bytes(buffer[:end]).lower()
            length = header_value(head + b"\r\n", b"content-length")
            if not head.startswith(b"http/1.1 ") or not length.isdigit():
                raise HttpError("not an answer of an internal listener")
            size = end + 4 + int(length)
            if len(buffer) < size:
                return
            del buffer[:size]
            self._answer(int(head[9:12]))
        if buffer:
            raise HttpError("answer to no request")


class _Peer(Server):
    """Another node's internal listener: one keep-alive connection, requests pipelined."""

    __slots__ = ("host",)
    protocol = _Link

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        super().__init__((parts.hostname or "127.0.0.1", parts.port or 80), TIMEOUT)
        self.host = parts.netloc.encode("ascii")


class Peers:
    def __init__(self, secret: str) -> None:
        self._auth = b"Authorization: Bearer %s\r\n" % secret.encode("ascii")
        self._peers: dict[str, _Peer] = {}

    async def _request(self, url: str, method: bytes, path: str, body: bytes = b"") -> int | None:
        """The peer's status, or None when it cannot be reached in time."""
        peer = self._peers.get(url)
        if peer is None:
            peer = self._peers[url] = _Peer(url)
        kind = b"Content-Type: application/json\r\n" if body else b""
        request = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
            method,
            path.encode("ascii"),
            peer.host,
            self._auth,
            kind,
            len(body),
            body,
        )
        try:
            return await peer.call(request, None)
        except HttpError as exc:
            event(logging.WARNING, "router.unreachable", node=url, error=str(exc) or repr(exc))
            return None

    async def push(self, url: str, uaid: str, update: Update | Message) -> int | None:
        """The peer's answer: 200 written to the socket, 202 its hello's flush will send it,
        404 not connected there; None when it cannot be reached."""
        fields = (
            update.fields()
            if type(update) is Message
            else {"channelID": update.channel_id, "version": update.version, "data": update.data}
        )
        body = orjson.dumps(fields)
        return await self._request(url, b"PUT", f"/push/{uaid}", body)

    async def kick(self, url: str, uaid: str, connected_at: float) -> None:
        """Ask the peer to close its socket for uaid if it is the one from connected_at."""
        await self._request(url, b"DELETE", f"/notif/{uaid}/{connected_at!r}")

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
