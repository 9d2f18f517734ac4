"""Standardise-and-fold and calibration: exact folds, so a checkpoint scores raw taps on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resmemnet.model.resmemnet import create_model
from resmemnet.train.cache import CachedRows, FeatureCache
from resmemnet.train.head import Standardiser, calibrate, folded


def _cache(tmp_path, features: np.ndarray, valid: np.ndarray | None = None) -> FeatureCache:
    valid = np.ones(features.shape[1], bool) if valid is None else valid
    return FeatureCache(tmp_path, features, valid, [])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8).eval()


def test_folded_model_on_raw_taps_equals_trained_model_on_standardised_taps(model, tmp_path):
    dim = sum(model.tap_channels)
    rng = np.random.default_rng(0)
    raw = (rng.normal(3.0, 1.0, (1, 40, dim)) * rng.uniform(0.01, 100, dim)).astype(np.float32)
    std = Standardiser.fit(CachedRows.of(_cache(tmp_path, raw)))
    x = torch.from_numpy(raw[0])
    torch.testing.assert_close(std(x).mean(0), torch.zeros(dim), atol=1e-4, rtol=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.forward_pooled(std(x))
        with folded(model, std):
            got = model.forward_pooled(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for name, value in model.state_dict().items():  # the trained weights come back bit for bit
        assert torch.equal(value, before[name]), name


def test_standardiser_uses_only_valid_rows_of_the_chosen_positions(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
    valid = np.array([True, True, False, True, True, True])
    rows = CachedRows.of(_cache(tmp_path, feats, valid), np.array([0, 2, 4]))  # row 2 failed to load
    std = Standardiser.fit(rows)
    torch.testing.assert_close(std.mean, torch.tensor([4.0, 5.0]))  # mean of rows 0 and 4


def test_cached_rows_address_several_caches_in_order(tmp_path):
    a = _cache(tmp_path, np.arange(8, dtype=np.float32).reshape(1, 4, 2))
    b = _cache(tmp_path, 100 + np.arange(6, dtype=np.float32).reshape(1, 3, 2))
    rows = CachedRows.of(a, np.array([3, 1])).plus(CachedRows.of(b))
    assert len(rows) == 5 and rows.valid.all()
    assert rows.take([4, 0, 2]).tolist() == [[104.0, 105.0], [6.0, 7.0], [100.0, 101.0]]


def test_calibration_recovers_a_known_sigmoid_and_keeps_the_ranking(model):
    torch.manual_seed(1)
    pooled = torch.randn(64, sum(model.tap_channels))
    with torch.no_grad():
        raw = model.forward_pooled(pooled).numpy()
    logit = np.log(raw / (1 - raw))
    target = 1 / (1 + np.exp(-(2.5 * logit - 0.4)))
    fit = calibrate(model, raw, target)
    assert fit["slope"] == pytest.approx(2.5, rel=1e-3) and fit["intercept"] == pytest.approx(-0.4, abs=1e-3)
    with torch.no_grad():
        np.testing.assert_allclose(model.forward_pooled(pooled).numpy(), target, atol=1e-4)


def test_calibration_refuses_a_head_that_ranks_backwards(model):
    raw = np.linspace(0.2, 0.8, 20)
    with pytest.raises(ValueError, match="ranks validation images backwards"):
        calibrate(model, raw, raw[::-1].copy())
