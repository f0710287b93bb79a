"""The client side of node-to-node routing: this node asking another to act.

A node that stores an update for a device held elsewhere asks the holding
node (named in the store's Holder record) to write it to the socket; a node
that takes over a UAID asks the old holder to close its stale socket. Both
go to the other node's internal listener over keep-alive HTTP, authenticated
with a secret derived from the token key that every node shares.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from urllib.parse import urlsplit

import orjson

from simplepush.httpclient import HttpConn, HttpError, HttpPool
from simplepush.logs import event
from simplepush.updates import Update
from simplepush.webpush import Message

# A peer that does not answer within this is treated as gone (PROTOCOL.md 6.3).
TIMEOUT = 3.0
POOL_SIZE = 16
_CONTEXT = b"simplepush internal router v1"


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


class Peers:
    def __init__(self, secret: str) -> None:
        self._auth = b"Authorization: Bearer %s\r\n" % secret.encode("ascii")
        self._pools: dict[str, HttpPool] = {}

    def _pool(self, url: str) -> HttpPool:
        pool = self._pools.get(url)
        if pool is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80

            async def connect(conn: HttpConn) -> HttpConn:
                loop = asyncio.get_running_loop()
                await loop.create_connection(lambda: conn, host, port)
                return conn

            pool = self._pools[url] = HttpPool(parts.netloc, connect, POOL_SIZE)
        return pool

    async def _request(self, url: str, method: bytes, path: str, body: bytes = b"") -> int | None:
        """The peer's status, or None when it cannot be reached in time."""
        headers = self._auth + (b"Content-Type: application/json\r\n" if body else b"")
        try:
            async with asyncio.timeout(TIMEOUT):
                status, _body, _sent = await self._pool(url).request(
                    method, path.encode("ascii"), body, headers
                )
        except (OSError, TimeoutError, HttpError) as exc:
            event(logging.WARNING, "router.unreachable", node=url, error=str(exc) or repr(exc))
            return None
        return status

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
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
