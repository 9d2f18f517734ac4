import json

import pytest
import torch
from safetensors.torch import save_file

from resmemnet import CheckpointError, create_model, load_checkpoint, load_model, read_metadata, save_checkpoint
from resmemnet.data.transforms import Preprocessing
from resmemnet.model.backbones import BACKBONES, WEIGHT_SOURCES
from resmemnet.model.heads import HEADS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = create_model("resnet50", preprocessing=Preprocessing(resize=(256, 256), crop=(224, 224))).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(model, path, metadata={"training_data": "synthetic", "licence": "MIT", "metrics": {"rho": 0.5}})
    return model, path


def test_save_then_load_gives_identical_outputs(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    x = torch.randn(2, 3, 96, 80)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert loaded.preprocessing == model.preprocessing
    assert loaded.metadata["training_data"] == "synthetic"
    assert loaded.metadata["metrics"] == {"rho": 0.5}
    assert load_model(path).config == model.config


def test_metadata_is_readable_without_loading_weights(saved):
    meta = read_metadata(saved[1])
    assert meta["config"]["backbone"] == "resnet50"
    assert meta["preprocessing"]["crop"] == [224, 224]
    assert len(meta["weights_sha256"]) == 64


@pytest.mark.parametrize("backbone", BACKBONES.names())
@pytest.mark.parametrize("head", HEADS.names())
def test_every_backbone_and_head_builds_runs_and_round_trips(tmp_path, backbone, head):
    model = create_model(backbone, head=head, proj_dim=32, hidden_dim=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
    assert before.shape == (2,) and torch.isfinite(before).all()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)  # no architecture arguments: the file says it all
    assert (loaded.config.backbone, loaded.config.head) == (backbone, head)
    with torch.inference_mode():
        assert torch.allclose(before, loaded(x), atol=1e-6)


def test_peephole_option_round_trips(tmp_path):
    model = create_model("mobilenet_v3_large", peephole=True, proj_dim=16, hidden_dim=8)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "p.safetensors"))
    assert loaded.config.peephole and type(loaded.head.rnn).__name__ == "PeepholeLSTM"


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(create_model("mobilenet_v3_large").state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle-based.*arbitrary code"):
        load_checkpoint(path)


def test_truncated_checkpoint_fails_clearly(saved, tmp_path):
    data = saved[1].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_tampered_weights_are_detected(saved, tmp_path):
    data = bytearray(saved[1].read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data, header untouched
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a resmemnet checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path():
    with pytest.raises(CheckpointError, match="No checkpoint file at /no/such.safetensors"):
        load_model("/no/such.safetensors")


def test_newer_format_asks_for_an_upgrade(tmp_path):
    model = create_model("mobilenet_v3_large")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = read_metadata(path) | {"format_version": 99}
    save_file(tensors, path, metadata={"resmemnet": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="Upgrade resmemnet"):
        load_checkpoint(path)


def test_head_only_checkpoint_rebuilds_backbone_from_its_weight_source(tmp_path, monkeypatch):
    source_net = create_model("mobilenet_v3_large").backbone.net
    monkeypatch.setitem(WEIGHT_SOURCES._builders, "test-source", lambda arch: source_net.state_dict())
    model = create_model("mobilenet_v3_large", backbone_weights="test-source", proj_dim=16).eval()
    path = save_checkpoint(model, tmp_path / "head.safetensors", include_backbone=False)
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    assert path.stat().st_size < full.stat().st_size / 10  # no backbone tensors in the file
    loaded = load_checkpoint(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_head_only_save_needs_a_weight_source(tmp_path):
    with pytest.raises(CheckpointError, match="backbone_weights"):
        save_checkpoint(create_model("mobilenet_v3_large"), tmp_path / "x.safetensors", include_backbone=False)
