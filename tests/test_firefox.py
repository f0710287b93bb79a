"""WebPush end to end with a real browser: Debian's headless Firefox ESR (docs/WEBPUSH.md).

A console-script server on a real memcached, a tiny Tornado page-and-sink app,
and `firefox-esr --headless` with a fresh profile whose push service is this
server (`dom.push.serverURL`). The page (tests/firefox/index.html) registers a
service worker (tests/firefox/sw.js), subscribes with a VAPID key the test
made, and POSTs the subscription to the sink; the worker POSTs each push
payload it decrypts to the sink. The test sends pushes with pywebpush and
checks they arrive intact and in order, across a kill -9 and restart of the
server (Firefox reconnects with its UAID), and that a push signed with
another key is refused and never arrives. Everything listens on 127.0.0.1
on ports the OS chose; every wait is bounded; Firefox and the servers are
killed at teardown. A missing firefox-esr fails the test, it is not skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from py_vapid import Vapid
from pywebpush import WebPushException, webpush
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler, StaticFileHandler

from tests.conftest import Memcached
from tests.test_cli import SCRIPT
from tests.test_cluster import EXIT_TIMEOUT, Server, free_ports, gone

STATIC = Path(__file__).parent / "firefox"
# Bounds for waiting, not performance thresholds.
START_TIMEOUT = 10.0  # a process to come up, the page's sink to answer
SUBSCRIBE_TIMEOUT = 30.0  # Firefox started -> the page's subscription at the sink
PUSH_TIMEOUT = 10.0  # a push answered 201 -> its payload at the sink
RECONNECT_TIMEOUT = 15.0  # the server restarted -> Firefox's hello with its UAID
HTTP_TIMEOUT = 5.0
CLAIMS = {"sub": "mailto:test@example.com"}

# The profile's prefs: the push service is our server over plain ws://, and
# nothing tries to reach the network (the machine has none).
PREFS: dict[str, Any] = {
    # push service
    "dom.push.enabled": True,
    "dom.push.connection.enabled": True,
    "dom.push.testing.allowInsecureServerURL": True,
    "dom.push.loglevel": "debug",
    "dom.push.maxQuotaPerSubscription": 1000,  # pushes without a notification cost quota
    "dom.push.retryBaseInterval": 500,  # ms; the first reconnect after the server died
    "dom.push.requestTimeout": 10000,
    "dom.serviceWorkers.enabled": True,
    "permissions.default.desktop-notification": 1,  # userVisibleOnly needs the permission
    "network.manage-offline-status": False,  # never decide we are offline (no push then)
    "network.proxy.type": 0,
    # diagnostics on stdout: the push service's log and the page's console
    "devtools.console.stdout.chrome": True,
    "devtools.console.stdout.content": True,
    "browser.dom.window.dump.enabled": True,
    # no phoning home, no first-run pages
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
    "app.update.auto": False,
    "app.update.checkInstallTime": False,
    "app.update.disabledForTesting": True,
    "browser.aboutwelcome.enabled": False,
    "browser.discovery.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.ping-centre.telemetry": False,
    "browser.region.network.url": "",
    "browser.region.update.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.search.update": False,
    "browser.sessionstore.resume_from_crash": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.tabs.warnOnClose": False,
    "browser.topsites.contile.enabled": False,
    "browser.newtabpage.activity-stream.feeds.system.topstories": False,
    "browser.newtabpage.activity-stream.feeds.topsites": False,
    "browser.newtabpage.activity-stream.telemetry": False,
    "captivedetect.canonicalURL": "",
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.blocklist.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "extensions.update.enabled": False,
    "geo.provider.network.url": "",
    "identity.fxaccounts.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.http.speculative-parallel-limit": 0,
    "network.prefetch-next": False,
    "network.trr.mode": 5,
    "security.OCSP.enabled": 0,
    "security.remote_settings.crlite_filters.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",  # remote settings: refused at once
    "toolkit.startup.max_resumed_crashes": -1,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "toolkit.telemetry.server": "",
    "toolkit.telemetry.unified": False,
}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def wait_for(condition: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    """Poll condition until it is truthy (and return it); fail with what() after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s: {what()}")
        time.sleep(0.05)


# --- the page and its sink ----------------------------------------------------------


