"""UDP wake-up (issue 15): a sleeping device woken by one datagram, and only then.

The fake phone is a UDP socket on 127.0.0.1 plus a WebSocket device whose
hello gives that socket as `wakeup_hostport`; `[wakeup] networks` allows
127.0.0.0/8. The device drops its socket, an app server's PUT (or WebPush
POST) is stored, the datagram arrives, and the device reconnects and gets
the update. Also: nothing is sent with wake-up off, to an address outside
the networks (or its operator's), twice within `min_interval`, or while the
device is connected; the 4774 close; and several processes on one store
(two nodes on memcached, two workers on sqlite) sending exactly one
datagram. Before those, the rules and settings on their own, and the sqlite
file's upgrade from schema version 1.

In-process servers run once per backend (tests/conftest.py); the processes
of the last section are real `simplepush --config` runs. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from simplepush import session
from simplepush.config import ConfigError, ServerSettings, Settings, WakeupSettings, load
from simplepush.metrics import NullMetrics
from simplepush.protocol import Wakeup
from simplepush.stats import Stats, Worker, view
from simplepush.store import Holder
from simplepush.store.memcached import MemcachedStore
from simplepush.store.memory import MemoryStore
from simplepush.store.sqlite import SqliteStore
from simplepush.store.sqlite_file import _SCHEMA, SCHEMA_VERSION, check_path
from simplepush.tokens import generate_key
from simplepush.updates import Update
from simplepush.waker import Waker
from simplepush.wakeup import (
    CLOSE_CODE,
    CLOSE_REASON,
    DATAGRAM,
    Refusal,
    parse_networks,
    parse_operators,
    refusal,
    target,
)
from tests.conftest import Device as AsyncDevice
from tests.conftest import free_port, new_id
from tests.test_cli import SCRIPT, assert_config_error, run_cli
from tests.test_cluster import IO_TIMEOUT, Device, Server, memcached_proc, via  # noqa: F401
from tests.test_cluster import put as http_put
from tests.test_crash import servers, storage_section  # noqa: F401
from tests.test_websocket import hang_up, hello, hello_ok, notification
from tests.webpush_device import (
    assert_created,
    open_device,
    post_message,
    released,
)

# What issue 15 asks of a wake-up: the datagram arrives within a second of the PUT.
WAKE_TIMEOUT = 1.0
# How long the phone listens for a datagram that must not come.
QUIET = 0.5
LOOPBACK = parse_networks("127.0.0.0/8")


class UdpPhone:
    """A phone's UDP listener on 127.0.0.1: where its wake-ups arrive."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def hostport(self, ip: str = "127.0.0.1") -> dict[str, Any]:
        return {"ip": ip, "port": self.port}

    # --- in-process tests: on the IOLoop ---------------------------------------------

    async def received(self, seconds: float) -> bytes | None:
        """The next datagram, or None when none comes within `seconds`."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 512), seconds)
        except TimeoutError:
            return None

    async def woken(self, timeout: float = WAKE_TIMEOUT) -> bytes:
        """The next datagram, which must come within `timeout` seconds."""
        data = await self.received(timeout)
        assert data is not None, f"no wake-up datagram within {timeout} s"
        return data

    async def stays_asleep(self, seconds: float = QUIET) -> None:
        data = await self.received(seconds)
        assert data is None, f"a datagram came: {data!r}"

    # --- other processes' tests: blocking, from test threads ---------------------------

    def count(self, first_within: float, quiet: float = QUIET) -> int:
        """Datagrams received: the first must come within `first_within` s, the count
        ends after `quiet` s without one."""
        received, wait = 0, first_within
        while select.select([self.sock], [], [], wait)[0]:
            assert self.sock.recv(512) == DATAGRAM
            received, wait = received + 1, quiet
        return received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def phones() -> Iterator[Callable[[], UdpPhone]]:
    """phones() -> a new UDP listener; all closed at teardown."""
    made: list[UdpPhone] = []

    def _phone() -> UdpPhone:
        phone = UdpPhone()
        made.append(phone)
        return phone

    yield _phone
    for phone in made:
        phone.close()


@pytest.fixture
def phone(phones) -> UdpPhone:
    return phones()


# --- the rules, without I/O --------------------------------------------------------------

NETWORKS = parse_networks("10.0.0.0/8, fd00::/8")
OPERATORS = parse_operators("214-07: 10.64.0.0/10, 310-260: 10.128.0.0/9 fd00:1::/32")


def at(ip: str, port: int | None = 5000, mcc: str | None = None, mnc: str | None = None) -> Wakeup:
    return Wakeup(ip, port, mcc, mnc, None)


@pytest.mark.parametrize(
    ("wakeup", "networks", "operators", "expected"),
    [
        pytest.param(at("10.1.2.3"), NETWORKS, {}, None, id="inside"),
        pytest.param(at("fd00::5"), NETWORKS, {}, None, id="inside-v6"),
        pytest.param(at("::ffff:10.1.2.3"), NETWORKS, {}, None, id="v4-mapped-inside"),
        pytest.param(at("10.1.2.3", None), NETWORKS, {}, Refusal.NO_PORT, id="no-port"),
        pytest.param(at("10.1.2.3"), (), {}, Refusal.OUTSIDE_NETWORKS, id="off"),
        pytest.param(at("192.0.2.1"), NETWORKS, {}, Refusal.OUTSIDE_NETWORKS, id="outside"),
        pytest.param(
            at("::ffff:192.0.2.1"), NETWORKS, {}, Refusal.OUTSIDE_NETWORKS, id="v4-mapped-outside"
        ),
        pytest.param(at("fe80::1"), NETWORKS, {}, Refusal.OUTSIDE_NETWORKS, id="outside-v6"),
        pytest.param(at("10.64.0.9", 5000, "214", "07"), NETWORKS, OPERATORS, None, id="operator"),
        pytest.param(
            at("fd00:1::9", 5000, "310", "260"), NETWORKS, OPERATORS, None, id="operator-v6"
        ),
        pytest.param(
            at("10.64.0.9", 5000, "214", "7"),
            NETWORKS,
            OPERATORS,
            Refusal.UNKNOWN_OPERATOR,
            id="mnc-spelled-otherwise",
        ),
        pytest.param(
            at("10.64.0.9"), NETWORKS, OPERATORS, Refusal.UNKNOWN_OPERATOR, id="no-mobilenetwork"
        ),
        pytest.param(
            at("10.128.0.9", 5000, "214", "07"),
            NETWORKS,
            OPERATORS,
            Refusal.OUTSIDE_OPERATOR,
            id="another-operators-range",
        ),
        pytest.param(
            at("192.0.2.1", 5000, "214", "07"),
            NETWORKS,
            OPERATORS,
            Refusal.OUTSIDE_NETWORKS,
            id="outside-everything",
        ),
    ],
)
def test_refusal_says_whether_an_address_may_be_sent_to(wakeup, networks, operators, expected):
    assert refusal(wakeup, networks, operators) == expected


def test_a_v4_mapped_address_is_sent_to_as_ipv4():
    assert target(at("::ffff:10.1.2.3", 4000)) == ("10.1.2.3", 4000)
    assert target(at("fd00::5", 4000)) == ("fd00::5", 4000)


def test_operators_are_parsed_with_their_networks():
    assert parse_networks("") == ()
    assert parse_networks(" 10.0.0.0/8,fd00::/8  100.64.0.0/10 ") == (
        *parse_networks("10.0.0.0/8"),
        *parse_networks("fd00::/8"),
        *parse_networks("100.64.0.0/10"),
    )
    assert parse_operators("") == {}
    assert parse_operators("214-07: 10.64.0.0/10, 310-260: 10.128.0.0/9 fd00:1::/32") == {
        ("214", "07"): parse_networks("10.64.0.0/10"),
        ("310", "260"): parse_networks("10.128.0.0/9 fd00:1::/32"),
    }


# --- the settings and the dashboard --------------------------------------------------------


def write(tmp_path: Path, wakeup: str) -> str:
    config = tmp_path / "config.ini"
    config.write_text(f"[server]\ntoken_key_file =\n[wakeup]\n{wakeup}", encoding="utf-8")
    return str(config)


def test_wakeup_is_off_by_default_and_the_keys_load(tmp_path):
    assert load(write(tmp_path, "")).wakeup == WakeupSettings()
    assert WakeupSettings().networks == ()
    settings = load(
        write(
            tmp_path,
            "networks = 10.0.0.0/8 fd00::/8\n"
            "mobile_networks = 214-07: 10.64.0.0/10, 310-260: 10.128.0.0/9 fd00:1::/32\n"
            "min_interval = 5\n"
            "close_after_hello = yes\n",
        )
    )
    assert settings.wakeup == WakeupSettings(NETWORKS, OPERATORS, 5, True)


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        pytest.param("networks = 10.0.0.1/8\n", ["networks", "10.0.0.1/8", "host bits"], id="host"),
        pytest.param("networks = 10.0.0.0/33\n", ["networks", "10.0.0.0/33"], id="prefix"),
        pytest.param("networks = example.net\n", ["networks", "example.net"], id="name"),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 21407: 10.0.0.0/8\n",
            ["mobile_networks", "21407", "mcc-mnc"],
            id="no-dash",
        ),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 214-07 10.0.0.0/8\n",
            ["mobile_networks", "mcc-mnc"],
            id="no-colon",
        ),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 214-0a: 10.0.0.0/8\n",
            ["mobile_networks", "214-0a"],
            id="letters",
        ),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 214-07:\n",
            ["mobile_networks", "214-07 has no networks"],
            id="empty-operator",
        ),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 214-07: 10.0.0.0/9, 214-07: 10.1.0.0/16\n",
            ["mobile_networks", "214-07 is listed twice"],
            id="twice",
        ),
        pytest.param(
            "networks = 10.0.0.0/8\nmobile_networks = 214-07: 10.0.0.0/8 192.168.0.0/16\n",
            ["mobile_networks", "214-07 192.168.0.0/16 is not inside [wakeup] networks"],
            id="operator-outside",
        ),
        pytest.param(
            "mobile_networks = 214-07: 10.0.0.0/8\n",
            ["mobile_networks", "not inside [wakeup] networks"],
            id="operators-without-networks",
        ),
        pytest.param("min_interval = 0\n", ["min_interval", "from 1 to 86400"], id="interval-0"),
        pytest.param("min_interval = 2.5\n", ["min_interval", "2.5"], id="interval-float"),
        pytest.param("close_after_hello = maybe\n", ["close_after_hello", "maybe"], id="bool"),
        pytest.param("port = 8080\n", ["[wakeup] port", "unknown key"], id="unknown"),
    ],
)
def test_a_bad_wakeup_setting_names_its_key(tmp_path, lines, fragments):
    config = write(tmp_path, lines)
    with pytest.raises(ConfigError) as raised:
        load(config)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{config}: [wakeup] ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_bad_wakeup_setting_exits_2_with_one_line(tmp_path):
    config = write(tmp_path, "networks = 10.0.0.0/8, everywhere\n")
    result = run_cli(SCRIPT, "--config", config, cwd=tmp_path)
    assert_config_error(result, [config, "[wakeup] networks", "'everywhere' is not a network"])


def test_the_dashboard_shows_wakeups_since_start():
    stats = Stats()
    stats.incr("wakeup.sent", 3)
    stats.incr("wakeup.refused")
    stats.take(1000, {}, {})
    stats.incr("wakeup.sent")
    stats.incr("wakeup.error")
    stats.take(1001, {}, {})
    worker = Worker(0, 1, stats.samples, stats.totals)
    assert view([worker])["wakeup"] == {"sent": 4, "refused": 1, "failed": 1}
    page = (Path(__file__).parent.parent / "simplepush/dashboard/index.html").read_text()
    for key in ("wakeup/sent", "wakeup/refused", "wakeup/failed"):
        assert f'data-key="{key}"' in page


# --- the sender's failures: logged, never raised -----------------------------------------


@pytest.mark.gen_test
async def test_a_datagram_that_cannot_be_sent_is_logged_and_counted(caplog):
    """The broadcast address without SO_BROADCAST: sendto fails with EACCES."""
    caplog.set_level(logging.INFO, logger="simplepush")
    store, stats = MemoryStore(), Stats()
    waker = Waker(WakeupSettings(parse_networks("255.255.255.255/32")), store, NullMetrics(stats))
    uaid = new_id().replace("-", "")
    await store.hello(uaid, at("255.255.255.255", 4000), Holder("http://127.0.0.1:8090", 1.0))
    try:
        await waker.wake(uaid)
    finally:
        waker.close()
    [(level, fields)] = wakeup_events(caplog, "wakeup.error")
    assert level == logging.WARNING
    assert fields["ip"] == "255.255.255.255" and fields["port"] == 4000
    assert "Permission denied" in fields["error"], fields
    assert stats.counts == {"wakeup.error": 1}


@pytest.mark.gen_test
async def test_a_claim_the_store_cannot_answer_is_logged_and_sends_nothing(caplog):
    caplog.set_level(logging.INFO, logger="simplepush")
    server = f"127.0.0.1:{free_port()}"  # nothing listens there
    store, stats = MemcachedStore([server], timeout=1), Stats()
    waker = Waker(WakeupSettings(LOOPBACK), store, NullMetrics(stats))
    try:
        await waker.wake(new_id().replace("-", ""))
    finally:
        waker.close()
        await store.close()
    [(level, fields)] = wakeup_events(caplog, "storage.error")
    assert level == logging.WARNING
    assert fields["op"] == "claim_wakeup"
    assert fields["error"].startswith(f"memcached {server}: claim_wakeup failed"), fields
    assert stats.counts == {}


# --- the sqlite file: schema version 1 upgraded in place ---------------------------------

# uaids as schema version 1 made it, before wake_at.
V1_UAIDS = """CREATE TABLE uaids (
    uaid TEXT PRIMARY KEY,
    kind INTEGER NOT NULL,
    registered INTEGER NOT NULL,
    holder_node TEXT,
    holder_at REAL,
    wake_ip TEXT,
    wake_port INTEGER,
    wake_mcc TEXT,
    wake_mnc TEXT,
    wake_netid TEXT,
    seen_at REAL NOT NULL
) WITHOUT ROWID"""


def version_1_file(path: Path, uaid: str, chid: str) -> None:
    """A database as simplepush with schema version 1 left it: one device, one pending update."""
    assert _SCHEMA[0].startswith("CREATE TABLE uaids")  # the only table version 2 changed
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in (V1_UAIDS, *_SCHEMA[1:]):
        db.execute(statement)
    now = time.time()
    db.execute(
        "INSERT INTO uaids VALUES (?, 0, 1, NULL, NULL, '127.0.0.1', 4000, '214', '07', NULL, ?)",
        (uaid, now),
    )
    db.execute("INSERT INTO channels VALUES (?, ?, ?)", (uaid, chid, chid))
    db.execute("INSERT INTO pending VALUES (?, ?, 1, 7, 'hi', ?)", (uaid, chid, now))
    db.execute("PRAGMA user_version = 1")
    db.close()


@pytest.mark.gen_test
async def test_a_version_1_database_is_upgraded_and_keeps_its_records(tmp_path):
    path = tmp_path / "old.db"
    uaid, chid = new_id().replace("-", ""), new_id().replace("-", "")
    version_1_file(path, uaid, chid)
    check_path(str(path))  # what config.py looks at before any worker starts: accepted
    store = SqliteStore(str(path))
    try:
        assert await store.pending(uaid) == [Update(chid, 7, "hi")]
        woken = Wakeup("127.0.0.1", 4000, "214", "07", None)
        assert await store.claim_wakeup(uaid, 30) == woken
        assert await store.claim_wakeup(uaid, 30) is None
        fresh = new_id().replace("-", "")
        await store.hello(fresh, woken, Holder("http://127.0.0.1:8090", 1.0))
        assert await store.claim_wakeup(fresh, 30) == woken
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (2,)
        columns = [row[1] for row in db.execute("PRAGMA table_info(uaids)")]
        assert columns[-2:] == ["seen_at", "wake_at"]
        claimed = db.execute("SELECT wake_at FROM uaids WHERE uaid = ?", (uaid,)).fetchone()[0]
        assert abs(claimed - time.time()) < 60
    finally:
        db.close()
    again = SqliteStore(str(path))  # version 2 now: opened as is
    try:
        assert await again.pending(uaid) == [Update(chid, 7, "hi")]
    finally:
        await again.close()


# --- one server, every backend -----------------------------------------------------------


@pytest.fixture
def wakeup_settings() -> WakeupSettings:
    """127.0.0.0/8 allowed; a test parametrizes this name for other settings."""
    return WakeupSettings(networks=LOOPBACK)


@pytest.fixture
def server_settings(http_port: int, storage_settings, wakeup_settings) -> Settings:
    """The conftest's server, with [wakeup] settings."""
    server = ServerSettings(
        endpoint_url=f"http://127.0.0.1:{http_port}", token_key=(generate_key(),), port=http_port
    )
    return Settings(server=server, storage=storage_settings, wakeup=wakeup_settings)


