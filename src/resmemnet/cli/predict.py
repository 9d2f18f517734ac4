"""`resmemnet predict`: score files, folders or globs into CSV/JSONL/JSON (or a table on stdout).

Argument parsing only; the job (formats, resume, torchrun sharding) is `resmemnet.jobs.run_scoring`.
"""

from __future__ import annotations

import argparse

from resmemnet.cli import COMMANDS
from resmemnet.inference import BACKENDS, ScorerSpec
from resmemnet.jobs import ScoringJob, default_workers, run_scoring
from resmemnet.runtime import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help=COMMANDS["predict"])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="look in subfolders (and let ** match in globs)")
    p.add_argument("--output", "-o", help="write rows to this .csv, .jsonl or .json file (default: a table on stdout)")
    p.add_argument("--resume", action="store_true", help="skip images already in --output and append the rest")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=ScoringJob.batch_size)
    p.add_argument("--workers", type=int, default=default_workers(), help="JPEG decoding processes")
    p.add_argument("--precision", choices=PRECISIONS, default=ScorerSpec.precision,
                   help="auto: fp16 autocast on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--backend", choices=BACKENDS, default=ScorerSpec.backend, help="onnxruntime needs --onnx")
    p.add_argument("--onnx", help="model exported by `resmemnet export --format onnx` (for --backend onnxruntime)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster long runs)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default memory format (channels_last is usually faster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --device, shared with `explain`."""
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default model)")
    p.add_argument("--device", default=ScorerSpec.device, help="auto, cpu, cuda or cuda:N (auto: CUDA when present)")


def run(args: argparse.Namespace) -> int:
    job = ScoringJob(args.paths, output=args.output, resume=args.resume, overwrite=args.overwrite,
                     recursive=args.recursive, batch_size=args.batch_size, workers=args.workers, progress=args.progress)
    spec = ScorerSpec(args.checkpoint, backend=args.backend, onnx=args.onnx, device=args.device,
                      precision=args.precision, channels_last=args.channels_last, compile=args.compile)
    return int(run_scoring(job, spec).failed > 0)
