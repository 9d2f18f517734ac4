"""`resmemnet predict`: score files, folders or globs into CSV/JSONL/JSON (or a table on stdout).

Rows are written and flushed batch by batch, so a crash loses at most the batch in flight, and
`--resume` skips paths already in the output. Under torchrun each rank scores every WORLD_SIZE-th
remaining image into its own part file; rank 0 merges the parts into the output in input order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from resmemnet.predict import PRECISIONS, Prediction, Scorer, TorchScorer, find_images, iter_batches, resolve_device
from resmemnet.pretrained import load_model

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}
BACKENDS = ("torch", "onnxruntime")
FIELDS = ("path", "score", "error")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score images (files, folders, globs) for memorability")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="look in subfolders (and let ** match in globs)")
    p.add_argument("--output", "-o", help="write rows to this .csv, .jsonl or .json file (default: a table on stdout)")
    p.add_argument("--resume", action="store_true", help="skip images already in --output and append the rest")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="JPEG decoding processes")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: fp16 autocast on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="onnxruntime needs --onnx")
    p.add_argument("--onnx", help="model exported by `resmemnet export --format onnx` (for --backend onnxruntime)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster long runs)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default memory format (channels_last is usually faster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --device, shared with `explain`."""
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: CUDA when present)")


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"Cannot tell the output format of {path}; use one of: {', '.join(FORMATS)}")
    return FORMATS[suffix]


def read_rows(path: str | Path) -> list[Prediction]:
    """Rows of a predict output file; a torn last line or an unclosed JSON array (a crash) is tolerated."""
    path = Path(path)
    if not path.exists():
        return []
    fmt, text = output_format(path), path.read_text(encoding="utf-8")
    if fmt == "csv":
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        records: Iterable[dict] = csv.DictReader(io.StringIO(text))
    elif fmt == "jsonl":
        lines = text.split("\n")
        records = [json.loads(line) for line in (lines[:-1] if not text.endswith("\n") else lines) if line.strip()]
    else:
        records = _read_json_array(text, path)
    rows = []
    for r in records:
        if set(FIELDS) - set(r):
            raise ValueError(f"{path} is not a predict output (needs columns {', '.join(FIELDS)}); "
                             "pick a new --output or drop --resume")
        rows.append(Prediction(str(r["path"]), float(r["score"]) if r["score"] not in ("", None) else None,
                               r["error"] or ""))
    return rows


def _read_json_array(text: str, path: Path) -> list[dict]:
    body = text.strip()
    if not body:
        return []
    if not body.endswith("]"):  # streamed array cut short: keep the complete rows
        body = body[:body.rfind("}") + 1] + "]" if "}" in body else "[]"
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a readable JSON array of rows ({exc})") from exc


class RowWriter:
    """Streams rows to a file (or a table on stdout), flushing after each batch."""

    def __init__(self, stream: TextIO, fmt: str, *, append: bool = False, count: int = 0):
        """`append` continues a file that already holds `count` rows (no header then)."""
        self.stream, self.fmt, self.count = stream, fmt, count
        self._csv = csv.writer(stream, lineterminator="\n")
        if append:
            return
        if fmt == "csv":
            self._csv.writerow(FIELDS)
        elif fmt == "json":
            stream.write("[")
        elif fmt == "table":
            stream.write(f"{'score':>8}  path\n")

    def write(self, rows: Iterable[Prediction]) -> None:
        for r in rows:
            if self.fmt == "csv":
                self._csv.writerow((r.path, "" if r.score is None else repr(r.score), r.error))
            elif self.fmt == "table":
                score = "ERROR" if r.score is None else f"{r.score:.4f}"
                self.stream.write(f"{score:>8}  {r.path}{'  ' + r.error if r.error else ''}\n")
            elif self.fmt == "jsonl":
                self.stream.write(json.dumps({"path": r.path, "score": r.score, "error": r.error}) + "\n")
            else:  # json: one array, streamed
                record = json.dumps({"path": r.path, "score": r.score, "error": r.error})
                self.stream.write(("," if self.count else "") + "\n" + record)
            self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n")
        self.stream.flush()
        if self.stream is not sys.stdout:
            self.stream.close()


