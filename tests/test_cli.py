"""The installed `simplepush` console script, run as a real process.

Covers DESIGN.md section 3: `--help`, `genkey` and the key file install.sh
makes, config errors (one line, exit 2), the shipped config.ini, a full
device/app-server round trip against the process, what a browser gets on
the public port, the mozlog envelope, text logs, and shutdown on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from configparser import ConfigParser
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import websocket
from cryptography.fernet import Fernet

from simplepush.config import AdminSettings, load
from simplepush.tokens import generate_key, is_valid_key
from simplepush.web import landing_text
from tests.conftest import free_port

SCRIPT = Path(sys.executable).parent / "simplepush"
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "config.ini"
# Bounds for waiting on a process, not performance thresholds.
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
IO_TIMEOUT = 5.0
ENVELOPE = {"Timestamp", "Type", "Logger", "Hostname", "EnvVersion", "Severity", "Pid", "Fields"}


@pytest.fixture(scope="module")
def script() -> Path:
    if not SCRIPT.is_file():
        pytest.fail(f"console script {SCRIPT} is missing: run `pip install -e .` in this venv")
    return SCRIPT


def run_cli(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=START_TIMEOUT, cwd=cwd
    )


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> list[str]:
        return self.stdout.read_text(encoding="utf-8").splitlines()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=EXIT_TIMEOUT)


def get_json(server: Server, path: str) -> dict:
    with urllib.request.urlopen(server.url(path), timeout=IO_TIMEOUT) as response:
        return json.loads(response.read())


def launch(
    script: Path,
    tmp_path: Path,
    token_key: str | None = None,
    admin: dict[str, str] | None = None,
    storage: dict[str, str] | None = None,
    metrics: dict[str, str] | None = None,
    **logging: str,
) -> Server:
    """The console script on a free port with these [logging] settings, answering /status.

    The dashboard is off unless `admin` gives its [admin] settings: the
    default port 8081 would be shared by every server a test run starts.
    A server that does not come up is killed before the test fails.
    """
    port = free_port()
    config = tmp_path / f"server-{port}.ini"
    config.write_text(
        "[server]\n"
        f"port = {port}\n"
        f"endpoint_url = http://127.0.0.1:{port}\n"
        f"token_key = {generate_key() if token_key is None else token_key}\n"
        "[logging]\n"
        + "".join(f"{key} = {value}\n" for key, value in logging.items())
        + "[admin]\n"
        + "".join(f"{key} = {value}\n" for key, value in (admin or {"port": "0"}).items())
        + "[storage]\n"
        + "".join(f"{key} = {value}\n" for key, value in (storage or {}).items())
        + "[metrics]\n"
        + "".join(f"{key} = {value}\n" for key, value in (metrics or {}).items()),
        encoding="utf-8",
    )
    stdout, stderr = tmp_path / f"stdout-{port}.log", tmp_path / f"stderr-{port}.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [str(script), "--config", str(config)], stdout=out, stderr=err, cwd=tmp_path
        )
    server = Server(proc, port, stdout, stderr)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {stderr.read_text()}")
        try:
            get_json(server, "/status")
            return server
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=EXIT_TIMEOUT)
                pytest.fail(f"server did not answer /status within {START_TIMEOUT} s")
            time.sleep(0.05)


@pytest.fixture
def start(script: Path, tmp_path: Path):
    """start(token_key=..., log_format=...): a server answering /status; killed at teardown."""
    started: list[Server] = []

    def _start(token_key: str | None = None, log_format: str = "json") -> Server:
        server = launch(
            script, tmp_path, token_key, format=log_format, output="stdout", level="info"
        )
        started.append(server)
        return server

    yield _start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=EXIT_TIMEOUT)


@pytest.fixture
def sockets():
    """Client WebSockets opened by a test, closed at teardown."""
    opened: list[websocket.WebSocket] = []

    def _open(port: int) -> websocket.WebSocket:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=IO_TIMEOUT)
        opened.append(ws)
        return ws

    yield _open
    for ws in opened:
        ws.close(timeout=0)


def request(ws: websocket.WebSocket, frame: dict) -> dict:
    ws.send(json.dumps(frame))
    return json.loads(ws.recv())


def close_code(ws: websocket.WebSocket) -> int:
    """Read until the server's close frame and return its code."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0]


