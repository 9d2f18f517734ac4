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
import torch

from resmemnet import Preprocessing, create_model, predict, save_checkpoint
from resmemnet.cli import main
from resmemnet.jobs import read_rows
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


def test_an_ensemble_writes_score_std_next_to_score(photo_dir, tmp_path):
    ensemble = create_model("mobilenet_v3_large", head="linear-ensemble", members=4,
                            preprocessing=Preprocessing(resize=(32, 32))).eval()
    torch.nn.init.normal_(ensemble.head.fc.weight, std=0.01)
    path = save_checkpoint(ensemble, tmp_path / "ensemble.safetensors")
    assert main(["predict", str(photo_dir), "--checkpoint", str(path), "--output", str(tmp_path / "s.csv"),
                 "--workers", "0", "--no-progress", "--precision", "fp32"]) == 0
    rows = _rows(tmp_path / "s.csv")
    assert list(rows[0]) == ["path", "score", "error", "score_std"]
    scores, spread = predict(sorted(str(p) for p in photo_dir.glob("*.jpg")), ensemble, return_std=True)
    np.testing.assert_allclose([float(r["score_std"]) for r in rows], spread, rtol=1e-4)
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores, atol=1e-5)


def test_one_row_per_image_however_named_and_resumed(checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["=HYPERLINK(\"x\").jpg", "+1+1.jpg", "plain.jpg", "two\nlines.jpg"]
    for i, name in enumerate(names):
        make_photo(folder / name, size=(16, 16), seed=i)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scores.csv"
    args = ["--checkpoint", checkpoint, "--workers", "0", "--no-progress", "--batch-size", "2", "--output", str(out)]
    assert main(["predict", "photos", str(folder), "photos/plain.jpg", *args]) == 0
    rows = read_rows(out)
    assert sorted(r.path for r in rows) == sorted(f"photos/{n}" for n in names)
    capsys.readouterr()

    make_photo(folder / "new.jpg", size=(16, 16), seed=9)
    assert main(["predict", str(folder), "photos", *args, "--resume"]) == 0  # other spelling, then the first
    assert "1 scored, 4 already in" in capsys.readouterr().err
    rows = read_rows(out)
    assert len(rows) == 5 and len({os.path.realpath(r.path) for r in rows}) == 5

    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(["predict", *names[:2], *args[:-1], str(tmp_path / "here.csv")]) == 0
    with (tmp_path / "here.csv").open(newline="") as f:
        first_cells = [line[0] for line in csv.reader(f)][1:]
    assert first_cells == ["'=HYPERLINK(\"x\").jpg", "'+1+1.jpg"]  # a spreadsheet shows them, runs nothing
    assert main(["predict", *names[:2], *args[:-1], str(tmp_path / "here.csv"), "--resume"]) == 0
    assert "0 scored, 2 already in" in capsys.readouterr().err
    assert [r.path for r in read_rows(tmp_path / "here.csv")] == names[:2]


def test_links_odd_formats_and_folders_named_like_images(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    make_photo(folder / "real.jpg", size=(16, 16))
    make_photo(folder / "really_jpeg.heic", size=(16, 16), fmt="JPEG")
    (folder / "real.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(40))
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "x.jpg").mkdir()
    (tmp_path / "empty.jpg").mkdir()
    out = tmp_path / "o.jsonl"
    code = main(["predict", str(tmp_path / "empty.jpg"), str(folder), "--checkpoint", checkpoint, "--workers", "0",
                 "--no-progress", "--output", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"warning: skipped {folder / 'x.jpg'}: a folder, not an image" in err
    assert "warning: no images" in err and "empty.jpg" in err
    rows = {Path(r.path).name: r for r in read_rows(out)}
    assert sorted(rows) == ["dangling.jpg", "loop.jpg", "real.heic", "real.jpg", "really_jpeg.heic"]
    assert rows["real.jpg"].score is not None and rows["really_jpeg.heic"].score is not None
    assert "unsupported format" in rows["real.heic"].error
    assert rows["dangling.jpg"].error == f"dangling symbolic link (to {folder / 'gone.jpg'})"
    assert rows["loop.jpg"].error == "symbolic link loop"


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


def test_resume_repairs_a_file_with_the_same_image_twice(checkpoint, photo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(photo_dir)
    out = tmp_path / "o.jsonl"
    rows = [{"path": "img0.jpg", "score": 0.5, "error": ""}, {"path": str(photo_dir / "img0.jpg"), "score": 0.5,
                                                               "error": ""}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # what an older version wrote
    assert main(["predict", ".", "--checkpoint", checkpoint, "--workers", "0", "--no-progress", "-o", str(out),
                 "--resume"]) == 0
    paths = [os.path.realpath(r.path) for r in read_rows(out)]
    assert sorted(paths) == sorted(str(p) for p in photo_dir.glob("*.jpg")) and len(paths) == 6


def test_overwrite_replaces_an_existing_output(checkpoint, photo_dir, tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("path,score,error\nold.jpg,0.5,\n", encoding="utf-8")
    args = ["predict", str(photo_dir), "--checkpoint", checkpoint, "--workers", "0", "--no-progress",
            "--output", str(out)]
    assert main(args) == 2  # refused: the file exists and neither --resume nor --overwrite was given
    assert main([*args, "--overwrite"]) == 0
    rows = read_rows(out)
    assert [r.path for r in rows] == sorted(str(p) for p in photo_dir.glob("*.jpg"))  # old.jpg is gone
