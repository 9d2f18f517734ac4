from __future__ import annotations

import pytest
import torch

from resmemnet.data.base import ImageScoreDataset
from resmemnet.data.decoded import DecodedImages
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import create_model
from resmemnet.train.cache import build_feature_cache, cache_key
from resmemnet.train.data import flip_for


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8,
                        preprocessing=Preprocessing(resize=(32, 32))).eval()


def test_cache_holds_pool_taps_of_both_views(model, tiny_split, tmp_path):
    ds = tiny_split.train
    cache = build_feature_cache(model, ds, tmp_path, views=2, dtype="float32")
    assert cache.features.shape == (2, len(ds), sum(model.tap_channels))
    images = torch.stack([DecodedImages(ds.paths, model.preprocessing.transforms())[i].image for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(cache.take([0, 1, 2]), model.pool_taps(images))
        torch.testing.assert_close(cache.take([0, 1, 2], views=1), model.pool_taps(images.flip(-1)))
    assert isinstance(cache.features, __import__("numpy").memmap)


def test_cache_is_reused_and_keyed_by_what_changes_features(model, tiny_split, tmp_path):
    ds = tiny_split.train
    first = build_feature_cache(model, ds, tmp_path)
    stamp = (first.path / "features.npy").stat().st_mtime_ns
    again = build_feature_cache(model, ds, tmp_path)
    assert again.path == first.path and (again.path / "features.npy").stat().st_mtime_ns == stamp
    key = cache_key(model, ds, 1, "float16")
    fewer = ImageScoreDataset(ds.paths[:-1], ds.scores[:-1])
    assert cache_key(model, fewer, 1, "float16") != key
    assert cache_key(model, ds, 2, "float16") != key
    assert cache_key(model, ds, 1, "float16", precision="bf16") != key  # bf16 rows are not fp32 rows
    torch.manual_seed(0)
    other_head = create_model("mobilenet_v3_large", head="last", proj_dim=16, preprocessing=model.preprocessing)
    assert cache_key(other_head, ds, 1, "float16") == key  # same trunk, same features
    with torch.no_grad():
        model.backbone.net.get_parameter("features.1.block.0.0.weight").add_(1.0)  # different backbone weights
    assert cache_key(model, ds, 1, "float16") != key
    model.preprocessing = Preprocessing(resize=(40, 40))
    assert cache_key(model, ds, 1, "float16") != key
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_bad_images_are_reported_and_masked(model, tiny_split, tmp_path):
    ds = tiny_split.train
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    mixed = ImageScoreDataset([*ds.paths[:3], broken, tmp_path / "missing.jpg"], [0.1, 0.2, 0.3, 0.4, 0.5])
    cache = build_feature_cache(model, mixed, tmp_path / "c")
    assert cache.valid.tolist() == [True, True, True, False, False]
    assert len(cache.errors) == 2 and "broken.jpg" in cache.errors[0] and "missing.jpg" in cache.errors[1]


def test_flip_is_a_fixed_coin_per_seed_epoch_image():
    flips = [flip_for(0, 3, i) for i in range(400)]
    assert flips == [flip_for(0, 3, i) for i in range(400)]
    assert 150 < sum(flips) < 250
    assert flips != [flip_for(0, 4, i) for i in range(400)]


def test_rows_are_the_scorers_own_pass_at_the_runs_precision_and_leave_the_model_as_it_was(model, tiny_split,
                                                                                            tmp_path):
    from resmemnet.inference import TorchScorer
    from resmemnet.runtime import PrecisionChoice

    ds = tiny_split.train
    images = torch.stack([DecodedImages(ds.paths, model.preprocessing.transforms())[i].image for i in range(3)])
    model.train()
    try:
        bf16 = build_feature_cache(model, ds, tmp_path, dtype="float32", precision=PrecisionChoice("bf16", "test"))
        start = 3  # trunk rows: taps[:3] pooled, plus the third tap's map
        trunk = build_feature_cache(model, ds, tmp_path, dtype="float32", start=start)
        assert model.training and model.backbone.training  # scored in eval mode, handed back in training mode
    finally:
        model.eval()
    scorer = TorchScorer(model, device="cpu", precision="bf16", channels_last=False)
    torch.testing.assert_close(bf16.take([0, 1, 2]), scorer.pool(images).float(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(trunk.take([0, 1, 2]), model.trunk_rows(images, start))
    assert bf16.path != trunk.path and not torch.equal(bf16.take([0]), model.pool_taps(images[:1]))
