"""resmemnet-small's levers on validation: input side x frozen stages x human weight, each with its training time.

    nice -n 5 .venv/bin/python benchmarks/small_levers.py                  # every row below, resumable
    nice -n 5 .venv/bin/python benchmarks/small_levers.py --rows side-128 # one row

Each row is the shipped build command (`resmemnet train --config configs/resmemnet-small.toml`, no candidates)
with its overrides, in runs/levers/<row>; a stopped run goes on with --resume where it stopped. The human-weight
rows at 160 px with layer2 frozen are the build's own candidates: they are read from runs/resmemnet-small
(its candidates.md) when that build has run. The choice reads validation rho only (178 LNSIM images); the
held-out images are never read here. Training time: the epochs' own seconds in log.csv (the caches, built once
per input side and frozen stage and shared with later runs, are not counted). Writes benchmarks/small_levers.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ["--config", "configs/resmemnet-small.toml", "--dataset", "lnsim", "--root", "../shared/datasets/lnsim"]
ROWS = {
    "side-128": ["image_size=128"],
    "side-224": ["image_size=224"],
    "frozen-layer1": ["frozen_until='layer1'"],
}


def _summary(run: Path) -> dict[str, float]:
    """Best validation rho, its epoch and the summed epoch seconds of one finished run folder."""
    with open(run / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    best = max(log, key=lambda row: float(row["val_spearman"]))
    return {"val_rho": float(best["val_spearman"]), "best_epoch": int(best["epoch"]),
            "train_minutes": sum(float(row["seconds"]) for row in log) / 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--human-weight", type=float, help="default: the weight the build chose")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "small_levers.md")
    args = parser.parse_args()

    build = ROOT / "runs" / "resmemnet-small"
    chosen = json.loads((build / "config.json").read_text())  # the build's config (its candidates listed)
    table: dict[str, dict[str, float]] = {}
    weight = args.human_weight
    for candidate in chosen["candidates"]:
        run = build / "candidates" / candidate["name"]
        if (run / "metrics.json").is_file():
            table[f"160 px, layer2 frozen, {candidate['name']}"] = _summary(run)
    if weight is None:
        best = max(table, key=lambda name: table[name]["val_rho"])
        weight = float(best.rsplit("human-", 1)[1])
    for name in args.rows:
        run = ROOT / "runs" / "levers" / name
        overrides = ["candidates=[]", f"human_weight={weight}", *ROWS[name]]
        command = [str(Path(sys.executable).with_name("resmemnet")), "train", *BUILD, "--output", str(run),
                   *[word for o in overrides for word in ("--set", o)]]
        if not (run / "metrics.json").is_file():
            subprocess.run([*command, *(["--resume"] if run.exists() else [])], cwd=ROOT, check=True)
        side = next((o.split("=")[1] for o in ROWS[name] if o.startswith("image_size")), "160")
        stage = next((o.split("=")[1].strip("'") for o in ROWS[name] if o.startswith("frozen_until")), "layer2")
        table[f"{side} px, {stage} frozen, human-{weight}"] = _summary(run)

    lines = ["# resmemnet-small: the levers, on validation", "",
             f"Command: `python benchmarks/small_levers.py {' '.join(sys.argv[1:])}`", "",
             "| input side, frozen stages, human weight | validation rho (best epoch) | training minutes |",
             "|---|---|---|"]
    lines += [f"| {name} | {row['val_rho']:.4f} (epoch {row['best_epoch']}) | {row['train_minutes']:.1f} |"
              for name, row in table.items()]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
