import numpy as np
import pytest
from scipy import stats

from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.metrics import (
    human_consistency,
    mean_std,
    mse,
    pearson,
    regression_metrics,
    spearman,
    split_half_consistency,
    top_bottom,
)


def test_spearman_equals_scipy_on_data_with_ties():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 200) / 4  # heavy ties
    pred = np.round(true + rng.normal(0, 0.3, 200), 1)  # ties in predictions too
    assert spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true).statistic, abs=1e-12)
    assert pearson(pred, true) == pytest.approx(np.corrcoef(pred, true)[0, 1], abs=1e-12)


def test_spearman_is_rank_based():
    x = np.arange(10.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_mse_and_summary():
    assert mse([0.5, 0.7], [0.4, 0.9]) == pytest.approx((0.01 + 0.04) / 2)
    m = regression_metrics([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert m["spearman"] == pytest.approx(-1.0) and m["n"] == 3
    s = mean_std([0.6, 0.7, 0.8])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1)


def test_top_bottom_rank_by_prediction():
    pred = np.arange(300) / 300
    true = np.arange(300)[::-1] / 300  # perfectly anti-correlated
    rows = {r["rank"]: r for r in top_bottom(pred, true)}
    assert list(rows) == ["top 10", "top 25", "top 50", "top 100", "top 200",
                          "bottom 200", "bottom 100", "bottom 50", "bottom 25", "bottom 10"]
    assert rows["top 10"]["predicted"] == pytest.approx(np.mean(pred[-10:]))
    assert rows["top 10"]["true"] == pytest.approx(np.mean(true[-10:]))
    assert rows["bottom 10"]["predicted"] < rows["top 10"]["predicted"]
    assert len(top_bottom(pred[:30], true[:30])) == 4  # N larger than the set is skipped


def test_mismatched_or_tiny_inputs_are_rejected():
    with pytest.raises(ValueError, match="3 predictions but 2 targets"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])


def _split(half2, other_half):
    test = ImageScoreDataset([f"{i}.jpg" for i in range(len(half2))], half2)
    return Split(train=test, test=test, test_other_half=other_half)


def test_split_half_consistency_leaves_out_images_nobody_in_half_1_saw():
    half2 = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    half1 = np.array([0.15, np.nan, 0.2, 0.6, 0.5])
    assert split_half_consistency(_split(half2, half1)) == pytest.approx(0.8)  # ranks 1 2 4 3 vs 1 2 3 4
    assert split_half_consistency(_split(half2, None)) is None  # one score per image: nothing to compare
    assert np.isnan(split_half_consistency(_split(half2[:2], np.array([0.3, np.nan]))))
    with pytest.raises(ValueError, match="4 half-1 scores for 5 test images"):
        split_half_consistency(_split(half2, half1[:4]))


def test_human_consistency_is_the_mean_over_splits():
    half1 = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, np.nan, 0.1]])
    half2 = np.array([[0.1, 0.3, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4]])
    result = human_consistency(half1, half2)
    assert result["per_split"] == pytest.approx([0.8, -1.0])
    assert (result["mean"], result["n"]) == (pytest.approx(-0.1), 2)