async def say_hello(
    device: AsyncDevice,
    phone: UdpPhone | None = None,
    uaid: str = "",
    channels: tuple[str, ...] = (),
    ip: str = "127.0.0.1",
    **extra: Any,
) -> str:
    """A hello (giving the phone's address when there is one) answered 200; the UAID."""
    if phone is not None:
        extra["wakeup_hostport"] = phone.hostport(ip)
    reply = await device.request(hello(uaid, channels, **extra))
    assert reply == hello_ok(reply.get("uaid", "")), reply
    assert not uaid or reply["uaid"] == uaid
    device.uaid = reply["uaid"]
    return device.uaid


async def asleep(node: Any, device: AsyncDevice) -> None:
    """The device drops its socket, and the server has let go of its UAID."""
    await hang_up(device)
    await released(node, device.uaid)


async def sleeping(connect, node, phone: UdpPhone | None, **extra: Any) -> tuple[str, str, str]:
    """A device that said hello (with the phone's address), registered and went to sleep:
    its (uaid, channelID, endpoint)."""
    device = await connect()
    uaid = await say_hello(device, phone, **extra)
    chid = new_id()
    endpoint = await device.register(chid)
    await asleep(node, device)
    return uaid, chid, endpoint


async def stored(put, endpoint: str, version: int) -> None:
    response = await put(endpoint, f"version={version}")
    assert (response.code, response.body) == (202, b"{}")


