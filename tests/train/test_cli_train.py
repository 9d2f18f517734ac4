"""`resmemnet train` on bad input: one line on stderr, exit code 2, and nothing half-made on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from resmemnet.cli import main
from tests.conftest import make_photo
from tests.train.conftest import TINY

RESMEMNET = str(Path(sys.executable).with_name("resmemnet"))
ONE_FROZEN_EPOCH = "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"

# (extra arguments, what the one-line message says); the README's CLI section documents each option.
BAD_INPUTS = [
    (["--set", "batch_sise=3"], "Unknown config key 'batch_sise'"),
    (["--set", "phases.0.lr_max=inf"], "phases.0.lr_max: Input should be a finite number (got inf)"),
    (["--set", "phases.99.epochs=1"], "phases has 3 entries (indices 0..2), not '99'"),
    (["--set", "batch_size.x=1"], "batch_size is a value (24), not a table or list"),
    (["--set", "batch_size=-1"], "batch_size: Input should be greater than or equal to 1"),
    (["--set", "image_size=100000"], "image_size: Input should be less than or equal to 1024"),
    (["--set", "phases.0.epochs=0", "--set", "phases.1.epochs=0", "--set", "phases.2.epochs=0"],
     "every phase has 0 epochs"),
    (["--set", "model.proj_dim=100000000"], "proj_dim must be an integer in 1..4096"),
    (["--set", "batch_size"], "must look like key=value"),
    (["--config", "missing.toml"], "Config file not found: missing.toml"),
    (["--split", "7"], "splits 0..4"),
    (["--all-splits", "--splits", "-2"], "--splits must be at least 1"),
    (["--all-splits", "--methods", ","], "--methods is empty"),
    (["--all-splits", "--methods", "svm"], "available: resmemnet, last, ridge"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(extra, message, syn_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic", "--root", str(syn_root), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # no config.json, no checkpoint: the run never started


def test_bad_config_file_is_one_line(syn_root, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"batch_size = \xff")
    assert main(["train", "--config", str(bad), "--dataset", "synthetic", "--root", str(syn_root),
                 "--output", str(tmp_path / "r")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_infinite_learning_rate_exits_nonzero_without_traceback_or_files(syn_root, tmp_path):
    """The attack of issue 13: lr_max=inf trained on NaN and wrote NaN weights and an 'Infinity' config."""
    out = tmp_path / "run"
    done = subprocess.run([RESMEMNET, "train", "--dataset", "synthetic", "--root", str(syn_root), "--output",
                           str(out), "--set", "phases.0.lr_max=inf"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "lr_max: Input should be a finite number" in done.stderr
    assert not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(tiny_split, tmp_path, monkeypatch):
    """The loss turns NaN in epoch 2: the run stops there with one line; every file it wrote is finite."""
    import torch.nn.functional as F

    from resmemnet.checkpoint import read_metadata
    from resmemnet.train.loop import TrainingDiverged, train
    from tests.train.conftest import tiny_config

    real, calls = F.mse_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 6 else loss  # 5 batches an epoch: NaN in epoch 2

    monkeypatch.setattr(F, "mse_loss", poisoned)
    config = tiny_config("phases=[{epochs=3, lr_min=1e-3, lr_max=1e-2, frozen=true}]")
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 2, step 2; .*last.safetensors holds"):
        train(config, tiny_split, tmp_path / "run")
    run = tmp_path / "run"
    assert read_metadata(run / "last.safetensors")["epoch"] == 1 and not (run / "metrics.json").exists()
    for path in run.glob("*.safetensors"):
        assert all(bool(t.isfinite().all()) for t in load_file(path).values()), path
    assert "Infinity" not in (run / "config.json").read_text()


def test_cli_trains_one_split_and_records_the_command(syn_root, tmp_path, capsys):
    from resmemnet.checkpoint import read_metadata

    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--root", str(syn_root), "--output", str(out), "--split", "1"]
    for o in [*TINY, ONE_FROZEN_EPOCH]:
        args += ["--set", o]
    assert main(args) == 0
    assert "test rho" in capsys.readouterr().out
    meta = read_metadata(out / "best.safetensors")
    assert meta["command"].startswith(f"resmemnet train --dataset synthetic --root {syn_root} --split 1 --output")
    assert "--set image_size=32" in meta["command"] and meta["config_file"] == ""


def test_a_bad_value_in_a_one_phase_list_is_reported_once(syn_root, tmp_path, capsys):
    """Issue 21.6: the right error came with a confusing second clause, "Tuple should have at least 1 item"."""
    assert main(["train", "--dataset", "synthetic", "--root", str(syn_root), "--output", str(tmp_path / "run"),
                 "--set", ONE_FROZEN_EPOCH, "--set", "phases.0.lr_max=inf"]) == 2
    assert capsys.readouterr().err == ("resmemnet train: error: Invalid config: phases.0.lr_max: Input should be a "
                                       "finite number (got inf)\n")


def test_cli_trains_from_your_own_csv(tmp_path, capsys):
    """Issue 21.7: `resmemnet train --dataset csv` could not be given the table's path."""
    from resmemnet.checkpoint import read_metadata

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(30):
        make_photo(root / f"{i}.jpg", size=(32, 32), seed=i)
    table = tmp_path / "scores.csv"
    table.write_text("path,score\n" + "".join(f"{i}.jpg,{(i * 7 % 30) / 30}\n" for i in range(30)))
    out = tmp_path / "run"
    args = ["train", "--dataset", "csv", "--csv", str(table), "--root", str(root), "--output", str(out)]
    for o in [*TINY, ONE_FROZEN_EPOCH, "val_fraction=0.25"]:
        args += ["--set", o]
    assert main(args) == 0
    assert "test rho" in capsys.readouterr().out
    assert f"--dataset csv --csv {table} --root {root}" in read_metadata(out / "best.safetensors")["command"]
