"""The closed-form ensemble head: penalties, folding and members checked against scikit-learn's own ridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV

from resmemnet.checkpoint import load_checkpoint, read_metadata
from resmemnet.model.resmemnet import ModelConfig, ResMemNet
from resmemnet.predict import predict
from resmemnet.train.cache import CachedRows, FeatureCache
from resmemnet.train.loop import train
from resmemnet.train.ridge import fit_linear_ensemble, group_columns
from resmemnet.train.targets import tap_column, teacher_targets

from .conftest import tiny_config

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4)


def _model(members: int = 6) -> ResMemNet:
    model = ResMemNet(ModelConfig(backbone="mobilenet_v3_large", head="linear-ensemble", members=members))
    groups = ["signal"] * 8 + ["noise"] * (len(model.tap_channels) - 8)  # two experts over the 16 taps
    model.backbone.tap_groups = groups
    return model


def _rows(x: np.ndarray, valid: np.ndarray | None = None) -> CachedRows:
    valid = np.ones(len(x), bool) if valid is None else valid
    return CachedRows.of(FeatureCache(path=None, features=x[None].astype(np.float32), valid=valid, errors=[]))


def _data(model: ResMemNet, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features where the `signal` expert predicts the target and the `noise` expert does not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, sum(model.tap_channels))) * rng.uniform(0.1, 10, sum(model.tap_channels))
    signal = group_columns(model)["signal"]
    truth = x[:, signal[:20]] @ rng.normal(size=20) / 30
    truth = (truth - truth.mean()) / truth.std()
    return x, 1 / (1 + np.exp(-(truth + 0.3 * rng.normal(size=n)))), truth


def test_groups_follow_the_backbone_tap_groups():
    model = _model()
    columns = group_columns(model)
    assert list(columns) == ["signal", "noise"]
    assert sum(len(c) for c in columns.values()) == sum(model.tap_channels)
    assert len(columns["signal"]) == sum(model.tap_channels[:8])
    plain = ResMemNet(ModelConfig(backbone="mobilenet_v3_large", head="linear-ensemble"))
    assert list(group_columns(plain)) == ["all"]


def test_each_penalty_is_the_one_ridgecv_picks_by_leave_one_out():
    model = _model()
    x, y, _ = _data(model)
    report = fit_linear_ensemble(model, _rows(x), y, labelled=len(y), alphas=ALPHAS)
    logit = np.log(y / (1 - y))
    for name, columns in group_columns(model).items():
        xs = x[:, columns]
        xs = (xs - xs.mean(0)) / (xs.std(0) + 1e-3)
        expected = RidgeCV(alphas=ALPHAS).fit(xs, logit).alpha_
        assert report["groups"][name]["alpha"] == expected
    assert report["groups"]["signal"]["loo_spearman"] > 0.6
    assert abs(report["groups"]["noise"]["loo_spearman"]) < 0.3


def test_the_folded_head_is_the_average_of_bootstrap_ridges_fitted_by_scikit_learn():
    """Every member, recomputed from scratch: sklearn's Ridge on the member's bootstrap sample, per group,
    scaled, averaged and mapped as the report says, must equal what the folded Linear layer computes."""
    model = _model(members=3)
    x, y, _ = _data(model)
    report = fit_linear_ensemble(model, _rows(x), y, labelled=len(y), alphas=ALPHAS, seed=7)
    logit = np.log(y / (1 - y))
    new = np.random.default_rng(1).normal(size=(10, x.shape[1])) * x.std(0)
    mapping, groups = report["logit_map"], group_columns(model)
    expected = np.zeros((10, 3))
    for k in range(3):
        counts = np.bincount(np.random.default_rng([7, k]).integers(0, len(y), len(y)), minlength=len(y))
        z = 0.0
        for name, columns in groups.items():
            mean, std = x[:, columns].mean(0), x[:, columns].std(0) + 1e-3
            ridge = Ridge(alpha=report["groups"][name]["alpha"], solver="cholesky")
            ridge.fit((x[:, columns] - mean) / std, logit, sample_weight=counts)
            group = ridge.predict((new[:, columns] - mean) / std) - mapping["centre"]
            z = z + group / report["groups"][name]["scale"]
        expected[:, k] = mapping["centre"] + mapping["intercept"] + mapping["slope"] * z / len(groups)
    with torch.no_grad():
        got = model.head(torch.from_numpy(new).float()).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_members_differ_agree_on_the_ranking_and_repeat_with_the_seed():
    model, again, other = _model(), _model(), _model()
    x, y, truth = _data(model, n=200)
    for m, seed in ((model, 0), (again, 0), (other, 1)):
        fit_linear_ensemble(m, _rows(x[:150]), y[:150], labelled=150, alphas=ALPHAS, seed=seed)
    assert torch.equal(model.head.fc.weight, again.head.fc.weight)
    assert not torch.equal(model.head.fc.weight, other.head.fc.weight)
    with torch.no_grad():
        members = model.forward_members(torch.from_numpy(x[150:]).float()).numpy()
    assert members.std(axis=1).min() > 0  # bootstrap members disagree a little on every image
    held_out_rho = np.corrcoef(members.mean(axis=1), truth[150:])[0, 1]
    assert held_out_rho > 0.4  # the noise expert weighs as much as the signal one: averaging halves the signal


def test_distillation_rows_pull_the_fit_towards_the_teacher():
    """Rows scored only by a teacher (weight w) move the fit towards the teacher as w grows."""
    model = _model(members=2)
    x, y, truth = _data(model, n=160)
    other = x[:, group_columns(model)["noise"][:20]] @ np.random.default_rng(3).normal(size=20)
    teacher = truth[80:] + 2 * other[80:] / other.std()  # a teacher that half agrees with the humans
    rows = _rows(x)
    targets = np.concatenate([y[:80], teacher_targets(_rows(np.c_[x[80:], teacher]), x.shape[1], y[:80])])
    agreement = []
    for weight in (0.01, 3.0):
        m = _model(members=2)
        fit_linear_ensemble(m, rows, targets, labelled=80, distil_weight=weight, alphas=ALPHAS)
        with torch.no_grad():
            pred = m.forward_pooled(torch.from_numpy(x[80:]).float()).numpy()
        agreement.append(np.corrcoef(pred, teacher)[0, 1])
    assert agreement[1] > agreement[0] + 0.3


def test_unknown_groups_and_too_few_images_are_refused():
    model = _model()
    x, y, _ = _data(model, n=30)
    with pytest.raises(ValueError, match=r"ensemble_groups \['colour'\] are not tap groups"):
        fit_linear_ensemble(model, _rows(x), y, labelled=30, groups=["colour"])
    with pytest.raises(ValueError, match="at least 10 labelled training images"):
        fit_linear_ensemble(model, _rows(x[:5]), y[:5], labelled=5)


def test_teacher_targets_keep_the_teachers_ranking_on_the_human_scale():
    rows = _rows(np.c_[np.zeros((5, 2)), [3.0, 1.0, 2.0, 5.0, 4.0]], valid=np.array([1, 1, 1, 1, 0], bool))
    human = np.array([0.6, 0.7, 0.8])
    out = teacher_targets(rows, 2, human)
    assert np.isnan(out[4])  # an image that failed to load is never a target
    assert np.argsort(out[:4]).tolist() == [1, 2, 0, 3]
    assert out[:4].mean() == pytest.approx(human.mean()) and out[:4].std() == pytest.approx(human.std())


def test_tap_column_names_the_one_channel_taps():
    model = _model()
    with pytest.raises(ValueError, match="distil_tap 'resmem.score' is not a tap"):
        tap_column(model, "resmem.score")
    with pytest.raises(ValueError, match="must hold one score"):
        tap_column(model, model.backbone.taps[0])


def test_a_linear_ensemble_trains_with_resmemnet_train_and_predicts_a_spread(tiny_split, tmp_path):
    config = tiny_config("model.head='linear-ensemble'", "model.members=4", "augment='none'", "calibrate=true",
                         "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-3, frozen=true}]")
    result = train(config, tiny_split, tmp_path / "run")
    meta = read_metadata(result.best_checkpoint)
    assert meta["fit"]["members"] == 4 and meta["calibration"]["slope"] > 0
    assert result.test["spearman"] > 0.5  # the synthetic scores are a function of the image
    model = load_checkpoint(result.best_checkpoint)
    scores, spread = predict(tiny_split.test.paths, model, return_std=True)
    assert np.isfinite(scores).all() and (spread > 0).all() and (spread < 0.2).all()
    np.testing.assert_allclose(scores, predict(tiny_split.test.paths, model), rtol=1e-6)


def _gated(members: int = 4) -> ResMemNet:
    model = ResMemNet(ModelConfig(backbone="mobilenet_v3_large", head="gated-ensemble", members=members))
    model.backbone.tap_groups = ["signal"] * 8 + ["noise"] * (len(model.tap_channels) - 8)
    return model


def test_a_gated_head_scores_training_like_photos_with_its_experts_and_other_photos_with_the_fallback():
    """Other photos differ from the training images in the `noise` taps: the gate must tell them apart, the
    head must compute g * fc + (1 - g) * fallback, and the in-domain read-out must still rank the truth."""
    model = _gated()
    x, y, truth = _data(model, n=260)
    noise = group_columns(model)["noise"]
    others = np.random.default_rng(5).normal(size=(200, x.shape[1])) * x.std(0)
    others[:, noise[:50]] += 3 * x[:, noise[:50]].std(0)  # a shift the gate can see
    report = fit_linear_ensemble(model, _rows(x[:200]), y[:200], labelled=200, alphas=ALPHAS, groups=["signal"],
                                 fallback_groups=["signal", "noise"], gate_rows=_rows(others[:100]),
                                 gate_groups=["noise"])
    assert report["gate"]["photos"] == 100 and report["fallback"]["groups"]["noise"]["features"] == len(noise)
    assert list(report["groups"]) == ["signal"]
    head = model.head
    with torch.no_grad():
        for rows, expect_in_domain in ((x[200:], True), (others[100:], False)):
            t = torch.from_numpy(rows).float()
            g = torch.sigmoid(head.gate(t))
            torch.testing.assert_close(head(t), g * head.fc(t) + (1 - g) * head.fallback(t))
            assert (g.mean() > 0.9) if expect_in_domain else (g.mean() < 0.1)
        pred = model.forward_pooled(torch.from_numpy(x[200:]).float()).numpy()
    assert np.corrcoef(pred, truth[200:])[0, 1] > 0.5


def test_calibration_rescales_both_read_outs_of_a_gated_head():
    from resmemnet.train.head import calibrate

    model = _gated(members=2)
    x, y, _ = _data(model, n=120)
    others = np.random.default_rng(2).normal(size=(50, x.shape[1])) * x.std(0) + 3 * x.std(0)
    fit_linear_ensemble(model, _rows(x), y, labelled=120, alphas=ALPHAS, groups=["signal"],
                        fallback_groups=["signal", "noise"], gate_rows=_rows(others), gate_groups=["noise"])
    t = torch.from_numpy(np.r_[x[:10], others[:10]]).float()
    with torch.no_grad():
        before = model.head(t)
        report = calibrate(model, model.forward_pooled(torch.from_numpy(x).float()).numpy(), 0.5 + 0.5 * (y - 0.5))
        after = model.head(t)
    torch.testing.assert_close(after, report["slope"] * before + report["intercept"], rtol=1e-4, atol=1e-4)


def test_a_gated_head_refuses_a_half_given_setup():
    gated, plain = _gated(), _model()
    x, y, _ = _data(plain, n=40)
    with pytest.raises(ValueError, match="needs fallback_groups, gate_groups and gate photos"):
        fit_linear_ensemble(gated, _rows(x), y, labelled=40, groups=["signal"], fallback_groups=["noise"])
    with pytest.raises(ValueError, match="need head 'gated-ensemble', not 'linear-ensemble'"):
        fit_linear_ensemble(plain, _rows(x), y, labelled=40, fallback_groups=["noise"])
    with pytest.raises(ValueError, match=r"gate_groups \['colour'\] are not tap groups"):
        fit_linear_ensemble(gated, _rows(x), y, labelled=40, fallback_groups=["noise"], gate_rows=_rows(x),
                            gate_groups=["colour"])
    with pytest.raises(ValueError, match="at least 10 readable photos in gate_dirs"):
        fit_linear_ensemble(gated, _rows(x), y, labelled=40, fallback_groups=["noise"], gate_rows=_rows(x[:3]),
                            gate_groups=["noise"])


def test_a_gated_ensemble_trains_with_resmemnet_train_from_gate_folders(tiny_split, tmp_path):
    from PIL import Image

    folder = tmp_path / "other photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # flat colours: nothing like the synthetic training images
        Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3))).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped and reported, not fatal
    config = tiny_config("model.head='gated-ensemble'", "model.members=3", "augment='none'", "calibrate=true",
                         "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-3, frozen=true}]", "fallback_groups=['all']",
                         "gate_groups=['all']", f"gate_dirs=['{folder}']")
    result = train(config, tiny_split, tmp_path / "run")
    gate = read_metadata(result.best_checkpoint)["fit"]["gate"]
    assert gate["photos"] == 12 and gate["mean_gate"]["training_images"] > gate["mean_gate"]["gate_photos"]
    model = load_checkpoint(result.best_checkpoint)
    assert model.config.head == "gated-ensemble"
    scores, spread = predict(tiny_split.test.paths, model, return_std=True)
    assert np.isfinite(scores).all() and (spread > 0).all()
