"""The scoring job behind `resmemnet predict`: find images, score them, stream rows to CSV/JSONL/JSON, resume, shard.

Rows are written and flushed batch by batch, so a crash loses at most the batch in flight, and a
resumed job skips the images already in its output, matched on their resolved location (the same
folder named as `photos` and `/abs/photos` is one folder). A run holds `<output>.lock` throughout, so
a second run on the same output fails at once rather than replacing the file under the first. Paths
are written as the file system holds them, also names that are not UTF-8, and a NaN or infinite
score is an error row, never a number. Under torchrun each rank scores every WORLD_SIZE-th remaining
image into a part file; rank 0 merges the parts into the output in input order. An engine finds and scores
the images (`LocalEngine`, in this process; `resmemnet.ray.RayEngine`, on a Ray cluster); the rest is shared.

>>> result = run_scoring(ScoringJob(["photos/"], output="scores.csv", recursive=True), ScorerSpec())
>>> result.failed      # error rows (bad files); the CLI exits 1 when there are any
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from os import PathLike
from pathlib import Path
from typing import Any, Protocol, TextIO

from filelock import FileLock, Timeout
from tqdm import tqdm

from resmemnet.data.images import IMAGE_EXTENSIONS
from resmemnet.fileio import atomic_write
from resmemnet.inference import Prediction, Scorer, ScorerSpec, checked, score_paths

__all__ = ["FIELDS", "OUTPUT_FORMATS", "SCAN_EXTENSIONS", "ImageScan", "JobResult", "LocalEngine", "RowWriter",
           "ScoringEngine", "ScoringJob", "default_workers", "is_uri", "output_format", "path_key", "read_rows",
           "run_scoring", "scan_images", "write_rows"]

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}
FIELDS = ("path", "score", "error")
SPREAD_FIELD = "score_std"
# Formats Pillow may not decode still get a row (an "unsupported format" error) rather than silence.
SCAN_EXTENSIONS = (*IMAGE_EXTENSIONS, ".heic", ".heif", ".avif")
# OWASP CSV injection: a spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# How output files are opened. A name that is not UTF-8 reaches Python as lone surrogates (os.fsdecode);
# surrogateescape writes them back as the file system's own bytes (JSON escapes them as \udcXX) and reads
# them back exactly, so every path the file system holds is a row, and resume finds it again.
_TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # s3://, gs://, file://...: read by an engine that reads URIs


def default_workers() -> int:
    """JPEG-decoding processes for a job: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------- finding images
@dataclass
class ImageScan:
    """The paths to score, in a stable order, and one warning line per thing that was skipped."""

    paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def is_uri(source: str | PathLike[str]) -> bool:
    """Whether `source` is a URI (`s3://bucket/key`, `file:///abs/path`) rather than a local path."""
    return _URI.match(str(source)) is not None


def path_key(path: str | PathLike[str]) -> str:
    """Where a path points, for matching: its folder resolved, its own name kept (a symlinked file stays itself).

    A URI is its own key.
    """
    if is_uri(path):
        return str(path)
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _looks_like_image(name: str) -> bool:
    return name.lower().endswith(SCAN_EXTENSIONS)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:  # dangling link, loop: not a folder, so it becomes a row
        return False


