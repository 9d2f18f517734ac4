"""The inference core: scorers leave the caller's model as it was; pooled and image scoring agree; precision policy."""

import numpy as np
import pytest
import torch

from resmemnet import Preprocessing, create_model
from resmemnet.inference import Scorer, ScorerSpec, TorchScorer, eval_mode, model_on, precision_for, score_paths
from resmemnet.runtime import choose_precision
from tests.conftest import make_photo


@pytest.fixture
def model():
    return create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(32, 32)))


def _state(model: torch.nn.Module) -> dict:
    return {"training": [m.training for m in model.modules()],
            "devices": {p.device for p in model.parameters()},
            "strides": [p.stride() for p in model.parameters()],
            "params": {k: v.clone() for k, v in model.state_dict().items()}}


def _channels_last(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)


def _same(a: dict, b: dict) -> bool:
    return (a["training"] == b["training"] and a["devices"] == b["devices"] and a["strides"] == b["strides"]
            and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"]))


def test_torch_scorer_leaves_the_callers_model_as_it_was(model):
    model.train()
    model.freeze_backbone()  # backbone in eval, head in train: a mix that model.train(was) would not restore
    before = _state(model)
    scorer = TorchScorer(model, device="cpu", precision="fp32", channels_last=True)
    images = torch.rand(3, 3, 32, 32)
    scores = scorer(images)
    scorer.score_pooled(torch.rand(2, sum(model.tap_channels)))
    assert _same(before, _state(model))
    with torch.no_grad(), eval_mode(model):
        expected = model(images).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)  # scored in eval mode, although the model trains
    assert _same(before, _state(model))


def test_a_scorer_on_another_device_works_on_a_copy(model):
    before = _state(model)
    scorer = TorchScorer(model, device="meta", precision="fp32")
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}
    assert _same(before, _state(model))
    owned = TorchScorer(model, device="cpu", precision="fp32", inplace=True)  # handed over: prepared in place
    assert owned.model is model and _channels_last(model) and _state(model)["strides"] != before["strides"]


def test_model_on_copies_only_when_it_must(model):
    assert model_on(model, torch.device("cpu")) is model
    copy = model_on(model, torch.device("cpu"), memory_format=torch.channels_last)
    assert copy is not model and _channels_last(copy) and not _channels_last(model)


def test_score_pooled_matches_scoring_images(model):
    scorer = TorchScorer(model, device="cpu", precision="fp32")
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), eval_mode(model):
        pooled = model.pool_taps(images)
    np.testing.assert_allclose(scorer.score_pooled(pooled), scorer(images), atol=1e-6)


def test_a_scorer_with_a_spread_fills_score_std(model, tmp_path):
    class Spread(Scorer):
        gives_spread = True
        preprocessing = model.preprocessing

        def __call__(self, batch):
            return np.full(len(batch), 0.5, np.float32)

        def score_with_spread(self, batch):
            return self(batch), np.arange(len(batch), dtype=np.float32) / 10

    paths = [make_photo(tmp_path / f"{i}.png", size=(8, 8)) for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"junk")
    rows = [r for b in score_paths([paths[0], tmp_path / "bad.png", *paths[1:]], Spread(), batch_size=4) for r in b]
    assert [(r.score, r.score_std) for r in rows] == [(0.5, 0.0), (None, None), (0.5, pytest.approx(0.1)),
                                                      (0.5, pytest.approx(0.2))]


def test_precision_for_a_device_is_the_runtime_policy():
    assert precision_for("cpu") == choose_precision("auto", torch.device("cpu"))
    assert precision_for("cpu", "fp32").name == "fp32" and precision_for("cpu").reason
    with pytest.raises(ValueError, match="use --precision bf16 or fp32"):
        precision_for("cpu", "fp16")


def test_scorer_spec_checks_its_backend():
    with pytest.raises(ValueError, match="needs --onnx"):
        ScorerSpec(backend="onnxruntime")
    with pytest.raises(ValueError, match="available: torch, onnxruntime"):
        ScorerSpec(backend="tensorrt")


def _tiny_onnx(path, precision: str) -> str:
    """A stand-in ONNX model with resmemnet metadata: the mean pixel as the score."""
    import json

    import onnx
    from onnx import TensorProto, helper

    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["images", "axes"], ["scores"], keepdims=0)], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b"])], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = {"preprocessing": Preprocessing(resize=(32, 32)).to_dict(), "precision": precision}
    model.metadata_props.add(key="resmemnet", value=json.dumps(meta))
    onnx.save(model, path)
    return str(path)


