"""Choose by validation: train each of a config's candidates, keep the one with the best validation rho.

Every candidate trains on the same train/validation carve (it may not change `seed`, `val_fraction`
or `target`) and shares the one feature cache, in its own run folder <output>/candidates/<name>/.
The choice reads validation Spearman rho only; the test set is scored after it, for the record, and
never changes it. <output>/best.safetensors is the chosen candidate's file, with the candidates'
table and the chosen name in its metadata; <output>/candidates.md holds the same table.

A finished candidate (its metrics.json written) is not retrained on resume; an unfinished one
resumes from its last saved step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from resmemnet.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from resmemnet.data.base import Split
from resmemnet.fileio import atomic_write
from resmemnet.report import markdown_table
from resmemnet.train.config import TrainConfig
from resmemnet.train.finish import as_stored, record_test
from resmemnet.train.loop import train
from resmemnet.train.state import RESUME_FILE, RunResult, config_changes, read_log

__all__ = ["CANDIDATES_DIR", "choose_candidate"]

CANDIDATES_DIR = "candidates"
_HEADERS = ("candidate", "overrides", "best epoch", "validation rho", "test rho (after the choice)")


def _finished(config: TrainConfig, run_dir: Path) -> RunResult | None:
    """The result of a candidate run that already ended (metrics.json written), or None."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    saved = json.loads((run_dir / "config.json").read_text())
    changed = config_changes(saved, config)
    if changed:
        raise ValueError(f"Cannot resume {run_dir}: the candidate's config differs in {changed}. Resume with "
                         "the same config, or start a new run in another output folder.")
    metrics = json.loads(metrics_path.read_text())
    bad = run_dir / "bad_images.txt"
    return RunResult(run_dir, run_dir / "best.safetensors", run_dir / "last.safetensors", metrics["best_epoch"],
                     metrics["best_val_spearman"], metrics["test"] or {}, read_log(run_dir / "log.csv"),
                     bad.read_text().splitlines() if bad.is_file() else [])


def _test_spearman(test: dict[str, Any]) -> float:
    return test["every_subject_split"]["mean"] if "every_subject_split" in test else test["spearman"]


def choose_candidate(config: TrainConfig, split: Split, output: str | Path, *, resume: bool = False,
                     metadata: dict[str, Any] | None = None) -> RunResult:
    """Train every candidate of `config` on `split`, keep the best on validation; returns the chosen run,
    its best checkpoint copied to <output>/best.safetensors and its test metrics."""
    output = Path(output)
    if not resume and ((output / CANDIDATES_DIR).exists() or (output / RESUME_FILE).exists()):
        raise ValueError(f"{output} already holds a run; pass --resume to continue it, or choose a new output folder")
    results: dict[str, RunResult] = {}
    for candidate in config.candidates:
        candidate_config = config.for_candidate(candidate.name)
        run_dir = output / CANDIDATES_DIR / candidate.name
        done = _finished(candidate_config, run_dir) if resume else None
        results[candidate.name] = done or train(candidate_config, split, run_dir, resume=resume,
                                                metadata={**(metadata or {}), "candidate": candidate.name},
                                                test=False)
    # The choice: validation rho only (the first listed wins a tie; an undefined rho never wins).
    chosen = max(results, key=lambda name: (results[name].best_val_spearman
                                            if not math.isnan(results[name].best_val_spearman) else -math.inf))
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 records
        return dataclasses.replace(results[chosen], chosen_candidate=chosen)
    tests = {name: result.test or record_test(config.for_candidate(name), split, result.run_dir)
             for name, result in results.items()}
    table = [{"candidate": c.name, "set": list(c.set), "best_epoch": results[c.name].best_epoch,
              "val_spearman": results[c.name].best_val_spearman, "test_spearman": _test_spearman(tests[c.name])}
             for c in config.candidates]
    markdown = markdown_table(_HEADERS, [
        [f"**{row['candidate']}** (chosen)" if row["candidate"] == chosen else row["candidate"],
         ", ".join(f"`{s}`" for s in row["set"]) or "none", row["best_epoch"], f"{row['val_spearman']:.4f}",
         f"{row['test_spearman']:.4f}"] for row in table])
    with atomic_write(output / "candidates.md") as f:
        f.write(f"# Candidates of {config.name or 'this run'}\n\nChosen by validation Spearman rho: "
                f"**{chosen}**. Test rho was computed after the choice, for the record.\n\n{markdown}\n")
    best = as_stored(load_checkpoint(results[chosen].best_checkpoint), config.for_candidate(chosen))
    save_checkpoint(best, output / "best.safetensors", metadata={"chosen_candidate": chosen, "candidates": table},
                    include_backbone=read_metadata(results[chosen].best_checkpoint)["backbone_in_file"])
    with atomic_write(output / "config.json") as f:
        f.write(config.to_json())
    shutil.copyfile(results[chosen].run_dir / "metrics.json", output / "metrics.json")
    chosen_result = results[chosen]
    return RunResult(output, output / "best.safetensors", chosen_result.last_checkpoint, chosen_result.best_epoch,
                     chosen_result.best_val_spearman, tests[chosen], chosen_result.history,
                     chosen_result.bad_images, chosen_candidate=chosen)
