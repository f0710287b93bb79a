"""Logs as the mozlog envelope that Heka reads, one JSON object per line.

Code logs events through `event()`: a dotted Type and flat Fields. The
formatter is python-json-logger's, shaped into the envelope of DESIGN.md
section 3; `format = text` gives readable lines for a terminal instead.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("simplepush")

# syslog severities (RFC 5424) of the standard levels
_SEVERITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def event(level: int, type_: str, **fields: Any) -> None:
    """Log one event; callers on hot paths pass cheap fields, formatting happens only if enabled."""
    if log.isEnabledFor(level):
        log.log(level, type_, extra={"event_type": type_, "fields": fields})


def severity(levelno: int) -> int:
    for level, value in _SEVERITY.items():
        if levelno >= level:
            return value
    return 7


class MozlogFormatter(JsonFormatter):
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
        log_data["Timestamp"] = int(record.created * 1_000_000_000)
        log_data["Type"] = event_type
        log_data["Logger"] = self._logger_name
        log_data["Hostname"] = self._hostname
        log_data["EnvVersion"] = "2.0"
        log_data["Severity"] = severity(record.levelno)
        log_data["Pid"] = record.process
        log_data["Fields"] = fields


class TextFormatter(logging.Formatter):
    """`2026-11-28 10:00:00 INFO websocket.hello uaid=... status=200` for people."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None)
        if fields is None:
            text = f"{stamp} {record.levelname} {record.name} {record.getMessage()}"
        else:
            pairs = " ".join(f"{key}={value}" for key, value in fields.items())
            text = f"{stamp} {record.levelname} {record.msg} {pairs}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(fmt: str, output: str, level: str, name: str) -> None:
    """Route every simplepush and tornado log record to one handler."""
    if output == "stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    elif output == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(output)
    handler.setFormatter(MozlogFormatter(name) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
