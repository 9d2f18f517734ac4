"""The synthetic dataset is served by the same entry point as the real ones, with its earlier images and splits."""

import numpy as np
import pytest
from PIL import Image

from resmemnet.data import describe_dataset, load_split, num_splits


def test_synthetic_split_is_the_same_as_before_it_was_registered(tmp_path):
    assert num_splits("synthetic", tmp_path) == 5
    split = load_split("synthetic", tmp_path, split=1, seed=2, n=20, size=8)
    # pinned from the trainer's former synthetic_split(root, split=1, seed=2, n=20, size=8)
    assert [p.name for p in split.test.paths] == ["syn_2_8_0004.png", "syn_2_8_0012.png", "syn_2_8_0007.png"]
    np.testing.assert_allclose(split.test.scores, [0.6200704, 0.5028415, 0.2386026], rtol=1e-6)
    assert [p.name for p in split.val.paths] == ["syn_2_8_0010.png", "syn_2_8_0011.png", "syn_2_8_0019.png"]
    assert (len(split.train), len(split.val), len(split.test)) == (14, 3, 3)
    assert split.info["absent"] == split.info["unscored"] == {"train": 0, "val": 0, "test": 0}
    assert split.test_other_half is None


def test_each_image_shows_its_score_as_a_colour(tmp_path):
    split = load_split("synthetic", tmp_path, n=16, size=8)
    for dataset in (split.train, split.val, split.test):
        for path, score in zip(dataset.paths, dataset.scores, strict=True):
            red, _, blue = np.asarray(Image.open(path), dtype=np.float64).mean(axis=(0, 1))
            assert red == pytest.approx(255 * score, abs=12) and blue == pytest.approx(255 * (1 - score), abs=12)


def test_description_writes_nothing_and_bad_requests_are_clear(tmp_path):
    info = describe_dataset("synthetic", tmp_path / "syn", n=10)
    assert not (tmp_path / "syn").exists()
    assert (info["images"]["listed"], info["images"]["absent"], info["scores"]["n"]) == (10, 10, 10)
    load_split("synthetic", tmp_path / "syn", n=10)
    assert describe_dataset("synthetic", tmp_path / "syn", n=10)["images"]["present"] == 10
    with pytest.raises(ValueError, match=r"synthetic has splits 0\.\.4"):
        load_split("synthetic", tmp_path, split=5)
    with pytest.raises(ValueError, match="n >= 7"):
        load_split("synthetic", tmp_path, n=6)
    with pytest.raises(ValueError, match="does not take option.*images_dir; valid options: n, size"):
        load_split("synthetic", tmp_path, images_dir=tmp_path)