def wakeup_events(caplog: pytest.LogCaptureFixture, type_: str) -> list[tuple[int, dict]]:
    return [
        (record.levelno, record.fields)  # type: ignore[attr-defined]
        for record in caplog.records
        if getattr(record, "event_type", "") == type_
    ]


@pytest.mark.gen_test(timeout=15)
async def test_a_sleeping_device_is_woken_by_one_datagram_and_gets_the_update(
    connect, put, node, phone, caplog
):
    caplog.set_level(logging.DEBUG, logger="simplepush")
    uaid, chid, endpoint = await sleeping(connect, node, phone)
    await stored(put, endpoint, 7)
    assert await phone.woken() == DATAGRAM
    device = await connect()
    await say_hello(device, phone, uaid, (chid,))
    assert await device.recv() == notification((chid, 7))
    assert node.stats.counts.get("wakeup.sent") == 1
    assert wakeup_events(caplog, "wakeup.sent") == [
        (logging.DEBUG, {"uaid": uaid, "ip": "127.0.0.1", "port": phone.port})
    ]
    assert wakeup_events(caplog, "wakeup.refused") == []


@pytest.mark.gen_test(timeout=15)
async def test_a_webpush_post_wakes_a_sleeping_device_too(connect, put, node, phone, http_port):
    origin = f"http://127.0.0.1:{http_port}"
    device = await open_device(connect, origin)
    await device.hello(None, wakeup_hostport=phone.hostport())
    subscription = await device.register()
    await device.hang_up(node)
    response, body = await post_message(put, subscription, b"wake up", ttl=60)
    assert_created(response, origin, 60)
    assert await phone.woken() == DATAGRAM
    device = await device.reconnect(connect)
    await device.expect_message(subscription, body, b"wake up", 60)
    # TTL 0: nothing was kept, so nothing to wake the device for (even after the interval).
    await device.hang_up(node)
    response, _ = await post_message(put, subscription, b"now or never", ttl=0)
    assert_created(response, origin, 0)
    await phone.stays_asleep()