def _scan_folder(folder: str, recursive: bool, scan: ImageScan) -> list[str]:
    """Image-looking entries of `folder` (and below, following links once per real folder), sorted."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:  # a link back to a folder already scanned
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            scan.warnings.append(f"skipped folder {current}: {exc.strerror or exc}")
            continue
        for entry in entries:
            if _is_dir(entry.path):
                if recursive:
                    pending.append(entry.path)
                elif _looks_like_image(entry.name):
                    scan.warnings.append(f"skipped {entry.path}: a folder, not an image (--recursive looks inside)")
            elif _looks_like_image(entry.name):
                found.append(entry.path)  # files, dangling links and link loops alike: each gets a row
    return sorted(found)


def scan_images(sources: Iterable[str | PathLike[str]], *, recursive: bool = False) -> ImageScan:
    """Files, folders and glob patterns -> image paths, each location once, in a stable (sorted) order.

    A named file is kept whatever it is, so a missing or bad one becomes an error row. Folders give
    their entries with an image suffix (SCAN_EXTENSIONS). A source that yields nothing is a warning,
    not a stop; only when no source yields anything is it an error.
    """
    scan = ImageScan()
    keys: set[str] = set()
    for source in map(str, sources):
        if _is_dir(source):
            files = _scan_folder(source, recursive, scan)
            if not files:
                scan.warnings.append(f"no images ({', '.join(SCAN_EXTENSIONS)}) in {source}"
                                     + ("" if recursive else "; use --recursive to look in subfolders"))
        elif glob.has_magic(source):
            files = []
            for match in sorted(glob.glob(source, recursive=recursive)):
                if not _is_dir(match):
                    files.append(match)
                elif _looks_like_image(match):
                    scan.warnings.append(f"skipped {match}: a folder, not an image")
            if not files:
                scan.warnings.append(f"no files match {source!r}")
        else:
            files = [source]
        for path in files:
            key = path_key(path)
            if key not in keys:
                keys.add(key)
                scan.paths.append(path)
    if not scan.paths:
        raise FileNotFoundError("nothing to score: " + "; ".join(scan.warnings))
    return scan


# ---------------------------------------------------------------- output files
def output_format(path: str | PathLike[str]) -> str:
    """'csv', 'jsonl' or 'json' from the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"Cannot tell the output format of {path}; use one of: {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[suffix]


def _csv_escape(text: str) -> str:
    """Neutralise spreadsheet formulas with a leading quote (OWASP); a leading quote is doubled so it reads back."""
    return "'" + text if text.startswith((*_FORMULA_START, "'")) else text


def _csv_unescape(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def _shown(text: str) -> str:
    """`text` for a terminal: bytes that are not UTF-8 (os.fsdecode's surrogates) shown as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _record(row: Prediction, fields: Sequence[str]) -> dict[str, Any]:
    record = {"path": row.path, "score": row.score, "error": row.error}
    if SPREAD_FIELD in fields:
        record[SPREAD_FIELD] = row.score_std
    return record


class RowWriter:
    """Streams rows to a file (or a table on stdout), flushing after each batch.

    `fields` is FIELDS, plus `score_std` when the scorer gives a spread.
    """

    def __init__(self, stream: TextIO, fmt: str, *, fields: Sequence[str] = FIELDS, append: bool = False,
                 count: int = 0):
        """`append` continues a file that already holds `count` rows (no header then)."""
        self.stream, self.fmt, self.fields, self.count = stream, fmt, tuple(fields), count
        self._csv = csv.writer(stream)  # RFC 4180 "\r\n" lines: then a path holding \r or \n is quoted
        if append:
            return
        if fmt == "csv":
            self._csv.writerow(self.fields)
        elif fmt == "json":
            stream.write("[")
        elif fmt == "table":
            stream.write(f"{'score':>8}  " + ("   std  " if SPREAD_FIELD in self.fields else "") + "path\n")

    def write(self, rows: Iterable[Prediction]) -> None:
        for r in rows:
            if self.fmt == "csv":
                cells = [_csv_escape(r.path), "" if r.score is None else repr(r.score), _csv_escape(r.error)]
                if SPREAD_FIELD in self.fields:
                    cells.append("" if r.score_std is None else repr(r.score_std))
                self._csv.writerow(cells)
            elif self.fmt == "table":
                score = "ERROR" if r.score is None else f"{r.score:.4f}"
                spread = "" if SPREAD_FIELD not in self.fields else \
                    f"{'' if r.score_std is None else f'{r.score_std:.4f}':>6}  "
                self.stream.write(f"{score:>8}  {spread}{_shown(r.path)}{'  ' + _shown(r.error) if r.error else ''}\n")
            elif self.fmt == "jsonl":
                self.stream.write(json.dumps(_record(r, self.fields)) + "\n")
            else:  # json: one array, streamed, one row per line
                self.stream.write(("," if self.count else "") + "\n" + json.dumps(_record(r, self.fields)))
            self.count += 1
        self.stream.flush()

    def finish(self) -> None:
        """End the output (a JSON array's `]`) without closing the stream."""
        if self.fmt == "json":
            self.stream.write("\n]\n")
        self.stream.flush()

    def close(self) -> None:
        self.finish()
        if self.stream is not sys.stdout:
            self.stream.close()


def write_rows(path: str | PathLike[str], rows: Iterable[Prediction], *, fields: Sequence[str] = FIELDS) -> None:
    """Write a whole output file atomically."""
    with atomic_write(path, **_TEXT) as stream:
        writer = RowWriter(stream, output_format(path), fields=fields)
        writer.write(rows)
        writer.finish()


def _number(value: Any, where: str) -> float | None:
    if value in ("", None):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: score {value!r} is not a number") from None


def _prediction(record: dict[str, Any], where: str) -> Prediction:
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where} is not a predict output row (no {', '.join(missing)}); "
                         "pick a new --output or drop --resume")
    score = _number(record["score"], where)
    error = record["error"] or ""
    if score is None and not error:
        raise ValueError(f"{where}: a row with neither a score nor an error; delete the line or the file")
    return checked(Prediction(str(record["path"]), score, str(error), _number(record.get(SPREAD_FIELD), where)))


