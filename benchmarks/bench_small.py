"""resmemnet-small next to resmem and its teacher resmemnet-large, on the same images, in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_small.py                      # the bundled resmemnet-small
    nice -n 5 .venv/bin/python benchmarks/bench_small.py --small runs/resmemnet-small/best.safetensors

Held-out images: the 447 test images of `load_split("lnsim", root, split=0, seed=0)`, fixed before any
training (every bundled model's config trains on the rest). Metric: the mean over LNSIM's 25 subject splits
of Spearman(prediction, half-2 score). Every model is scored as `resmemnet predict` runs it (the inference
core, precision `auto`); resmem with its own network and transform.

Out of domain: Spearman agreement of resmemnet-small with resmemnet-large on the photos its build never
trained on: the odd-numbered halves of imagenet-sample and of bsds500 + osie (its config distils on the even
halves, `distil_stride = 2`), and with resmem there. Writes --output (Markdown) and --json.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from bench_large import DATASETS, held_out_parser, held_out_table, model_scores, resmem_scores


def main() -> int:
    parser = held_out_parser(__doc__, "small")
    parser.add_argument("--small", default="resmemnet-small", help="bundled name or checkpoint path")
    parser.add_argument("--int8", type=Path, help="also score the held-out images with this int8 ONNX file "
                                                   "(bench_int8.py --keep DIR writes one)")
    args = parser.parse_args()

    from resmemnet.data import load_split
    from resmemnet.jobs import scan_images
    from resmemnet.metrics import spearman
    from resmemnet.train.targets import subject_split_test

    split = load_split("lnsim", args.lnsim, split=0, seed=0)
    test = [str(p) for p in split.test.paths]
    t0 = time.perf_counter()
    held_out = {"resmem 1.1.6 (zero-shot)": resmem_scores(test, args.workers),
                "resmemnet-large (teacher)": model_scores("resmemnet-large", test, args.workers)[0],
                "resmemnet-small": model_scores(args.small, test, args.workers)[0]}
    if args.int8:
        from resmemnet.inference import ScorerSpec, score_paths

        scorer = ScorerSpec(backend="onnxruntime", onnx=str(args.int8)).build()
        rows = [r for batch in score_paths(test, scorer, batch_size=16, workers=args.workers) for r in batch]
        held_out["resmemnet-small, int8 (ONNX Runtime)"] = np.array([r.score for r in rows], dtype=float)
    rho = {name: subject_split_test(split.info, test, pred) for name, pred in held_out.items()}

    ood = {}
    sets = {"imagenet-sample, odd half": [DATASETS / "imagenet-sample"],
            "bsds500 + osie, odd half": [DATASETS / "bsds500", DATASETS / "osie"]}
    for name, folders in sets.items():
        paths = [str(p) for p in scan_images(folders, recursive=True).paths[1::2]]
        paths = paths[:args.ood_limit] if args.ood_limit else paths
        small = model_scores(args.small, paths, args.workers)[0]
        ood[name] = {"photos": len(paths),
                     "agreement_with_large": spearman(small, model_scores("resmemnet-large", paths, args.workers)[0]),
                     "agreement_with_resmem": spearman(small, resmem_scores(paths, args.workers))}
    seconds = time.perf_counter() - t0

    command = ("python benchmarks/bench_small.py " + shlex.join(sys.argv[1:])).strip()
    result = {"command": command, "small": args.small, "held_out_images": len(test), "held_out": rho,
              "out_of_domain": ood, "seconds": seconds}
    args.json.write_text(json.dumps(result, indent=2, default=float))
    lines = ["# resmemnet-small on held-out LNSIM images and out of domain", "",
             f"Command: `{command}` ({seconds / 60:.0f} min on this machine). Held-out: the {len(test)} test images "
             "of LNSIM split 0 (seed 0), fixed before training; rho = mean +- std over the 25 subject splits of "
             "Spearman(prediction, half-2 score).", "", *held_out_table(rho)]
    lines += ["", "| out of domain (never trained on) | photos | Spearman with resmemnet-large | "
              "Spearman with resmem |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['photos']} | {v['agreement_with_large']:.3f} | {v['agreement_with_resmem']:.3f} |"
              for k, v in ood.items()]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
