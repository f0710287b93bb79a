"""config.ini to typed, validated settings.

Every key of DESIGN.md section 3 has a default here; a file only overrides.
Anything wrong raises ConfigError with one line naming the file, the key
and the problem, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from simplepush.logs import collector_address
from simplepush.store.sqlite_file import Unusable, check_path
from simplepush.tokens import is_valid_key
from simplepush.wakeup import Network, Operator, outside, parse_networks, parse_operators


class ConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    endpoint_url: str = "http://localhost:8080"
    processes: int = 1
    max_connections: int = 100000
    hello_timeout: float = 30.0
    max_channels: int = 200
    token_key: tuple[str, ...] = ()
    token_key_file: str = ""  # read only while token_key is empty
    router_host: str = "127.0.0.1"
    router_port: int = 8090
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    max_message_size: int = 256 * 1024
    max_body_size: int = 64 * 1024
    max_header_size: int = 16 * 1024
    idle_timeout: float = 60.0
    body_timeout: float = 10.0
    min_ping_interval: float = 0.0
    max_queued: int = 100


@dataclass(frozen=True, slots=True)
class StorageSettings:
    backend: str = "sqlite"
    servers: tuple[str, ...] = ("127.0.0.1:11211",)
    # sqlite's database file; load() makes a relative one relative to the config file.
    path: str = "simplepush.db"
    pending_ttl: int = 3 * 86400
    uaid_ttl: int = 60 * 86400
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    format: str = "auto"
    output: str = "stdout"
    level: str = "info"
    name: str = "simplepush"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    statsd_host: str = ""
    statsd_port: int = 8125
    prefix: str = "simplepush"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The operator dashboard's listener; empty host means [server] router_host."""

    host: str = ""
    port: int = 8081  # 0 = no dashboard
    token: str = ""  # empty = no token asked


@dataclass(frozen=True, slots=True)
class WakeupSettings:
    """UDP wake-up (docs/PROTOCOL.md): off while `networks` is empty."""

    networks: tuple[Network, ...] = ()
    mobile_networks: dict[Operator, tuple[Network, ...]] = field(default_factory=dict)
    min_interval: int = 30  # seconds between two datagrams to one device
    close_after_hello: bool = False  # close 4774 once a wakeable device has nothing unacked


@dataclass(frozen=True, slots=True)
class Settings:
    path: str = "config.ini"
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    wakeup: WakeupSettings = field(default_factory=WakeupSettings)


def _integer(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}, got {value}")
        return value

    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value <= 86400:
        raise ValueError(f"must be from 0 to 86400 seconds, got {text}")
    return value


