"""The admin listener: the operator dashboard, its files and /api/stats.

Worker 0 serves it on [admin] host:port (router_host by default), a port of
its own: the public port never routes here, and everything on it may ask
for [admin] token. With several workers, worker 0 collects the others'
samples from their internal listeners (internal.py, GET /stats) once a
second and answers for the whole machine. Not a hot path, so plain
tornado.web.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from tornado.web import Application, HTTPError, RequestHandler, StaticFileHandler

from simplepush import __version__
from simplepush.httpclient import HttpConn, HttpError, HttpPool
from simplepush.logs import event
from simplepush.node import Node
from simplepush.stats import Worker, view

DASHBOARD = Path(__file__).parent / "dashboard"
COOKIE = "simplepush_admin"
# Worker 0 asks the others this long after each whole second, once they have sampled it.
COLLECT_OFFSET = 0.3
COLLECT_TIMEOUT = 1.0


class Collector:
    """Every worker's history as worker 0 sees it: its own, and copies of the others'."""

    def __init__(self, node: Node, peers: dict[int, str], secret: str) -> None:
        stats = node.stats
        local = Worker(0, os.getpid(), stats.samples, stats.totals, stats.status, stats.inherited)
        self._workers = [local] + [Worker(index, 0) for index in sorted(peers)]
        self._pools = {index: _pool(url) for index, url in peers.items()}
        self._auth = b"Authorization: Bearer %s\r\n" % secret.encode("ascii")
        self._task: asyncio.Future[None] | None = None

    def workers(self) -> list[Worker]:
        return self._workers

    def start(self) -> None:
        if self._pools:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for pool in self._pools.values():
            pool.close()

    async def _run(self) -> None:
        while True:
            moment = math.floor(time.time()) + 1 + COLLECT_OFFSET
            await asyncio.sleep(moment - time.time())
            await asyncio.gather(*(self._collect(worker) for worker in self._workers[1:]))

    async def _collect(self, worker: Worker) -> None:
        """A worker that does not answer (dying, restarting) just shows no new samples."""
        path = b"/stats?since=%d" % worker.last
        try:
            async with asyncio.timeout(COLLECT_TIMEOUT):
                status, body, _ = await self._pools[worker.index].request(
                    b"GET", path, headers=self._auth
                )
            if status == 200:
                worker.absorb(json.loads(body))
        except (OSError, TimeoutError, HttpError, ValueError, KeyError, TypeError):
            return


def _pool(url: str) -> HttpPool:
    host, _, port = url.removeprefix("http://").rpartition(":")

    async def connect(conn: HttpConn) -> HttpConn:
        await asyncio.get_running_loop().create_connection(lambda: conn, host, int(port))
        return conn

    return HttpPool(f"{host}:{port}", connect, 1)


class Guarded(RequestHandler):
    """Asks for the token, if one is set: a Bearer header, ?token= or the cookie ?token= set."""

    def prepare(self) -> None:
        token: str = self.settings["admin_token"]
        if not token:
            return
        header = self.request.headers.get("Authorization", "")
        offered = [
            header.removeprefix("Bearer ") if header.startswith("Bearer ") else "",
            self.get_query_argument("token", ""),
            self.get_cookie(COOKIE, ""),
        ]
        if any(hmac.compare_digest(each.encode(), token.encode()) for each in offered if each):
            return
        self.set_status(401)
        self.set_header("WWW-Authenticate", 'Bearer realm="simplepush admin"')
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("401: this dashboard wants its token: open /?token=<[admin] token>\n")


class PageHandler(Guarded):
    def get(self) -> None:
        if self.settings["admin_token"] and self.get_query_argument("token", ""):
            # Keep the token out of the address bar and history: the cookie carries it from here.
            self.set_cookie(COOKIE, self.settings["admin_token"], httponly=True, samesite="Strict")
            self.redirect("/")
            return
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((DASHBOARD / "index.html").read_bytes())


class AssetHandler(Guarded, StaticFileHandler):
    """The page's script and style, from the package: no CDN, works offline."""


class StatsHandler(Guarded):
    def initialize(self, collector: Collector) -> None:
        self._collector = collector

    def get(self) -> None:
        at = self._number("at")
        since = self._number("since") or 0
        body = view(self._collector.workers(), at=at, since=since)
        body["version"] = __version__
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body, separators=(",", ":")))

    def _number(self, name: str) -> int | None:
        text = self.get_query_argument(name, "")
        if not text:
            return None
        if not text.isdigit():
            raise HTTPError(400, reason=f"{name} must be a whole number of seconds")
        return int(text)

    def compute_etag(self) -> None:
        return None


def make_admin_app(collector: Collector, token: str) -> Application:
    args: dict[str, Any] = {"collector": collector}
    return Application(
        [
            (r"/", PageHandler),
            (r"/api/stats", StatsHandler, args),
        ],
        static_path=str(DASHBOARD),
        static_handler_class=AssetHandler,
        admin_token=token,
        log_function=_log_request,
    )


def _log_request(handler: RequestHandler) -> None:
    event(
        logging.DEBUG,
        "http.request",
        method=handler.request.method,
        path=handler.request.path,
        status=handler.get_status(),
        duration_ms=round(handler.request.request_time() * 1000, 3),
    )
