import numpy as np
import pytest
import torch
from PIL import Image

from resmemnet import ImageLoadError, create_model, predict, save_checkpoint
from resmemnet.inference import TorchScorer, score_paths


@pytest.fixture(scope="module")
def model():
    return create_model("mobilenet_v3_large").eval()


def test_paths_images_and_tensors_give_the_same_scores(model, photo_dir):
    paths = sorted(photo_dir.glob("*.jpg"))
    from_paths = predict(paths, model, batch_size=4)
    from_pil = predict([Image.open(p) for p in paths], model)
    tensors = torch.stack([model.preprocessing.transforms()(Image.open(p).convert("RGB")) for p in paths])
    assert from_paths.shape == (len(paths),)
    np.testing.assert_allclose(from_paths, from_pil, atol=1e-6)
    np.testing.assert_allclose(from_paths, predict(tensors, model), atol=1e-6)
    np.testing.assert_allclose(predict(paths[0], model), from_paths[:1], atol=1e-6)


def test_predict_loads_a_checkpoint_path(model, photo_dir, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    img = sorted(photo_dir.glob("*.jpg"))[0]
    np.testing.assert_allclose(predict(img, str(path)), predict(img, model), atol=1e-6)


def test_bad_inputs_are_named(model, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        predict([tmp_path / "bad.jpg"], model)
    with pytest.raises(TypeError, match="Cannot score a int"):
        predict([3], model)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        predict([torch.zeros(1, 8, 8)], model)


def test_score_paths_streams_batches_in_order_and_reports_bad_files(model, photo_dir):
    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    paths = sorted(photo_dir.glob("*.jpg"))
    batches = list(score_paths(paths, TorchScorer(model, precision="fp32"), batch_size=4))
    assert [len(b) for b in batches] == [4, 3]
    rows = [r for b in batches for r in b]
    assert [r.path for r in rows] == [str(p) for p in paths]
    bad = [r for r in rows if r.error]
    assert len(bad) == 1 and bad[0].path.endswith("broken.jpg") and bad[0].score is None
    assert all(r.score_std is None for r in rows)
    good_paths = [p for p in paths if p.name != "broken.jpg"]
    np.testing.assert_allclose([r.score for r in rows if not r.error], predict(good_paths, model), atol=1e-6)


def test_fast_paths_agree_with_plain_fp32(model, photo_dir):
    paths = sorted(photo_dir.glob("*.jpg"))
    plain = predict(paths, model)
    fast = predict(paths, TorchScorer(model, channels_last=True, precision="fp32"))
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    bf16 = predict(paths, TorchScorer(model, channels_last=True, precision="bf16"))
    assert bf16.dtype == np.float32 and np.abs(bf16 - plain).max() < 2e-2
