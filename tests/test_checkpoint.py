import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

from resmemnet import CheckpointError, create_model, load_checkpoint, load_model, read_metadata, save_checkpoint
from resmemnet import checkpoint as checkpoint_module
from resmemnet.model import weights as weights_module
from resmemnet.model.backbones import BACKBONES
from resmemnet.model.heads import HEADS
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.weights import Weights

SLOW_BACKBONES = {"resnet101", "resnet152", "resmem-experts"}  # ResNet-101/152 round trips take many seconds


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


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=pytest.mark.slow) if b in SLOW_BACKBONES else b
                                      for b in BACKBONES.names()])
@pytest.mark.parametrize("head", HEADS.names())
def test_every_backbone_and_head_builds_runs_and_round_trips(tmp_path, backbone, head):
    model = create_model(backbone, head=head, proj_dim=32, hidden_dim=16).eval()
    side = 227 if backbone == "resmem-experts" else 64  # resmem's network takes exactly 227x227
    x = torch.randn(2, 3, side, side)
    with torch.inference_mode():
        before = model(x)
    assert before.shape == (2,) and torch.isfinite(before).all()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)  # no architecture arguments: the file says it all
    assert (loaded.config.backbone, loaded.config.head) == (backbone, head)
    with torch.inference_mode():
        assert torch.allclose(before, loaded(x), atol=1e-6)


def test_peephole_option_round_trips(tmp_path):
    model = create_model("mobilenet_v3_large", peephole=True, proj_dim=16, hidden_dim=8).eval()
    with torch.no_grad():
        for p in (model.head.rnn.w_ci, model.head.rnn.w_cf, model.head.rnn.w_co):
            torch.nn.init.normal_(p)  # non-zero peepholes: the saved cell must be the one that runs
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "p.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    torch.testing.assert_close(loaded.head.rnn.w_co, model.head.rnn.w_co)


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


def _offline_source(monkeypatch, name: str, arch: str) -> torch.nn.Module:
    """Register a trunk weights object that fits `arch` and holds a fixed random net."""
    net = create_model(arch).backbone.net
    monkeypatch.setitem(weights_module.WEIGHTS._entries, name, Weights(
        name=name, kind="trunk", arch=arch, loader=lambda a: net.state_dict(), preprocessing=Preprocessing(),
        meta={"licence": "test", "offline": True}))
    return net


def test_head_only_checkpoint_rebuilds_backbone_from_its_weight_source(tmp_path, monkeypatch):
    _offline_source(monkeypatch, "test-source", "mobilenet_v3_large")
    model = create_model("mobilenet_v3_large", weights="test-source", proj_dim=16).eval()
    path = save_checkpoint(model, tmp_path / "head.safetensors", include_backbone=False)
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    assert path.stat().st_size < full.stat().st_size / 10  # no backbone tensors in the file
    loaded = load_checkpoint(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_head_only_save_needs_an_offline_weight_source(tmp_path):
    with pytest.raises(CheckpointError, match="backbone_weights"):
        save_checkpoint(create_model("mobilenet_v3_large"), tmp_path / "x.safetensors", include_backbone=False)
    downloads = create_model("mobilenet_v3_large", head="last")
    downloads.config = downloads.config.__class__(**{**downloads.config.to_dict(), "backbone_weights": "IMAGENET1K_V2"})
    with pytest.raises(CheckpointError, match="'IMAGENET1K_V2' need a download"):
        save_checkpoint(downloads, tmp_path / "x.safetensors", include_backbone=False)


# ---- hostile or damaged metadata: every check happens before tensors are read or a model is built


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """Copy a checkpoint with metadata fields changed (`config` is merged key by key); tensors untouched."""
    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["resmemnet"])
    meta["config"] |= changes.pop("config", {})
    save_file(tensors, dst, metadata={"resmemnet": json.dumps(meta | changes)})
    return dst


@pytest.fixture
def small(tmp_path):
    return save_checkpoint(create_model("mobilenet_v3_large", head="last", proj_dim=8), tmp_path / "small.safetensors")


@pytest.fixture
def nothing_is_read_or_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensors were read or a model was built before the metadata was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)  # load_checkpoint imports it when it runs
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("proj_dim", [10**4, 10**6, 10**9])
def test_absurd_sizes_fail_on_the_schema_naming_the_file(small, tmp_path, nothing_is_read_or_built, proj_dim):
    bad = _rewrite(small, tmp_path / "bad.safetensors", config={"proj_dim": proj_dim})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert message.startswith(f"{bad} has invalid metadata") and "\n" not in message
    assert f"proj_dim must be an integer in 1..4096, got {proj_dim}" in message


def test_sizes_that_disagree_with_the_tensors_fail_before_reading_them(small, tmp_path, nothing_is_read_or_built):
    bad = _rewrite(small, tmp_path / "bad.safetensors", config={"proj_dim": 4000})
    with pytest.raises(CheckpointError, match=f"{bad} does not fit its own architecture: head.fc.weight is "
                                              r"\(1, 8\), expected \(1, 4000\)"):
        load_checkpoint(bad)


