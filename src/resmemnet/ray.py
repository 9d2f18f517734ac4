"""Score millions of images on a Ray cluster: an actor pool of scorers, fed by Ray decoding tasks on GPU clusters.

Each actor builds one `Scorer` from a `ScorerSpec` once, and decoding uses the one decoding dataset
(`DecodedImages`), so rows, error rows and scores are those of the local engine. A CPU actor decodes its own
batches in threads: a decoding task's process would import torch once per job, which costs as much CPU as
scoring a hundred photos. Inputs may be local paths, folders and globs, or URIs that pyarrow's file systems
read (`s3://`, `gs://`, `file://`).

>>> ds = ray.data.from_items([{"path": "s3://bucket/a.jpg"}, {"path": "/photos/b.png"}])
>>> scored = resmemnet.ray.score(ds, "resmemnet-small")   # + score, error, score_std columns
>>> run_ray_scoring(ScoringJob(["photos/"], output="scores.parquet"), ScorerSpec(), RayOptions(actors=4))

An actor lost mid-run (a node, a crash) is restarted and its batch retried (Ray Data's default for actor
pools: max_restarts=-1, max_task_retries=-1), so a run still writes every row once. CSV/JSONL/JSON outputs
stream through `resmemnet.jobs.run_scoring` in input order; a Parquet output (a folder, or a name ending
in .parquet) is written by the workers themselves, in no particular order, one file per block.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.block import BlockAccessor

from resmemnet.checkpoint import read_metadata
from resmemnet.data.decoded import DecodedImages
from resmemnet.data.images import ImageLoadError
from resmemnet.inference import MAX_BATCH, OnnxScorer, Prediction, ScorerSpec, checked
from resmemnet.jobs import (
    SCAN_EXTENSIONS,
    ImageScan,
    JobResult,
    ScoringJob,
    _holding,
    is_uri,
    path_key,
    run_scoring,
    scan_images,
)
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ModelConfig
from resmemnet.pretrained import resolve_checkpoint

__all__ = ["RayEngine", "RayOptions", "is_parquet_output", "run_ray_scoring", "score"]

_IMAGE = "__resmemnet_image"  # the decoded tensor, between the decoding tasks and the scoring actors
_ADDED = ("score", "error", "score_std")
_SCHEMA = pa.schema([("score", pa.float64()), ("error", pa.string()), ("score_std", pa.float64())])


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run is: the CLI's --ray-address, --actors, --gpus-per-actor and --cpus-per-actor."""

    address: str | None = None  # None: start a local Ray (or join $RAY_ADDRESS); "auto": a running cluster
    actors: int | None = None  # None: one per `gpus_per_actor` GPUs, else one per node (see `_pool`)
    gpus_per_actor: float = 0
    cpus_per_actor: float | None = None  # None: a CPU scorer takes a node's CPUs, a GPU scorer one CPU

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be positive, got {self.actors}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be 0 or more, got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")


# ---------------------------------------------------------------- URIs
@functools.cache
def _root(base: str) -> tuple[pafs.FileSystem, str]:
    """One file system per bucket or host (making an S3 one looks up its region), and the path of its root."""
    return pafs.FileSystem.from_uri(base + "/")


def _locate(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """`uri` -> its file system, its path there, and the URI of that file system's root."""
    parts = urlsplit(uri)
    base = f"{parts.scheme}://{parts.netloc}"
    fs, root = _root(base)
    return fs, f"{root.rstrip('/')}/{unquote(parts.path).lstrip('/')}", base


def _uri_of(base: str, path: str) -> str:
    """The URI of `path` on the file system of `base` (the inverse of `_locate`)."""
    return f"{base}/{quote(path[len(_root(base)[1].rstrip('/')):].lstrip('/'))}"


def _matches(path: str, pattern: str, recursive: bool) -> bool:
    """glob's rules: `*`, `?` and `[...]` stay within one path component; with `recursive`, `**/` matches any
    number of folders, none included."""
    if recursive and "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("**/", ""))
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))


def _read(path: str) -> str | bytes:
    """What `load_image` decodes: a local path itself, a URI's bytes (ImageLoadError when unreadable)."""
    if not is_uri(path):
        return path
    try:
        fs, where, _ = _locate(path)
        with fs.open_input_stream(where) as stream:
            return stream.read()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (OSError, ValueError) as exc:  # pyarrow: a folder, no access, a malformed URI
        raise ImageLoadError(path, f"cannot read ({exc})") from None


