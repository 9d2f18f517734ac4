import json

import numpy as np
import pytest
import torch
from PIL import Image

from resmemnet import ImageLoadError, Preprocessing, create_model, predict
from resmemnet.explain import Explanation, explain, resolve_layer
from resmemnet.inference import OnnxScorer, TorchScorer, precision_for
from tests.conftest import make_photo


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # an untrained model: some seeds give a map that is negative (so zero) everywhere
    return create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8,
                        preprocessing=Preprocessing(resize=(64, 64))).eval()


def _images(n=3):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


def test_heatmap_and_overlay_match_each_image_and_scores_match_predict(model):
    images = _images()
    out = explain(images, model, batch_size=2)
    assert len(out) == 3 and all(isinstance(e, Explanation) for e in out)
    for img, e in zip(images, out, strict=True):
        assert e.heatmap.shape == (img.height, img.width) and e.heatmap.dtype == np.float32
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0 and e.heatmap.max() > 0.5
        assert e.overlay.size == img.size and e.overlay.mode == "RGB"
    np.testing.assert_allclose([e.score for e in out], predict(images, model), atol=1e-5)


def test_frozen_backbone_still_gets_gradients_and_hooks_are_released(model):
    model.freeze_backbone()
    try:
        with torch.inference_mode():  # as a server would call it
            out = explain(_images(2), model)
    finally:
        model.unfreeze_backbone()
    assert all(e.heatmap.max() > 0.5 for e in out)
    layer = resolve_layer(model)
    assert not layer._forward_hooks and not layer._backward_hooks


def test_layer_choice_changes_the_heatmap_and_bad_layers_are_explained(model):
    img = _images(1)
    default = explain(img, model)[0].heatmap
    earlier = explain(img, model, layer=f"backbone.net.{model.backbone.taps[5]}")[0].heatmap
    assert np.abs(default - earlier).max() > 0.05
    with pytest.raises(ValueError, match=r"Unknown layer 'nope'.*backbone\.net\."):
        explain(img, model, layer="nope")
    with pytest.raises(ValueError, match="pick a convolutional layer"):
        explain(img, model, layer="head.fc")


def test_a_centre_crop_maps_back_to_the_whole_image(tmp_path):
    m = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8,
                     preprocessing=Preprocessing(resize=(128, 128), crop=(96, 96))).eval()
    e = explain(make_photo(tmp_path / "a.png", size=(64, 128)), m)[0]
    assert e.heatmap.shape == (128, 64)
    # the crop keeps the middle 3/4 of each side: no evidence outside it, the whole CAM inside it
    assert e.heatmap[:12].max() == 0.0 and e.heatmap[:, :6].max() == 0.0 and e.heatmap[20:108, 10:54].max() > 0.5


def test_paths_and_bad_files(model, tmp_path):
    good = make_photo(tmp_path / "good.jpg", size=(50, 30))
    assert explain(str(good), model)[0].heatmap.shape == (30, 50)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        explain([good, tmp_path / "bad.jpg"], model)
    with pytest.raises(ValueError, match="batch_size"):
        explain(good, model, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the cudnn LSTM backward in eval mode")
def test_lstm_backward_in_eval_mode_on_cuda():
    m = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(64, 64)))
    out = explain(_images(2), m, device="cuda")
    assert all(e.heatmap.max() > 0.5 for e in out)


def test_contact_sheet_shows_top_and_bottom(model, photo_dir):
    from resmemnet.explain import contact_sheet

    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    scores = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2]
    fig = contact_sheet(paths, scores, model, n=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split("\n")[0] for t in titles] == ["img1.jpg", "img4.jpg", "img5.jpg", "img0.jpg"]
    assert len(fig.axes) == 8 and "score 0.9000" in titles[0]
    with pytest.raises(ValueError, match="one score per path"):
        contact_sheet(paths, scores[:2], model)


