"""`resmemnet explain`: Grad-CAM overlays (PNG), raw heatmaps (.npy) and scores (JSON sidecars), or a contact sheet.

Argument parsing only; the work is `resmemnet.explain.run_explain`.
"""

from __future__ import annotations

import argparse

from resmemnet.cli import COMMANDS
from resmemnet.cli.predict import add_model_arguments
from resmemnet.explain import ExplainJob, run_explain
from resmemnet.runtime import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help=COMMANDS["explain"])
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="look in subfolders")
    p.add_argument("--output-dir", "-o", help="write NAME.cam.png, NAME.json (and NAME.npy) here")
    p.add_argument("--layer", help="Grad-CAM target module name (default: the model's last backbone stage)")
    p.add_argument("--npy", action="store_true", help="also save each raw heatmap (H, W) float32 as .npy")
    p.add_argument("--batch-size", type=int, default=ExplainJob.batch_size)
    add_model_arguments(p)
    p.add_argument("--precision", choices=[x for x in PRECISIONS if x != "int8"], default=ExplainJob.precision,
                   help="as for predict (auto: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32); int8 has "
                        "no gradients, so explain has none")
    p.add_argument("--contact-sheet", metavar="PNG",
                   help="write the top-N and bottom-N images with their heatmaps to one PNG")
    p.add_argument("--top", type=int, default=ExplainJob.top, help="N for --contact-sheet")
    p.add_argument("--scores", metavar="FILE",
                   help="for --contact-sheet: a `resmemnet predict` output to rank by (default: score PATHs now)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    job = ExplainJob(args.paths, output_dir=args.output_dir, contact_sheet=args.contact_sheet, scores=args.scores,
                     recursive=args.recursive, layer=args.layer, npy=args.npy, top=args.top,
                     batch_size=args.batch_size, checkpoint=args.checkpoint, device=args.device,
                     precision=args.precision, progress=args.progress)
    return int(run_explain(job) > 0)