@pytest.mark.gen_test(timeout=15)
async def test_a_device_whose_node_died_holding_it_is_woken_too(connect, put, node, phone):
    """The record still names a node that is gone: the PUT finds no socket there, then wakes."""
    uaid, _, endpoint = await sleeping(connect, node, phone)
    dead = Holder(f"http://127.0.0.1:{free_port()}", time.time())
    await node.store.hello(uaid, Wakeup("127.0.0.1", phone.port, None, None, None), dead)
    await stored(put, endpoint, 1)
    assert await phone.woken() == DATAGRAM


@pytest.mark.parametrize("wakeup_settings", [WakeupSettings()], ids=["off"])
@pytest.mark.gen_test(timeout=15)
async def test_nothing_is_sent_while_wakeup_is_off(connect, put, node, phone):
    _, _, endpoint = await sleeping(connect, node, phone)
    await stored(put, endpoint, 1)
    await phone.stays_asleep()
    assert "wakeup.sent" not in node.stats.counts


@pytest.mark.gen_test(timeout=15)
async def test_nothing_is_sent_twice_within_the_interval(connect, put, node, phone):
    uaid, chid, endpoint = await sleeping(connect, node, phone)
    await stored(put, endpoint, 1)
    assert await phone.woken() == DATAGRAM
    await stored(put, endpoint, 2)
    # The device wakes, takes version 2 and sleeps again: the interval still runs.
    device = await connect()
    await say_hello(device, phone, uaid, (chid,))
    assert await device.recv() == notification((chid, 2))
    await device.ack(chid, 2)
    await asleep(node, device)
    await stored(put, endpoint, 3)
    await phone.stays_asleep()
    assert node.stats.counts.get("wakeup.sent") == 1


