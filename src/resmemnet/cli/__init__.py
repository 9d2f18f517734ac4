"""The `resmemnet` command: a thin adapter over the library, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from resmemnet import __version__

# Each module defines add_parser(subparsers), whose parser sets `func(args) -> exit code`.
COMMANDS = ("info", "serve", "train", "dataset", "evaluate", "predict", "explain", "export")
# What a user can cause and fix: printed as one line, exit code 2. OSError covers unreadable and unwritable files.
USER_ERRORS = (ValueError, OSError, RuntimeError)
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): anything else is a bug in resmemnet
DEBUG_ENV = "RESMEMNET_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resmemnet", description="Predict, explain and train image memorability.")
    parser.add_argument("--version", action="version", version=f"resmemnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"resmemnet.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: its exit code, 2 for a bad argument or input, EXIT_INTERNAL for a bug (one line each).

    RESMEMNET_DEBUG=1 lets any exception through with its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(exc, USER_ERRORS):  # bad checkpoint, unknown name, offline weights, unreadable file
            print(f"resmemnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"resmemnet {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(rerun with {DEBUG_ENV}=1 for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
