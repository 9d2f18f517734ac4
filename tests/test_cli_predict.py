import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resmemnet import Preprocessing, create_model, predict, save_checkpoint
from resmemnet.cli import main
from resmemnet.cli.predict import read_rows
from tests.conftest import make_photo

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(32, 32)))
    return str(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


def _break(folder: Path) -> list[Path]:
    """Ten bad files of different kinds."""
    good = (folder / "good_0000.jpg").read_bytes()
    bad = {"junk.jpg": b"not an image", "empty.png": b"", "truncated.jpg": good[: len(good) // 2],
           "text.png": b"hello\n" * 20, "half_header.jpg": good[:20], "zeros.jpg": bytes(500),
           "html.webp": b"<html></html>", "cut.png": b"\x89PNG\r\n\x1a\n" + bytes(10), "bad.bmp": b"BM" + bytes(8),
           "fake.gif": b"GIF89a"}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return [folder / n for n in bad]


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_formats_order_errors_and_exit_code(checkpoint, photo_dir, tmp_path, capsys):
    (photo_dir / "sub").mkdir()
    make_photo(photo_dir / "sub" / "deep.png", seed=9)
    (photo_dir / "broken.jpg").write_bytes(b"junk")
    args = ["predict", str(photo_dir), "--checkpoint", checkpoint, "--batch-size", "4", "--workers", "0",
            "--no-progress"]
    outputs = {fmt: tmp_path / f"out.{fmt}" for fmt in ("csv", "jsonl", "json")}
    for out in outputs.values():
        assert main([*args, "--output", str(out)]) == 1  # one item failed
    by_format = {fmt: read_rows(out) for fmt, out in outputs.items()}
    assert by_format["csv"] == by_format["jsonl"] == by_format["json"]
    rows = by_format["json"]
    assert [r.path for r in rows] == sorted(str(p) for p in photo_dir.glob("*.jpg"))  # sub/ needs --recursive
    assert [r.path for r in rows if r.error] == [str(photo_dir / "broken.jpg")]
    assert rows[0].score is None and "not an image" in rows[0].error
    good = [p for p in sorted(photo_dir.glob("*.jpg")) if p.name != "broken.jpg"]
    np.testing.assert_allclose([r.score for r in rows if not r.error], predict(good, checkpoint), atol=1e-5)
    assert json.loads(outputs["json"].read_text())[1]["error"] == ""

    capsys.readouterr()
    globs = [str(photo_dir / "img*.jpg"), str(photo_dir / "**" / "*.png"), str(photo_dir / "broken.jpg")]
    assert main(["predict", *globs, "--recursive", *args[2:]]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["score", "path"] and len(table) == 1 + 8
    assert any("ERROR" in line and "broken.jpg" in line for line in table)
    assert any(line.endswith("deep.png") for line in table)
    assert main(["predict", str(photo_dir / "img0.jpg"), "--checkpoint", checkpoint, "--no-progress"]) == 0


def test_bad_arguments_are_one_line_errors(checkpoint, photo_dir, tmp_path, capsys):
    base = ["predict", str(photo_dir), "--checkpoint", checkpoint]
    assert main([*base, "--output", str(tmp_path / "x.txt")]) == 2
    assert "use one of: .csv, .jsonl, .json" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing*.jpg"), "--checkpoint", checkpoint]) == 2
    assert "No files match" in capsys.readouterr().err
    assert main([*base, "--backend", "onnxruntime"]) == 2
    assert "needs --onnx" in capsys.readouterr().err
    assert main([*base, "--precision", "fp16", "--device", "cpu"]) == 2
    assert "fp16 autocast is for GPUs" in capsys.readouterr().err


@pytest.mark.slow
def test_thousand_images_ten_broken_killed_halfway_then_resumed(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(1000):
        make_photo(folder / f"good_{i:04d}.jpg", size=(20, 16), seed=i)
    broken = _break(folder)
    out = tmp_path / "scores.csv"
    cmd = [str(BIN / "resmemnet"), "predict", str(folder), "--checkpoint", checkpoint, "--output", str(out),
           "--batch-size", "10", "--workers", "1", "--precision", "fp32", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    while proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 400):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup, maybe a torn last line
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; slow it down"
    partial = _rows(out)
    assert 400 <= len(partial) < 1010

    assert main([*cmd[1:], "--resume"]) == 1  # ten items failed
    assert f"{len(partial)} already in" in capsys.readouterr().err
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert len(rows) == 1010 and len(set(paths)) == 1010
    assert paths == sorted(paths)  # the kill point does not change the order
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert sorted(errors) == sorted(p.name for p in broken)
    assert all(r["score"] == "" for r in rows if r["error"]) and all(r["score"] for r in rows if not r["error"])
    assert "truncated" in errors["truncated.jpg"] and "empty file" in errors["empty.png"]
    assert "not an image" in errors["text.png"]
    sample = [folder / f"good_{i:04d}.jpg" for i in (0, 499, 999)]
    by_path = {r["path"]: float(r["score"]) for r in rows if not r["error"]}
    np.testing.assert_allclose([by_path[str(p)] for p in sample], predict(sample, checkpoint), atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_merge_into_one_file_in_order_and_resume(checkpoint, photo_dir, tmp_path):
    for i in range(6, 13):
        make_photo(photo_dir / f"img{i}.jpg", seed=i)
    (photo_dir / "broken.jpg").write_bytes(b"junk")
    args = ["predict", str(photo_dir), "--checkpoint", checkpoint, "--batch-size", "2", "--workers", "0",
            "--precision", "fp32", "--no-progress"]
    single = tmp_path / "single.jsonl"
    assert main([*args, "--output", str(single)]) == 1
    expected = read_rows(single)

    sharded = tmp_path / "sharded.jsonl"
    sharded.write_text("".join(line + "\n" for line in single.read_text().splitlines()[:5]))  # a partial run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    result = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port,
                             str(BIN / "resmemnet"), *args, "--output", str(sharded), "--resume"],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode != 0, "a failed item must fail the run"
    assert "14 rows from 2 ranks" in result.stderr, result.stderr[-2000:]
    rows = read_rows(sharded)
    assert [r.path for r in rows] == [r.path for r in expected]
    assert [r.error for r in rows] == [r.error for r in expected]
    np.testing.assert_allclose([r.score or 0 for r in rows], [r.score or 0 for r in expected], atol=1e-6)
    assert not list(tmp_path.glob("*.part.jsonl"))
