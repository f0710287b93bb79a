"""Logs as the mozlog envelope that Heka reads, one JSON object per line.

Code logs events through `event()`: a dotted Type and flat Fields. The
formatter is python-json-logger's (its orjson one: a third of the CPU per
line of its json one), shaped into the envelope of DESIGN.md section 3;
`format = text` gives readable lines for a terminal instead, and `format =
auto` picks text when the output is a terminal, so that a first run reads
well and files, pipes and collectors (Heka) still get JSON.

Lines go to stdout, stderr, a file (reopened on SIGHUP for logrotate) or a
udp:// or tcp:// collector. A collector must never slow the server down:
lines wait in a bounded queue that a background thread sends, and lines
that do not fit or cannot be sent are dropped and counted (`dropped_lines()`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

log = logging.getLogger("simplepush")

# syslog severities (RFC 5424) of the standard levels
_SEVERITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


# Warning and error events by Type, counted at any log level: the dashboard's "errors by kind".
_problems: dict[str, int] = {}
# In a worker, those its supervisor had logged when it forked it: every worker has the same.
_inherited: dict[str, int] = {}


def event(level: int, type_: str, **fields: Any) -> None:
    """Log one event; callers on hot paths pass cheap fields, formatting happens only if enabled."""
    if level >= logging.WARNING:
        _problems[type_] = _problems.get(type_, 0) + 1
    if log.isEnabledFor(level):
        log.log(level, type_, extra={"event_type": type_, "fields": fields})


def exception(type_: str) -> None:
    """Log an error event with the current exception's traceback, counted like `event`'s."""
    _problems[type_] = _problems.get(type_, 0) + 1
    log.exception(type_, extra={"event_type": type_, "fields": {}})


def problems() -> dict[str, int]:
    """How many warning and error events of each Type this process logged (or would have)."""
    return dict(_problems)


def inherited_problems() -> dict[str, int]:
    """`problems()` of the supervisor as it forked this worker; empty without one."""
    return dict(_inherited)


def severity(levelno: int) -> int:
    for level, value in _SEVERITY.items():
        if levelno >= level:
            return value
    return 7


class MozlogFormatter(OrjsonFormatter):
    def __init__(self, logger_name: str) -> None:
        super().__init__()
        self._logger_name = logger_name
        self._hostname = socket.gethostname()

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        fields = dict(getattr(record, "fields", {}))
        event_type = getattr(record, "event_type", None)
        if event_type is None:
            event_type = record.name
            fields["msg"] = record.getMessage()
        if "exc_info" in message_dict:
            fields["exc_info"] = message_dict["exc_info"]
        # A double's value (created is a float): Heka's json.lua, whose numbers are doubles,
        # gives the message this Timestamp to the nanosecond (tests/test_heka.py).
        log_data["Timestamp"] = int(record.created * 1_000_000_000)
        log_data["Type"] = event_type
        log_data["Logger"] = self._logger_name
        log_data["Hostname"] = self._hostname
        log_data["EnvVersion"] = "2.0"
        log_data["Severity"] = severity(record.levelno)
        log_data["Pid"] = record.process
        log_data["Fields"] = fields

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        """orjson refuses integers past 64 bits and lone surrogates, which a field may hold
        (what a device sent, say): such a line goes through json instead, escaped."""
        try:
            return super().jsonify_log_record(log_data)
        except TypeError:
            return json.dumps(log_data, default=self.json_default)


class TextFormatter(logging.Formatter):
    """`2026-11-28 10:00:00 INFO websocket.hello uaid=... status=200` for people.

    A value with a space, quote or `=` is quoted, so that each pair reads as one.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None)
        if fields is None:
            text = f"{stamp} {record.levelname} {record.name} {record.getMessage()}"
        else:
            pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
            text = f"{stamp} {record.levelname} {record.msg} {pairs}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(char in text for char in ' "=\t\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


