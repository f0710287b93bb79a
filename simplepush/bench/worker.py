"""One bench process: holds its share of devices and runs the phases it is told to.

The coordinator sends ``(phase, args)`` over a pipe and gets a Tally back, so
all processes start each phase together and the coordinator can sample the
server between phases. The pipe is read in a thread (``run_in_executor``)
so the event loop never blocks on it; EOF means the coordinator is gone.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal
import ssl
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from time import perf_counter
from urllib.parse import urlsplit

from simplepush.bench.device import Device, DeviceError, Shared
from simplepush.bench.net import connect, raise_nofile
from simplepush.bench.settings import Target, WorkerSettings, resolve
from simplepush.bench.tally import Tally
from simplepush.bench.webpush import Bodies
from simplepush.httpclient import HttpPool

ERROR_BACKOFF = 0.01  # closed loop: pause after a failed round trip, not to spin on errors
SOAK_TICK = 0.1  # soak: devices are split into ping_interval / SOAK_TICK groups
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


def worker_main(settings: WorkerSettings, conn: Connection) -> None:
    """Process entry point (must be importable for the spawn start method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    raise_nofile()
    asyncio.run(Worker(settings, conn).serve())


class Worker:
    """Devices, PUT pools and the phase loops of one process."""

    def __init__(self, settings: WorkerSettings, conn: Connection) -> None:
        self.s = settings
        self.conn = conn
        self.devices: list[Device] = []
        self.pools: dict[tuple[str, int], HttpPool] = {}
        self.ips: dict[str, str] = {}
        # One counter for all channels of this process: each channel's versions increase.
        self.versions = itertools.count(1)
        vapid = settings.vapid
        self.bodies = Bodies() if vapid else None  # WebPush mode
        self.origin_headers: dict[str, bytes] = {}  # WebPush: endpoint origin -> POST headers
        self.origins: dict[bytes, str] = {}  # and back, for --vapid-per-post
        self.shared = Shared(
            settings.ws.host,
            settings.ws_path,
            self.endpoint,
            vapid.register_key if vapid else None,
        )
        # For wss:// devices and https:// endpoints alike.
        self.tls = ssl.create_default_context(cafile=settings.ca_file or None)
        self.marks = (0, 0, 0, 0)  # shared's counters at the end of the last phase
        self.phases: dict[str, Callable[..., Awaitable[Tally]]] = {
            "setup": self.setup,
            "closed": self.closed,
            "open": self.open,
            "soak": self.soak,
        }

    async def serve(self) -> None:
        """Run phases until told to stop or the coordinator disappears."""
        loop = asyncio.get_running_loop()
        try:
            self.conn.send(None)  # booted
            while True:
                phase, args = await loop.run_in_executor(None, self.conn.recv)
                if phase == "stop":
                    break
                try:
                    tally = await self.measure(self.phases[phase](*args))
                except Exception:
                    self.conn.send(traceback.format_exc())
                    break
                self.conn.send(tally)
        except (EOFError, OSError):
            pass
        for device in self.devices:
            device.close()
        for pool in self.pools.values():
            pool.close()
        await asyncio.sleep(0)  # let the transports close

    async def measure(self, phase: Awaitable[Tally]) -> Tally:
        """Run a phase and add what every phase reports: CPU, wall time, socket counts.

        Socket counts run from the end of the previous phase, so a drop between
        two phases is counted in the next one rather than lost.
        """
        shared = self.shared
        cpu, start = time.process_time(), perf_counter()
        tally = await phase
        tally.client_cpu_s = time.process_time() - cpu
        tally.wall_s = perf_counter() - start
        counts = (shared.dropped, shared.protocol_errors, shared.pongs, shared.notifications)
        marks, self.marks = self.marks, counts
        tally.dropped, tally.protocol_errors, tally.pongs, tally.notifications = (
            now - mark for now, mark in zip(counts, marks, strict=True)
        )
        tally.alive = sum(device.ready for device in self.devices)
        return tally

    def endpoint(self, url: str) -> tuple[HttpPool, bytes, bytes]:
        """Map a pushEndpoint to the pool that reaches it, the request path and headers.

        Only the --url host (any port) or the explicit --endpoint-base is ever
        contacted, whatever endpoint_url the server was configured with. WebPush
        headers carry a JWT whose ``aud`` is the endpoint's own origin (as
        pywebpush computes it), even when --endpoint-base redirects the request.
        """
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = FORM
        if self.s.vapid is not None:
            origin = f"{parts.scheme}://{parts.netloc}"
            if origin not in self.origin_headers:
                self.origin_headers[origin] = self.s.vapid.headers(origin)
            headers = self.origin_headers[origin]
            self.origins[headers] = origin
        target = self.s.endpoint_base
        if target is None:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("endpoint is not http:// or https:// (use --endpoint-base)")
            host = parts.hostname
            if host not in self.ips:
                try:
                    self.ips[host] = resolve(host)
                except OSError:
                    raise ValueError("endpoint host does not resolve") from None
            if self.ips[host] != self.s.ws.ip:
                raise ValueError("endpoint host is not the --url host (use --endpoint-base)")
            tls = parts.scheme == "https"
            target = Target(parts.netloc, self.ips[host], parts.port or (443 if tls else 80), tls)
        pool = self.pools.get((target.ip, target.port))
        if pool is None:
            source = self.s.source_ips[self.s.index % len(self.s.source_ips)]
            tls = self.tls if target.tls else None
            pool = self.pools[target.ip, target.port] = HttpPool(
                target.host, lambda conn: connect(conn, target, source, tls), self.s.http_conns
            )
        return pool, path.encode(), headers

    def ready(self) -> list[Device]:
        """Devices that are registered and still connected."""
        return [device for device in self.devices if device.ready]

    def end_of(self, duration: float) -> float:
        """When a phase of ``duration`` ends (perf_counter), leaving time to drain."""
        left = self.s.deadline - time.monotonic() - self.s.op_timeout
        return perf_counter() + max(0.0, min(duration, left))

    async def setup(self) -> Tally:
        """Connect, hello and register every device, ``connect_concurrency`` at a time."""
        tally = Tally()
        loop = asyncio.get_running_loop()
        indices = iter(range(self.s.devices))
        ips = self.s.source_ips

        async def connector() -> None:
            for i in indices:
                if time.monotonic() >= self.s.deadline:
                    break
                tally.attempts += 1
                waiter: asyncio.Future[float] = loop.create_future()
                device = Device(self.shared, waiter)
                start = perf_counter()
                try:
                    async with asyncio.timeout(self.s.op_timeout):
                        source = ips[(self.s.first_device + i) % len(ips)]
                        tls = self.tls if self.s.ws.tls else None
                        await connect(device, self.s.ws, source, tls)
                        ready = await waiter
                except DeviceError as exc:
                    kind = exc.args[0]
                except TimeoutError:
                    kind = "timeout"
                except OSError as exc:
                    kind = "connect: " + errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                else:
                    self.devices.append(device)
                    tally.ok += 1
                    tally.latency_ms.append((ready - start) * 1000)
                    continue
                device.close()
                tally.errors[kind] += 1

        await asyncio.gather(
            *(connector() for _ in range(min(self.s.connect_concurrency, self.s.devices)))
        )
        if tally.attempts < self.s.devices:
            tally.errors["not tried: deadline"] += self.s.devices - tally.attempts
        return tally

    async def round_trip(self, device: Device, tally: Tally, due: float | None = None) -> bool:
        """Send a new message to ``device``'s endpoint and wait until the device has it.

        SimplePush: PUT ``version=N``, 200 (202 = stored). WebPush: POST a 100-byte
        aes128gcm body, 201, and the device recognises the message by its data.
        Returns False when it failed, so a closed loop can back off instead of spinning.
        """
        assert device.pool is not None
        seq = next(self.versions)
        if self.bodies is None:
            method, body, delivered = b"PUT", b"version=%d" % seq, 200
            got = device.expect(seq)
        else:
            method, delivered = b"POST", 201
            body, data = self.bodies.make(seq)
            got = device.expect(data)
        headers = device.headers
        if self.s.vapid_per_post:
            assert self.s.vapid is not None
            headers = self.s.vapid.headers(self.origins[headers])
        tally.attempts += 1
        try:
            async with asyncio.timeout(self.s.op_timeout):
                status, _, sent = await device.pool.request(method, device.path, body, headers)
                if due is not None:
                    tally.lag_ms.append((sent - due) * 1000)
                if status == delivered:
                    tally.latency_ms.append((await got - sent) * 1000)
                    tally.ok += 1
                    return True
                if status == 202 and self.bodies is None:
                    tally.stored += 1
                    return True
                tally.errors[f"http {status}"] += 1
        except TimeoutError:
            tally.timeouts += 1
        except DeviceError:
            tally.errors["device closed"] += 1
        except OSError:  # includes HttpError (a ConnectionError)
            tally.errors["http connection"] += 1
        finally:
            device.forget()
            if not got.done():
                got.cancel()
            elif not got.cancelled():
                got.exception()  # mark retrieved: no "never retrieved" warning
        return False

    async def closed(self, workers: int, duration: float) -> Tally:
        """``workers`` loops, each: take the least recently used idle channel, round trip it."""
        tally = Tally()
        idle = deque(self.ready())
        end = self.end_of(duration)

        async def loop() -> None:
            while idle and perf_counter() < end:
                device = idle.popleft()
                if device.ready:
                    if not await self.round_trip(device, tally):
                        await asyncio.sleep(ERROR_BACKOFF)
                    idle.append(device)

        await asyncio.gather(*(loop() for _ in range(min(workers, len(idle)))))
        return tally

    async def open(self, rate: float, duration: float) -> Tally:
        """Release PUTs at ``rate`` per second whatever the latency (no coordinated omission)."""
        tally = Tally()
        idle = deque(self.ready())
        running: set[asyncio.Task[None]] = set()

        async def one(device: Device, due: float) -> None:
            await self.round_trip(device, tally, due)
            if device.ready:
                idle.append(device)

        start, end = perf_counter(), self.end_of(duration)
        released = 0
        while (now := perf_counter()) < end:
            for _ in range(int((now - start) * rate) - released):
                released += 1
                if not idle:
                    tally.skipped += 1
                    continue
                task = asyncio.create_task(one(idle.popleft(), start + released / rate))
                running.add(task)
                task.add_done_callback(running.discard)
            # Sleep until the next PUT is due (the loop wakes with ~1 ms granularity).
            await asyncio.sleep(start + (released + 1) / rate - perf_counter())
        if running:
            await asyncio.wait(running)  # each is bounded by op_timeout
        return tally

    async def soak(self, duration: float, ping_interval: float) -> Tally:
        """Hold every device; each pings every ``ping_interval`` s, staggered evenly."""
        tally = Tally()
        devices = self.ready()
        groups = max(1, round(ping_interval / SOAK_TICK))
        start, end = perf_counter(), self.end_of(duration)
        for tick in itertools.count():
            due = start + tick * SOAK_TICK
            if due >= end:
                break
            await asyncio.sleep(max(0.0, due - perf_counter()))
            for device in devices[tick % groups :: groups]:
                if device.ready:
                    device.ping()
                    tally.pings += 1
        await asyncio.sleep(max(0.0, end - perf_counter()))
        # Give the last pings time to be answered, bounded by op_timeout.
        grace = perf_counter() + min(
            self.s.op_timeout, max(0.0, self.s.deadline - time.monotonic())
        )
        while self.shared.awaiting_pong and perf_counter() < grace:
            await asyncio.sleep(0.01)
        tally.pings_unanswered = self.shared.awaiting_pong
        return tally
