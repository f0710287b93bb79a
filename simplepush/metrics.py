"""statsd metrics under pushgo's names, through the `statsd` package.

With no statsd_host the server uses NullMetrics, whose calls cost one
method dispatch and send nothing.
"""

from __future__ import annotations

import statsd


class Metrics:
    def __init__(self, host: str, port: int, prefix: str) -> None:
        self._client = statsd.StatsClient(host, port, prefix=prefix or None)

    def incr(self, name: str, count: int = 1) -> None:
        self._client.incr(name, count)

    def gauge(self, name: str, value: float) -> None:
        self._client.gauge(name, value)

    def timing(self, name: str, ms: float) -> None:
        self._client.timing(name, ms)


class NullMetrics(Metrics):
    def __init__(self) -> None:
        pass

    def incr(self, name: str, count: int = 1) -> None:
        pass

    def gauge(self, name: str, value: float) -> None:
        pass

    def timing(self, name: str, ms: float) -> None:
        pass
