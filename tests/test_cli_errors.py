"""Every documented bad input of predict, explain, evaluate and export: one line on stderr, a non-zero code."""

import pytest
import torch

from resmemnet import Preprocessing, create_model, save_checkpoint
from resmemnet.cli import EXIT_INTERNAL, main
from resmemnet.data.images import MAX_PIXELS_ENV
from tests.conftest import make_photo
from tests.data.test_lnsim import _tiny_lnsim


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(32, 32)))
    checkpoint = str(save_checkpoint(model, root / "tiny.safetensors"))
    (root / "photos").mkdir()
    make_photo(root / "photos" / "a.jpg", size=(16, 16))
    (root / "done.csv").write_text("path,score,error\n")
    (root / "torn.jsonl").write_text('{"path": "a", "score": 0.5, "error": ""}\n{oops\n{"path": "b", "score": 0.1, '
                                     '"error": ""}\n')
    (root / "out_dir.csv").mkdir()
    _tiny_lnsim(root / "lnsim")
    return root, checkpoint


def _cases(root, checkpoint):
    photos, ck = str(root / "photos"), ["--checkpoint", checkpoint]
    predict = ["predict", photos, *ck, "--no-progress", "--workers", "0"]
    explain = ["explain", photos, *ck, "--no-progress"]
    evaluate = ["evaluate", "--dataset", "lnsim", "--root", str(root / "lnsim"), *ck, "--workers", "0",
                "--test-fraction", "0.5"]
    cases = [
        ([*predict, "--output", str(root / "x.txt")], "use one of: .csv, .jsonl, .json"),
        ([*predict, "--resume"], "--resume needs --output"),
        (["predict", str(root / "nothing*.jpg"), *ck], "nothing to score: no files match"),
        (["predict", str(root / "missing_dir") + "/", *ck], "file not found"),  # a row, so exit 1 (see below)
        ([*predict, "--backend", "onnxruntime"], "needs --onnx"),
        ([*predict, "--backend", "onnxruntime", "--onnx", str(root / "none.onnx")], "No ONNX model at"),
        ([*predict, "--precision", "fp16", "--device", "cpu"], "fp16 autocast is for GPUs"),
        ([*predict, "--output", str(root / "done.csv")], "already exists; pass --resume to continue it"),
        ([*predict, "--output", str(root / "out_dir.csv")], "is a folder"),
        ([*predict, "--output", str(root / "torn.jsonl"), "--resume"], "torn.jsonl, line 2: not a JSON row"),
        ([*predict, "--batch-size", "0"], "--batch-size must be positive"),
        ([*predict, "--workers", "-1"], "--workers must be 0 or more"),
        ([*predict, "--device", "tpu9"], "Unknown device 'tpu9'"),
        (["predict", photos, "--checkpoint", str(root / "missing.safetensors")], "No checkpoint file at"),
        (explain, "Nothing to write"),
        (["explain", *ck, "--contact-sheet", str(root / "s.png")], "Pass image PATHs"),
        ([*explain, "-o", str(root / "e"), "--batch-size", "0"], "--batch-size must be positive"),
        ([*explain, "-o", str(root / "e"), "--layer", "nope"], "Unknown layer 'nope'"),
        ([*explain, "--contact-sheet", str(root / "s.png"), "--top", "0"], "--top must be positive"),
        ([*explain, "-o", str(root / "done.csv")], "is a file"),
        (["explain", *ck, "--contact-sheet", str(root / "s.png"), "--scores", str(root / "done.csv")],
         "No scored images"),
        ([*evaluate, "--split", "9"], "splits 0..3"),
        ([*evaluate, "--max-splits", "0"], "max_splits must be at least 1"),
        ([*evaluate, "--batch-size", "0"], "batch_size must be positive"),
        ([*evaluate, "--precision", "fp16", "--device", "cpu"], "fp16 autocast is for GPUs"),
        (["evaluate", "--dataset", "lnsim", "--root", str(root / "nowhere"), *ck], "nowhere"),
        (["export", "-o", str(root / "m.onnx"), "--checkpoint", str(root / "missing.safetensors")],
         "No checkpoint file at"),
        (["export", "-o", str(root / "m.onnx"), *ck, "--check", str(root / "none*.jpg")], "nothing to score"),
        (["export", "-o", str(root / "m.onnx"), *ck, "--tolerance", "-1"], "--tolerance must be 0 or more"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*predict, "--device", "cuda"], "CUDA is not available"))
    return cases


def test_each_bad_input_is_one_line_and_a_non_zero_code(setup, capsys):
    root, checkpoint = setup
    for argv, message in _cases(root, checkpoint):
        code = main(argv)
        out, err = capsys.readouterr()
        err = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
        assert code != 0, argv
        assert message in out + "\n".join(err), (argv, out, err)
        if code == 2:
            assert len(err) == 1 and err[0].startswith(f"resmemnet {argv[0]}: error: "), (argv, err)
        else:  # the run went on: a missing path is an error row, and the exit code says an item failed
            assert code == 1, (argv, code)
    assert not (root / "m.onnx").exists(), "a --check typo must fail before the export"


def test_an_unexpected_exception_is_one_line_unless_debugging(setup, capsys, monkeypatch):
    import resmemnet.cli.predict as cli_predict

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli_predict, "run", broken)
    assert main(["predict", "x.jpg"]) == EXIT_INTERNAL
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["resmemnet predict: internal error: ZeroDivisionError: division by zero (rerun with "
                   "RESMEMNET_DEBUG=1 for the traceback, and please report it)"]
    monkeypatch.setenv("RESMEMNET_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["predict", "x.jpg"])


def test_a_bad_pixel_limit_is_one_line_from_the_parent_process(setup, capsys, monkeypatch):
    """Issue 21.5: RESMEMNET_MAX_PIXELS=abc gave a 1,371-character line holding a DataLoader worker's traceback."""
    root, checkpoint = setup
    monkeypatch.setenv(MAX_PIXELS_ENV, "abc")
    for argv in (["predict", str(root / "photos"), "--checkpoint", checkpoint, "--workers", "1", "--no-progress"],
                 ["evaluate", "--dataset", "lnsim", "--root", str(root / "lnsim"), "--checkpoint", checkpoint,
                  "--workers", "1", "--test-fraction", "0.5"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"resmemnet {argv[0]}: error: {MAX_PIXELS_ENV}='abc' is not a positive "
                                           f"whole number of pixels; unset it or use e.g. {MAX_PIXELS_ENV}=40000000\n")
