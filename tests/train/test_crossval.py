from __future__ import annotations

import csv
import json

import pytest

from resmemnet.checkpoint import read_metadata
from resmemnet.train.crossval import run_crossval
from tests.train.conftest import tiny_config

ONE_FROZEN_EPOCH = "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"


@pytest.mark.slow
def test_crossval_table_has_every_split_and_baseline(syn_root, tmp_path):
    result = run_crossval(tiny_config(ONE_FROZEN_EPOCH), "synthetic", syn_root, tmp_path / "cv", splits=[0, 1], n=32)
    assert [(r["split"], r["method"]) for r in result.rows] == [
        (0, "resmemnet"), (0, "last"), (0, "ridge"), (1, "resmemnet"), (1, "last"), (1, "ridge")]
    assert set(result.summary) == {"resmemnet", "last", "ridge"} and result.summary["ridge"]["n"] == 2
    # the synthetic score is a colour cue a linear model on pooled features can read
    assert result.summary["ridge"]["mean"] > 0.5
    lines = (tmp_path / "cv" / "results.md").read_text().splitlines()
    assert lines[0] == "| split | ResMem-Net | last head | ridge on pooled taps |"
    assert lines[-1].startswith("| mean +- std | ") and len(lines) == 5
    assert len(list(csv.DictReader(open(tmp_path / "cv" / "results.csv")))) == 6
    assert json.loads((tmp_path / "cv" / "results.json").read_text())["splits"] == [0, 1]
    assert (tmp_path / "cv" / "split1" / "last" / "best.safetensors").is_file()


@pytest.mark.slow
def test_crossval_chooses_a_candidate_on_each_split(syn_root, tmp_path):
    config = tiny_config(ONE_FROZEN_EPOCH, 'candidates=[{name="a"}, {name="b", set=["phases.0.lr_max=1e-1"]}]')
    result = run_crossval(config, "synthetic", syn_root, tmp_path / "cv", splits=[0], methods=["resmemnet"], n=32)
    run = tmp_path / "cv" / "split0" / "resmemnet"
    chosen = read_metadata(run / "best.safetensors")
    val = {name: json.loads((run / "candidates" / name / "metrics.json").read_text())["best_val_spearman"]
           for name in ("a", "b")}
    assert chosen["chosen_candidate"] == max(val, key=val.get)
    assert result.rows[0]["spearman"] == chosen["test"]["spearman"]


def test_crossval_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="available: resmemnet, last, ridge"):
        run_crossval(tiny_config(), "synthetic", tmp_path, tmp_path / "cv", methods=["svm"])


