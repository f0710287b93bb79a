"""The UDP wake-up sender: one datagram to a device that is connected nowhere.

The router calls `wake` when it stored an update for such a device. The
store's claim (Store.claim_wakeup) makes one node of all those sharing it
send, at most once per `min_interval`; the rules of simplepush/wakeup.py
decide whether the address may be sent to at all. Datagrams leave from one
non-blocking socket per address family, opened on first use: sendto never
waits, and a failure is logged, never raised.
"""

from __future__ import annotations

import logging
import socket

from simplepush.config import WakeupSettings
from simplepush.logs import event
from simplepush.metrics import Metrics
from simplepush.protocol import Wakeup
from simplepush.store import Store, StoreError
from simplepush.wakeup import DATAGRAM, refusal, target


class Waker:
    def __init__(self, settings: WakeupSettings, store: Store, metrics: Metrics) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._sockets: dict[int, socket.socket] = {}  # by address family

    def sleeps(self, wakeup: Wakeup | None) -> bool:
        """Whether to close with 4774, after its hello, a device that gave these details."""
        settings = self._settings
        return (
            settings.close_after_hello
            and wakeup is not None
            and refusal(wakeup, settings.networks, settings.mobile_networks) is None
        )

    async def wake(self, uaid: str) -> None:
        """Claim the device's wake-up in the store and, if it is ours to send, send it."""
        settings = self._settings
        try:
            wakeup = await self._store.claim_wakeup(uaid, settings.min_interval)
        except StoreError as exc:
            event(logging.WARNING, "storage.error", op="claim_wakeup", error=str(exc))
            return
        if wakeup is None:
            return  # no address, or a node sent a datagram less than min_interval ago
        refused = refusal(wakeup, settings.networks, settings.mobile_networks)
        if refused is not None:
            self._metrics.incr("wakeup.refused")
            event(
                logging.INFO,
                "wakeup.refused",
                reason=refused.value,
                ip=wakeup.ip,
                mcc=wakeup.mcc or "",
                mnc=wakeup.mnc or "",
            )
            return
        address = target(wakeup)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            self._socket(family).sendto(DATAGRAM, address)
        except OSError as exc:
            self._metrics.incr("wakeup.error")
            event(logging.WARNING, "wakeup.error", ip=wakeup.ip, port=wakeup.port, error=str(exc))
            return
        self._metrics.incr("wakeup.sent")
        event(logging.DEBUG, "wakeup.sent", uaid=uaid, ip=wakeup.ip, port=wakeup.port)

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sockets[family] = sock
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