class Sink:
    """The page's origin, http://localhost:<port>: serves tests/firefox and records POSTs.

    Runs its own asyncio loop in a thread, so the test may block; POSTs to
    /subscription, /received and /report are kept, in order, as (path, text).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: list[tuple[str, str]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HTTPServer | None = None

    def texts(self, path: str) -> list[str]:
        with self.lock:
            return [text for kind, text in self.posts if kind == path]

    def start(self) -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        ready = threading.Event()
        sink = self

        class Record(RequestHandler):
            def post(self) -> None:
                with sink.lock:
                    sink.posts.append((self.request.path, self.request.body.decode("utf-8")))
                self.set_status(204)

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            app = Application(
                [
                    (r"/(?:subscription|received|report)", Record),
                    (
                        r"/(.*)",
                        StaticFileHandler,
                        {"path": str(STATIC), "default_filename": "index.html"},
                    ),
                ]
            )
            self._server = HTTPServer(app)
            self._server.add_sockets(sockets)
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="sink", daemon=True)
        self._thread.start()
        assert ready.wait(START_TIMEOUT), "the sink did not start"

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return
        loop.call_soon_threadsafe(server.stop)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(START_TIMEOUT)


@pytest.fixture
def sink() -> Iterator[Sink]:
    page = Sink()
    page.start()
    yield page
    page.stop()


# --- the push server -----------------------------------------------------------------


def genkey() -> str:
    result = subprocess.run(
        [str(SCRIPT), "genkey"], capture_output=True, text=True, timeout=START_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def push_server(tmp_path: Path, memcached: Memcached) -> Iterator[Server]:
    """The console script on memcached with debug logs to a file; started, killed at teardown."""
    memcached.flush()
    with socket.socket() as probe:  # the OS picks the port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    router_port = free_ports(1)
    config = tmp_path / "push.ini"
    log = tmp_path / "push.log"
    config.write_text(
        "[server]\n"
        f"port = {port}\n"
        f"endpoint_url = http://localhost:{port}\n"
        f"token_key = {genkey()}\n"
        f"router_port = {router_port}\n"
        "[storage]\n"
        "backend = memcached\n"
        f"servers = {memcached.address}\n"
        "[logging]\n"
        f"output = {log}\n"
        "level = debug\n"
        "[admin]\n"
        "port = 0\n",
        encoding="utf-8",
    )
    server = Server(config, port, router_port, 1, log, tmp_path / "push.stderr")
    try:
        launch(server)
        yield server
    finally:
        server.kill_all()


def launch(server: Server) -> None:
    """Start (again) on the same port; wait for server.start and the port to accept."""
    server.launch()
    wait_for(lambda: accepting(server.port), START_TIMEOUT, lambda: f"port {server.port}")


def kill9(server: Server) -> None:
    """SIGKILL the server and wait until it is gone and its port refuses connections."""
    pid = server.proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    server.proc.wait(timeout=EXIT_TIMEOUT)
    wait_for(lambda: gone(pid), EXIT_TIMEOUT, lambda: f"server {pid} to be gone")
    wait_for(lambda: not accepting(server.port), EXIT_TIMEOUT, lambda: "the port to close")


# --- Firefox ---------------------------------------------------------------------------


class Firefox:
    """firefox-esr --headless with a fresh profile; its output goes to a file."""

    def __init__(self, binary: str, home: Path, server_port: int) -> None:
        self.binary = binary
        self.home = home
        self.profile = home / "profile"
        self.output = home / "firefox.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile.mkdir(parents=True)
        prefs = {**PREFS, "dom.push.serverURL": f"ws://localhost:{server_port}/"}
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items()),
            encoding="utf-8",
        )

    def start(self, url: str) -> None:
        env = {
            **os.environ,
            "HOME": str(self.home),  # no ~/.mozilla or ~/.cache of the real user touched
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "MOZ_HEADLESS": "1",
            "MOZ_CRASHREPORTER_DISABLE": "1",
            # Remote Settings honours services.settings.server only with this set.
            "MOZ_REMOTE_SETTINGS_DEVTOOLS": "1",
        }
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "--headless", "--no-remote", "--profile", str(self.profile), url],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its content processes share its process group
            )

    def log_tail(self, lines: int = 60, width: int = 400) -> str:
        """The end of Firefox's output (the push service logs every frame), lines cut short."""
        if not self.output.exists():
            return "(no output)"
        text = self.output.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(line[:width] for line in text[-lines:])

    def frames(self, said: str) -> list[dict[str, Any]]:
        """The push service's frames as its debug log shows them: said is
        "wsSendMessage: Sending message" (sent) or "wsOnMessageAvailable()" (received)."""
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_text(encoding="utf-8", errors="replace").splitlines():
            _, marker, quoted = line.partition(f'"{said}" ')
            if marker:
                with contextlib.suppress(ValueError):  # a line cut short while being written
                    found.append(json.loads(json.loads(quoted)))
        return found

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGKILL Firefox, its process group, and its processes outside the group."""
        if self.proc is None:
            return
        family = descendants(self.proc.pid) | crash_helpers(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT)
        wait_for(
            lambda: all(gone(pid) for pid in family),
            EXIT_TIMEOUT,
            lambda: f"Firefox's processes {[pid for pid in family if not gone(pid)]} to be gone",
        )


def descendants(pid: int) -> set[int]:
    """The live processes below pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def crash_helpers(pid: int) -> set[int]:
    """Firefox's crash helper: a daemon of its own session, not its child, started as
    `crashhelper <Firefox's pid> ...` (MOZ_CRASHREPORTER_DISABLE does not stop it)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"/crashhelper") and argv[1:2] == [str(pid).encode()]:
                    found.add(int(entry.name))
    return found


@pytest.fixture
def firefox_binary() -> str:
    binary = shutil.which("firefox-esr")
    if binary is None:
        pytest.fail("firefox-esr is missing; this test needs it: apt-get install -y firefox-esr")
    return binary


# --- the app server and the server's log --------------------------------------------------


def send(subscription: dict[str, Any], data: str, key: Vapid, encoding: str = "aes128gcm") -> Any:
    """pywebpush's webpush() with a VAPID key: the response, whatever its status."""
    try:
        return webpush(
            subscription,
            data=data,
            vapid_private_key=key,
            vapid_claims=dict(CLAIMS),  # webpush() adds aud and exp to the dict it gets
            ttl=60,
            content_encoding=encoding,
            timeout=HTTP_TIMEOUT,
        )
    except WebPushException as exc:
        if exc.response is None:
            raise
        return exc.response


