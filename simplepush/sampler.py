"""Once a second, this worker's numbers become a sample (stats.Stats.take).

It reads what the hot paths do not keep: open sockets, identified devices,
the process's resident memory, the health and round-trip time of a storage
check, and the warning and error events logged since the process began (so
the first sample has the start-up's, such as the memory backend's warning).
Samples are taken on whole wall-clock seconds, so that second t of every
worker covers the same second and the workers' samples add up.
"""

from __future__ import annotations

import asyncio
import math
import time

from simplepush.logs import inherited_problems, problems
from simplepush.node import Node
from simplepush.stats import ERROR_PREFIX
from simplepush.store import StoreError


def resident_bytes(status_path: str = "/proc/self/status") -> int:
    """VmRSS: the memory the process holds in RAM now (0 where /proc has no such line)."""
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _errors(counts: dict[str, int]) -> dict[str, int]:
    return {ERROR_PREFIX + kind: count for kind, count in counts.items()}


class Sampler:
    def __init__(self, node: Node) -> None:
        self._node = node
        self._task: asyncio.Future[None] | None = None
        self._check: asyncio.Future[None] | None = None
        self._storage_ok = 1.0
        self._storage_rtt_ms: float | None = None

    def start(self) -> None:
        self._node.stats.inherited.update(_errors(inherited_problems()))
        self._check = asyncio.ensure_future(self._check_storage())
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        for task in (self._task, self._check):
            if task is not None:
                task.cancel()

    async def _run(self) -> None:
        while True:
            second = math.floor(time.time()) + 1
            await asyncio.sleep(second - time.time())
            self.take(second)

    def take(self, second: int) -> None:
        node = self._node
        gauges = {
            "devices": node.devices,
            "connections": len(node.registry),
            "memory_bytes": resident_bytes(),
            "storage_ok": self._storage_ok,
        }
        if self._storage_rtt_ms is not None:
            gauges["storage_rtt_ms"] = self._storage_rtt_ms
        node.stats.status["last_error"] = node.last_storage_error
        node.stats.status["last_error_at"] = node.last_storage_error_at
        node.stats.take(second, gauges, _errors(problems()))
        if self._check is None or self._check.done():
            self._check = asyncio.ensure_future(self._check_storage())

    async def _check_storage(self) -> None:
        """Storage health for the next sample; not logged: /realstatus and real calls do that."""
        start = time.monotonic()
        error = ""
        try:
            await self._node.store.check()
        except StoreError as exc:
            error = str(exc) or type(exc).__name__
        self._storage_rtt_ms = round((time.monotonic() - start) * 1000, 3)
        self._storage_ok = 0.0 if error else 1.0
        self._node.stats.status["error"] = error
