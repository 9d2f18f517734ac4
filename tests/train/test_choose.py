"""Choose by validation: two candidates of a tiny config, the better validation rho kept, resumable."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from resmemnet.checkpoint import read_metadata
from resmemnet.cli import main
from resmemnet.train import choose
from resmemnet.train.config import load_config
from resmemnet.train.state import config_changes
from tests.train.conftest import TINY, tiny_config

# The first learns the synthetic cue; the second barely moves from its random start.
CANDIDATES = ('candidates=[{name="fast", set=["phases.0.lr_min=1e-3", "phases.0.lr_max=1e-2"]}, '
              '{name="still", set=["phases.0.lr_min=1e-9", "phases.0.lr_max=1e-9"]}]')
ONE_PHASE = "phases=[{epochs=2, lr_min=1e-4, lr_max=1e-3, frozen=true}]"


@pytest.mark.slow
def test_keeps_the_best_validation_candidate_records_it_and_resumes(tiny_split, tmp_path, monkeypatch):
    config = tiny_config(ONE_PHASE, "val_fraction=0.25", "cache_dir=''", "head_dtype=float16", CANDIDATES)
    result = choose.choose_candidate(config, tiny_split, tmp_path / "run")

    runs = {name: json.loads((tmp_path / "run" / "candidates" / name / "metrics.json").read_text())
            for name in ("fast", "still")}
    val = {name: m["best_val_spearman"] for name, m in runs.items()}
    chosen = max(val, key=val.get)
    assert val["fast"] != val["still"]  # the choice is between different rhos
    assert result.best_val_spearman == val[chosen] and result.best_checkpoint == tmp_path / "run" / "best.safetensors"
    # the shipped file is the chosen candidate's, tensors and storage dtype alike
    final = load_file(result.best_checkpoint)
    source = load_file(tmp_path / "run" / "candidates" / chosen / "best.safetensors")
    assert final.keys() == source.keys() and all(final[k].equal(source[k]) for k in final)
    assert final["head.fc.weight"].dtype == source["head.fc.weight"].dtype

    meta = read_metadata(result.best_checkpoint)
    assert meta["chosen_candidate"] == result.chosen_candidate == chosen and meta["candidate"] == chosen
    assert meta["train_config"] == config.for_candidate(chosen).to_dict()
    table = {row["candidate"]: row for row in meta["candidates"]}
    assert {name: row["val_spearman"] for name, row in table.items()} == val
    assert {name: row["best_epoch"] for name, row in table.items()} == {n: m["best_epoch"] for n, m in runs.items()}
    # test rho is recorded for every candidate, after the choice, in its own file
    for name, row in table.items():
        assert row["test_spearman"] == read_metadata(tmp_path / "run" / "candidates" / name /
                                                     "best.safetensors")["test_spearman"]
    assert meta["test_spearman"] == table[chosen]["test_spearman"] == result.test["spearman"]
    markdown = (tmp_path / "run" / "candidates.md").read_text()
    assert f"**{chosen}** (chosen)" in markdown and f"{val['still']:.4f}" in markdown
    assert "`phases.0.lr_max=1e-9`" in markdown

    # resume: finished candidates are not retrained; an unfinished one ends its run without training again
    (tmp_path / "run" / "candidates" / "still" / "metrics.json").unlink()
    before = load_file(tmp_path / "run" / "candidates" / "still" / "best.safetensors")
    trained = []
    real_train = choose.train
    monkeypatch.setattr(choose, "train", lambda config, split, run_dir, **kw: trained.append(run_dir.name)
                        or real_train(config, split, run_dir, **kw))
    again = choose.choose_candidate(config, tiny_split, tmp_path / "run", resume=True)
    assert trained == ["still"]
    after = load_file(tmp_path / "run" / "candidates" / "still" / "best.safetensors")
    assert all(before[k].equal(after[k]) for k in before)  # not calibrated twice
    assert read_metadata(again.best_checkpoint)["chosen_candidate"] == chosen
    assert again.best_val_spearman == result.best_val_spearman and again.test == result.test


def test_a_new_run_refuses_a_folder_that_holds_candidates(tiny_split, tmp_path):
    (tmp_path / "run" / "candidates").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        choose.choose_candidate(tiny_config(CANDIDATES), tiny_split, tmp_path / "run")


def test_a_finished_candidate_with_another_config_is_refused_on_resume(tiny_split, tmp_path):
    run_dir = tmp_path / "run" / "candidates" / "fast"
    run_dir.mkdir(parents=True)
    config = tiny_config(CANDIDATES)
    (run_dir / "config.json").write_text(config.for_candidate("still").to_json())
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"candidate's config differs in \['phases'\]"):
        choose.choose_candidate(config, tiny_split, tmp_path / "run", resume=True)


@pytest.mark.parametrize(("candidates", "message"), [
    ('[{name="a", set=["phases.0.lr_mx=1e-3"]}]', "candidate 'a': Unknown config key 'phases.0.lr_mx'"),
    ('[{name="a", set=["phases.4.epochs=1"]}]', "candidate 'a': Cannot override phases.4.epochs: phases has 3"),
    ('[{name="a", set=["batch_size=0"]}]', "candidate 'a': batch_size: Input should be greater than or equal to 1"),
    ('[{name="a", set=["val_fraction=0.5"]}]', "'val_fraction=0.5' changes val_fraction, which every candidate"),
    ('[{name="a"}, {name="a"}]', "candidates need distinct names"),
    ('[{name="../a"}]', "candidates.0.name: String should match pattern"),
    ('[{name="a", sett=[]}]', "Unknown config key 'candidates.0.sett'"),
])
def test_a_bad_candidate_is_one_line_and_nothing_starts(candidates, message, syn_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic", "--root", str(syn_root), "--output", str(out),
                 "--set", f"candidates={candidates}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_candidates_come_from_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[candidates]]\nname = "base"\n\n[[candidates]]\nname = "short"\nset = ["phases.0.epochs=1"]\n')
    config = load_config(path, TINY)
    assert [c.name for c in config.candidates] == ["base", "short"]
    assert config.for_candidate("short").phases[0].epochs == 1 and config.for_candidate("base").phases[0].epochs == 10
    assert config.for_candidate("short").candidates == ()
    with pytest.raises(ValueError, match=r"No candidate 'long'; this config has \['base', 'short'\]"):
        config.for_candidate("long")


def test_a_run_begun_before_candidates_existed_still_resumes():
    config = tiny_config()
    saved = config.to_dict()
    del saved["candidates"]  # a resume file written before the option was added
    assert config_changes(saved, config) == []
    assert config_changes(saved, tiny_config(CANDIDATES)) == ["candidates"]
