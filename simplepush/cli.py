"""Entry points: `simplepush --config FILE` and `simplepush genkey`."""

from __future__ import annotations

import argparse
import sys

from simplepush import __version__
from simplepush.config import ConfigError, fill_token_key, load
from simplepush.tokens import generate_key

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="simplepush",
        description="A SimplePush server. `simplepush genkey` prints a new token key.",
    )
    parser.add_argument("command", nargs="?", choices=["serve", "genkey"], default="serve")
    parser.add_argument("--config", default="config.ini", help="config file (default: config.ini)")
    parser.add_argument(
        "--fill",
        action="store_true",
        help="with genkey: write the key into --config's token_key if it is empty",
    )
    parser.add_argument("--version", action="version", version=__version__)
    options = parser.parse_args(args)
    if options.command == "genkey":
        return _genkey(options.config if options.fill else None)
    from simplepush.server import run

    try:
        settings = load(options.config)
        run(settings)
    except ConfigError as exc:
        print(f"simplepush: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _genkey(fill: str | None) -> int:
    key = generate_key()
    if fill is None:
        print(key)
        return 0
    try:
        if fill_token_key(fill, key):
            print(f"simplepush: wrote a new token_key into {fill}")
    except OSError as exc:
        print(f"simplepush: {fill}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
