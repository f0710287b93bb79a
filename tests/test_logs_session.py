"""The log lines of one whole device session, from the real console script.

Every line must be the mozlog envelope of DESIGN.md section 3 that Heka
decodes (docs/OPERATIONS.md lists the Types); at info level no line may
name a device (UAID) or carry an endpoint token, and at debug level the
session's events appear in the order they happened.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import websocket

from tests.test_cli import (
    ENVELOPE,
    EXIT_TIMEOUT,
    Server,
    get_json,
    launch,
    put,
    request,
    script,  # noqa: F401  (the fixture the tests below use)
)

# syslog severities of the levels the server logs at
SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}
# The Types one session produces at debug level, in order, with their levels.
SESSION_TYPES = [
    ("server.start", "info"),
    ("websocket.open", "debug"),
    ("websocket.hello", "info"),
    ("websocket.identified", "debug"),
    ("websocket.register", "debug"),
    ("websocket.notification", "debug"),
    ("update.received", "debug"),
    ("websocket.ack", "debug"),
    ("websocket.unregister", "debug"),
    ("websocket.close", "info"),
    ("server.stop", "info"),
]
FLAT = (str, int, float, bool, type(None))


def session(server: Server) -> tuple[str, str]:
    """connect, hello, register, PUT, notification, ack, unregister, close; (uaid, token)."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=EXIT_TIMEOUT)
    try:
        uaid = request(ws, {"messageType": "hello", "uaid": "", "channelIDs": []})["uaid"]
        chid = str(uuid.uuid4())
        endpoint = request(ws, {"messageType": "register", "channelID": chid})["pushEndpoint"]
        assert put(endpoint, b"version=7") == (200, b"{}")
        assert json.loads(ws.recv())["updates"] == [{"channelID": chid, "version": 7}]
        ws.send(json.dumps({"messageType": "ack", "updates": [{"channelID": chid, "version": 7}]}))
        reply = request(ws, {"messageType": "unregister", "channelID": chid})
        assert reply["status"] == 200
    finally:
        ws.close()
    # The close is logged when the server sees the socket go; /status shows that moment.
    deadline = time.monotonic() + EXIT_TIMEOUT
    while get_json(server, "/status")["clients"]:
        assert time.monotonic() < deadline, "the server did not see the socket close"
        time.sleep(0.02)
    return uaid, endpoint.rsplit("/", 1)[1]


def run(program: Path, tmp_path: Path, level: str) -> tuple[list[dict], str, str, int]:
    """One session against a fresh server; its records, the uaid and token, and its pid."""
    before = time.time_ns()
    server = launch(program, tmp_path, format="json", output="stdout", level=level)
    try:
        uaid, token = session(server)
    finally:
        server.proc.terminate()
        assert server.proc.wait(timeout=EXIT_TIMEOUT) == 0
    after = time.time_ns()
    lines = server.output()
    assert lines
    records = []
    for line in lines:
        record = json.loads(line)
        assert set(record) == ENVELOPE, line
        assert type(record["Timestamp"]) is int, line
        assert before - 1_000_000_000 <= record["Timestamp"] <= after + 1_000_000_000, line
        assert type(record["Type"]) is str and record["Type"], line
        assert record["Logger"] == "simplepush", line
        assert record["Hostname"] == socket.gethostname(), line
        assert record["EnvVersion"] == "2.0", line
        assert record["Severity"] in SEVERITY.values(), line
        assert record["Pid"] == server.proc.pid, line
        assert type(record["Fields"]) is dict, line
        for key, value in record["Fields"].items():
            assert type(key) is str and isinstance(value, FLAT), line
        records.append(record)
    return records, uaid, token, server.proc.pid


def test_debug_logs_tell_the_session_in_order(script, tmp_path):  # noqa: F811
    records, uaid, token, _pid = run(script, tmp_path, "debug")
    types = [record["Type"] for record in records]
    position = 0
    for expected, level in SESSION_TYPES:
        assert expected in types[position:], f"{expected} missing after {types[:position]}"
        position = types.index(expected, position) + 1
        assert records[position - 1]["Severity"] == SEVERITY[level], records[position - 1]
    close = next(record["Fields"] for record in records if record["Type"] == "websocket.close")
    assert close["identified"] is True
    assert type(close["duration_s"]) is float and type(close["code"]) is int
    hello = next(record["Fields"] for record in records if record["Type"] == "websocket.hello")
    assert hello["uaid_state"] == "new"
    update = next(record["Fields"] for record in records if record["Type"] == "update.received")
    assert (update["status"], update["outcome"]) == (200, "delivered")
    # The UAID is only in debug lines, and no line ever holds an endpoint token.
    for record in records:
        line = json.dumps(record)
        assert token not in line, line
        if uaid in line:
            assert record["Severity"] == SEVERITY["debug"], line


def test_info_logs_name_no_device_and_no_token(script, tmp_path):  # noqa: F811
    records, uaid, token, _pid = run(script, tmp_path, "info")
    types = [record["Type"] for record in records]
    assert [t for t in types if t.startswith(("server.", "websocket."))] == [
        "server.start",
        "websocket.hello",
        "websocket.close",
        "server.stop",
    ]
    for record in records:
        line = json.dumps(record)
        assert record["Severity"] <= SEVERITY["info"], line
        assert uaid not in line and token not in line, line