@pytest.mark.parametrize(
    "wakeup_settings", [WakeupSettings(networks=LOOPBACK, min_interval=1)], ids=["interval-1s"]
)
@pytest.mark.gen_test(timeout=15)
async def test_after_the_interval_the_next_update_wakes_the_device_again(connect, put, node, phone):
    _, _, endpoint = await sleeping(connect, node, phone)
    first = time.monotonic()  # before the first claim
    await stored(put, endpoint, 1)
    assert await phone.woken() == DATAGRAM
    for version in range(2, 100):  # each PUT within the second sends nothing
        await stored(put, endpoint, version)
        if (datagram := await phone.received(0.2)) is not None:
            break
        assert time.monotonic() < first + 5, "no second wake-up after the interval"
    assert datagram == DATAGRAM
    assert time.monotonic() - first >= 1


@pytest.mark.gen_test(timeout=15)
async def test_nothing_is_sent_while_the_device_is_connected(connect, put, node, phone):
    device = await connect()
    await say_hello(device, phone)
    chid = new_id()
    endpoint = await device.register(chid)
    response = await put(endpoint, "version=1")
    assert (response.code, response.body) == (200, b"{}")
    assert await device.recv() == notification((chid, 1))
    await phone.stays_asleep()


@pytest.mark.gen_test(timeout=15)
async def test_a_later_hello_without_wakeup_fields_forgets_the_address(connect, put, node, phone):
    uaid, chid, endpoint = await sleeping(connect, node, phone)
    device = await connect()
    await say_hello(device, None, uaid, (chid,))
    await asleep(node, device)
    await stored(put, endpoint, 1)
    await phone.stays_asleep()


