"""statsd metrics under pushgo's names, through the `statsd` package.

Stats are gathered in the process and sent every FLUSH_INTERVAL through a
statsd Pipeline, many per datagram: one sendto per stat would cost more
than the notification it counts. A counter goes out once per interval with
the sum of its increments, and a gauge with its last value: what statsd
itself would make of the separate lines, for a fraction of the formatting.
Every timing is still its own line. With no statsd_host the server uses
NullMetrics, which sends nothing.

Either way every counter is also added to the node's Stats (stats.py), so
the dashboard counts each statsd name once, with statsd on or off.
"""

from __future__ import annotations

import asyncio

import statsd

from simplepush.stats import Stats

FLUSH_INTERVAL = 0.2


class Metrics:
    # Lets callers skip reading clocks for timers nobody receives.
    enabled = True

    def __init__(self, stats: Stats, host: str, port: int, prefix: str) -> None:
        self.stats = stats
        self._client = statsd.StatsClient(host, port, prefix=prefix or None)
        self._pipe = self._client.pipeline()
        self._flush_scheduled = False
        self._counts: dict[str, int] = {}  # since the last flush
        self._gauges: dict[str, float] = {}

    def incr(self, name: str, count: int = 1) -> None:
        self.stats.incr(name, count)
        counts = self._counts
        counts[name] = counts.get(name, 0) + count
        if not self._flush_scheduled:
            self._schedule()

    def gauge(self, name: str, value: float) -> None:
        self._gauges[name] = value
        self._schedule()

    def timing(self, name: str, ms: float) -> None:
        self._pipe.timing(name, ms)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pipe = self._pipe
        for name, count in self._counts.items():
            pipe.incr(name, count)
        for name, value in self._gauges.items():
            pipe.gauge(name, value)
        self._counts.clear()
        self._gauges.clear()
        pipe.send()


class NullMetrics(Metrics):
    enabled = False

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def incr(self, name: str, count: int = 1) -> None:
        self.stats.incr(name, count)

    def gauge(self, name: str, value: float) -> None:
        pass

    def timing(self, name: str, ms: float) -> None:
        pass

    def flush(self) -> None:
        pass
