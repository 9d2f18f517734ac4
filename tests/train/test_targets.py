"""Distillation rows: another model's scores on extra images, rescaled to the human targets, as training rows."""

from __future__ import annotations

import numpy as np
import pytest

from resmemnet.checkpoint import read_metadata
from resmemnet.data import load_split
from resmemnet.metrics import spearman
from resmemnet.train.loop import train
from resmemnet.train.targets import distil_rows
from tests.train.conftest import tiny_config


def test_distil_rows_keep_the_ranking_on_the_targets_scale(tmp_path):
    (tmp_path / "scores.csv").write_text("path,score\na.jpg,10\nb.jpg,30\nc.jpg,20\n")
    targets = np.array([0.4, 0.6, 0.5, 0.7], dtype=np.float32)
    dataset, matched = distil_rows(tmp_path / "scores.csv", targets)
    assert [p.name for p in dataset.paths] == ["a.jpg", "b.jpg", "c.jpg"] and dataset.paths[0].parent == tmp_path
    assert matched.mean() == pytest.approx(targets.mean()) and matched.std() == pytest.approx(targets.std())
    assert spearman(matched, [10, 30, 20]) == pytest.approx(1.0)


@pytest.mark.parametrize(("text", "message"), [
    ("a.jpg,inf\nb.jpg,1\n", "line 1: score 'inf' is not a finite number"),
    ("a.jpg\n", "line 1: expected path,score"),
    ("a.jpg,1\nb.jpg,1\n", "at least two rows with different scores"),
])
def test_bad_distillation_csv_names_file_and_line(tmp_path, text, message):
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        distil_rows(tmp_path / "s.csv", np.array([0.1, 0.9]))


def test_distillation_rows_join_the_cached_training_rows(syn_root, tiny_split, tmp_path):
    extra = load_split("synthetic", syn_root / "extra", seed=5, n=12, size=32).train  # other images
    lines = [f"{p},{10 * s}" for p, s in zip(extra.paths, extra.scores, strict=True)]
    (tmp_path / "distil.csv").write_text("\n".join(lines) + "\n")
    result = train(tiny_config(f"distil_csv='{tmp_path / 'distil.csv'}'",
                               "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"),
                   tiny_split, tmp_path / "run")
    rows = len(tiny_split.train) + len(extra)
    assert f"{rows} training rows" in read_metadata(result.best_checkpoint)["training_data"]