@pytest.mark.parametrize(
    ("wakeup_settings", "hello_fields", "reason"),
    [
        pytest.param(
            WakeupSettings(networks=parse_networks("10.0.0.0/8")),
            {},
            Refusal.OUTSIDE_NETWORKS,
            id="outside-networks",
        ),
        pytest.param(
            WakeupSettings(LOOPBACK, parse_operators("214-07: 127.0.0.0/16")),
            {"mobilenetwork": {"mcc": "214", "mnc": "01"}},
            Refusal.UNKNOWN_OPERATOR,
            id="unknown-operator",
        ),
        pytest.param(
            WakeupSettings(LOOPBACK, parse_operators("214-07: 127.1.0.0/16")),
            {"mobilenetwork": {"mcc": "214", "mnc": "07"}},
            Refusal.OUTSIDE_OPERATOR,
            id="outside-operator",
        ),
    ],
)
@pytest.mark.gen_test(timeout=15)
async def test_an_address_outside_what_is_allowed_is_refused_and_logged(
    connect, put, node, phone, caplog, hello_fields, reason
):
    caplog.set_level(logging.INFO, logger="simplepush")
    mcc = hello_fields.get("mobilenetwork", {}).get("mcc", "")
    mnc = hello_fields.get("mobilenetwork", {}).get("mnc", "")
    _, _, endpoint = await sleeping(connect, node, phone, **hello_fields)
    await stored(put, endpoint, 1)
    await phone.stays_asleep()
    assert wakeup_events(caplog, "wakeup.refused") == [
        (logging.INFO, {"reason": reason.value, "ip": "127.0.0.1", "mcc": mcc, "mnc": mnc})
    ]
    assert node.stats.counts.get("wakeup.refused") == 1
    await stored(put, endpoint, 2)  # within the interval: not even refused again
    await phone.stays_asleep()
    assert node.stats.counts.get("wakeup.refused") == 1


@pytest.mark.parametrize(
    "wakeup_settings",
    [WakeupSettings(LOOPBACK, parse_operators("214-07: 127.0.0.0/16"))],
    ids=["operator"],
)
@pytest.mark.gen_test(timeout=15)
async def test_a_device_of_a_listed_operator_inside_its_networks_is_woken(
    connect, put, node, phone
):
    _, _, endpoint = await sleeping(
        connect, node, phone, mobilenetwork={"mcc": "214", "mnc": "07", "netid": "10.1.2.3"}
    )
    await stored(put, endpoint, 1)
    assert await phone.woken() == DATAGRAM