def write_rows(path: str | Path, rows: Iterable[Prediction]) -> None:
    """Write a whole output file atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = RowWriter(tmp.open("w", encoding="utf-8", newline=""), output_format(path))
    writer.write(rows)
    writer.close()
    os.replace(tmp, path)


def _build_scorer(args: argparse.Namespace, device: str) -> Scorer:
    if args.backend == "onnxruntime":
        if not args.onnx:
            raise ValueError("--backend onnxruntime needs --onnx MODEL.onnx (make one with `resmemnet export "
                             "--format onnx --output MODEL.onnx`)")
        from resmemnet.export import OnnxScorer

        return OnnxScorer(args.onnx, device=device)
    return TorchScorer(load_model(args.checkpoint), device=device, precision=args.precision,
                       channels_last=args.channels_last, compile=args.compile)


def _score(paths: list[str], scorer: Scorer, args: argparse.Namespace, writer: RowWriter, desc: str) -> int:
    """Score `paths` into `writer`; returns the number of error rows."""
    failed = 0
    with tqdm(total=len(paths), unit="img", desc=desc, disable=not args.progress or None, file=sys.stderr) as bar:
        for rows in iter_batches(paths, scorer, batch_size=args.batch_size, workers=args.workers):
            writer.write(rows)
            failed += sum(1 for r in rows if r.error)
            bar.update(len(rows))
    return failed


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.resume and not args.output:
        raise ValueError("--resume needs --output (the file to resume)")
    if args.output:
        output_format(args.output)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return _run_sharded(args, world, int(os.environ["RANK"]))
    paths = find_images(args.paths, recursive=args.recursive)
    scorer = _build_scorer(args, args.device)
    if not args.output:
        writer = RowWriter(sys.stdout, "table")
        failed = _score(paths, scorer, args, writer, "predict")
        writer.close()
        return int(failed > 0)
    prior = read_rows(args.output) if args.resume else []
    done = {r.path for r in prior}
    todo = [p for p in paths if p not in done]
    write_rows(args.output, prior)  # atomically; also repairs a file torn by a crash
    writer = _append_to(args.output, len(prior))
    failed = _score(todo, scorer, args, writer, "predict")
    writer.close()
    failed += sum(1 for r in prior if r.error)
    print(f"{len(todo)} scored, {len(prior)} already in {args.output}, {failed} failed", file=sys.stderr)
    return int(failed > 0)


def _append_to(path: str | Path, count: int) -> RowWriter:
    """A writer that continues a complete output file (a JSON array is reopened before its `]`)."""
    stream = Path(path).open("r+", encoding="utf-8", newline="")
    fmt = output_format(path)
    if fmt == "json":
        stream.seek(stream.read().rindex("]"))
        stream.truncate()
    else:
        stream.seek(0, io.SEEK_END)
    return RowWriter(stream, fmt, append=True, count=count)


def _part(output: str, rank: int) -> Path:
    return Path(f"{output}.rank{rank}.part.jsonl")


def _parts(output: str) -> list[Path]:
    return sorted(Path(output).parent.glob(f"{Path(output).name}.rank*.part.jsonl"))


def _merge(files: list[Path], paths: list[str]) -> list[Prediction]:
    """One row per path from `files` (later files win): known paths in input order, any others first."""
    rows: dict[str, Prediction] = {}
    for source in files:
        rows.update((r.path, r) for r in read_rows(source))
    order = {p: i for i, p in enumerate(paths)}
    return sorted(rows.values(), key=lambda r: order.get(r.path, -1))


def _run_sharded(args: argparse.Namespace, world: int, rank: int) -> int:
    import torch
    import torch.distributed as dist

    if not args.output:
        raise ValueError("Under torchrun, pass --output: the ranks' rows are merged into that file")
    device = resolve_device(args.device)
    if device.type == "cuda":  # one GPU per rank; NCCL barriers use the current device
        device = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(device)
    # Scoring a large share can take hours; the barriers must outwait the slowest rank.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(days=1))
    try:
        paths = find_images(args.paths, recursive=args.recursive)
        if rank == 0:  # fold a crashed run's parts into the output (or drop them), so each rank starts clean
            parts = _parts(args.output)
            if args.resume:
                write_rows(args.output, _merge([Path(args.output), *parts], paths))
            for part in parts:
                part.unlink()
        dist.barrier()
        done = {r.path for r in read_rows(args.output)} if args.resume else set()
        share = [p for p in paths if p not in done][rank::world]
        writer = RowWriter(_part(args.output, rank).open("w", encoding="utf-8"), "jsonl")
        failed = _score(share, _build_scorer(args, str(device)), args, writer, f"rank {rank}")
        writer.close()
        dist.barrier()
        if rank == 0:
            parts = _parts(args.output)
            merged = _merge([Path(args.output), *parts] if args.resume else parts, paths)
            write_rows(args.output, merged)
            for part in parts:
                part.unlink()
            failed = sum(1 for r in merged if r.error)
            print(f"{len(merged)} rows from {world} ranks in {args.output}, {failed} failed", file=sys.stderr)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return int(failed > 0)