def _timeout_up_to(high: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {text!r}") from None
        if not 0 < value <= high:
            raise ValueError(f"must be more than 0 and at most {high:g} seconds, got {text}")
        return value

    return convert


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return convert


def _boolean(text: str) -> bool:
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.lower())
    if value is None:
        raise ValueError(f"must be true or false, got {text!r}")
    return value


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _token_keys(text: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    for index, key in enumerate(keys, 1):
        if not is_valid_key(key):
            raise ValueError(
                f"key {index} is not a Fernet key (32 url-safe base64 bytes);"
                " make one with `simplepush genkey`"
            )
    return keys


def _host_ports(text: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError("must list at least one host:port")
    for server in servers:
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{server!r} is not host:port")
    return servers


def _admin_token(text: str) -> str:
    if text and (len(text) < 16 or not text.isascii() or not text.isprintable() or " " in text):
        raise ValueError(
            "must be empty or at least 16 printable ASCII characters without spaces;"
            " `simplepush genkey` makes a good one"
        )
    return text


def _log_output(text: str) -> str:
    if not text:
        raise ValueError("must be stdout, stderr, a file path, udp://host:port or tcp://host:port")
    collector = collector_address(text)  # a malformed or unknown URL raises ValueError
    if collector is None and text not in ("stdout", "stderr"):
        _check_log_file(text)
    return text


def _check_log_file(path: str) -> None:
    """Refuse a file the server could not append to, before opening it ends in a traceback."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: no such directory")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path}: not writable by this user")
    elif not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: directory {directory} is not writable by this user")


_PORT = _integer(1, 65535)

_SCHEMA: dict[str, dict[str, Callable[[str], object]]] = {
    "server": {
        "host": _nonempty,
        "port": _PORT,
        "endpoint_url": _url,
        "processes": _integer(0, 256),
        "max_connections": _integer(1, 10_000_000),
        "hello_timeout": _seconds,
        "max_channels": _integer(1, 100_000),
        "token_key": _token_keys,
        "token_key_file": str,
        "router_host": _nonempty,
        "router_port": _PORT,
        "ssl_certfile": str,
        "ssl_keyfile": str,
        # Below 256 KiB a command with a long field would be cut rather than answered.
        "max_message_size": _integer(256 * 1024, 64 * 1024 * 1024),
        # A PUT body holds version and up to 4096 bytes of data, percent-encoded: 12.3 KiB.
        "max_body_size": _integer(16 * 1024, 64 * 1024 * 1024),
        "max_header_size": _integer(4 * 1024, 1024 * 1024),
        "idle_timeout": _timeout_up_to(86400),
        "body_timeout": _timeout_up_to(3600),
        "min_ping_interval": _seconds,
        "max_queued": _integer(1, 10_000),
    },
    "storage": {
        "backend": _choice("sqlite", "memory", "memcached"),
        "servers": _host_ports,
        "path": _nonempty,
        "pending_ttl": _integer(1, 3650 * 86400),
        "uaid_ttl": _integer(1, 3650 * 86400),
        "timeout": _timeout_up_to(60),
    },
    "logging": {
        "format": _choice("auto", "json", "text"),
        "output": _log_output,
        "level": _choice("debug", "info", "warning", "error", "critical"),
        "name": _nonempty,
    },
    "metrics": {
        "statsd_host": str,
        "statsd_port": _PORT,
        "prefix": str,
    },
    "admin": {
        "host": str,
        "port": _integer(0, 65535),
        "token": _admin_token,
    },
    "wakeup": {
        "networks": parse_networks,
        "mobile_networks": parse_operators,
        # memcached counts expiry in whole seconds, and 0 would mean "never".
        "min_interval": _integer(1, 86400),
        "close_after_hello": _boolean,
    },
}

_SECTION_TYPES = {
    "server": ServerSettings,
    "storage": StorageSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
    "admin": AdminSettings,
    "wakeup": WakeupSettings,
}


def load(path: str) -> Settings:
    """The settings of config file `path`, token keys read from token_key_file if named."""
    return _with_key_file(_parse(path))


def _parse(path: str) -> Settings:
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, default_section="\0"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {_NO_SUCH_FILE}")
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: cannot be read: {first_line}") from None
    sections: dict[str, object] = {}
    for section in parser.sections():
        if section not in _SCHEMA:
            raise ConfigError(f"{path}: [{section}]: unknown section (known: {', '.join(_SCHEMA)})")
    for section, keys in _SCHEMA.items():
        values: dict[str, object] = {}
        if parser.has_section(section):
            for key, text in parser.items(section):
                if key not in keys:
                    raise ConfigError(f"{path}: [{section}] {key}: unknown key")
                try:
                    values[key] = keys[key](text.strip())
                except ValueError as exc:
                    raise ConfigError(f"{path}: [{section}] {key}: {exc}") from None
        sections[section] = _SECTION_TYPES[section](**values)
    settings = Settings(path=path, **sections)  # type: ignore[arg-type]
    settings = _database_beside(settings)
    _check_together(settings)
    if not settings.admin.host:
        admin = dataclasses.replace(settings.admin, host=settings.server.router_host)
        settings = dataclasses.replace(settings, admin=admin)
    return settings


_NO_SUCH_FILE = "no such file"


def _file_problem(exc: OSError | UnicodeDecodeError) -> str:
    """What is wrong with a file, in the words every message about a file uses."""
    if isinstance(exc, FileNotFoundError):
        return _NO_SUCH_FILE
    if isinstance(exc, UnicodeDecodeError):
        return "cannot be read: not text"
    return f"cannot be read: {exc.strerror or exc}"


def key_file_path(settings: Settings) -> str:
    """token_key_file, a relative one taken from the config file's directory."""
    return os.path.join(os.path.dirname(settings.path), settings.server.token_key_file)


def _with_key_file(settings: Settings) -> Settings:
    """token_key from token_key_file; an inline token_key wins, so older configs keep theirs."""
    server = settings.server
    if server.token_key or not server.token_key_file:
        return settings
    path = key_file_path(settings)
    where = f"{settings.path}: [server] token_key_file: {path}"
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        hint = f"; `simplepush genkey --fill --config {settings.path}` makes one"
        missing = isinstance(exc, FileNotFoundError)
        raise ConfigError(f"{where}: {_file_problem(exc)}{hint if missing else ''}") from None
    try:
        keys = _token_keys(",".join(text.split()))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not keys:
        raise ConfigError(f"{where}: is empty; put `simplepush genkey`'s output in it")
    return dataclasses.replace(settings, server=dataclasses.replace(server, token_key=keys))


def worker_count(server: ServerSettings) -> int:
    """`processes`, where 0 means one per CPU."""
    return server.processes or os.cpu_count() or 1


def needs_router(settings: Settings) -> bool:
    """Whether workers listen on router ports: another node may hold a device.

    memcached is shared by every node of every machine; sqlite by the
    workers of one server; a lone process (or the memory backend) has no one
    to route to, so it binds no router port.
    """
    backend = settings.storage.backend
    return backend == "memcached" or (backend == "sqlite" and worker_count(settings.server) > 1)


def _database_beside(settings: Settings) -> Settings:
    """A relative [storage] path is relative to the config file, not to the working directory."""
    storage = settings.storage
    if os.path.isabs(storage.path):
        return settings
    directory = os.path.dirname(os.path.abspath(settings.path))
    storage = dataclasses.replace(storage, path=os.path.join(directory, storage.path))
    return dataclasses.replace(settings, storage=storage)


def _check_together(settings: Settings) -> None:
    path = settings.path
    server, admin = settings.server, settings.admin
    if bool(server.ssl_certfile) != bool(server.ssl_keyfile):
        given, missing = ("ssl_certfile", "ssl_keyfile")
        if server.ssl_keyfile:
            given, missing = missing, given
        raise ConfigError(f"{path}: [server] {missing}: must be set too when {given} is")
    if server.ssl_certfile:
        try:
            tls_context(server)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{path}: [server] ssl_certfile: cannot load {server.ssl_certfile}"
                f" with {server.ssl_keyfile}:"
                f" {_NO_SUCH_FILE if isinstance(exc, FileNotFoundError) else exc.strerror or exc}"
            ) from None
    if server.processes != 1 and settings.storage.backend == "memory":
        raise ConfigError(
            f"{path}: [server] processes: the memory backend serves one process;"
            " set processes = 1 (several processes need backend = sqlite or memcached)"
        )
    if settings.storage.backend == "sqlite":
        try:
            check_path(settings.storage.path)
        except Unusable as exc:
            raise ConfigError(f"{path}: [storage] path: {exc}") from None
    stray = outside(settings.wakeup.mobile_networks, settings.wakeup.networks)
    if stray is not None:
        raise ConfigError(
            f"{path}: [wakeup] mobile_networks: {stray} is not inside [wakeup] networks"
        )
    if admin.port and admin.port == server.port:
        raise ConfigError(f"{path}: [admin] port: {admin.port} is [server] port; pick another")
    routers = range(server.router_port, server.router_port + worker_count(server))
    if admin.port in routers and needs_router(settings):
        raise ConfigError(
            f"{path}: [admin] port: {admin.port} is a worker's router port"
            f" ({routers.start} to {routers.stop - 1}); pick another"
        )


def tls_context(server: ServerSettings) -> ssl.SSLContext:
    """The public listener's TLS settings: Python's defaults for a server (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
    return context


_EMPTY_TOKEN_KEY = re.compile(r"^(token_key[ \t]*=)[ \t]*(;.*)?$", re.MULTILINE)


def ensure_token_key(path: str, key: str) -> str:
    """What install.sh runs: give the config `key` where it has none; says where, or "".

    A config naming token_key_file gets that file, created 0600 (an existing
    one is kept, whatever it holds, and then checked); an older config
    without one gets the key written into its empty token_key line.
    """
    settings = _parse(path)
    server = settings.server
    written = ""
    if server.token_key_file and not server.token_key:
        key_path = key_file_path(settings)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            why = "no such directory" if isinstance(exc, FileNotFoundError) else exc.strerror
            raise ConfigError(
                f"{path}: [server] token_key_file: {key_path}: cannot be created: {why}"
            ) from None
        else:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(key + "\n")
            written = f"wrote a new key into {key_path}"
    elif not server.token_key:
        try:
            if _fill_inline(path, key):
                written = f"wrote a new token_key into {path}"
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be written: {exc.strerror}") from None
    load(path)  # a key file that was there already must hold keys
    return written


def _fill_inline(path: str, key: str) -> bool:
    """Write key into an empty token_key line, keeping its comment; False if there is none."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    filled, count = _EMPTY_TOKEN_KEY.subn(
        lambda m: f"{m.group(1)} {key}" + (f"  {m.group(2)}" if m.group(2) else ""), text, count=1
    )
    if not count:
        return False
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(filled)
    return True
