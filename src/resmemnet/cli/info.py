"""`resmemnet info`: the architecture, a checkpoint's metadata, or the bundled models and weight sources."""

from __future__ import annotations

import argparse
import json

from resmemnet.cli import COMMANDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"])
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default "
                                        "model if installed, else the default architecture, untrained)")
    p.add_argument("--backbone", help="describe this architecture instead (untrained)")
    p.add_argument("--head", help="head for --backbone")
    p.add_argument("--list", action="store_true", help="list the bundled models and weight sources with licences")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _catalogue() -> dict[str, list[dict[str, object]]]:
    from resmemnet.model.weights import get_weights, list_models, list_weights

    def entry(name: str) -> dict[str, object]:
        weights = get_weights(name)
        arch = weights.arch.to_dict() if hasattr(weights.arch, "to_dict") else weights.arch
        return {"name": name, "arch": arch, **weights.meta}

    return {"models": [entry(n) for n in list_models()], "weights": [entry(n) for n in list_weights()]}


def _print_catalogue(catalogue: dict[str, list[dict[str, object]]]) -> None:
    from resmemnet.pretrained import DEFAULT_MODEL

    for title, key in (("Bundled models (resmemnet predict --checkpoint NAME)", "models"),
                       ("Backbone weights (create_model(..., weights=NAME))", "weights")):
        print(f"{title}:")
        for item in catalogue[key]:
            arch = item["arch"]["backbone"] if isinstance(item["arch"], dict) else item["arch"] or "any torchvision"
            default = " (default)" if item["name"] == DEFAULT_MODEL else ""
            where = "offline" if item["offline"] else "downloads"
            print(f"  {item['name']}{default}: {arch}, {where}; licence: {item['licence']}")
            if "use" in item:
                held_out = item["metrics"]["lnsim_held_out_spearman"]  # type: ignore[index]
                print(f"      pick it as {item['use']} (held-out LNSIM rho {held_out})")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so `resmemnet --version` and bad arguments answer at once (and a damaged
    # --checkpoint file was refused by resmemnet.cli.main before torch loads).
    from resmemnet.checkpoint import read_metadata
    from resmemnet.inference import precision_for
    from resmemnet.model.resmemnet import create_model
    from resmemnet.pretrained import DEFAULT_MODEL, load_model, resolve_checkpoint

    if args.list:
        if args.json:
            print(json.dumps(_catalogue(), indent=2))
        else:
            _print_catalogue(_catalogue())
        return 0
    if args.backbone or args.head or (args.checkpoint is None and DEFAULT_MODEL is None):
        model = create_model(args.backbone or "resnet50", head=args.head)
        info = {**model.describe(), "checkpoint": None}
    else:
        path = resolve_checkpoint(args.checkpoint)
        metadata = read_metadata(path)  # checked before anything is built
        model = load_model(args.checkpoint)  # a bundled name also checks the file against its registration
        info = {**model.describe(), "checkpoint": str(path), "metadata": metadata}
    choice = precision_for("auto", checkpoint=args.checkpoint if info["checkpoint"] else "")  # "": no bundled model
    info["precision"] = {"name": choice.name, "reason": choice.reason}  # what `predict` would use on this machine
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key not in ("tap_names", "tap_channels", "config", "metadata", "precision"):
            print(f"{key:>14}: {value}")
    nested = []
    for key, value in (info.get("metadata") or {}).items():
        if isinstance(value, (dict, list)):
            nested.append(key)  # results tables and the like read better as JSON
        elif key not in ("weights_sha256",):
            print(f"{key:>14}: {value}")
    if nested:
        print(f"{'more':>14}: {', '.join(nested)} (resmemnet info --json)")
    print(f"{'precision':>14}: {choice.name} ({choice.reason})")
    return 0