@pytest.mark.parametrize(("changes", "message"), [
    ({"config": {"proj_dim": 8.5}}, "config.proj_dim: .*integer"),
    ({"config": {"proj_dim": "8"}}, "config.proj_dim: .*integer"),
    ({"config": {"backbone": "resnet5"}}, "Unknown backbone 'resnet5'"),
    ({"config": {"backbone_weights": "nonsense"}}, "Unknown weights 'nonsense'"),
    ({"config": {"extra": 1}}, r"config: unknown keys \['extra'\]"),
    ({"preprocessing": {"resize": [10**6, 10**6]}}, "resize must be .* 1..4096"),
    ({"backbone_in_file": "yes"}, "backbone_in_file: Input should be a valid boolean"),
    ({"weights_sha256": "x"}, "weights_sha256: String should match pattern"),
])
def test_malformed_metadata_is_one_line_naming_the_file(small, tmp_path, nothing_is_read_or_built, changes, message):
    bad = _rewrite(small, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=f"^{bad} .*{message}") as info:
        read_metadata(bad)
    assert "\n" not in str(info.value)


def test_a_checkpoint_never_downloads_its_backbone(small, tmp_path, nothing_is_read_or_built):
    bad = _rewrite(small, tmp_path / "bad.safetensors", backbone_in_file=False,
                   config={"backbone_weights": "IMAGENET1K_V2"})
    with pytest.raises(CheckpointError, match=f"{bad} holds no backbone: .*'IMAGENET1K_V2' need a download"):
        load_checkpoint(bad)


def test_altered_metadata_fails_the_hash(small, tmp_path):
    assert read_metadata(small)["format_version"] == 2
    bad = _rewrite(small, tmp_path / "bad.safetensors", licence="MIT, says the attacker")
    with pytest.raises(CheckpointError, match="weights and metadata do not match the SHA-256"):
        load_checkpoint(bad)


def test_version_1_files_still_load_with_the_tensors_hashed(small, tmp_path):
    model = load_checkpoint(small)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    v1 = _rewrite(small, tmp_path / "v1.safetensors", format_version=1,
                  weights_sha256=checkpoint_module.weights_digest(tensors))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(load_checkpoint(v1)(x), model(x))


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a directory, not a checkpoint file"):
        load_model(tmp_path)


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(small, tmp_path):
    for pad in range(256):  # the first byte of a safetensors file is its header length, mod 256
        path = _rewrite(small, tmp_path / "odd.safetensors", note="x" * pad)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_metadata(path)["note"] == "x" * pad



# ---- issue 21: non-finite tensors, preprocessing outside sane ranges, metadata nested too deep


def test_a_nan_weight_is_refused_naming_the_file_and_the_tensor(tmp_path):
    model = create_model("mobilenet_v3_large", head="last", proj_dim=8)
    with torch.no_grad():
        model.head.fc.weight[0, 1] = float("inf")
        model.head.fc.weight[0, 2] = float("nan")
    bad = save_checkpoint(model, tmp_path / "nan.safetensors")  # a valid hash: the tensors are scanned
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == (f"{bad}: tensor head.fc.weight holds 2 NaN or infinite value(s); the file is damaged "
                               "or comes from a run that diverged")


@pytest.mark.parametrize(("preprocessing", "message"), [
    ({"std": [1e-300] * 3}, r"std must be 3 values in \[0.01, 1\] \(a standard deviation of pixels in \[0, 1\]\)"),
    ({"mean": [1e30, 0, 0]}, r"mean must be 3 values in \[0, 1\] \(a mean of pixels in \[0, 1\]\)"),
    ({"crop": [4000, 4000]}, r"crop \(4000, 4000\) is larger than resize \(224, 224\)"),
    ({"resize": [4000, 4000], "crop": [4000, 4000]}, r"resize must be \(height, width\) in 16..1024"),
    ({"resize": [8, 8]}, r"resize must be \(height, width\) in 16..1024, got \(8, 8\)"),
])
def test_preprocessing_outside_sane_ranges_is_refused_from_the_header(small, tmp_path, nothing_is_read_or_built,
                                                                      preprocessing, message):
    """Issue 21.3: std 1e-300 made every score NaN; crop [4000, 4000] took 90 s an image."""
    bad = _rewrite(small, tmp_path / "bad.safetensors", preprocessing=preprocessing)
    with pytest.raises(CheckpointError, match=f"^{bad} has invalid metadata: preprocessing: .*{message}") as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value)


def test_metadata_nested_too_deep_names_the_file(small, tmp_path):
    """Issue 21.6: 100,000 nested brackets gave "maximum recursion depth exceeded" and no file name."""
    with safe_open(small, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = f.metadata()["resmemnet"]
    bad = tmp_path / "deep.safetensors"
    save_file(tensors, bad, metadata={"resmemnet": raw[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"})
    with pytest.raises(CheckpointError, match=f"^{bad} has damaged metadata: nested too deeply"):
        read_metadata(bad)
