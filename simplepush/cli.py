"""Entry points: `simplepush [serve] --config FILE` and `simplepush genkey [--fill]`."""

from __future__ import annotations

import argparse
import sys

from simplepush import __version__
from simplepush.config import ConfigError, ensure_token_key, load
from simplepush.tokens import generate_key

EXIT_CONFIG = 2
DEFAULT_CONFIG = "config.ini"
CONFIG_HELP = f"the config file (default: {DEFAULT_CONFIG})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simplepush",
        usage="%(prog)s [-h] [--version] [serve | genkey [--fill]] [--config FILE]",
        description="A push server for WebPush and SimplePush devices, on one WebSocket port."
        " Without a command it serves.",
    )
    # SUPPRESS: given before or after the command, and absent when not given at all.
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server in the foreground until SIGTERM or Ctrl-C (the default)",
        description="Run the server in the foreground: devices and app servers on [server]"
        " port, the dashboard on [admin] port. SIGTERM or Ctrl-C closes every device socket"
        " with 1001 and exits 0; a bad config prints one line and exits 2.",
    )
    serve.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    genkey = commands.add_parser(
        "genkey",
        help="print a new token key; with --fill, give the config a key if it has none",
        description="Print a new token key (for token_key or token_key_file). With --fill,"
        " what install.sh runs: create the config's token_key_file (mode 0600) if it is"
        " missing, or, in a config without token_key_file, write the key into its empty"
        " token_key; a config that has a key keeps it.",
    )
    genkey.add_argument(
        "--fill", action="store_true", help="give --config a key instead of printing one"
    )
    genkey.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = getattr(options, "config", None)
    try:
        if options.command == "genkey":
            if config is not None and not options.fill:
                parser.error("genkey reads --config only with --fill")
            return _genkey((config or DEFAULT_CONFIG) if options.fill else None)
        from simplepush.server import run

        run(load(config or DEFAULT_CONFIG))
    except ConfigError as exc:
        print(f"simplepush: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _genkey(fill: str | None) -> int:
    key = generate_key()
    if fill is None:
        print(key)
        return 0
    written = ensure_token_key(fill, key)
    if written:
        print(f"simplepush: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
