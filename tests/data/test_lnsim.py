"""The LNSIM loader on the real data (skips when absent) and on a small copy the test writes."""

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from resmemnet.data import describe_dataset, load_split, num_splits
from resmemnet.data.lnsim import split_half_scores
from resmemnet.metrics import spearman, split_half_consistency
from tests.conftest import make_photo, shared_dataset


def test_real_lnsim_counts_and_human_consistency():
    info = describe_dataset("lnsim", shared_dataset("lnsim"))
    assert (info["images"]["listed"], info["images"]["present"], info["images"]["absent"]) == (2632, 2231, 401)
    assert info["splits"]["count"] == 25 and info["human_consistency"]["n"] == 25
    assert info["human_consistency"]["mean"] == pytest.approx(0.78, abs=0.005)


def test_real_lnsim_split_keeps_each_image_with_its_own_score():
    root = shared_dataset("lnsim")
    split = load_split("lnsim", root, split=3, seed=1)
    hrs1 = loadmat(root / "Random_splits" / "subject_hrs1.mat")["subject_hrs1"]
    hrs2 = loadmat(root / "Random_splits" / "subject_hrs2.mat")["subject_hrs2"]
    train_ids = np.array([int(p.stem) - 1 for p in split.train.paths])
    test_ids = np.array([int(p.stem) - 1 for p in split.test.paths])
    np.testing.assert_allclose(split.train.scores, hrs1[3, train_ids], rtol=1e-6)
    np.testing.assert_allclose(split.test.scores, hrs2[3, test_ids], rtol=1e-6)
    assert len(split.train) + len(split.test) == 2231
    assert split.info["absent"]["train"] + split.info["absent"]["test"] == 401
    recorded = split.info["image_split"]
    assert (recorded["seed"], recorded["split"], recorded["test_fraction"]) == (1, 3, 0.2)
    assert set(recorded["test_indices"]) >= {i + 1 for i in test_ids}


def _tiny_lnsim(root, n=20, absent=(2, 5, 11)):
    rng = np.random.default_rng(0)
    (root / "Image_data").mkdir(parents=True)
    (root / "Random_splits").mkdir()
    for i in range(1, n + 1):
        if i not in absent:
            make_photo(root / "Image_data" / f"{i:04d}.jpg", size=(8, 8), seed=i)
    hrs1, hrs2 = rng.uniform(0, 1, (4, n)), rng.uniform(0, 1, (4, n))
    savemat(root / "Random_splits" / "subject_hrs1.mat", {"subject_hrs1": hrs1})
    savemat(root / "Random_splits" / "subject_hrs2.mat", {"subject_hrs2": hrs2})
    return hrs1, hrs2


def test_split_is_seeded_partitions_all_images_and_never_shifts_scores(tmp_path):
    hrs1, hrs2 = _tiny_lnsim(tmp_path)
    assert num_splits("lnsim", tmp_path) == 4
    a = load_split("lnsim", tmp_path, split=1, seed=7, test_fraction=0.25)
    b = load_split("lnsim", tmp_path, split=1, seed=7, test_fraction=0.25)
    c = load_split("lnsim", tmp_path, split=2, seed=7, test_fraction=0.25)
    assert a.test.paths == b.test.paths and a.test.paths != c.test.paths
    listed = a.info["image_split"]
    assert sorted(listed["train_indices"] + listed["test_indices"]) == list(range(1, 21))
    assert len(listed["test_indices"]) == 5
    for dataset, half in ((a.train, hrs1), (a.test, hrs2)):
        ids = [int(p.stem) - 1 for p in dataset.paths]
        assert not {1, 4, 10} & set(ids)  # 0002, 0005, 0011 are absent
        np.testing.assert_allclose(dataset.scores, half[1, ids], rtol=1e-6)
    assert a.info["absent"]["train"] + a.info["absent"]["test"] == 3
    usable = [int(p.stem) - 1 for p in a.test.paths]
    np.testing.assert_allclose(a.test_other_half, hrs1[1, usable])  # half 1 of the same test images
    assert split_half_consistency(a) == pytest.approx(spearman(hrs1[1, usable], hrs2[1, usable]))
    assert a.info["human_consistency"] == split_half_consistency(a)


def test_images_nobody_saw_are_unscored_and_counted(tmp_path):
    hrs1, hrs2 = _tiny_lnsim(tmp_path)
    hrs1[2, [0, 3]] = np.nan  # nobody in half 1 of subject split 2 saw images 0001 and 0004
    hrs2[2, [6, 7]] = np.nan
    savemat(tmp_path / "Random_splits" / "subject_hrs1.mat", {"subject_hrs1": hrs1})
    savemat(tmp_path / "Random_splits" / "subject_hrs2.mat", {"subject_hrs2": hrs2})
    loaded1, loaded2 = split_half_scores(tmp_path)
    np.testing.assert_array_equal(loaded1, hrs1)  # NaN stays NaN
    np.testing.assert_array_equal(loaded2, hrs2)
    split = load_split("lnsim", tmp_path, split=2, seed=0, test_fraction=0.5)
    train_ids = {i - 1 for i in split.info["image_split"]["train_indices"]}
    test_ids = {i - 1 for i in split.info["image_split"]["test_indices"]}
    assert split.info["unscored"] == {"train": len({0, 3} & train_ids), "test": len({6, 7} & test_ids)}
    assert sum(split.info["unscored"].values()) > 0
    absent = {1, 4, 10}
    assert split.info["counts"] == {"train": len(train_ids - absent - {0, 3}), "test": len(test_ids - absent - {6, 7})}
    test = [int(p.stem) - 1 for p in split.test.paths]
    both = [i for i in test if not np.isnan(hrs1[2, i])]
    assert split_half_consistency(split) == pytest.approx(spearman(hrs1[2, both], hrs2[2, both]))
    described = describe_dataset("lnsim", tmp_path)
    assert described["unscored"] == {"half1": 2, "half2": 2, "never": 0}


def test_infinite_hit_rate_is_refused_with_its_place(tmp_path):
    hrs1, _ = _tiny_lnsim(tmp_path)
    hrs1[3, 9] = np.inf
    savemat(tmp_path / "Random_splits" / "subject_hrs1.mat", {"subject_hrs1": hrs1})
    with pytest.raises(ValueError, match=r"Random_splits: subject_hrs1 has 1 infinite hit rate\(s\), first at split 4, "
                                         r"image 10"):
        load_split("lnsim", tmp_path)


def test_bad_requests_say_what_is_valid(tmp_path):
    _tiny_lnsim(tmp_path)
    with pytest.raises(ValueError, match=r"splits 0\.\.3"):
        load_split("lnsim", tmp_path, split=4)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\]"):
        load_split("lnsim", tmp_path, test_fraction=0)
    with pytest.raises(ValueError, match="Unknown dataset 'lnsm'; available: csv, lamem, lnsim, memcat, sun, synth"):
        load_split("lnsm", tmp_path)
    with pytest.raises(ValueError, match="does not take option"):
        load_split("lnsim", tmp_path, score_column="x")
    with pytest.raises(FileNotFoundError, match="Random_splits"):
        load_split("lnsim", tmp_path / "nowhere")