@pytest.fixture
def bundled_with_int8(model, tmp_path, monkeypatch):
    """A bundled model registered (for this test only) with an int8 ONNX file, as the default model."""
    from resmemnet import pretrained
    from resmemnet.model import weights

    int8 = _tiny_onnx(tmp_path / "tiny.int8.onnx", "int8")
    monkeypatch.setitem(weights.WEIGHTS._entries, "tiny-int8", weights.Weights(
        name="tiny-int8", kind="model", loader=lambda: model, preprocessing=model.preprocessing, arch=model.config,
        meta={"licence": "test", "offline": True, "file": "tiny.safetensors", "int8_onnx": int8}))
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "tiny-int8")
    return int8


def test_a_bundled_int8_model_is_used_where_the_cpu_has_vnni(bundled_with_int8, monkeypatch):
    from resmemnet import runtime
    from resmemnet.inference import OnnxScorer, int8_onnx_for

    assert str(int8_onnx_for(None)) == bundled_with_int8 and int8_onnx_for("elsewhere.safetensors") is None
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    scorer = ScorerSpec().build()
    assert isinstance(scorer, OnnxScorer) and scorer.precision.name == "int8"
    images = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(scorer(images), images.mean(dim=(1, 2, 3)).numpy(), atol=1e-6)
    assert precision_for("cpu", checkpoint="tiny-int8").name == "int8"
    assert isinstance(ScorerSpec(precision="fp32").build(), TorchScorer)  # --precision still overrides
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert isinstance(ScorerSpec().build(), TorchScorer)
    assert isinstance(ScorerSpec(precision="int8").build(), OnnxScorer)


def test_int8_without_an_int8_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="needs an int8 model; make one with `resmemnet export --format onnx --int8"):
        ScorerSpec(checkpoint=str(tmp_path / "m.safetensors"), precision="int8").build()
    fp32 = _tiny_onnx(tmp_path / "m.onnx", "fp32")
    with pytest.raises(ValueError, match="is a fp32 model, not int8"):
        ScorerSpec(backend="onnxruntime", onnx=fp32, precision="int8").build()


def test_an_ensemble_model_gives_the_mean_and_spread_of_its_members(tmp_path):
    ensemble = create_model("mobilenet_v3_large", head="linear-ensemble", members=5,
                            preprocessing=Preprocessing(resize=(32, 32))).eval()
    torch.nn.init.normal_(ensemble.head.fc.weight, std=0.01)
    scorer = TorchScorer(ensemble, device="cpu", precision="fp32")
    assert scorer.gives_spread and not TorchScorer(create_model("mobilenet_v3_large"), device="cpu").gives_spread
    images = torch.rand(3, 3, 32, 32)
    scores, spread = scorer.score_with_spread(images)
    with torch.no_grad():
        members = ensemble.forward_members(ensemble.pool_taps(images)).numpy()
    np.testing.assert_allclose(scores, members.mean(1), atol=1e-6)
    np.testing.assert_allclose(spread, members.std(1, ddof=1), atol=1e-6)
    np.testing.assert_allclose(scorer(images), scores, atol=1e-6)
    paths = [make_photo(tmp_path / f"{i}.png", size=(40, 40)) for i in range(2)]
    rows = [r for b in score_paths(paths, scorer) for r in b]
    assert all(r.score_std is not None and r.score_std > 0 for r in rows)


def test_a_default_batch_fits_the_activation_budget():
    small = TorchScorer(create_model("resnet50", preprocessing=Preprocessing(resize=(160, 160))), device="cpu")
    big = TorchScorer(create_model("resnet50", preprocessing=Preprocessing(resize=(1024, 1024))), device="cpu")
    per_image = big.model.activation_bytes((1024, 1024))
    assert per_image == 16 * 256 * 256 * 256  # layer1's 256 x 256 x 256 output map, as four fp32 copies
    assert small.batch_size_for() == 32  # capped: a larger batch gains nothing
    assert big.batch_size_for() == (1 << 30) // per_image == 4
    assert big.batch_size_for(budget=1) == 1  # never zero
    assert small.model.activation_bytes((160, 320)) == 2 * small.model.activation_bytes((160, 160))


def test_score_paths_without_a_batch_size_uses_the_scorers(model, tmp_path, monkeypatch):
    paths = [make_photo(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    scorer = TorchScorer(model, device="cpu", precision="fp32")
    monkeypatch.setattr(scorer, "batch_size_for", lambda budget=None: 2)
    assert [len(rows) for rows in score_paths(paths, scorer)] == [2, 2, 1]
