import json

import pytest
import torch

from resmemnet import ModelConfig, create_model
from resmemnet.cli import main


@pytest.fixture(scope="module")
def model():
    return create_model("resnet50").eval()


def test_info_json_reports_the_paper_architecture(capsys):
    assert main(["info", "--backbone", "resnet50", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"] == "resnet50"
    assert info["head"] == "lstm"
    assert info["taps"] == 16
    assert info["projection"] == 128
    assert 24_000_000 <= info["parameters"] <= 28_000_000


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("size", [(224, 224), (512, 512), (320, 480)])
def test_forward_any_size_gives_one_finite_score_per_image(model, batch, size):
    with torch.inference_mode():
        scores = model(torch.randn(batch, 3, *size))
    assert scores.shape == (batch,)
    assert torch.isfinite(scores).all()
    assert ((scores > 0) & (scores < 1)).all()  # sigmoid output: a probability


def test_taps_follow_depth_order(model):
    assert model.backbone.taps[0] == "layer1.0" and model.backbone.taps[-1] == "layer4.2"
    assert model.tap_channels == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3


def test_forward_equals_pooled_path(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), model.forward_pooled(model.pool_taps(x)))


def test_freeze_and_unfreeze_backbone():
    m = create_model("resnet50", head="last")
    m.freeze_backbone()
    m.train()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    assert not m.backbone.training  # frozen BatchNorm statistics stay put
    assert m.num_parameters(trainable_only=True) < 3_000_000
    m.unfreeze_backbone()
    assert all(p.requires_grad for p in m.backbone.parameters()) and m.backbone.training


def test_output_is_the_heads_raw_value_or_its_sigmoid():
    identity = create_model("mobilenet_v3_large", output="identity", proj_dim=8, hidden_dim=8).eval()
    sigmoid = create_model(ModelConfig(**{**identity.config.to_dict(), "output": "sigmoid"})).eval()
    sigmoid.load_state_dict(identity.state_dict())
    with torch.no_grad():
        identity.head.fc.bias.fill_(5.0)  # a raw value outside [0, 1], which only the sigmoid squashes
        sigmoid.head.fc.bias.fill_(5.0)
        x = torch.randn(2, 3, 64, 64)
        raw = identity.head(identity.projection(identity.pool_taps(x)))
        assert (raw > 1).any()
        torch.testing.assert_close(identity(x), raw)
        torch.testing.assert_close(sigmoid(x), torch.sigmoid(raw))


@pytest.mark.parametrize("bad, message", [
    (dict(backbone="resnet5"), "Unknown backbone 'resnet5'; available: "),
    (dict(head="gru"), "Unknown head 'gru'"),
    (dict(output="relu"), "Unknown output"),
    (dict(head="transformer", peephole=True), "peephole=True needs head='lstm'"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(proj_dim=10**9), r"proj_dim must be an integer in 1\.\.4096, got 1000000000"),
    (dict(hidden_dim=64.5), "hidden_dim must be an integer"),
    (dict(backbone_weights="IMAGENET"), "Unknown weights 'IMAGENET' for resnet50; available: "),
    (dict(backbone_weights="resmem"), "Unknown weights 'resmem' for resnet50"),  # a ResNet-152 trunk
])
def test_bad_config_is_rejected_with_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)