# RFC 3986's scheme: what makes `name://...` a URL rather than a file path.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def collector_address(output: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a udp:// or tcp:// output, None for stdout/stderr/a file.

    Raises ValueError naming the expected shape when the URL is malformed or
    has another scheme (http://, file://, ...), which would otherwise be taken
    for a file path.
    """
    scheme, sep, rest = output.partition("://")
    if not sep or not _URL_SCHEME.fullmatch(scheme):
        return None
    if scheme not in ("udp", "tcp"):
        raise ValueError(
            f"{output!r}: {scheme}:// is not an output; use udp://host:port, tcp://host:port,"
            " stdout, stderr or a file path"
        )
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (
        not colon
        or not host
        or any(char in host for char in "/[]@ \t")
        or not port.isdigit()
        or not 1 <= int(port) <= 65535
    ):
        raise ValueError(f"{output!r} is not {scheme}://host:port with a port from 1 to 65535")
    return scheme, host, int(port)


# A queue of lines for a collector: about 3 MB of memory at most.
QUEUE_LINES = 10_000
# Seconds between connection attempts to a tcp collector grow to this cap.
RECONNECT_MIN, RECONNECT_MAX = 0.25, 2.0
# A collector that takes no data for this long is dropped and reconnected.
SEND_TIMEOUT = 5.0
# `logging.dropped` is reported at most this often, while lines are dropped.
DROP_REPORT_INTERVAL = 5.0
# At exit, queued lines get this long to reach the collector.
DRAIN_TIMEOUT = 1.0

_dropped = 0
_dropped_lock = threading.Lock()


def dropped_lines() -> int:
    """Lines this process could not deliver to its collector, for /realstatus."""
    return _dropped


def _count_dropped(count: int = 1) -> None:
    global _dropped
    with _dropped_lock:
        _dropped += count


class CollectorHandler(logging.Handler):
    """Sends each line to a udp or tcp collector from a background thread.

    emit() runs on the IOLoop, so it only formats and enqueues without
    blocking; the thread owns the socket, DNS lookups and reconnects. udp
    sends one datagram per line, tcp newline-delimited lines on one connection.
    """

    def __init__(self, scheme: str, host: str, port: int, queue_lines: int = QUEUE_LINES) -> None:
        super().__init__()
        self.scheme, self.host, self.port = scheme, host, port
        self.output = f"{scheme}://{host}:{port}"
        self._queue_lines = queue_lines
        self._start()
        _collectors.add(self)

    def _start(self) -> None:
        """Fresh state and thread: also run in a forked child, which inherits no thread."""
        self._queue: queue.Queue[bytes] = queue.Queue(self._queue_lines)
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._address: Any = None
        self._retry_at = 0.0
        self._delay = RECONNECT_MIN
        self._reported = 0
        self._reported_at = -DROP_REPORT_INTERVAL
        self._thread = threading.Thread(target=self._run, name="log-collector", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        if self._sock is not None:
            self._sock.close()  # our copy only: the parent keeps its connection
        self._start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            _count_dropped()

    def close(self) -> None:
        """Give queued lines DRAIN_TIMEOUT to leave, then stop the thread."""
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(b"")  # wakes the thread; a full queue keeps it awake anyway
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(DRAIN_TIMEOUT)
        super().close()

    def _run(self) -> None:
        while True:
            self._report_drops()
            if self._closing.is_set() and (self._sock is None or self._queue.empty()):
                break
            if self._sock is None and not self._connect():
                self._closing.wait(max(0.0, self._retry_at - time.monotonic()))
                continue
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line:
                self._send(line)
        if self._sock is not None:
            self._sock.close()

    def _connect(self) -> bool:
        """Resolve and (tcp) connect, at most once per backoff delay; True when ready."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        address = None
        try:
            if self.scheme == "udp":
                family, kind, _, _, address = socket.getaddrinfo(
                    self.host, self.port, type=socket.SOCK_DGRAM
                )[0]
                sock = socket.socket(family, kind)
                sock.setblocking(False)
            else:  # tries every address of the host, as a tcp client should
                sock = socket.create_connection((self.host, self.port), timeout=RECONNECT_MAX)
                sock.settimeout(SEND_TIMEOUT)
        except OSError:
            self._retry_at = now + self._delay
            self._delay = min(self._delay * 2, RECONNECT_MAX)
            return False
        self._sock, self._address, self._delay = sock, address, RECONNECT_MIN
        return True

    def _send(self, line: bytes) -> None:
        """One line; a failure drops it, and for tcp also the connection (it may hold half)."""
        assert self._sock is not None
        try:
            if self.scheme == "udp":
                self._sock.sendto(line, self._address)
            else:
                self._sock.sendall(line)
        except OSError as exc:
            _count_dropped()
            if self.scheme == "tcp" or exc.errno not in (errno.EAGAIN, errno.EMSGSIZE):
                self._sock.close()
                self._sock = None
                self._retry_at = time.monotonic() + self._delay

    def _report_drops(self) -> None:
        """`logging.dropped` on stderr, which works when the collector does not."""
        total = _dropped
        now = time.monotonic()
        if total == self._reported or now - self._reported_at < DROP_REPORT_INTERVAL:
            return
        record = log.makeRecord(
            log.name,
            logging.WARNING,
            __file__,
            0,
            "logging.dropped",
            (),
            None,
            extra={
                "event_type": "logging.dropped",
                "fields": {
                    "output": self.output,
                    "dropped": total - self._reported,
                    "total": total,
                },
            },
        )
        self._reported, self._reported_at = total, now
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


_collectors: weakref.WeakSet[CollectorHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A worker counts its own drops and problems, and runs its own sender thread and connection."""
    global _dropped, _dropped_lock, _problems, _inherited
    _dropped, _dropped_lock = 0, threading.Lock()
    _problems, _inherited = {}, _problems
    for handler in list(_collectors):
        handler._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ReopeningFileHandler(logging.FileHandler):
    """A log file that reopen() swaps for a fresh one at the same path, for logrotate."""

    def reopen(self) -> None:
        self.acquire()
        try:
            fresh = self._open()
            old, self.stream = self.stream, fresh
        finally:
            self.release()
        if old is not None:
            old.close()


def reopen() -> None:
    """SIGHUP: reopen the log file after logrotate moved it; other outputs need nothing."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                event(
                    logging.ERROR,
                    "logging.reopen_failed",
                    path=handler.baseFilename,
                    error=str(exc),
                )
            else:
                event(logging.INFO, "logging.reopened", path=handler.baseFilename)


def _json(fmt: str, handler: logging.Handler) -> bool:
    """`auto` is JSON unless the handler writes to a terminal, where a person reads."""
    if fmt != "auto":
        return fmt == "json"
    stream = getattr(handler, "stream", None)
    try:
        return not (stream is not None and stream.isatty())
    except ValueError:  # a closed stream
        return True


def setup(fmt: str, output: str, level: str, name: str) -> None:
    """Route every simplepush and tornado log record to one handler."""
    collector = collector_address(output)
    if collector is not None:
        handler: logging.Handler = CollectorHandler(*collector)
    elif output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    elif output == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = ReopeningFileHandler(output)
    handler.setFormatter(MozlogFormatter(name) if _json(fmt, handler) else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
