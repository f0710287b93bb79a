#!/usr/bin/env python3
"""How long `simplepush` on sqlite takes to be ready with a large database.

Builds a database of N stored UAIDs (default 1,000,000; each one WebPush
channel) with the server's own schema, then starts the server on it, as
`processes` workers, and times until /status answers and until a WebSocket
hello with a stored UAID gets that UAID back. Issue 12's target: ready in
under 5 s with a million UAIDs (docs/PERFORMANCE.md, "SQLite").

    scripts/startup_million.py [--uaids 1000000] [--processes 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from tornado.websocket import websocket_connect

from simplepush.store.sqlite_file import open_database

BATCH = 50_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(path: Path, uaids: int) -> str:
    """N WebPush UAIDs with one channel each; returns one of them to say hello with."""
    open_database(str(path), 5.0).close()  # the server's schema, created as the server does
    db = sqlite3.connect(path, isolation_level=None)
    now = time.time()
    probe = ""
    for start in range(0, uaids, BATCH):
        rows = [uuid.uuid4().hex for _ in range(min(BATCH, uaids - start))]
        probe = probe or rows[len(rows) // 2]
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO uaids (uaid, kind, registered, seen_at) VALUES (?, 1, 1, ?)",
            ((u, now) for u in rows),
        )
        db.executemany(
            "INSERT INTO channels VALUES (?, ?, ?)",
            ((u, uuid.uuid4().hex, str(uuid.uuid4())) for u in rows),
        )
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return probe


def status(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


async def hello(port: int, uaid: str) -> str:
    ws = await websocket_connect(f"ws://127.0.0.1:{port}/")
    await ws.write_message(json.dumps({"messageType": "hello", "use_webpush": True, "uaid": uaid}))
    reply = json.loads(await ws.read_message())
    ws.close()
    return reply["uaid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uaids", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--keep", help="build the database in this directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.keep or tmp)
        db = where / "million.db"
        t0 = time.monotonic()
        probe = build(db, args.uaids) if not db.exists() else None
        if probe is None:
            row = sqlite3.connect(db).execute("SELECT uaid FROM uaids LIMIT 1").fetchone()
            probe = row[0]
        print(
            f"database: {args.uaids} UAIDs, {db.stat().st_size / 1e6:.0f} MB, "
            f"built in {time.monotonic() - t0:.1f} s"
        )
        port = free_port()
        config = where / "config.ini"
        config.write_text(
            f"[server]\nport = {port}\nprocesses = {args.processes}\n"
            f"router_port = {free_port()}\n[storage]\npath = {db}\n"
            f"[logging]\noutput = {where / 'server.log'}\n[admin]\nport = 0\n"
        )
        start = time.monotonic()
        server = subprocess.Popen([sys.executable, "-m", "simplepush.cli", "--config", str(config)])
        try:
            while not status(port):
                if server.poll() is not None or time.monotonic() - start > 60:
                    raise SystemExit("startup_million.py: the server did not come up")
                time.sleep(0.01)
            ready = time.monotonic() - start
            echoed = asyncio.run(hello(port, probe))
            helloed = time.monotonic() - start
            if echoed != probe:
                raise SystemExit(f"startup_million.py: hello got {echoed}, not {probe}")
            print(
                f"/status answered {ready:.2f} s after start; a stored UAID's hello echoed "
                f"{helloed:.2f} s after start"
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
