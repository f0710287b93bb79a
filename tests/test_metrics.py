"""statsd output under pushgo's names (DESIGN.md section 3), received on a real UDP socket.

The server runs in-process (tests/conftest.py) with a real `Metrics`
pointed at a socket this module listens on. One known session is driven
over the wire, and the exact multiset of stats that arrive is checked: each
event is counted once, where it happens, with the right statsd type.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from simplepush.config import MetricsSettings, Settings
from simplepush.metrics import FLUSH_INTERVAL
from simplepush.node import Node
from tests.conftest import new_id

PREFIX = "sp"
# Bounds the wait for stats that must come; then this long more for any that must not.
ARRIVAL_TIMEOUT = 5.0
QUIET = 3 * FLUSH_INTERVAL


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    """The statsd server: a bound, non-blocking UDP socket on 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def server_settings(server_settings: Settings, statsd: socket.socket) -> Settings:
    """conftest's settings, with metrics sent to `statsd`."""
    port = statsd.getsockname()[1]
    metrics = MetricsSettings(statsd_host="127.0.0.1", statsd_port=port, prefix=PREFIX)
    return dataclasses.replace(server_settings, metrics=metrics)


class Received:
    """Every stat line that reached the socket, as (name, value, type)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.stats: list[tuple[str, str, str]] = []

    async def _read(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        try:
            packet = await asyncio.wait_for(loop.sock_recv(self._sock, 65536), timeout)
        except TimeoutError:
            return False
        for line in packet.decode("ascii").splitlines():
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            assert name.startswith(PREFIX + "."), line
            self.stats.append((name[len(PREFIX) + 1 :], value, kind))
        return True

    def events(self) -> int:
        """Counted events and timings so far: a counter line carries the sum of its interval's."""
        return sum(self.counters().values()) + sum(self.timers().values())

    async def until(self, count: int) -> None:
        """Read until `count` events have come, then listen QUIET longer for extras."""
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while self.events() < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self.events()} of {count} events: {self.stats}"
            await self._read(left)
        while await self._read(QUIET):
            pass

    def counters(self) -> Counter[str]:
        """Each counter's total: one line per flush interval with its sum (metrics.py)."""
        totals: Counter[str] = Counter()
        for name, value, kind in self.stats:
            if kind == "c":
                totals[name] += int(value)
        return totals

    def timers(self) -> Counter[str]:
        for name, value, kind in self.stats:
            if kind == "ms":
                assert float(value) >= 0, (name, value)
        return Counter(name for name, _value, kind in self.stats if kind == "ms")

    def gauges(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value, kind in self.stats if kind == "g"]


async def wait_for_no_sockets(node: Node) -> None:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while len(node.registry):
        assert time.monotonic() < deadline, "the server did not see the device leave"
        await asyncio.sleep(0.01)


@pytest.mark.gen_test(timeout=20)
async def test_a_known_session_sends_exactly_these_stats(connect, put, http_port, node, statsd):
    received = Received(statsd)
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    assert await device.request("{}") == {}
    assert (await put(endpoint, "version=1")).code == 200
    assert (await device.recv())["messageType"] == "notification"
    await device.ack(chid, 1)
    await device.expect_silence()
    device.close()
    await wait_for_no_sockets(node)

    assert (await put(endpoint, "version=2")).code == 202
    again = await connect()
    await again.hello(device.uaid, [chid])
    assert (await again.recv())["updates"] == [{"channelID": chid, "version": 2}]
    await again.ack(chid, 2)
    await again.expect_silence()
    assert (await put(endpoint, "version=abc")).code == 400
    assert (await put(f"http://127.0.0.1:{http_port}/update/not-a-token", "version=3")).code == 404
    reply = await again.request({"messageType": "unregister", "channelID": chid})
    assert reply["status"] == 200
    assert (await put(endpoint, "version=4")).code == 404
    again.close()
    await wait_for_no_sockets(node)

    await received.until(29)
    assert received.counters() == Counter(
        {
            "client.socket.connect": 2,
            "client.socket.disconnect": 2,
            "updates.client.hello": 2,
            "updates.client.register": 1,
            "updates.client.ping": 1,
            "updates.client.ack": 2,
            "updates.client.unregister": 1,
            "updates.sent": 2,  # one live, one flushed after the second hello
            "updates.appserver.incoming": 5,
            "updates.appserver.invalid": 2,  # bad version, bad token
            "updates.appserver.rejected": 1,  # unregistered channel
        }
    )
    assert received.timers() == Counter(
        {
            "client.flush": 4,  # after each hello and each ack
            "updates.handled": 2,  # the 200 and the 202
            "client.socket.lifespan": 2,
        }
    )
    # A gauge goes out with its last value of each interval: a disconnect and the next
    # connect may share one, but the first device was counted and the last one's leaving.
    gauges = received.gauges()
    assert {name for name, _ in gauges} == {"update.client.connections"}
    assert (gauges[0][1], gauges[-1][1]) == ("1", "0")
    assert {value for _, value in gauges} == {"0", "1"}
