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