@pytest.mark.gen_test(timeout=15)
async def test_a_hello_without_a_port_cannot_be_woken(connect, put, node, phone, caplog):
    caplog.set_level(logging.INFO, logger="simplepush")
    device = await connect()
    await say_hello(device, wakeup_hostport={"ip": "127.0.0.1"})
    endpoint = await device.register()
    await asleep(node, device)
    await stored(put, endpoint, 1)
    await phone.stays_asleep()
    assert [fields["reason"] for _, fields in wakeup_events(caplog, "wakeup.refused")] == [
        "no_port"
    ]


# --- close 4774 after the hello ----------------------------------------------------------

SLEEPY = WakeupSettings(networks=LOOPBACK, close_after_hello=True)


@pytest.mark.parametrize("wakeup_settings", [SLEEPY], ids=["close_after_hello"])
@pytest.mark.gen_test(timeout=15)
async def test_a_wakeable_device_is_closed_4774_after_its_hello_and_acks(connect, put, node, phone):
    device = await connect()
    uaid = await say_hello(device)  # no address: the socket stays open
    chid = new_id()
    endpoint = await device.register(chid)
    await asleep(node, device)
    # Nothing pending: closed after a quiet second.
    device = await connect()
    await say_hello(device, phone, uaid, (chid,))
    assert await device.expect_closed() == CLOSE_CODE
    assert device.conn.close_reason == CLOSE_REASON
    await released(node, uaid)
    await stored(put, endpoint, 3)
    assert await phone.woken() == DATAGRAM
    # Woken: the flush, then the close only once the device acked it.
    device = await connect()
    await say_hello(device, phone, uaid, (chid,))
    assert await device.recv() == notification((chid, 3))
    await device.expect_silence()
    await device.ack(chid, 3)
    assert await device.expect_closed() == CLOSE_CODE
    assert await node.store.pending(uaid) == []


@pytest.mark.parametrize("wakeup_settings", [SLEEPY], ids=["close_after_hello"])
@pytest.mark.gen_test(timeout=15)
async def test_a_new_wakeable_device_registers_then_sleeps(connect, put, node, phone):
    """The 4774 waits for a quiet second: a new device's registers come first."""
    device = await connect()
    uaid = await say_hello(device, phone)
    await device.expect_silence()  # well within the quiet second: still open
    chid = new_id()
    endpoint = await device.register(chid)
    await device.expect_silence()
    endpoint_too = await device.register(new_id())
    started = time.monotonic()
    assert await device.expect_closed() == CLOSE_CODE
    assert time.monotonic() - started >= session.QUIET_BEFORE_SLEEP - 0.1
    await released(node, uaid)
    await stored(put, endpoint, 3)
    assert await phone.woken() == DATAGRAM
    assert endpoint_too != endpoint


@pytest.mark.parametrize("wakeup_settings", [SLEEPY], ids=["close_after_hello"])
@pytest.mark.gen_test(timeout=15)
async def test_a_webpush_device_is_closed_4774_once_its_messages_are_acked(
    connect, put, node, phone, http_port
):
    origin = f"http://127.0.0.1:{http_port}"
    device = await open_device(connect, origin)
    uaid = (await device.hello())["uaid"]
    subscription = await device.register()
    await device.hang_up(node)
    response, body = await post_message(put, subscription, b"for later", ttl=60)
    assert_created(response, origin, 60)
    woken = await open_device(connect, origin)
    woken.subscriptions = device.subscriptions
    await woken.hello(uaid, wakeup_hostport=phone.hostport())
    frame = await woken.expect_message(subscription, body, b"for later", 60)
    await woken.expect_silence()
    await woken.ack_frame(frame)
    assert await woken.expect_closed() == CLOSE_CODE


@pytest.mark.parametrize(
    ("wakeup_settings", "address"),
    [
        pytest.param(SLEEPY, {"ip": "10.0.0.1"}, id="outside-networks"),
        pytest.param(SLEEPY, {"ip": "127.0.0.1", "port": 0}, id="invalid-port"),
        pytest.param(SLEEPY, {"ip": "localhost"}, id="not-an-ip"),
        pytest.param(SLEEPY, None, id="no-address"),
        pytest.param(WakeupSettings(networks=LOOPBACK), {"ip": "127.0.0.1"}, id="setting-off"),
    ],
)
@pytest.mark.gen_test(timeout=15)
async def test_other_devices_keep_their_socket_open(connect, phone, address):
    device = await connect()
    if address is not None:
        address.setdefault("port", phone.port)
        await say_hello(device, wakeup_hostport=address)
    else:
        await say_hello(device)
    assert await device.request("{}") == {}
    await device.expect_silence()