def _scan_uri(uri: str, recursive: bool, scan: ImageScan) -> list[str]:
    """A URI's images as `scan_images` finds a local source's: a folder's image-named files sorted, a glob's
    matches, a file itself (whatever it is, so that a missing one becomes an error row)."""
    fs, path, base = _locate(uri)
    folder, pattern = path, None
    if glob.has_magic(path):
        folder = path[: path.index(next(c for c in path if c in "*?["))].rpartition("/")[0] or "/"
        pattern = path
    elif fs.get_file_info(path).type != pafs.FileType.Directory:
        return [uri]
    deep = recursive or (pattern is not None and "/" in pattern[len(folder) + 1:])  # magic in a folder's name
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=deep, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and (
        _matches(i.path, pattern, recursive) if pattern else i.base_name.lower().endswith(SCAN_EXTENSIONS)))
    if not files:
        scan.warnings.append(f"no files match {uri!r}" if pattern else f"no images in {uri}")
    return [_uri_of(base, f) for f in files]


def scan_sources(sources: Iterable[str], *, recursive: bool = False) -> ImageScan:
    """`scan_images`, where sources may also be URIs."""
    sources = [str(s) for s in sources]
    if not any(map(is_uri, sources)):
        return scan_images(sources, recursive=recursive)
    scan, keys = ImageScan(), set()
    for source in sources:
        if is_uri(source):
            found = _scan_uri(source, recursive, scan)
        else:
            try:
                local = scan_images([source], recursive=recursive)
            except FileNotFoundError as exc:
                scan.warnings.append(str(exc).removeprefix("nothing to score: "))
                continue
            found = local.paths
            scan.warnings.extend(local.warnings)
        for path in found:
            if path_key(path) not in keys:
                keys.add(path_key(path))
                scan.paths.append(path)
    if not scan.paths:
        raise FileNotFoundError("nothing to score: " + "; ".join(scan.warnings))
    return scan


# ---------------------------------------------------------------- the pipeline
def _spec(model: str | ScorerSpec | None) -> ScorerSpec:
    return model if isinstance(model, ScorerSpec) else ScorerSpec(checkpoint=model)


def _model_header(spec: ScorerSpec) -> tuple[Preprocessing, bool]:
    """The preprocessing the decoding tasks apply, and whether scores come with a spread, from the model file's
    header: the driver never loads the weights."""
    if spec.backend == "onnxruntime":
        return OnnxScorer(spec.onnx, device="cpu").preprocessing, False
    meta = read_metadata(resolve_checkpoint(spec.checkpoint))
    return Preprocessing.from_dict(meta["preprocessing"]), ModelConfig.from_dict(meta["config"]).members > 1


