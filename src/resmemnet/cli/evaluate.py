"""`resmemnet evaluate`: a model's Spearman/Pearson/MSE on a dataset's test split(s), with a report folder."""

from __future__ import annotations

import argparse
import json
import sys

from resmemnet.cli import COMMANDS
from resmemnet.cli.dataset import add_dataset_arguments, dataset_options
from resmemnet.inference import ScorerSpec
from resmemnet.jobs import ScoringJob, default_workers
from resmemnet.runtime import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    add_dataset_arguments(p)
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default)")
    p.add_argument("--split", type=int, action="append",
                   help="evaluate this split (0-based; repeatable); default: every split, mean ± std")
    p.add_argument("--max-splits", type=int, help="evaluate at most this many splits (a ResNet-50 on a few CPU "
                                                  "cores scores ~25 images/s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image split where the code makes it "
                                                       "(lnsim, memcat, csv)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of images in the test set where the code makes the split (1.0: all of them)")
    p.add_argument("--batch-size", type=int, default=ScoringJob.batch_size,
                   help="images per model call (default: as many as fit 1 GiB of activations, at most 32)")
    p.add_argument("--workers", type=int, default=default_workers(), help="image-decoding processes")
    p.add_argument("--device", default=ScorerSpec.device, help="auto, cpu, cuda or cuda:N (auto: CUDA when present)")
    p.add_argument("--precision", choices=PRECISIONS, default=ScorerSpec.precision,
                   help="auto: fp16 autocast on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--report", metavar="DIR", help="write summary.md, result.json, scatter.png, top.png and "
                                                   "bottom.png here")
    p.add_argument("--json", action="store_true", help="print the full result (per-image predictions too)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resmemnet.evaluate import evaluate_splits
    from resmemnet.pretrained import load_model, resolve_checkpoint
    from resmemnet.report import summary_lines, write_report  # matplotlib

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint)
    result = evaluate_splits(model, args.dataset, args.root, splits=args.split, max_splits=args.max_splits,
                             seed=args.seed, test_fraction=args.test_fraction, batch_size=args.batch_size,
                             workers=args.workers, device=args.device, precision=args.precision,
                             progress=not args.json, **dataset_options(args))
    result["checkpoint"] = str(checkpoint)
    if args.report:
        written = write_report(result, args.report)
        print(f"report written to {written['summary'].parent}", file=sys.stderr)
    print(json.dumps(result, indent=1, default=str) if args.json else "\n".join(summary_lines(result)))
    return 0
