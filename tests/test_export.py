import numpy as np
import onnx
import pytest
import torch

from resmemnet import Preprocessing, create_model, load_model, save_checkpoint
from resmemnet.cli import main
from resmemnet.export import Int8Recipe, agreement, compare_onnx
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


@pytest.fixture(scope="module")
def exported_int8(exported, tmp_path_factory):
    """One int8 export through the CLI, calibrated on a few generated photos and checked on others."""
    _, checkpoint, _ = exported
    folder = tmp_path_factory.mktemp("int8")
    (folder / "calib").mkdir()
    for i in range(6):
        make_photo(folder / "calib" / f"c{i}.jpg", size=(80, 72), seed=10 + i)
    (folder / "calib" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped with a warning, not fatal
    for i in range(4):
        make_photo(folder / f"check{i}.jpg", size=(80, 72), seed=20 + i)
    onnx_path = folder / "tiny.int8.onnx"
    rc = main(["export", "--format", "onnx", "--int8", "--calibrate", str(folder / "calib"), "--calibration-images",
               "7", "--output", str(onnx_path), "--checkpoint", str(checkpoint), "--check", str(folder / "check*.jpg"),
               "--min-spearman", "-1"])
    return rc, onnx_path, sorted(map(str, folder.glob("check*.jpg")))


@pytest.mark.slow
def test_int8_export_runs_in_onnxruntime_with_its_recipe(exported, exported_int8, capsys):
    model, _, _ = exported
    rc, onnx_path, _ = exported_int8
    assert rc == 0
    scorer = OnnxScorer(onnx_path)
    assert scorer.precision.name == "int8" and scorer.preprocessing == model.preprocessing
    recipe = scorer.metadata["int8_recipe"]
    assert scorer.metadata["note"] == "test" and recipe["images"] == 6 and recipe["method"] == "minmax"
    ops = {node.op_type for node in onnx.load(onnx_path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "LSTM"} <= ops
    scores = scorer(torch.rand(3, 3, 64, 64))
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))


@pytest.mark.slow
def test_int8_quantises_the_trunk_and_never_the_head(exported_int8):
    _, onnx_path, _ = exported_int8
    graph = onnx.load(onnx_path).graph
    producers = {out: node for node in graph.node for out in node.output}
    quantized_inputs = {node.name for node in graph.node if node.op_type in ("Conv", "Gemm", "LSTM", "MatMul")
                        and any(producers.get(t) is not None and producers[t].op_type == "DequantizeLinear"
                                for t in node.input)}
    convs = {node.name for node in graph.node if node.op_type == "Conv"}
    assert convs and convs <= quantized_inputs  # every trunk convolution reads int8 weights and activations
    assert not {n.name for n in graph.node if n.op_type in ("Gemm", "LSTM", "MatMul")} & quantized_inputs


@pytest.mark.slow
def test_int8_check_reports_spearman_and_largest_difference(exported, exported_int8):
    model, _, _ = exported
    _, onnx_path, checks = exported_int8
    result = agreement(model, onnx_path, checks)
    assert result.images == 4 and -1 <= result.spearman <= 1 and 0 <= result.max_abs_diff < 1
    exact = agreement(model, exported[2], checks)  # the fp32 export: same scores (a random head ranks near-ties)
    assert exact.images == 4 and exact.max_abs_diff < 1e-4 and -1 <= exact.spearman <= 1
    with pytest.raises(ValueError, match="at least 2 images"):
        agreement(model, onnx_path, checks[:1])


def test_int8_needs_calibration_photos(tmp_path, capsys):
    assert main(["export", "--format", "onnx", "--int8", "--output", str(tmp_path / "m.onnx")]) == 2
    assert "--int8 and --calibrate DIR go together" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown calibration method 'median'"):
        Int8Recipe(method="median")


def test_trunk_nodes_stop_at_the_pooled_taps():
    from onnx import TensorProto, helper

    from resmemnet.export import trunk_nodes

    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [helper.make_node("Relu", ["images"], ["r"], name="trunk_relu"),
             helper.make_node("ReduceMean", ["r", "axes"], ["pooled"], keepdims=0, name="pool"),
             helper.make_node("Relu", ["pooled"], ["scores"], name="head_relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])], [axes])
    model = helper.make_model(graph)
    assert trunk_nodes(model, Int8Recipe(fp32_blocks=())) == ["trunk_relu"]
    assert trunk_nodes(model, Int8Recipe(fp32_blocks=(0,))) == []
    with pytest.raises(ValueError, match=r"fp32 blocks \[-3, -2\] do not exist: the model has 1 tapped blocks"):
        trunk_nodes(model, Int8Recipe(fp32_blocks=(-3, -2, -1)))
