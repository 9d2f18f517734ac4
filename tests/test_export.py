import numpy as np
import onnx
import pytest
import torch

from resmemnet import Preprocessing, create_model, load_model, save_checkpoint
from resmemnet.cli import main
from resmemnet.export import compare_onnx
from resmemnet.inference import OnnxScorer
from resmemnet.jobs import read_rows, scan_images
from tests.conftest import make_photo, shared_dataset


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export through the CLI (the slow part), shared by every test here."""
    folder = tmp_path_factory.mktemp("export")
    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(64, 64)))
    checkpoint = save_checkpoint(model, folder / "tiny.safetensors", metadata={"note": "test"})
    for i in range(3):
        make_photo(folder / f"check{i}.jpg", seed=i)
    onnx_path = folder / "tiny.onnx"
    assert main(["export", "--format", "onnx", "--output", str(onnx_path), "--checkpoint", str(checkpoint),
                 "--check", str(folder / "check*.jpg")]) == 0
    return load_model(checkpoint), checkpoint, onnx_path


@pytest.mark.slow
def test_dynamic_batch_and_spatial_size_match_pytorch(exported):
    model, _, onnx_path = exported
    scorer = OnnxScorer(onnx_path)
    for shape in [(1, 3, 64, 64), (5, 3, 96, 80), (2, 3, 224, 224)]:
        batch = torch.randn(*shape)
        with torch.no_grad():
            np.testing.assert_allclose(scorer(batch), model(batch).numpy(), atol=1e-5)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(onnx_path).graph.input}
    assert inputs["images"][1] == 3 and all(isinstance(d, str) for k, d in enumerate(inputs["images"]) if k != 1)


@pytest.mark.slow
def test_preprocessing_travels_in_the_onnx_metadata(exported):
    model, _, onnx_path = exported
    scorer = OnnxScorer(onnx_path)
    assert scorer.preprocessing == model.preprocessing
    assert scorer.metadata["config"] == model.config.to_dict() and scorer.metadata["note"] == "test"


@pytest.mark.slow
def test_onnxruntime_matches_pytorch_on_real_photos(exported):
    model, _, onnx_path = exported
    photos = scan_images([shared_dataset("bsds500")], recursive=True).paths[:16]
    assert compare_onnx(model, onnx_path, photos) < 1e-4


@pytest.mark.slow
def test_predict_backend_onnxruntime(exported, photo_dir, tmp_path):
    _, checkpoint, onnx_path = exported
    args = ["predict", str(photo_dir), "--batch-size", "4", "--no-progress", "--workers", "0"]
    assert main([*args, "--backend", "onnxruntime", "--onnx", str(onnx_path), "-o", str(tmp_path / "o.csv")]) == 0
    assert main([*args, "--checkpoint", str(checkpoint), "--precision", "fp32", "-o", str(tmp_path / "t.csv")]) == 0
    onnx_rows, torch_rows = read_rows(tmp_path / "o.csv"), read_rows(tmp_path / "t.csv")
    assert [r.path for r in onnx_rows] == [r.path for r in torch_rows] and len(onnx_rows) == 6
    np.testing.assert_allclose([r.score for r in onnx_rows], [r.score for r in torch_rows], atol=1e-5)


def test_onnx_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="resmemnet export --format onnx"):
        OnnxScorer(tmp_path / "missing.onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["scores"])], "g",
                                   [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="re-export it from the checkpoint"):
        OnnxScorer(tmp_path / "x.onnx")