def answer(response: Any) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text!r}"


def hellos(server: Server) -> list[dict[str, Any]]:
    """The current run's hellos: websocket.hello (info) with the websocket.identified
    (debug, the UAID) logged right after it, merged."""
    found, hello = [], None
    for record in server.records():
        if record["Type"] == "websocket.hello":
            hello = record["Fields"]
        elif record["Type"] == "websocket.identified" and hello is not None:
            found.append({**hello, **record["Fields"]})
            hello = None
    return found


def notifications(server: Server) -> int:
    """How many notification frames the current run sent (live or flushed after a hello)."""
    return sum(r["Fields"]["updates"] for r in server.records("websocket.notification"))


def acked(server: Server) -> int:
    """How many messages the current run's acks removed."""
    return sum(r["Fields"]["acked"] for r in server.records("websocket.ack"))


# --- the test ------------------------------------------------------------------------------


def test_firefox_receives_webpush_across_a_server_restart(
    firefox_binary, push_server, sink, tmp_path
):
    server = push_server
    vapid = Vapid()
    vapid.generate_keys()
    public = vapid.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    firefox = Firefox(firefox_binary, tmp_path / "firefox", server.port)
    started = time.monotonic()

    def state() -> str:
        stderr = server.stderr.read_text() if server.stderr.exists() else ""
        return (
            f"\nsink posts: {sink.posts}"
            f"\nserver stderr: {stderr}"
            f"\nserver log (last 20 records): {server.records()[-20:]}"
            f"\nfirefox alive: {firefox.alive()}; its output (tail):\n{firefox.log_tail()}"
        )

    def push(data: str, key: Vapid, encoding: str = "aes128gcm") -> Any:
        try:
            return send(subscription, data, key, encoding)
        except requests.RequestException as exc:
            pytest.fail(f"POST {endpoint} ({encoding}): {exc!r}{state()}")

    def received(count: int, what: str) -> list[str]:
        wait_for(
            lambda: len(sink.texts("/received")) >= count,
            PUSH_TIMEOUT,
            lambda: f"{what} at the service worker{state()}",
        )
        return sink.texts("/received")

    try:
        firefox.start(f"http://localhost:{sink.port}/?key={b64u(public)}&timeout=25000")

        # The page subscribed through the server: a v2 endpoint (it gave a key).
        posted = wait_for(
            lambda: sink.texts("/subscription"),
            SUBSCRIBE_TIMEOUT,
            lambda: f"the page's subscription{state()}",
        )
        subscription = json.loads(posted[0])
        endpoint = subscription["endpoint"]
        origin = f"http://localhost:{server.port}"
        assert endpoint.startswith(f"{origin}/wpush/v2/"), subscription
        assert set(subscription["keys"]) == {"p256dh", "auth"}, subscription
        # The server saw Firefox's WebPush hello (without a UAID: a fresh profile) and minted one.
        first = wait_for(lambda: hellos(server), START_TIMEOUT, lambda: f"a hello{state()}")[0]
        assert first["webpush"] is True and first["uaid_state"] == "new", first
        uaid = first["uaid"]
        print(f"subscribed after {time.monotonic() - started:.1f} s")

        # Three pushes back to back, the second aesgcm, each longer than the one before: 201
        # each, and the worker gets all three intact. Firefox decrypts each message in its
        # own promise chain, so the push events (and the worker's POSTs) may come in any
        # order; the server's order is checked on the frames Firefox logged, below.
        nonce = os.urandom(4).hex()
        payloads = [
            f"one {nonce}",
            f"two (aesgcm) {nonce} \u2713 \u00fc " + "y" * 1000,
            f"three {nonce} " + "x" * 2000,
        ]
        encodings = ["aes128gcm", "aesgcm", "aes128gcm"]
        for payload, encoding in zip(payloads, encodings, strict=True):
            response = push(payload, vapid, encoding)
            assert response.status_code == 201, f"{encoding}: {answer(response)}"
            assert response.headers["Location"].startswith(f"{origin}/m/"), answer(response)
        assert sorted(received(3, "three pushes")) == sorted(payloads), state()
        # Firefox acked each with code 100 (any other code is logged as undelivered).
        wait_for(
            lambda: acked(server) >= 3,
            PUSH_TIMEOUT,
            lambda: f"the server to log Firefox's three acks{state()}",
        )
        assert server.records("websocket.ack_undelivered") == [], state()

        # A push signed with another key: 403, and it never reaches Firefox (checked below:
        # the push after the restart is the only frame that follows).
        intruder = Vapid()
        intruder.generate_keys()
        response = push(f"intruder {nonce}", intruder)
        assert response.status_code == 403, answer(response)
        assert response.json()["errno"] == 109, answer(response)
        assert response.headers.get("WWW-Authenticate", "").startswith("vapid"), answer(response)

        # kill -9 the server; the same port and memcached again; Firefox comes back with its
        # UAID (a new one would make it drop the subscription) and gets the fourth push.
        kill9(server)
        launch(server)
        again = wait_for(
            lambda: hellos(server),
            RECONNECT_TIMEOUT,
            lambda: f"Firefox's hello after the restart{state()}",
        )[0]
        assert (again["uaid"], again["uaid_state"], again["webpush"]) == (uaid, "known", True), (
            f"{again} after {first}{state()}"
        )
        response = push(f"four {nonce}", vapid)
        assert response.status_code == 201, answer(response)
        assert received(4, "the push after the restart")[3] == f"four {nonce}", state()
        wait_for(lambda: acked(server) >= 1, PUSH_TIMEOUT, lambda: f"the fourth ack{state()}")
        # The first three were acked away: this run of the server sent the fourth only
        # (Firefox would drop a repeat silently, so the server's log is where to look).
        assert notifications(server) == 1, state()
        assert server.records("websocket.ack_undelivered") == [], state()
        # Firefox's side: it got the four notifications in the order they were POSTed
        # (encodings, and the bodies growing like the payloads), nothing else (no intruder),
        # and acked each with code 100.
        frames = [
            f
            for f in firefox.frames("wsOnMessageAvailable()")
            if f.get("messageType") == "notification"
        ]
        seen = [f.get("headers", {}).get("encoding") for f in frames]
        assert seen == [*encodings, "aes128gcm"], f"notification encodings {seen}"
        sizes = [len(f["data"]) for f in frames[:3]]
        assert sizes == sorted(sizes), f"the server reordered the three: body sizes {sizes}"
        got = [(f["channelID"], f["version"], 100) for f in frames]
        sent = [
            (update["channelID"], update["version"], update.get("code"))
            for f in firefox.frames("wsSendMessage: Sending message")
            if f.get("messageType") == "ack"
            for update in f["updates"]
        ]
        # (acked once each; in any order, as Firefox acks after its own async dispatch)
        assert len(got) == 4 and sorted(sent) == sorted(got), f"notifications {got}, acks {sent}"
        # Both hellos were answered alike: the UAID minted first, then echoed.
        replies = [
            f for f in firefox.frames("wsOnMessageAvailable()") if f.get("messageType") == "hello"
        ]
        hello_reply = {
            "messageType": "hello",
            "uaid": uaid,
            "status": 200,
            "use_webpush": True,
            "broadcasts": {},
        }
        assert replies == [hello_reply, hello_reply], replies
        assert sink.texts("/subscription") == [posted[0]]
        assert "pushsubscriptionchange" not in sink.texts("/report"), state()
        print(f"done after {time.monotonic() - started:.1f} s")
    finally:
        firefox.stop()
