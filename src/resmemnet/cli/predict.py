"""`resmemnet predict`: score files, folders or globs into CSV/JSONL/JSON (or a table on stdout).

Argument parsing only; the job (formats, resume, torchrun sharding) is `resmemnet.jobs.run_scoring`, and
`--engine ray` is `resmemnet.ray.run_ray_scoring` (imported only then: the local engine never needs Ray).
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
    p.add_argument("--output", "-o", help="write rows to this .csv, .jsonl or .json file (default: a table on stdout); "
                   "with --engine ray also a Parquet dataset (a folder, or a name ending in .parquet)")
    p.add_argument("--resume", action="store_true", help="skip images already in --output and append the rest")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=ScoringJob.batch_size,
                   help="images per model call (default: as many as fit 1 GiB of activations, at most 32)")
    p.add_argument("--workers", type=int, default=default_workers(), help="JPEG decoding processes")
    p.add_argument("--precision", choices=PRECISIONS, default=ScorerSpec.precision,
                   help="auto: fp16 autocast on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--backend", choices=BACKENDS, default=ScorerSpec.backend, help="onnxruntime needs --onnx")
    p.add_argument("--onnx", help="model exported by `resmemnet export --format onnx` (for --backend onnxruntime)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster long runs)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default memory format (channels_last is usually faster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    ray = p.add_argument_group("Ray engine (pip install 'resmemnet[ray]')")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="ray: decode in Ray tasks and score in a pool of Ray actors; inputs may be s3://, gs://, "
                          "file:// URIs")
    ray.add_argument("--ray-address", help="a running Ray cluster ('auto': the one this machine belongs to; default: "
                                           "start Ray here)")
    ray.add_argument("--actors", type=int, help="scoring actors (default: one per node, or per --gpus-per-actor GPUs)")
    ray.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs each scoring actor holds (default: 0)")
    ray.add_argument("--cpus-per-actor", type=float, help="CPUs (torch threads) each scoring actor holds (default: "
                                                         "a node's CPUs shared by --actors; 1 with GPUs)")
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
    if args.engine == "local":
        if args.ray_address or args.actors is not None or args.gpus_per_actor or args.cpus_per_actor is not None:
            raise ValueError("--ray-address, --actors, --gpus-per-actor and --cpus-per-actor are for --engine ray")
        return int(run_scoring(job, spec).failed > 0)
    try:
        from resmemnet.ray import RayOptions, run_ray_scoring
    except ModuleNotFoundError as exc:
        raise ValueError(f"--engine ray needs Ray ({exc}); pip install 'resmemnet[ray]'") from None
    options = RayOptions(args.ray_address, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                         cpus_per_actor=args.cpus_per_actor)
    return int(run_ray_scoring(job, spec, options).failed > 0)
