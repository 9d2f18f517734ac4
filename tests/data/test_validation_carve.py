"""The one validation carve: seeded by numpy's default_rng(seed), with the results runs were made with."""

import numpy as np
import pytest

from resmemnet.data import load_split
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.train.config import load_config
from resmemnet.train.data import training_split, validation_indices
from tests.conftest import make_photo


def test_carve_keeps_its_results_for_a_seed():
    train, val = validation_indices(20, 0.25, 3)  # pinned: default_rng(3).permutation(20), first 5 held out
    assert val.tolist() == [3, 8, 12, 16, 18]
    assert train.tolist() == sorted(set(range(20)) - {3, 8, 12, 16, 18})
    assert validation_indices(10, 0.1, 0)[1].tolist() == [4, 6]  # at least 2 held out
    with pytest.raises(ValueError, match="Cannot carve a validation set of 2 from 3 training images"):
        validation_indices(3, 0.2, 0)


def test_a_split_without_validation_is_carved_and_the_carve_recorded(tmp_path):
    split = load_split("csv", tmp_path, csv=_table(tmp_path), test_fraction=0.2)
    carved, kept, held_out = training_split(split, load_config(None, ["val_fraction=0.25", "seed=7"]))
    assert carved.info["val_carved_fraction"] == 0.25 and carved.info["val_carve_seed"] == 7
    assert held_out is not None and held_out.tolist() == validation_indices(len(split.train), 0.25, 7)[1].tolist()
    assert [p.name for p in carved.val.paths] == [split.train.paths[i].name for i in held_out]
    assert [p.name for p in carved.train.paths] == [split.train.paths[i].name for i in kept]
    np.testing.assert_array_equal(carved.val.scores, split.train.scores[held_out])  # each image keeps its score
    assert carved.test is split.test


def test_a_shipped_validation_set_is_kept(tmp_path):
    paths = [tmp_path / f"{i}.jpg" for i in range(6)]
    part = lambda a, b: ImageScoreDataset(paths[a:b], np.arange(a, b) / 10)  # noqa: E731
    split = Split(train=part(0, 4), test=part(4, 5), val=part(5, 6), info={"dataset": "x"})
    carved, kept, held_out = training_split(split, load_config(None, []))
    assert held_out is None and kept.tolist() == [0, 1, 2, 3] and carved.info == {"dataset": "x"}
    assert carved.val.paths == split.val.paths and carved.val.scores.tolist() == pytest.approx([0.5])


def _table(root):
    for i in range(12):
        make_photo(root / f"p{i}.jpg", size=(8, 8), seed=i)
    (root / "s.csv").write_text("path,score\n" + "".join(f"p{i}.jpg,{i / 12}\n" for i in range(12)))
    return root / "s.csv"
