"""Builds a node from settings and runs it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import signal

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from simplepush import __version__, logs
from simplepush.config import ConfigError, Settings, StorageSettings
from simplepush.logs import event
from simplepush.metrics import Metrics, NullMetrics
from simplepush.node import Node
from simplepush.registry import Registry
from simplepush.router import Router
from simplepush.store import Store
from simplepush.store.memcached import MemcachedStore
from simplepush.store.memory import MemoryStore
from simplepush.tokens import TokenCodec, generate_key
from simplepush.web import make_app

GOING_AWAY = (1001, "server shutting down")
# Devices reconnect in storms after an outage; Tornado's default of 128 drops them.
LISTEN_BACKLOG = 4096
# Descriptors kept free for listeners, log files, storage and peer connections.
FD_RESERVE = 100
# Devices get their close frame at once; this bounds the wait for their answers.
SHUTDOWN_GRACE = 3.0


def build_store(storage: StorageSettings) -> Store:
    """The configured backend; only the memory one loses its state on restart, so it warns."""
    if storage.backend == "memcached":
        return MemcachedStore(
            storage.servers,
            pending_ttl=storage.pending_ttl,
            uaid_ttl=storage.uaid_ttl,
            timeout=storage.timeout,
            threads=storage.threads,
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


def build_node(settings: Settings) -> Node:
    server = settings.server
    keys = list(server.token_key)
    if not keys:
        keys = [generate_key()]
        event(
            logging.WARNING,
            "config.warning",
            key="token_key",
            problem="empty: using a key for this run only; endpoints die with the process",
        )
    metrics_settings = settings.metrics
    metrics = (
        Metrics(metrics_settings.statsd_host, metrics_settings.statsd_port, metrics_settings.prefix)
        if metrics_settings.statsd_host
        else NullMetrics()
    )
    store = build_store(settings.storage)
    registry = Registry()
    return Node(
        store=store,
        registry=registry,
        router=Router(store, registry, f"http://{server.router_host}:{server.router_port}"),
        tokens=TokenCodec(keys),
        metrics=metrics,
        endpoint_url=server.endpoint_url,
        max_channels=server.max_channels,
        max_connections=socket_capacity(server.max_connections),
        hello_timeout=server.hello_timeout,
    )


def listen(settings: Settings) -> list:
    """Bind before anything else starts, so a busy port is a config error (exit 2)."""
    server = settings.server
    try:
        return bind_sockets(server.port, address=server.host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        problem = (
            "is already in use"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be bound: {exc.strerror}"
        )
        raise ConfigError(
            f"{settings.path}: [server] port: {server.host}:{server.port} {problem}"
        ) from None


async def serve(settings: Settings) -> None:
    sockets = listen(settings)
    node = build_node(settings)
    http_server = HTTPServer(make_app(node))
    http_server.add_sockets(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    event(
        logging.INFO,
        "server.start",
        version=__version__,
        host=settings.server.host,
        port=settings.server.port,
        endpoint_url=settings.server.endpoint_url,
        backend=settings.storage.backend,
        max_connections=settings.server.max_connections,
    )
    await stopping.wait()
    http_server.stop()
    open_sockets = len(node.registry)
    node.registry.close_all(*GOING_AWAY)
    deadline = loop.time() + SHUTDOWN_GRACE
    while len(node.registry) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await node.store.close()
    node.metrics.flush()
    event(logging.INFO, "server.stop", closed_sockets=open_sockets)


def run(settings: Settings) -> None:
    logs.setup(
        settings.logging.format,
        settings.logging.output,
        settings.logging.level,
        settings.logging.name,
    )
    asyncio.run(serve(settings))
