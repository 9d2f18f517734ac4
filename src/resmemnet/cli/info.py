"""`resmemnet info`: the architecture, and a checkpoint's metadata."""

from __future__ import annotations

import argparse
import json

from resmemnet.checkpoint import read_metadata
from resmemnet.model.resmemnet import create_model
from resmemnet.pretrained import DEFAULT_MODEL, load_model, resolve_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe the architecture or a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default "
                                        "model if installed, else the default architecture, untrained)")
    p.add_argument("--backbone", help="describe this architecture instead (untrained)")
    p.add_argument("--head", help="head for --backbone")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.backbone or args.head or (args.checkpoint is None and DEFAULT_MODEL is None):
        model = create_model(args.backbone or "resnet50", head=args.head)
        info = {**model.describe(), "checkpoint": None}
    else:
        path = resolve_checkpoint(args.checkpoint)
        model = load_model(path)
        info = {**model.describe(), "checkpoint": str(path), "metadata": read_metadata(path)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key not in ("tap_names", "tap_channels", "config", "metadata"):
            print(f"{key:>14}: {value}")
    nested = []
    for key, value in (info.get("metadata") or {}).items():
        if isinstance(value, (dict, list)):
            nested.append(key)  # results tables and the like read better as JSON
        elif key not in ("weights_sha256",):
            print(f"{key:>14}: {value}")
    if nested:
        print(f"{'more':>14}: {', '.join(nested)} (resmemnet info --json)")
    return 0
