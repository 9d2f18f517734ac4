"""The `resmemnet` command: a thin adapter over the library, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from resmemnet import __version__

# Each module defines add_parser(subparsers), whose parser sets `func(args) -> exit code`.
COMMANDS = ("info", "serve", "train", "dataset", "evaluate", "predict", "explain", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resmemnet", description="Predict, explain and train image memorability.")
    parser.add_argument("--version", action="version", version=f"resmemnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"resmemnet.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # User-facing errors (bad checkpoint, unknown name, offline weights) print as one line.
        print(f"resmemnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