def test_explain_cli_writes_overlays_heatmaps_sidecars_and_a_contact_sheet(model, photo_dir, tmp_path, capsys):
    from resmemnet import save_checkpoint
    from resmemnet.cli import main

    checkpoint = str(save_checkpoint(model, tmp_path / "m.safetensors"))
    (photo_dir / "broken.jpg").write_bytes(b"junk")
    out = tmp_path / "out"
    rc = main(["explain", str(photo_dir), "--checkpoint", checkpoint, "--output-dir", str(out), "--npy",
               "--batch-size", "4", "--no-progress", "--contact-sheet", str(tmp_path / "sheet.png"), "--top", "2"])
    assert rc == 1 and "broken.jpg: not an image" in capsys.readouterr().err
    sidecar = json.loads((out / "img3.json").read_text())
    assert sidecar["layer"] == model.cam_layer and sidecar["path"] == str(photo_dir / "img3.jpg")
    assert sidecar["precision"] == precision_for("auto").name  # the CLI's policy, as `resmemnet predict` has it
    np.testing.assert_allclose(sidecar["score"], predict(photo_dir / "img3.jpg", model, precision="auto"), atol=1e-6)
    heatmap = np.load(out / sidecar["heatmap"])
    assert heatmap.shape == (40, 48) and Image.open(out / sidecar["overlay"]).size == (48, 40)
    assert len(list(out.glob("*.cam.png"))) == 6 and not (out / "broken.json").exists()
    assert Image.open(tmp_path / "sheet.png").size[0] > 200
    assert main(["explain", str(photo_dir / "img0.jpg"), "--checkpoint", checkpoint, "-o", str(out),
                 "--layer", "nope"]) == 2
    assert "Unknown layer 'nope'" in capsys.readouterr().err


def test_resnet_default_layer_runs_and_a_container_that_never_runs_is_named():
    m = create_model("resnet50", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(64, 64))).eval()
    m.freeze_backbone()  # as the bundled default model is
    assert m.cam_layer == "backbone.net.layer4.2"
    assert explain(_images(1), m)[0].heatmap.max() > 0.5
    with pytest.raises(ValueError, match="never ran in the forward pass.*backbone.net.layer4.2"):
        explain(_images(1), m, layer="backbone.net.layer4")


def test_explain_leaves_the_callers_model_as_it_was(model):
    model.train()
    for p in model.head.parameters():
        p.grad = torch.full_like(p, 7.0)  # a training step's gradients, half-way
    flags = [m.training for m in model.modules()]
    grads = {name: p.grad for name, p in model.named_parameters()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        out = explain(_images(2), model, device="cpu")
    finally:
        after_flags = [m.training for m in model.modules()]
        model.eval()
    assert after_flags == flags
    assert {name: p.grad for name, p in model.named_parameters()} == grads
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires
    assert all(e.heatmap.max() > 0.5 for e in out)
    np.testing.assert_allclose([e.score for e in out], predict(_images(2), model), atol=1e-5)  # scored in eval mode
    for p in model.head.parameters():
        p.grad = None


def test_a_scorers_own_pass_is_explained_at_its_precision():
    sensitive = create_model("mobilenet_v3_large", head="linear-ensemble", members=2,
                             preprocessing=Preprocessing(resize=(64, 64))).eval()
    torch.nn.init.normal_(sensitive.head.fc.weight, std=0.05)  # a read-out whose score moves with its input
    images = _images(2)
    bf16 = TorchScorer(sensitive, device="cpu", precision="bf16")
    scores = [e.score for e in explain(images, bf16)]
    np.testing.assert_allclose(scores, predict(images, bf16), atol=1e-6, rtol=0)
    assert np.abs(np.array(scores) - predict(images, sensitive)).max() > 1e-5  # bf16, not the library's fp32
    onnx = OnnxScorer.__new__(OnnxScorer)  # never run: Grad-CAM refuses it before any work
    with pytest.raises(TypeError, match="Grad-CAM needs gradients, which a OnnxScorer has not"):
        explain(images, onnx)

