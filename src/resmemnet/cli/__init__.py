"""The `resmemnet` command: a thin adapter over the library, one module per subcommand.

Only the subcommand being run is imported (the others get a parser stub for `--help`), so
`resmemnet --version` and a bad argument answer in a fraction of a second rather than after
torch, torchvision and Grad-CAM have loaded. Before that import, `main` reads the header of a
`--checkpoint` file, so every command refuses a damaged or hostile file in milliseconds, before
torch loads; and it checks the pixel limit ($RESMEMNET_MAX_PIXELS) once, in this process, so that
DataLoader workers never meet a bad one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from resmemnet import __version__

# name -> help. Each module defines add_parser(subparsers), whose parser sets `func(args) -> exit code`.
COMMANDS = {
    "info": "describe the architecture or a checkpoint, or list bundled models and weights",
    "serve": "serve the web page and REST API (needs the 'serve' extra)",
    "train": "train a model (the paper's recipe by default) or cross-validate it",
    "dataset": "describe a memorability dataset folder",
    "evaluate": "evaluate a model on a memorability dataset (one split or all)",
    "predict": "score images (files, folders, globs) for memorability",
    "explain": "Grad-CAM heatmaps of what makes images memorable",
    "export": "export a checkpoint for other runtimes (ONNX)",
}
# What a user can cause and fix: printed as one line, exit code 2. OSError covers unreadable and unwritable files.
USER_ERRORS = (ValueError, OSError, RuntimeError)
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): anything else is a bug in resmemnet
DEBUG_ENV = "RESMEMNET_DEBUG"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the subcommand named in `argv` (default: sys.argv), stubs for the others.

    The top-level parser takes no option with a value, so the first word that is not an option is
    the subcommand; `argv=None` and no subcommand named give the stubs only (top-level --help).
    """
    chosen = _chosen(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="resmemnet", description="Predict, explain and train image memorability.")
    parser.add_argument("--version", action="version", version=f"resmemnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"resmemnet.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _chosen(words: Sequence[str]) -> str | None:
    return next((w for w in words if not w.startswith("-")), None)


def _check_early(words: Sequence[str]) -> None:
    """Checks before the subcommand is imported: a checkpoint file's header (before torch loads), the pixel limit."""
    from resmemnet.checkpoint import read_metadata

    given = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    given.add_argument("--checkpoint")
    try:
        checkpoint = given.parse_known_args(words)[0].checkpoint
    except argparse.ArgumentError:  # `--checkpoint` with no value: the subcommand's parser says so
        checkpoint = None
    if checkpoint and Path(checkpoint).is_file():  # bundled names are not files, and are checked when built
        read_metadata(checkpoint)
    from resmemnet.data.images import apply_max_pixels  # the resmemnet.data package imports torch

    apply_max_pixels()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: its exit code, 2 for a bad argument or input, EXIT_INTERNAL for a bug (one line each).

    RESMEMNET_DEBUG=1 lets any exception through with its traceback.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(words)
    try:
        if command in COMMANDS:
            _check_early(words)
        args = build_parser(words).parse_args(words)
        return int(args.func(args) or 0)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(exc, USER_ERRORS):  # bad checkpoint, unknown name, offline weights, unreadable file
            print(f"resmemnet {command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"resmemnet {command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(rerun with {DEBUG_ENV}=1 for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