def _decode(batch: dict[str, np.ndarray], *, column: str, preprocessing: Preprocessing,
            threads: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
    """Decode a batch's images as the local engine does, in `threads` if given (Pillow and torch release the GIL);
    a bad file gets its error and a blank tensor. A Ray task for GPU scorers, inside the actor for CPU scorers."""
    images = DecodedImages(batch[column].tolist(), preprocessing.transforms(), min_size=preprocessing.input_size,
                           reader=_read)
    items = list((threads.map if threads else map)(images.__getitem__, range(len(images))))
    blank = np.zeros((3, *preprocessing.input_size), dtype=np.float32)
    batch[_IMAGE] = np.stack([blank if item.image is None else item.image.numpy() for item in items])
    batch["error"] = np.array([item.error for item in items], dtype=object)
    return batch


class _Scoring:
    """A Ray actor: one scorer, built once, scoring batches that decoding tasks decoded, or with `decode`, decoding
    them itself in `threads` threads first."""

    def __init__(self, spec: ScorerSpec, column: str, preprocessing: Preprocessing, threads: int, decode: bool):
        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, whatever OMP_NUM_THREADS says
        self.scorer = spec.build()
        self.column = column
        self.preprocessing = preprocessing
        self.threads = ThreadPoolExecutor(threads) if decode else None  # None: decoding tasks decoded the batches
        if self.scorer.preprocessing != preprocessing:  # the driver read it from the file's header
            raise RuntimeError(f"the scorer expects {self.scorer.preprocessing}, the images were decoded with "
                               f"{preprocessing}")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.threads:
            batch = _decode(batch, column=self.column, preprocessing=self.preprocessing, threads=self.threads)
        paths, errors = batch[self.column].tolist(), batch["error"].tolist()
        good = [i for i, error in enumerate(errors) if not error]
        rows = [Prediction(str(p), None, e) for p, e in zip(paths, errors, strict=True)]
        if good:
            scores, spread = self.scorer.score_with_spread(torch.from_numpy(np.array(batch[_IMAGE][good])))
            for k, i in enumerate(good):
                std = None if spread is None else float(spread[k])
                rows[i] = checked(Prediction(rows[i].path, float(scores[k]), "", std))
        table = BlockAccessor.batch_to_block({k: v for k, v in batch.items() if k not in (_IMAGE, "error")})
        added = pa.table({"score": [r.score for r in rows], "error": [r.error for r in rows],
                          "score_std": [r.score_std for r in rows]}, schema=_SCHEMA)  # None: a null, not a NaN
        for name in _ADDED:
            table = table.append_column(name, added[name])
        return table


@dataclass(frozen=True)
class _Pool:
    actors: int
    cpus: float  # each actor's CPUs: its torch threads on a CPU


def _pool(options: RayOptions, *, spare_cpus: int) -> _Pool:
    """How many scorers, and the CPUs each holds. A CPU scorer takes every CPU of a node (of the smallest node,
    less `spare_cpus`) and runs that many torch threads, as the local engine does: one process per node pays for
    the imports and the model once, and holds one copy of the weights. `--actors N` shares the CPUs among N.
    `spare_cpus` stay free for the tasks that read a user's dataset, which could otherwise wait forever."""
    resources = ray.cluster_resources()
    cpus_total = resources.get("CPU", 0.0)
    if options.gpus_per_actor:
        have, per = resources.get("GPU", 0.0), options.gpus_per_actor
        actors = options.actors or max(1, int(have // per))
        if actors * per > have:
            raise ValueError(f"{actors} scoring actor(s) with {per:g} GPU each need {actors * per:g} GPUs; the "
                             f"Ray cluster has {have:g}; drop --gpus-per-actor to score on CPUs")
        return _Pool(actors, options.cpus_per_actor or 1.0)
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    smallest = min((c for c in node_cpus if c), default=cpus_total)
    usable = max(1.0, cpus_total - spare_cpus)
    cpus = options.cpus_per_actor or (max(1, int(usable // options.actors)) if options.actors
                                      else max(1, int(smallest - spare_cpus)))
    actors = options.actors or max(1, int(usable // cpus))
    if actors * cpus > cpus_total:
        raise ValueError(f"{actors} scoring actor(s) with {cpus:g} CPU each need {actors * cpus:g} CPUs; the Ray "
                         f"cluster has {cpus_total:g}")
    return _Pool(actors, cpus)


def _actor_pool(actors: int, *, decode: bool) -> ray.data.ActorPoolStrategy:
    """A fixed pool; an actor that decodes takes two batches at once, so that one decodes while one scores."""
    if not decode:
        return ray.data.ActorPoolStrategy(size=actors)
    return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)


def score(ds: ray.data.Dataset, model: str | ScorerSpec | None = None, *, column: str = "path",
          batch_size: int = 32, options: RayOptions | None = None) -> ray.data.Dataset:
    """`ds` with `score`, `error` and `score_std` columns added, scoring the images its `column` names.

    `model` is a checkpoint path, a bundled name (None: the bundled default) or a full `ScorerSpec`. Scoring
    runs in a pool of actors sized by `_pool`; one CPU stays free for the tasks that read `ds`. A CPU scorer
    decodes its batches itself, in threads on the CPUs it holds; for GPU scorers, Ray tasks decode (one per
    cluster CPU at a time, holding none, as the local engine's DataLoader workers do). A bad image is a row
    with an error and no score. Rows come out in any order unless `ds.context.execution_options.preserve_order`
    is set.
    """
    options = options or RayOptions()
    options.check()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    columns = ds.columns()
    if column not in columns or {*_ADDED, _IMAGE} & set(columns):
        raise ValueError(f"the dataset needs a {column!r} column of image paths or URIs and none named "
                         f"{', '.join(_ADDED)}; it has {', '.join(columns)}")
    spec = _spec(model)
    if not options.gpus_per_actor:  # an actor may use only the GPUs Ray gave it
        if spec.device.startswith("cuda"):
            raise ValueError(f"--device {spec.device} with --engine ray needs --gpus-per-actor (e.g. 1)")
        spec = replace(spec, device="cpu")
    preprocessing, _ = _model_header(spec)
    pool = _pool(options, spare_cpus=1)
    gpu = bool(options.gpus_per_actor)
    if gpu:  # the nodes' CPUs decode for the GPUs
        ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy", num_cpus=0,
                            compute=ray.data.TaskPoolStrategy(size=max(1, int(ray.cluster_resources()["CPU"]))),
                            fn_kwargs={"column": column, "preprocessing": preprocessing})
    return ds.map_batches(_Scoring, batch_size=batch_size, batch_format="numpy", num_cpus=pool.cpus,
                          num_gpus=options.gpus_per_actor or None, compute=_actor_pool(pool.actors, decode=not gpu),
                          fn_constructor_kwargs={"spec": spec, "column": column, "preprocessing": preprocessing,
                                                 "threads": max(1, int(pool.cpus)), "decode": not gpu})


def _connect(options: RayOptions) -> None:
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, logging_level="WARNING")


class RayEngine:
    """A `resmemnet.jobs.ScoringEngine` on Ray: `run_scoring` writes the rows, in input order, as it does locally."""

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        self.spec = ScorerSpec()

    def scan(self, sources: Sequence[str], *, recursive: bool) -> ImageScan:
        return scan_sources(sources, recursive=recursive)

    def start(self, spec: ScorerSpec) -> bool:
        self.options.check()
        _connect(self.options)
        # the paths are in the driver's memory, so no read task needs a CPU: every CPU can score
        pool = _pool(self.options, spare_cpus=0)
        self.options = replace(self.options, actors=pool.actors, cpus_per_actor=pool.cpus)
        self.spec = spec
        return _model_header(spec)[1]

    def dataset(self, paths: list[str], job: ScoringJob) -> ray.data.Dataset:
        """The scored dataset of `paths`, one block per batch so that every core gets work from the start."""
        size = job.batch_size or MAX_BATCH  # the driver holds no model to size batches from
        blocks = [pa.table({"path": paths[i:i + size]}) for i in range(0, len(paths), size)]
        ds = score(ray.data.from_arrow(blocks), self.spec, batch_size=size, options=self.options)
        ds.context.enable_progress_bars = False  # run_scoring shows one bar of rows written, and logs its warnings
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ds

    def score(self, paths: list[str], job: ScoringJob) -> Iterator[list[Prediction]]:
        if not paths:
            return
        ds = self.dataset(paths, job)
        ds.context.execution_options.preserve_order = True
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield [Prediction(r["path"], r["score"], r["error"], r["score_std"]) for r in batch.to_pylist()]


# ---------------------------------------------------------------- jobs
def is_parquet_output(output: str | None) -> bool:
    """A Parquet dataset (a folder of files) is written for an output that is a folder or ends with .parquet."""
    return output is not None and (output.lower().endswith(".parquet") or Path(output).is_dir())


def _parquet_done(folder: Path, log: Callable[[str], None]) -> tuple[set[str], int]:
    """Path keys and error count of the rows already in a Parquet output; a file a crash left unreadable is
    deleted (its images are scored again)."""
    done: set[str] = set()
    failed = 0
    for file in sorted(folder.glob("*.parquet")):
        try:
            table = pq.read_table(file, columns=["path", "error"])
        except (OSError, pa.ArrowInvalid) as exc:
            log(f"warning: {file} is unreadable ({exc}), likely cut short by a crash; deleting it")
            file.unlink()
            continue
        for path, error in zip(table["path"].to_pylist(), table["error"].to_pylist(), strict=True):
            done.add(path_key(path))
            failed += bool(error)
    return done, failed


def _run_parquet(job: ScoringJob, spec: ScorerSpec, options: RayOptions, log: Callable[[str], None]) -> JobResult:
    folder = Path(job.output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; a Parquet output is a folder")
    existing = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if job.resume and job.overwrite:
        raise ValueError("--resume continues the output and --overwrite replaces it; pass one of them")
    if existing and not (job.resume or job.overwrite):
        raise ValueError(f"{folder} already holds Parquet files; pass --resume to continue it, --overwrite to "
                         "replace them, or choose another --output")
    with _holding(job.output):
        engine = RayEngine(options)
        scan = engine.scan(job.sources, recursive=job.recursive)
        for warning in scan.warnings:
            log(f"warning: {warning}")
        spread = engine.start(spec)
        for file in existing if job.overwrite else []:
            file.unlink()
        done, failed_before = _parquet_done(folder, log) if job.resume else (set(), 0)
        todo = [p for p in scan.paths if path_key(p) not in done]
        if todo:
            ds = engine.dataset(todo, job)
            ds.select_columns(["path", "score", "error", *(["score_std"] if spread else [])]).write_parquet(
                str(folder.resolve()))
        failed = _parquet_done(folder, log)[1] - failed_before if todo else 0
    log(f"{len(todo) - failed} scored, {failed} failed, {len(done)} already in {folder}"
        + (f" ({failed_before} of them failed)" if failed_before else ""))
    return JobResult(len(todo) - failed, len(done), failed + failed_before)


def run_ray_scoring(job: ScoringJob, spec: ScorerSpec, options: RayOptions | None = None, *,
                    log: Callable[[str], None] | None = None) -> JobResult:
    """`resmemnet predict --engine ray`: `run_scoring`'s job on Ray, or a Parquet dataset for a Parquet output."""
    options = options or RayOptions()
    if is_parquet_output(job.output):
        return _run_parquet(job, spec, options, log or (lambda line: print(line, file=sys.stderr)))
    return run_scoring(job, spec, log=log, engine=RayEngine(options))

