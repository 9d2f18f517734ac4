"""The SUN loader on .mat files written in the exact layout of the Isola et al. (CVPR 2011) release."""

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from resmemnet.data import describe_dataset, load_split, num_splits
from resmemnet.metrics import spearman, split_half_consistency

N_TOTAL, N_TARGETS, N_SPLITS = 2400, 2222, 25


def write_sun(root, n_train=1111):
    """Tiny 4x4 images, each filled with its own index so a test can tell which image is which."""
    rng = np.random.default_rng(0)
    img = np.zeros((4, 4, 3, N_TOTAL), dtype=np.uint8)
    img[:, :, 0, :] = np.arange(N_TOTAL) % 256
    img[:, :, 1, :] = np.arange(N_TOTAL) // 256
    (root / "Data" / "Image data").mkdir(parents=True)
    savemat(root / "Data" / "Image data" / "target_images.mat", {"img": img})
    hits = rng.integers(20, 80, N_TOTAL)
    misses = rng.integers(0, 40, N_TOTAL)
    targets = np.empty((N_TOTAL, 1), dtype=object)  # a MATLAB cell array of structs, as the release has
    for i in range(N_TOTAL):
        targets[i, 0] = {"hits": float(hits[i]), "misses": float(misses[i]), "false_alarms": 2.0,
                         "correct_rejections": 50.0, "filepath": f"img_{i + 1}.jpg"}
    (root / "Data" / "Experiment data").mkdir(parents=True)
    savemat(root / "Data" / "Experiment data" / "sorted_target_data.mat", {"sorted_target_data": targets})
    true = rng.uniform(0.3, 0.9, N_TARGETS)
    hrs1 = np.clip(true + rng.normal(0, 0.1, (N_SPLITS, N_TARGETS)), 0, 1)
    hrs2 = np.clip(true + rng.normal(0, 0.1, (N_SPLITS, N_TARGETS)), 0, 1)
    hrs2[:, 7] = np.nan  # an image nobody in half 2 saw (0/0 in MATLAB)
    orders = np.stack([rng.permutation(N_TARGETS) for _ in range(N_SPLITS)]) + 1  # 1-based
    splits = root / "Data" / "Random splits"
    splits.mkdir(parents=True)
    for name, value in {"subject_hrs1": hrs1, "subject_hrs2": hrs2,
                        "image_train_indices": orders[:, :n_train].astype(np.float64),
                        "image_test_indices": orders[:, n_train:].astype(np.float64)}.items():
        savemat(splits / f"{name}.mat", {name: value})
    return hrs1, hrs2, orders


def _index_of(path):
    pixel = np.asarray(Image.open(path))[0, 0]
    return int(pixel[0]) + 256 * int(pixel[1])


def test_sun_split_follows_the_split_half_protocol_with_1_based_indices(tmp_path):
    hrs1, hrs2, orders = write_sun(tmp_path)
    assert num_splits("sun", tmp_path) == 25
    split = load_split("sun", tmp_path, split=4, images_dir=tmp_path / "png")
    train_ids, test_ids = orders[4, :1111] - 1, orders[4, 1111:] - 1
    # train: half-1 scores of the train images; test: half-2 scores of the test images (image 8 unscored)
    assert [_index_of(p) for p in split.train.paths] == train_ids.tolist()  # order of the split file
    expected_test = [i for i in test_ids.tolist() if i != 7]
    assert [_index_of(p) for p in split.test.paths] == expected_test
    np.testing.assert_allclose(split.train.scores, hrs1[4, train_ids], rtol=1e-6)
    np.testing.assert_allclose(split.test.scores, hrs2[4, expected_test], rtol=1e-6)
    assert split.info["unscored"]["test"] == (7 in test_ids) and split.info["unscored"]["train"] == 0
    assert split.info["absent"] == {"train": 0, "test": 0}
    assert split_half_consistency(split) == pytest.approx(spearman(hrs1[4, expected_test], hrs2[4, expected_test]))
    assert split.info["human_consistency"] == split_half_consistency(split)
    assert len(list((tmp_path / "png").glob("*.png"))) == N_TARGETS  # only the targets, not the 178 fillers


def test_sun_description_and_bad_indices(tmp_path):
    hrs1, hrs2, _ = write_sun(tmp_path)
    info = describe_dataset("sun", tmp_path)
    assert info["images"]["present"] == N_TARGETS and info["splits"]["count"] == 25
    keep = np.arange(N_TARGETS) != 7  # the unscored image is left out, not counted as a tie
    expected = np.mean([spearman(hrs1[s, keep], hrs2[s, keep]) for s in range(N_SPLITS)])
    assert info["human_consistency"]["mean"] == pytest.approx(expected)
    assert (info["splits"]["train"], info["splits"]["test"]) == (1111, 1111)
    assert 0.6 < info["human_consistency"]["mean"] < 1.0 and info["human_consistency"]["n"] == 25
    assert info["hit_rate"]["n"] == N_TARGETS
    savemat(tmp_path / "Data" / "Random splits" / "image_test_indices.mat",
            {"image_test_indices": np.zeros((25, 1111))})  # 0-based by mistake
    with pytest.raises(ValueError, match="1-based"):
        load_split("sun", tmp_path, split=0)
    with pytest.raises(ValueError, match=r"splits 0\.\.24"):
        load_split("sun", tmp_path, split=25)