# --- several processes on one store: exactly one datagram --------------------------------


@pytest.fixture
def wakeable(servers: Callable[..., Server]) -> Callable[..., Server]:  # noqa: F811
    """wakeable(storage, processes=1) -> a started `simplepush --config` with wake-up on for
    127.0.0.0/8, logging at debug, all with one token key; killed at teardown."""
    return lambda storage, processes=1: servers(
        storage, processes, "debug", "[wakeup]\nnetworks = 127.0.0.0/8\n"
    )


@pytest.fixture
def devices() -> Iterator[Callable[[Server], Device]]:
    """devices(server) -> a device socket on that server; all closed at teardown."""
    opened: list[Device] = []

    def _open(server: Server) -> Device:
        device = Device(server)
        opened.append(device)
        return device

    yield _open
    for device in opened:
        with contextlib.suppress(Exception):
            device.ws.close(timeout=0)


def asleep_on(devices, server: Server, phone: UdpPhone) -> tuple[str, str, str]:
    """A device that said hello on `server` with the phone's address, registered a channel
    and disconnected: (uaid, channelID, endpoint)."""
    device = devices(server)
    reply = device.request(hello(wakeup_hostport=phone.hostport()))
    assert reply == hello_ok(reply.get("uaid", "")), reply
    device.uaid = reply["uaid"]
    chid = new_id()
    endpoint = device.register(chid)
    device.disconnect()
    return device.uaid, chid, endpoint


def at_once(endpoints: list[str], version: int) -> list[int]:
    """One PUT to each endpoint, all released together from their own threads; the statuses."""
    barrier = threading.Barrier(len(endpoints))

    def send(endpoint: str) -> int:
        barrier.wait(timeout=IO_TIMEOUT)
        return http_put(endpoint, f"version={version}").status

    with ThreadPoolExecutor(len(endpoints)) as pool:
        return list(pool.map(send, endpoints))


def sent_by(nodes: list[Server]) -> list[int]:
    """The Pid of every wakeup.sent record in these servers' logs."""
    return [r["Pid"] for server in nodes for r in server.records("wakeup.sent")]


def test_two_nodes_on_one_memcached_send_one_datagram_for_a_put(
    wakeable,
    memcached_proc,  # noqa: F811
    devices,
    phones,
    tmp_path,
):
    storage = storage_section("memcached", tmp_path, memcached_proc)
    a, b = wakeable(storage), wakeable(storage)
    # One PUT, on the node that did not hold the device.
    phone = phones()
    uaid, chid, endpoint = asleep_on(devices, a, phone)
    assert http_put(via(endpoint, b), "version=1").status == 202
    assert phone.count(IO_TIMEOUT) == 1
    device = devices(b)
    reply = device.request(hello(uaid, [chid], wakeup_hostport=phone.hostport()))
    assert reply == hello_ok(uaid)
    assert device.recv() == notification((chid, 1))
    # Concurrent PUTs, half on each node, for another sleeping device.
    phone = phones()
    _, _, endpoint = asleep_on(devices, a, phone)
    assert at_once([via(endpoint, node) for node in (a, b, a, b, a, b)], 2) == [202] * 6
    assert phone.count(IO_TIMEOUT) == 1
    assert len(sent_by([a, b])) == 2


def test_two_sqlite_workers_send_one_datagram_for_concurrent_puts(
    wakeable, devices, phones, tmp_path
):
    server = wakeable(storage_section("sqlite", tmp_path, None), processes=2)
    phone = phones()
    _, _, endpoint = asleep_on(devices, server, phone)
    assert http_put(endpoint, "version=1").status == 202
    assert phone.count(IO_TIMEOUT) == 1
    # Rounds of concurrent PUTs until both workers have taken some (the kernel spreads
    # connections over them); all within the interval, so one datagram in all.
    phone = phones()
    _, _, endpoint = asleep_on(devices, server, phone)
    first, deadline = len(server.records("update.received")), time.monotonic() + IO_TIMEOUT
    for version in range(1, 100):
        assert at_once([endpoint] * 6, version) == [202] * 6
        if len({r["Pid"] for r in server.records("update.received")[first:]}) == 2:
            break
        assert time.monotonic() < deadline, "every PUT went to one worker"
    assert phone.count(IO_TIMEOUT) == 1
    assert len(sent_by([server])) == 2