def put(endpoint: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        endpoint,
        data=body,
        method="PUT",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(req, timeout=IO_TIMEOUT) as response:
        return response.status, response.read()


def round_trip(server: Server, open_socket) -> None:
    """hello, register, PUT (200), the exact notification, ack, ping."""
    ws = open_socket(server.port)
    hello = request(ws, {"messageType": "hello", "uaid": "", "channelIDs": []})
    uaid = hello["uaid"]
    assert re.fullmatch(r"[0-9a-f]{32}", uaid)
    assert hello == {"messageType": "hello", "uaid": uaid, "status": 200}
    chid = str(uuid.uuid4())
    reply = request(ws, {"messageType": "register", "channelID": chid})
    endpoint = reply["pushEndpoint"]
    assert endpoint.startswith(server.url("/update/"))
    assert reply == {
        "messageType": "register",
        "channelID": chid,
        "status": 200,
        "uaid": uaid,
        "pushEndpoint": endpoint,
    }
    assert put(endpoint, b"version=42") == (200, b"{}")
    assert json.loads(ws.recv()) == {
        "messageType": "notification",
        "updates": [{"channelID": chid, "version": 42}],
    }
    ws.send(json.dumps({"messageType": "ack", "updates": [{"channelID": chid, "version": 42}]}))
    ws.send("{}")
    assert ws.recv() == "{}"


# --- genkey -----------------------------------------------------------------


def test_genkey_prints_a_new_fernet_key(script, tmp_path):
    keys = []
    for _ in range(2):
        result = run_cli(script, "genkey", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1
        key = lines[0]
        assert len(key) == 44
        assert len(base64.urlsafe_b64decode(key)) == 32
        Fernet(key)
        keys.append(key)
    assert keys[0] != keys[1]


def test_help_lists_the_commands_and_what_they_do(script, tmp_path):
    result = run_cli(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{serve,genkey}" not in result.stdout
    described = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("    ") and len(line.split()) > 3
    }
    assert {"serve", "genkey"} <= described, result.stdout
    serve = run_cli(script, "serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0 and "SIGTERM" in serve.stdout and "exits 2" in serve.stdout


@pytest.mark.parametrize(
    "args",
    [["--fill"], ["serve", "--fill"], ["genkey", "--config", "config.ini"]],
    ids=["fill-alone", "fill-serve", "genkey-config-without-fill"],
)
def test_an_option_its_command_does_not_read_is_an_error(script, tmp_path, args):
    result = run_cli(script, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == "" and "error:" in result.stderr


def test_serve_is_the_default_command_and_config_goes_before_or_after_it(script, tmp_path):
    absent = tmp_path / "absent.ini"
    for args in (["--config", str(absent)], ["serve", "--config", str(absent)]):
        assert_config_error(run_cli(script, *args, cwd=tmp_path), [f"{absent}: no such file"])
    assert_config_error(run_cli(script, cwd=tmp_path), ["config.ini: no such file"])


def test_genkey_fill_creates_the_key_file_the_config_names_once(script, tmp_path):
    """What install.sh does with the shipped config.ini: a secret file, config.ini untouched."""
    config = tmp_path / "config.ini"
    config.write_bytes(SHIPPED_CONFIG.read_bytes())
    key_file = tmp_path / "simplepush.key"
    result = run_cli(script, "genkey", "--fill", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"simplepush: wrote a new key into {key_file}\n"
    assert config.read_bytes() == SHIPPED_CONFIG.read_bytes()
    assert key_file.stat().st_mode & 0o777 == 0o600
    [key] = key_file.read_text().split()
    assert is_valid_key(key)
    assert load(str(config)).server.token_key == (key,)
    again = run_cli(script, "genkey", "--fill", "--config", str(config), cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, "")
    assert key_file.read_text().split() == [key]


def test_a_key_file_is_found_beside_its_config_and_holds_keys_newest_first(script, tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "simplepush.ini"
    config.write_text("[server]\ntoken_key_file = keys\n")
    keys = (generate_key(), generate_key(), generate_key())
    (etc / "keys").write_text(f"{keys[0]}\n\n{keys[1]}, {keys[2]}\n")
    assert load(str(config)).server.token_key == keys
    # genkey --fill run from elsewhere finds the same file, and keeps it
    result = run_cli(script, "genkey", "--fill", "--config", "etc/simplepush.ini", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert load(str(config)).server.token_key == keys


def test_git_ignores_the_key_file_so_that_no_commit_publishes_it():
    root = SHIPPED_CONFIG.parent
    result = subprocess.run(
        ["git", "-C", str(root), "check-ignore", "--quiet", "simplepush.key"], timeout=IO_TIMEOUT
    )
    assert result.returncode == 0


def test_an_inline_token_key_wins_over_the_key_file(tmp_path):
    """Older configs keep their key; the file, even missing, is then not read."""
    key = generate_key()
    config = tmp_path / "config.ini"
    config.write_text(f"[server]\ntoken_key = {key}\ntoken_key_file = missing.key\n")
    assert load(str(config)).server.token_key == (key,)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["no such file", "genkey --fill"]),
        ("", ["is empty"]),
        ("not-a-key\n", ["key 1 is not a Fernet key"]),
        (f"{generate_key()}\nnot-a-key\n", ["key 2 is not a Fernet key"]),
        (b"\xff\xfe", ["cannot be read: not text"]),
        ("directory", ["cannot be read: Is a directory"]),
    ],
    ids=["missing", "empty", "bad-key", "bad-second-key", "binary", "directory"],
)
def test_a_bad_key_file_exits_2_with_one_line(script, tmp_path, content, fragments):
    key_file = tmp_path / "simplepush.key"
    if content == "directory":
        key_file.mkdir()
    elif isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    config = tmp_path / "config.ini"
    config.write_text(f"[server]\nport = {free_port()}\ntoken_key_file = simplepush.key\n")
    result = run_cli(script, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "[server] token_key_file", str(key_file), *fragments])


@pytest.mark.parametrize("command", [["genkey", "--fill"], ["serve"]])
def test_a_missing_config_is_no_such_file_for_every_command(script, tmp_path, command):
    config = tmp_path / "absent.ini"
    result = run_cli(script, *command, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [f"simplepush: {config}: no such file"])


def test_genkey_fill_where_the_key_file_cannot_be_made_exits_2_with_one_line(script, tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[server]\ntoken_key_file = no/such/dir/simplepush.key\n")
    result = run_cli(script, "genkey", "--fill", "--config", str(config), cwd=tmp_path)
    assert_config_error(result, ["[server] token_key_file", "cannot be created: no such directory"])


def test_genkey_fill_writes_a_key_into_an_empty_token_key_once(script, tmp_path):
    """An older config, without token_key_file: the key goes inline, as it always did."""
    config = tmp_path / "config.ini"
    config.write_text("[server]\nport = 8080  ; the port\ntoken_key =    ; keys, newest first\n")
    result = run_cli(script, "genkey", "--fill", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"simplepush: wrote a new token_key into {config}\n"
    keys = load(str(config)).server.token_key
    assert len(keys) == 1 and is_valid_key(keys[0])
    line = next(ln for ln in config.read_text().splitlines() if ln.startswith("token_key"))
    assert ";" in line, "the key's comment is kept"
    again = run_cli(script, "genkey", "--fill", "--config", str(config), cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, "")
    assert load(str(config)).server.token_key == keys


# --- bad configs: one line naming file, key and problem; exit 2 ------------


BAD_CONFIGS = [
    pytest.param("[bogus]\nx = 1\n", ["[bogus]", "unknown section"], id="unknown-section"),
    pytest.param("[server]\ncolour = blue\n", ["[server] colour", "unknown"], id="unknown-key"),
    pytest.param("[server]\nport = abc\n", ["[server] port", "abc"], id="port-abc"),
    pytest.param("[server]\nport = 0\n", ["[server] port", "65535"], id="port-0"),
    pytest.param("[server]\nport = 70000\n", ["[server] port", "70000"], id="port-70000"),
    pytest.param(
        "[server]\nmax_connections = -1\n", ["[server] max_connections", "-1"], id="max-conn"
    ),
    pytest.param(
        "[server]\nhello_timeout = soon\n", ["[server] hello_timeout", "soon"], id="hello-timeout"
    ),
    pytest.param("[server]\ntoken_key = not-a-key\n", ["[server] token_key", "Fernet"], id="key"),
    pytest.param(
        f"[server]\ntoken_key = {generate_key()}, not-a-key\n",
        ["[server] token_key", "key 2"],
        id="second-key",
    ),
    pytest.param(
        "[server]\nprocesses = 2\n[storage]\nbackend = memory\n",
        ["[server] processes", "memcached"],
        id="processes-memory",
    ),
    pytest.param("[storage]\nbackend = redis\n", ["[storage] backend", "redis"], id="redis"),
    pytest.param(
        "[server]\nmax_message_size = 4096\n",
        ["[server] max_message_size", "262144"],
        id="message-limit-too-low",
    ),
    pytest.param(
        "[server]\nmax_body_size = 1k\n", ["[server] max_body_size", "'1k'"], id="body-limit"
    ),
    pytest.param(
        "[server]\nidle_timeout = 0\n", ["[server] idle_timeout", "more than 0"], id="idle"
    ),
    pytest.param(
        "[server]\nssl_certfile = /nonexistent.pem\n",
        ["[server] ssl_keyfile", "must be set too"],
        id="tls-half",
    ),
    pytest.param("[logging]\nlevel = loud\n", ["[logging] level", "loud"], id="level"),
    pytest.param(
        "[logging]\noutput = /nonexistent/simplepush.log\n",
        ["[logging] output", "/nonexistent/simplepush.log: no such directory"],
        id="log-directory",
    ),
    pytest.param(
        "[server]\nssl_certfile = /nonexistent.pem\nssl_keyfile = /nonexistent.key\n",
        ["[server] ssl_certfile", "cannot load /nonexistent.pem", ": no such file"],
        id="tls-missing",
    ),
    pytest.param(
        "[server]\nendpoint_url = push.example.com\n",
        ["[server] endpoint_url", "http"],
        id="endpoint-scheme",
    ),
]


def assert_config_error(result: subprocess.CompletedProcess[str], fragments: list[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(("text", "fragments"), BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line(script, tmp_path, text, fragments):
    config = tmp_path / "bad.ini"
    config.write_text(text, encoding="utf-8")
    result = run_cli(script, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), *fragments])


def test_missing_config_file_exits_2_with_one_line(script, tmp_path):
    config = tmp_path / "absent.ini"
    result = run_cli(script, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "no such file"])


def test_port_in_use_exits_2_with_one_line(script, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.ini"
        config.write_text(f"[server]\nport = {port}\n", encoding="utf-8")
        result = run_cli(script, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "[server] port", str(port), "in use"])


# --- the shipped config.ini -------------------------------------------------


DESIGN_DEFAULTS = {
    "server": {
        "host": "127.0.0.1",
        "port": 8080,
        "endpoint_url": "http://localhost:8080",
        "processes": 1,
        "max_connections": 100000,
        "hello_timeout": 30,
        "max_channels": 200,
        "token_key": None,  # empty, so that the key comes from token_key_file
        "token_key_file": "simplepush.key",  # install.sh creates it
        "router_host": "127.0.0.1",
        "router_port": 8090,
        "ssl_certfile": "",
        "ssl_keyfile": "",
        "max_message_size": 262144,
        "max_body_size": 65536,
        "max_header_size": 16384,
        "idle_timeout": 60,
        "body_timeout": 10,
        "min_ping_interval": 0,
        "max_queued": 100,
    },
    "storage": {
        "backend": "sqlite",
        "path": None,  # simplepush.db, which load() takes from config.ini's directory
        "servers": ("127.0.0.1:11211",),
        "pending_ttl": 259200,
        "uaid_ttl": 5184000,
        "timeout": 5,
    },
    "logging": {"format": "auto", "output": "stdout", "level": "info", "name": "simplepush"},
    "metrics": {"statsd_host": "", "statsd_port": 8125, "prefix": "simplepush"},
    "admin": {"host": None, "port": 8081, "token": ""},  # host: router_host when empty
    "wakeup": {
        "networks": (),
        "mobile_networks": {},
        "min_interval": 30,
        "close_after_hello": False,
    },
}


def test_shipped_config_has_every_key_with_designs_default(tmp_path):
    # As install.sh leaves it: beside the key file it names.
    config = tmp_path / "config.ini"
    config.write_bytes(SHIPPED_CONFIG.read_bytes())
    (tmp_path / "simplepush.key").write_text(generate_key())
    settings = load(str(config))
    raw = ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    raw.read(SHIPPED_CONFIG, encoding="utf-8")
    assert set(raw.sections()) == set(DESIGN_DEFAULTS)
    assert raw["server"]["token_key"] == ""
    for section, defaults in DESIGN_DEFAULTS.items():
        assert set(raw[section]) == set(defaults), section
        loaded = asdict(getattr(settings, section))
        for key, value in defaults.items():
            if value is not None:
                assert loaded[key] == value, (section, key)


def test_shipped_config_comments_every_key():
    for line in SHIPPED_CONFIG.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith((";", "#", "[")):
            continue
        _, _, comment = stripped.partition(";")
        assert comment.strip(), f"no ';' comment: {line!r}"


# --- a running server -------------------------------------------------------


def test_full_run_serves_devices_and_logs_mozlog_json(start, sockets):
    server = start()
    round_trip(server, sockets)
    assert server.stop() == 0
    lines = server.output()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert set(record) == ENVELOPE, record
        assert type(record["Timestamp"]) is int
        assert type(record["Type"]) is str
        assert record["Logger"] == "simplepush"
        assert record["Hostname"] == socket.gethostname()
        assert record["EnvVersion"] == "2.0"
        assert record["Severity"] in range(8)
        assert record["Pid"] == server.proc.pid
        assert type(record["Fields"]) is dict
    types = [record["Type"] for record in records]
    assert "server.start" in types
    assert "websocket.hello" in types


def http_call(
    server: Server, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_a_browser_on_the_public_port_is_told_what_it_is_and_where_to_go(start):
    server = start()
    for path in ("/", "/some/page"):
        status, headers, body = http_call(server, "GET", path)
        assert status == 200, path
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        text = body.decode()
        for fragment in ("WebSocket endpoint", "PUT /update/<token>", "POST /wpush/v1/<token>"):
            assert fragment in text, (fragment, text)
        assert "The dashboard is off ([admin] port = 0)." in text
        assert len(text.splitlines()) <= 5
    # A WebSocket client that gets the upgrade wrong is answered as before.
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "x" * 24}
    status, headers, body = http_call(
        server, "GET", "/", headers={**upgrade, "Sec-WebSocket-Version": "8"}
    )
    assert (status, headers["Sec-WebSocket-Version"], body) == (426, "13", b"")
    status, _, body = http_call(server, "GET", "/", headers={"Sec-WebSocket-Version": "13"})
    assert (status, body) == (400, b"")


def test_a_dashboard_is_named_on_the_public_port_only_on_a_loopback_address():
    assert b"http://127.0.0.1:8081/" in landing_text(AdminSettings(host="127.0.0.1"))
    assert b"http://[::1]:9000/" in landing_text(AdminSettings(host="::1", port=9000))
    private = landing_text(AdminSettings(host="10.1.2.3")).decode()
    assert "10.1.2.3" not in private and "8081" not in private
    assert "private address of [admin] host and port" in private


def test_every_error_body_is_compact_json(start):
    """As endpoint.py writes them: 405 on every route, and the limits' 413 and 431 too."""
    server = start()
    requests = [
        ("GET", "/update/some-token", b"", {}, 405, "PUT, OPTIONS"),
        ("POST", "/", b"", {}, 405, "GET"),
        ("GET", "/wpush/v1/some-token", b"", {}, 405, "POST"),
        ("PUT", "/update/not-a-token", b"version=1", {}, 404, None),
        ("PUT", "/update/some-token", b"x" * 70_000, {}, 413, None),
        ("GET", "/status", b"", {"X-Padding": "x" * 20_000}, 431, None),
    ]
    for method, path, body, headers, expected, allow in requests:
        status, answer_headers, answer = http_call(server, method, path, body, headers)
        assert status == expected, (method, path, status, answer)
        assert answer == json.dumps(json.loads(answer), separators=(",", ":")).encode(), answer
        assert answer_headers["Allow"] == allow, (method, path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_devices_with_1001_and_exits_0(start, sockets, signum):
    server = start()
    identified = sockets(server.port)
    hello = request(identified, {"messageType": "hello", "uaid": "", "channelIDs": []})
    assert hello["status"] == 200
    anonymous = sockets(server.port)
    assert get_json(server, "/status")["clients"] == 2
    signalled = time.monotonic()
    server.proc.send_signal(signum)
    assert close_code(identified) == 1001
    assert close_code(anonymous) == 1001
    remaining = max(0.0, EXIT_TIMEOUT - (time.monotonic() - signalled))
    assert server.proc.wait(timeout=remaining) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT).close()


def test_text_log_format_is_not_json(start):
    server = start(log_format="text")
    assert server.stop() == 0
    lines = server.output()
    assert lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert any("server.start" in line and f"port={server.port}" in line for line in lines)


def test_empty_token_key_warns_and_endpoints_work(start, sockets):
    server = start(token_key="")
    warnings = [json.loads(line) for line in server.output()]
    assert any(
        record["Type"] == "config.warning" and record["Fields"].get("key") == "token_key"
        for record in warnings
    ), warnings
    round_trip(server, sockets)
