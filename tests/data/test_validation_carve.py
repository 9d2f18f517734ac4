"""The one validation carve: seeded by numpy's default_rng(seed), with the results runs were made with."""

import numpy as np
import pytest

from resmemnet.data import load_split
from resmemnet.data.base import ImageScoreDataset
from resmemnet.train.data import carve_validation, validation_indices, with_validation
from tests.conftest import make_photo


def test_carve_keeps_its_results_for_a_seed():
    train, val = validation_indices(20, 0.25, 3)  # pinned: default_rng(3).permutation(20), first 5 held out
    assert val.tolist() == [3, 8, 12, 16, 18]
    assert train.tolist() == sorted(set(range(20)) - {3, 8, 12, 16, 18})
    assert validation_indices(10, 0.1, 0)[1].tolist() == [4, 6]  # at least 2 held out


def test_carved_images_keep_their_scores_and_transform(tmp_path):
    paths = [tmp_path / f"{i}.jpg" for i in range(10)]
    data = ImageScoreDataset(paths, np.arange(10) / 10, transform=str)
    train, val = carve_validation(data, 0.2, 0)
    assert [p.name for p in val.paths] == ["4.jpg", "6.jpg"] and val.scores.tolist() == pytest.approx([0.4, 0.6])
    assert len(train) == 8 and train.transform is str and val.transform is str
    with pytest.raises(ValueError, match="Cannot carve a validation set of 2 from 3 training images"):
        carve_validation(ImageScoreDataset(paths[:3], [0.1, 0.2, 0.3]), 0.2, 0)


def test_with_validation_records_the_carve(tmp_path):
    split = load_split("csv", tmp_path, csv=_table(tmp_path), test_fraction=0.2)
    carved = with_validation(split, 0.25, 7)
    assert carved.info["val_carved_fraction"] == 0.25 and carved.info["val_carve_seed"] == 7
    assert sorted(p.name for p in carved.train.paths + carved.val.paths) == sorted(p.name for p in split.train.paths)


def _table(root):
    for i in range(12):
        make_photo(root / f"p{i}.jpg", size=(8, 8), seed=i)
    (root / "s.csv").write_text("path,score\n" + "".join(f"p{i}.jpg,{i / 12}\n" for i in range(12)))
    return root / "s.csv"
