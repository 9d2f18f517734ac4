"""A teacher model's scores as training targets: computed once, through the inference core, and resumable.

Distillation trains a small model on a large one's scores. The teacher is scored like any user's job
(`resmemnet.jobs.run_scoring`: the same decoding, preprocessing, precision and error rows), into a CSV
in the cache folder named after the teacher file's digest and the precision. Rows are flushed batch by
batch, so a stopped build loses one batch and the next run goes on where it stopped; new photos are
scored and added, photos already there are never scored again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resmemnet.inference import ScorerSpec
from resmemnet.jobs import ScoringJob, path_key, read_rows, run_scoring
from resmemnet.pretrained import resolve_checkpoint

__all__ = ["teacher_cache_file", "teacher_scores"]


def teacher_cache_file(teacher: str, cache_dir: str | Path, precision: str) -> Path:
    """The CSV that holds `teacher`'s scores at `precision`: a new teacher file gets a new CSV."""
    file = resolve_checkpoint(teacher)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"teacher-{file.stem}-{precision}-{digest}.csv"


def teacher_scores(teacher: str, paths: Sequence[str], cache_dir: str | Path, *, precision: str = "bf16",
                   batch_size: int = 16, workers: int = 2, progress: bool = False) -> np.ndarray:
    """`teacher`'s score of each of `paths` (NaN where the photo could not be read), scoring only new photos."""
    output = teacher_cache_file(teacher, cache_dir, precision)
    output.parent.mkdir(parents=True, exist_ok=True)
    known = {path_key(r.path) for r in read_rows(output)} if output.is_file() else set()
    todo = [str(p) for p in paths if path_key(p) not in known]
    if todo:
        job = ScoringJob(todo, output=str(output), resume=output.is_file(), batch_size=batch_size, workers=workers,
                         progress=progress)
        run_scoring(job, ScorerSpec(checkpoint=teacher, precision=precision))
    rows = {path_key(r.path): r for r in read_rows(output)}
    return np.array([np.nan if rows[path_key(p)].score is None else rows[path_key(p)].score for p in paths],
                    dtype=np.float32)
