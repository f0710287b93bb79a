"""Entry points: `simplepush --config FILE` and `simplepush genkey`."""

from __future__ import annotations

import argparse
import sys

from simplepush import __version__
from simplepush.config import ConfigError, load
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
    parser.add_argument("--version", action="version", version=__version__)
    options = parser.parse_args(args)
    if options.command == "genkey":
        print(generate_key())
        return 0
    from simplepush.server import run

    try:
        settings = load(options.config)
        run(settings)
    except ConfigError as exc:
        print(f"simplepush: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
