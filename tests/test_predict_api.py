import numpy as np
import pytest
import torch
from PIL import Image

from resmemnet import ImageLoadError, create_model, predict, save_checkpoint


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


def test_iter_predictions_streams_rows_in_order_and_reports_bad_files(model, photo_dir):
    from resmemnet.predict import iter_predictions

    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    paths = sorted(photo_dir.glob("*.jpg"))
    rows = list(iter_predictions(paths, model, batch_size=4))
    assert [r.path for r in rows] == [str(p) for p in paths]
    bad = [r for r in rows if r.error]
    assert len(bad) == 1 and bad[0].path.endswith("broken.jpg") and bad[0].score is None
    good_paths = [p for p in paths if p.name != "broken.jpg"]
    np.testing.assert_allclose([r.score for r in rows if not r.error], predict(good_paths, model), atol=1e-6)


def test_fast_paths_agree_with_plain_fp32(model, photo_dir):
    from resmemnet.predict import TorchScorer

    paths = sorted(photo_dir.glob("*.jpg"))
    plain = predict(paths, model)
    fast = predict(paths, TorchScorer(model, channels_last=True, precision="fp32"))
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    bf16 = predict(paths, TorchScorer(model, channels_last=True, precision="bf16"))
    assert bf16.dtype == np.float32 and np.abs(bf16 - plain).max() < 2e-2
    model.eval().to(memory_format=torch.contiguous_format)


def test_precision_and_device_choices():
    from resmemnet.predict import resolve_device, resolve_precision

    cpu = torch.device("cpu")
    from resmemnet.predict import _cpu_has_bf16

    assert resolve_precision("auto", cpu) == ("bf16" if _cpu_has_bf16() else "fp32")
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="available: auto, fp32, bf16, fp16"):
        resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match="use --precision bf16 or fp32"):
        resolve_precision("fp16", cpu)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_find_images_files_folders_globs(tmp_path):
    from resmemnet.predict import find_images

    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert find_images([tmp_path]) == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg")]
    assert find_images([tmp_path], recursive=True)[-1] == str(tmp_path / "sub" / "c.webp")
    assert find_images([str(tmp_path / "**" / "*.webp"), tmp_path / "b.jpg", tmp_path / "b.jpg"],
                       recursive=True) == [str(tmp_path / "sub" / "c.webp"), str(tmp_path / "b.jpg")]
    assert find_images([tmp_path / "missing.jpg"]) == [str(tmp_path / "missing.jpg")]  # becomes an error row
    with pytest.raises(FileNotFoundError, match="No files match"):
        find_images([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="use --recursive"):
        find_images([tmp_path / "empty"])
