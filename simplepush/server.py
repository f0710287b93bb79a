"""Builds a node from settings and runs it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import logging
import resource
import signal
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import uvloop
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from simplepush import __version__, logs
from simplepush.admin import Collector, make_admin_app
from simplepush.config import (
    ConfigError,
    ServerSettings,
    Settings,
    StorageSettings,
    needs_router,
    tls_context,
    worker_count,
)
from simplepush.http1 import PublicServer
from simplepush.internal import serve_internal
from simplepush.logs import event
from simplepush.metrics import Metrics, NullMetrics
from simplepush.node import Node
from simplepush.peers import Peers, router_secrets
from simplepush.registry import Registry
from simplepush.router import Router
from simplepush.sampler import Sampler
from simplepush.stats import Stats
from simplepush.store import Store
from simplepush.store.memcached import MemcachedStore
from simplepush.store.memory import MemoryStore
from simplepush.store.sqlite import SqliteStore
from simplepush.store.sqlite_file import Unusable
from simplepush.supervisor import supervise
from simplepush.tokens import TokenCodec, generate_key
from simplepush.vapid import Verifier
from simplepush.waker import Waker
from simplepush.web import FrontDoor, make_app

GOING_AWAY = (1001, "server shutting down")
# Devices reconnect in storms after an outage; Tornado's default of 128 drops them.
LISTEN_BACKLOG = 4096
# Descriptors kept free for listeners, log files, storage and peer connections.
FD_RESERVE = 100
# Devices get their close frame at once; this bounds the wait for their answers.
SHUTDOWN_GRACE = 3.0
SWEEP_INTERVAL_MS = 1000


def build_store(storage: StorageSettings, node: str) -> Store:
    """The configured backend (`node`: this worker's name in Holder records); only the
    memory one loses its state on restart, so it warns.

    An sqlite file that cannot be used is a config error (exit 2): config.py
    checks what it can without opening it, and this catches the rest.
    """
    if storage.backend == "sqlite":
        try:
            return SqliteStore(
                storage.path,
                pending_ttl=storage.pending_ttl,
                uaid_ttl=storage.uaid_ttl,
                timeout=storage.timeout,
            )
        except Unusable as exc:
            raise ConfigError(f"[storage] path: {exc}") from None
    if storage.backend == "memcached":
        return MemcachedStore(
            storage.servers,
            pending_ttl=storage.pending_ttl,
            uaid_ttl=storage.uaid_ttl,
            timeout=storage.timeout,
            node=node,
        )
    event(
        logging.WARNING,
        "storage.warning",
        backend="memory",
        problem="pending updates and registrations do not survive a restart",
    )
    return MemoryStore()


def socket_capacity(wanted: int) -> int:
    """Raise the open-file limit as far as allowed; max_connections must fit under it.

    Past the limit accept() fails on every loop turn, so the server refuses
    upgrades (503) before it gets there.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    usable = max(soft - FD_RESERVE, 1)
    if wanted > usable:
        event(
            logging.WARNING,
            "config.warning",
            key="max_connections",
            problem=f"{wanted} is above the open-file limit: at most {usable} devices",
        )
        return usable
    return wanted


def node_url(settings: Settings, index: int) -> str:
    """How Holder records name worker `index`: its internal listener."""
    server = settings.server
    return f"http://{server.router_host}:{server.router_port + index}"


def origin(url: str) -> str:
    """scheme://host[:port] with the default port left out: what VAPID's `aud` must be."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def build_node(settings: Settings, index: int = 0) -> Node:
    server = settings.server
    keys = list(server.token_key)
    statsd = settings.metrics
    stats = Stats()
    metrics = (
        Metrics(stats, statsd.statsd_host, statsd.statsd_port, statsd.prefix)
        if statsd.statsd_host
        else NullMetrics(stats)
    )
    url = node_url(settings, index)
    store = build_store(settings.storage, url)
    registry = Registry()
    peers = Peers(router_secrets(keys)[0])
    wakeup = settings.wakeup
    waker = Waker(wakeup, store, metrics) if wakeup.networks else None
    node = Node(
        store=store,
        registry=registry,
        router=Router(store, registry, peers, metrics, url, waker),
        tokens=TokenCodec(keys),
        metrics=metrics,
        stats=stats,
        endpoint_url=server.endpoint_url,
        max_channels=server.max_channels,
        max_connections=socket_capacity(server.max_connections),
        hello_timeout=server.hello_timeout,
        max_message_size=server.max_message_size,
        max_body_size=server.max_body_size,
        max_header_size=server.max_header_size,
        min_ping_interval=server.min_ping_interval,
        vapid=Verifier(origin(server.endpoint_url)),
        max_queued=server.max_queued,
    )
    store.watch_losses(node.records_lost)
    return node


def public_server(door: FrontDoor, server: ServerSettings) -> PublicServer:
    """The listener for devices and app servers, with TLS and the limits of [server]."""
    return PublicServer(
        door,
        tls_context(server) if server.ssl_certfile else None,
        max_header_size=server.max_header_size,
        max_body_size=server.max_body_size,
        idle_timeout=server.idle_timeout,
        body_timeout=server.body_timeout,
        backlog=LISTEN_BACKLOG,
    )


def with_token_key(settings: Settings) -> Settings:
    """An empty token_key gets a key for this run, made once so that every worker shares it."""
    if settings.server.token_key:
        return settings
    event(
        logging.WARNING,
        "config.warning",
        key="token_key",
        problem="empty: using a key for this run only; endpoints die with the process",
    )
    server = dataclasses.replace(settings.server, token_key=(generate_key(),))
    return dataclasses.replace(settings, server=server)


def _bind(
    settings: Settings, key: str, host: str, port: int, reuse_port: bool, section: str = "server"
) -> list:
    """A listening socket; a busy port is a config error (exit 2) before anything starts."""
    try:
        return bind_sockets(port, address=host, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        problem = (
            "is already in use"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be bound: {exc.strerror}"
        )
        raise ConfigError(f"{settings.path}: [{section}] {key}: {host}:{port} {problem}") from None


def listen(settings: Settings, count: int) -> list[list]:
    """The public sockets, one set per worker.

    Several workers each get their own SO_REUSEPORT socket: the kernel
    spreads devices evenly over them, and the supervisor keeps a dead
    worker's socket open so its queued connections wait for the replacement.
    A plain bind first makes sure nobody else already listens there.
    """
    server = settings.server
    if count == 1:
        return [_bind(settings, "port", server.host, server.port, reuse_port=False)]
    for sock in _bind(settings, "port", server.host, server.port, reuse_port=False):
        sock.close()
    return [
        _bind(settings, "port", server.host, server.port, reuse_port=True) for _ in range(count)
    ]


def listen_internal(settings: Settings, count: int) -> list[list]:
    """Worker i's internal listener on router_port + i, where another node may hold a device."""
    server = settings.server
    if not needs_router(settings):
        return [[] for _ in range(count)]
    return [
        _bind(settings, "router_port", server.router_host, server.router_port + index, False)
        for index in range(count)
    ]


def listen_admin(settings: Settings) -> list:
    """The dashboard's socket, bound once so that a replaced worker 0 serves it again."""
    admin = settings.admin
    if not admin.port:
        return []
    return _bind(settings, "port", admin.host, admin.port, reuse_port=False, section="admin")


async def serve(
    settings: Settings, public: list, internal: list, index: int = 0, admin: list | None = None
) -> None:
    """Worker `index`; the one given the `admin` sockets serves the dashboard for all."""
    node = build_node(settings, index)
    http_server = public_server(make_app(node, settings.admin), settings.server)
    await http_server.start(public)
    secrets = router_secrets(list(settings.server.token_key))
    internal_servers = await serve_internal(node, secrets, internal)
    # Expired WebPush messages go in slices, one a second, besides being skipped on read.
    sweeper = PeriodicCallback(lambda: asyncio.ensure_future(node.sweep()), SWEEP_INTERVAL_MS)
    sweeper.start()
    # Without a dashboard nobody reads samples, so no worker takes them.
    sampler = Sampler(node) if settings.admin.port else None
    if sampler is not None:
        sampler.start()
    collector = admin_server = None
    if admin:
        peers = {i: node_url(settings, i) for i in range(1, worker_count(settings.server))}
        collector = Collector(node, peers, secrets[0])
        collector.start()
        admin_server = HTTPServer(make_admin_app(collector, settings.admin.token))
        admin_server.add_sockets(admin)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # logrotate moved the log file: write to a fresh one at the configured path
    loop.add_signal_handler(signal.SIGHUP, logs.reopen)
    event(
        logging.INFO,
        "server.start",
        version=__version__,
        worker=index,
        host=settings.server.host,
        port=settings.server.port,
        endpoint_url=settings.server.endpoint_url,
        backend=settings.storage.backend,
        node=node.router.url,
        max_connections=node.max_connections,
        dashboard=f"http://{settings.admin.host}:{settings.admin.port}/" if admin else "",
    )
    await stopping.wait()
    http_server.stop_accepting()
    if admin_server is not None and collector is not None:
        admin_server.stop()
        collector.stop()
    sweeper.stop()
    if sampler is not None:
        sampler.stop()
    for internal_server in internal_servers:
        internal_server.close()
    open_sockets = len(node.registry)
    node.registry.close_all(*GOING_AWAY)
    # PUTs being answered finish before the store closes, and so do those on the
    # connections just taken from the queues: the first sleep lets them be read.
    deadline = loop.time() + SHUTDOWN_GRACE
    while True:
        await asyncio.sleep(0.05)
        if not (len(node.registry) or node.puts_in_flight) or loop.time() >= deadline:
            break
    await http_server.close_connections()  # idle keep-alive ones
    await node.router.close()
    await node.store.close()
    node.metrics.flush()
    event(logging.INFO, "server.stop", worker=index, closed_sockets=open_sockets)


# A young collection every 20,000 net allocations of tracked objects, not 700 (PERFORMANCE.md).
GC_THRESHOLDS = (20_000, 20, 20)


def on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on libuv's loop: the same asyncio, less CPU per event (docs/PERFORMANCE.md).

    With the collector's thresholds raised: a device's objects live as long
    as its socket, and Python's default (a young collection every 700 net
    allocations, which a reconnect storm makes grow into full ones) cost a
    worker 3.5% of its CPU in the round-trip bench, and more in setup.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run(settings: Settings) -> None:
    logs.setup(
        settings.logging.format,
        settings.logging.output,
        settings.logging.level,
        settings.logging.name,
    )
    settings = with_token_key(settings)
    count = worker_count(settings.server)
    public = listen(settings, count)
    internal = listen_internal(settings, count)
    admin = listen_admin(settings)
    if count == 1:
        on_uvloop(serve(settings, public[0], internal[0], 0, admin))
        return

    def work(index: int) -> int:
        for other, (sockets, internals) in enumerate(zip(public, internal, strict=True)):
            if other != index:
                for sock in sockets + internals:
                    sock.close()
        dashboard = admin if index == 0 else []
        if index:
            for sock in admin:
                sock.close()
        on_uvloop(serve(settings, public[index], internal[index], index, dashboard))
        return 0

    supervise(count, work, [sock for sockets in public + internal + [admin] for sock in sockets])