def _csv_records(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    stream = io.StringIO(text, newline="")
    reader = csv.reader(stream, strict=True)
    records: list[tuple[int, list[str]]] = []
    try:
        records.extend((reader.line_num, rec) for rec in reader)
    except csv.Error as exc:
        if stream.read():  # malformed in the middle; a crash can only tear the end
            raise ValueError(f"{path}, line {reader.line_num}: unreadable CSV ({exc})") from exc
    else:
        if text and not text.endswith("\n") and records:
            records.pop()  # the last row was cut short by a crash
    if not records:
        return []
    header = records[0][1]
    if not set(FIELDS) <= set(header):
        raise ValueError(f"{path} is not a predict output (needs columns {', '.join(FIELDS)}); "
                         "pick a new --output or drop --resume")
    rows = []
    for line, rec in records[1:]:
        if len(rec) != len(header):
            raise ValueError(f"{path}, line {line}: {len(rec)} cells where the header has {len(header)}")
        cells = dict(zip(header, rec, strict=True))
        cells["path"], cells["error"] = _csv_unescape(cells["path"]), _csv_unescape(cells["error"])
        rows.append((line, cells))
    return rows


def _jsonl_records(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the last line, torn by a crash
                break
            raise ValueError(f"{path}, line {number}: not a JSON row ({exc.msg}); fix or delete that line") from None
    return rows


def _json_records(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Elements of a JSON array one by one, so that an array cut short by a crash keeps its complete rows."""
    decoder, rows, line, counted = json.JSONDecoder(), [], 1, 0
    pos = len(text) - len(text.lstrip())
    if pos == len(text):
        return []
    if text[pos] != "[":
        raise ValueError(f"{path} is not a JSON array of rows; pick a new --output or drop --resume")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos == len(text) or text[pos] == "]":
            return rows
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if "\n" in text[pos:].rstrip():  # rows follow: corrupt, not torn (a JSON string holds no raw newline)
                raise ValueError(f"{path}, line {line}: not a JSON row ({exc.msg}); fix or delete it") from None
            return rows
        rows.append((line, record))


def read_rows(path: str | PathLike[str]) -> list[Prediction]:
    """Rows of a predict output file (none if it does not exist).

    A last row torn by a crash is dropped; anything malformed before it is an error naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    with path.open(**_TEXT) as f:  # newline="": a \r inside a quoted path stays a \r
        text = f.read()
    fmt = output_format(path)
    records = {"csv": _csv_records, "jsonl": _jsonl_records, "json": _json_records}[fmt](text, path)
    for _, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path} is not a predict output (rows must be objects); pick a new --output")
    return [_prediction(record, f"{path}, line {line}") for line, record in records]


# ---------------------------------------------------------------- the job
@dataclass(frozen=True)
class ScoringJob:
    """What to score and where the rows go; the defaults here are the CLI's defaults."""

    sources: Sequence[str]  # files, folders, glob patterns
    output: str | None = None  # .csv, .jsonl or .json; None: a table on stdout
    resume: bool = False
    overwrite: bool = False  # replace an existing output instead of refusing
    recursive: bool = False
    batch_size: int | None = None  # None: the scorer's, sized to its memory budget (Scorer.batch_size_for)
    workers: int = field(default_factory=default_workers)
    progress: bool = True

    def check(self) -> None:
        """Fail early, with what to do, on arguments that cannot work together."""
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if self.resume and not self.output:
            raise ValueError("--resume needs --output (the file to resume)")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the output and --overwrite replaces it; pass one of them")
        if self.output:
            output_format(self.output)
            if Path(self.output).is_dir():
                raise ValueError(f"--output {self.output} is a folder; name a .csv, .jsonl or .json file")
            if Path(self.output).exists() and not (self.resume or self.overwrite):
                raise ValueError(f"{self.output} already exists; pass --resume to continue it, --overwrite to "
                                 "replace it, or choose another --output")


@dataclass(frozen=True)
class JobResult:
    """How a job went: images scored now (successes), rows already in the output, error rows in the output
    (this run's and earlier runs'; the CLI exits 1 when there are any)."""

    scored: int
    already: int
    failed: int


class ScoringEngine(Protocol):
    """Where a job's images are found and scored. run_scoring keeps the rest of the job (lock, resume, output
    files) for every engine, so all engines write the same rows; `LocalEngine` is the default."""

    def scan(self, sources: Sequence[str], *, recursive: bool) -> ImageScan:
        """The paths to score, as `scan_images` gives them."""

    def start(self, spec: ScorerSpec) -> bool:
        """Get the scorer(s) `spec` describes ready; True when their scores come with a spread (`score_std`)."""

    def score(self, paths: list[str], job: ScoringJob) -> Iterable[list[Prediction]]:
        """Rows for `paths`, batch by batch, in input order, as `score_paths` gives them."""


class LocalEngine:
    """Scores in this process: `job.workers` DataLoader processes decode, one scorer scores."""

    scorer: Scorer

    def scan(self, sources: Sequence[str], *, recursive: bool) -> ImageScan:
        return scan_images(sources, recursive=recursive)

    def start(self, spec: ScorerSpec) -> bool:
        self.scorer = spec.build()
        return self.scorer.gives_spread

    def score(self, paths: list[str], job: ScoringJob) -> Iterable[list[Prediction]]:
        return score_paths(paths, self.scorer, batch_size=job.batch_size, workers=job.workers)


def _score_into(batches: Iterable[list[Prediction]], total: int, job: ScoringJob, writer: RowWriter,
                desc: str) -> int:
    """Write `batches` (`total` rows) to `writer`; returns the number of error rows (bad files, NaN or infinite
    scores)."""
    failed = 0
    with tqdm(total=total, unit="img", desc=desc, disable=not job.progress or None, file=sys.stderr) as bar:
        for batch in batches:
            writer.write(batch)  # a NaN or infinite score is already an error row (inference.score_paths)
            failed += sum(1 for r in batch if r.error)
            bar.update(len(batch))
    return failed


def _append_to(path: str, fields: Sequence[str], count: int) -> RowWriter:
    """A writer that continues a complete output file (a JSON array is reopened before its `]`)."""
    stream = Path(path).open("r+", **_TEXT)
    fmt = output_format(path)
    if fmt == "json":
        stream.seek(stream.read().rindex("]"))
        stream.truncate()
    else:
        stream.seek(0, io.SEEK_END)
    return RowWriter(stream, fmt, fields=fields, append=True, count=count)


@contextlib.contextmanager
def _holding(output: str | None) -> Iterator[None]:
    """Hold `<output>.lock` (an OS lock, freed even by a crash) for a whole run, when there is an output.

    Two runs on one output would each replace the file with their own rows; the second run fails at
    once instead, before it scans or loads anything.
    """
    if not output:
        yield
        return
    lock = FileLock(f"{output}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"{output} is being written by another run, which holds {lock.lock_file}; wait for "
                           "that run to finish or choose another --output") from None
    try:
        yield
    finally:
        lock.release()


def run_scoring(job: ScoringJob, spec: ScorerSpec, *, log: Callable[[str], None] | None = None,
                engine: ScoringEngine | None = None) -> JobResult:
    """Run `job` with the scorer `spec` describes, on `engine` (default: this process); warnings and the
    summary line go to `log` (stderr)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    job.check()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if engine is not None:
            raise ValueError("Under torchrun each rank scores in its own process; drop --engine")
        return _run_sharded(job, spec, world, int(os.environ["RANK"]), log)
    engine = engine or LocalEngine()
    with _holding(job.output):
        scan = engine.scan(job.sources, recursive=job.recursive)
        for warning in scan.warnings:
            log(f"warning: {warning}")
        spread = engine.start(spec)
        if not job.output:
            writer = RowWriter(sys.stdout, "table", fields=_fields(spread, []))
            failed = _score_into(engine.score(scan.paths, job), len(scan.paths), job, writer, "predict")
            writer.close()
            log(f"{len(scan.paths) - failed} scored, {failed} failed")
            return JobResult(len(scan.paths) - failed, 0, failed)
        # one row per location, also when an older run wrote one twice (the latest row wins, in its first place)
        prior = list({path_key(r.path): r for r in read_rows(job.output)}.values()) if job.resume else []
        done = {path_key(r.path) for r in prior}
        todo = [p for p in scan.paths if path_key(p) not in done]
        fields = _fields(spread, prior)
        write_rows(job.output, prior, fields=fields)  # atomically; also repairs a file torn by a crash
        writer = _append_to(job.output, fields, len(prior))
        failed = _score_into(engine.score(todo, job), len(todo), job, writer, "predict")
        writer.close()
    failed_before = sum(1 for r in prior if r.error)
    log(f"{len(todo) - failed} scored, {failed} failed, {len(prior)} already in {job.output}"
        + (f" ({failed_before} of them failed)" if failed_before else ""))
    return JobResult(len(todo) - failed, len(prior), failed + failed_before)


def _fields(spread: bool, rows: Sequence[Prediction]) -> tuple[str, ...]:
    """The output's columns: `score_std` too when the scorer gives a spread or rows already have one."""
    return (*FIELDS, SPREAD_FIELD) if spread or any(r.score_std is not None for r in rows) else FIELDS


def _part(output: str, rank: int) -> Path:
    return Path(f"{output}.rank{rank}.part.jsonl")


def _parts(output: str) -> list[Path]:
    return sorted(Path(output).parent.glob(f"{Path(output).name}.rank*.part.jsonl"))


def _merge(files: list[Path], paths: list[str]) -> list[Prediction]:
    """One row per location from `files` (later files win): known paths in input order, any others first."""
    rows: dict[str, Prediction] = {}
    for source in files:
        rows.update((path_key(r.path), r) for r in read_rows(source))
    order = {path_key(p): i for i, p in enumerate(paths)}
    return sorted(rows.values(), key=lambda r: order.get(path_key(r.path), -1))


def _run_sharded(job: ScoringJob, spec: ScorerSpec, world: int, rank: int, log: Callable[[str], None]) -> JobResult:
    import torch
    import torch.distributed as dist

    from resmemnet.runtime import resolve_device

    if not job.output:
        raise ValueError("Under torchrun, pass --output: the ranks' rows are merged into that file")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(spec.device, local_rank=local_rank)
    if device.type == "cuda":  # one GPU per rank; NCCL barriers use the current device
        torch.cuda.set_device(device)
    with _holding(job.output if rank == 0 else None):  # rank 0 writes the output, the others parts
        # Scoring a large share can take hours; the barriers must outwait the slowest rank.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(days=1))
        try:
            scan = scan_images(job.sources, recursive=job.recursive)
            if rank == 0:  # fold a crashed run's parts into the output (or drop them), so each rank starts clean
                for warning in scan.warnings:
                    log(f"warning: {warning}")
                parts = _parts(job.output)
                if job.resume:
                    merged = _merge([Path(job.output), *parts], scan.paths)
                    write_rows(job.output, merged, fields=_fields(False, merged))
                for part in parts:
                    part.unlink()
            dist.barrier()
            prior = read_rows(job.output) if job.resume else []
            done = {path_key(r.path) for r in prior}
            todo = [p for p in scan.paths if path_key(p) not in done]
            scorer = spec.build(local_rank=local_rank)
            fields = _fields(scorer.gives_spread, prior)
            writer = RowWriter(_part(job.output, rank).open("w", **_TEXT), "jsonl", fields=fields)
            mine = todo[rank::world]
            batches = score_paths(mine, scorer, batch_size=job.batch_size, workers=job.workers)
            failed = _score_into(batches, len(mine), job, writer, f"rank {rank}")
            scored = len(mine) - failed
            writer.close()
            dist.barrier()
            if rank == 0:
                parts = _parts(job.output)
                merged = _merge([Path(job.output), *parts] if job.resume else parts, scan.paths)
                write_rows(job.output, merged, fields=_fields(scorer.gives_spread, merged))
                for part in parts:
                    part.unlink()
                failed = sum(1 for r in merged if r.error)
                log(f"{len(merged)} rows from {world} ranks in {job.output}, {failed} failed")
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return JobResult(scored, len(prior), failed)
