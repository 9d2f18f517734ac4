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
from filelock import FileLock
from PIL import Image, ImageFile

from resmemnet import Preprocessing, create_model, predict, save_checkpoint
from resmemnet.cli import main
from resmemnet.data.images import MAX_PIXELS_ENV
from resmemnet.inference import TorchScorer
from resmemnet.jobs import read_rows
from tests.conftest import make_big_png, make_photo

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
    assert "1 scored, 0 failed, 4 already in" in capsys.readouterr().err
    rows = read_rows(out)
    assert len(rows) == 5 and len({os.path.realpath(r.path) for r in rows}) == 5

    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(["predict", *names[:2], *args[:-1], str(tmp_path / "here.csv")]) == 0
    with (tmp_path / "here.csv").open(newline="") as f:
        first_cells = [line[0] for line in csv.reader(f)][1:]
    assert first_cells == ["'=HYPERLINK(\"x\").jpg", "'+1+1.jpg"]  # a spreadsheet shows them, runs nothing
    assert main(["predict", *names[:2], *args[:-1], str(tmp_path / "here.csv"), "--resume"]) == 0
    assert "0 scored, 0 failed, 2 already in" in capsys.readouterr().err
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


def test_a_name_that_is_not_utf8_gets_its_row_and_resumes(checkpoint, tmp_path, capsys):
    """Issue 21.1: `b\\xff.jpg` killed a CSV run ('utf-8' codec can't encode), and --resume failed the same way."""
    folder = tmp_path / "v"
    folder.mkdir()
    for i in range(3):
        make_photo(folder / f"{i}.jpg", size=(16, 16), seed=i)
    odd = os.fsencode(folder) + b"/b\xff.jpg"
    with open(odd, "wb") as f:
        f.write((folder / "0.jpg").read_bytes())
    args = ["predict", str(folder), "--checkpoint", checkpoint, "--workers", "0", "--no-progress"]
    for fmt in ("csv", "jsonl", "json"):
        out = tmp_path / f"v.{fmt}"
        assert main([*args, "-o", str(out)]) == 0
        rows = read_rows(out)
        assert len(rows) == 4 and os.fsdecode(odd) in [r.path for r in rows]
        assert all(r.score is not None for r in rows)
        capsys.readouterr()
        assert main([*args, "-o", str(out), "--resume"]) == 0
        assert f"0 scored, 0 failed, 4 already in {out}" in capsys.readouterr().err
        assert read_rows(out) == rows
    assert main(args) == 0  # the table on stdout shows the name with the odd byte escaped
    assert f"{folder}/b\\xff.jpg" in capsys.readouterr().out


def test_two_runs_on_one_output_one_fails_at_once_and_nothing_is_lost(checkpoint, tmp_path, capsys, monkeypatch):
    """Issue 21.2: `predict A -o same.csv --resume & predict B -o same.csv --resume` lost rows silently."""
    import resmemnet.jobs as jobs

    folders = {name: tmp_path / name for name in "AB"}
    for k, folder in enumerate(folders.values()):
        folder.mkdir()
        for i in range(4):
            make_photo(folder / f"{i}.jpg", size=(16, 16), seed=10 * k + i)
    out = tmp_path / "same.csv"
    common = ["--checkpoint", checkpoint, "--workers", "0", "--no-progress", "--batch-size", "2", "-o", str(out),
              "--resume"]
    real, second = jobs.score_paths, []

    def start_b_between_batches(*args, **kwargs):
        for rows in real(*args, **kwargs):
            if not second:  # run A holds its output: run B starts now, on the same file
                second.append(None)
                second[0] = main(["predict", str(folders["B"]), *common]), capsys.readouterr().err
            yield rows

    monkeypatch.setattr(jobs, "score_paths", start_b_between_batches)
    assert main(["predict", str(folders["A"]), *common]) == 0
    ((code, err),) = second
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"resmemnet predict: error: {out} is being written by another run") and f"{out}.lock" in err
    assert sorted(r.path for r in read_rows(out)) == sorted(str(p) for p in folders["A"].glob("*.jpg"))
    monkeypatch.undo()
    assert main(["predict", str(folders["B"]), *common]) == 0  # B, rerun once A is done, adds its rows
    assert sorted(r.path for r in read_rows(out)) == sorted(str(p) for p in tmp_path.glob("[AB]/*.jpg"))
    with FileLock(f"{out}.lock", timeout=0):  # released: nothing holds the output any more
        pass


def test_a_nan_score_is_an_error_row_and_exit_1_never_a_number(checkpoint, photo_dir, tmp_path, capsys, monkeypatch):
    """Issue 21.3: a model that outputs NaN printed nan, said '0 failed', exited 0 and wrote NaN into JSON."""
    real = TorchScorer.score_with_spread

    def nan_first(self, batch):
        scores, spread = real(self, batch)
        return np.where(np.arange(len(scores)) == 0, np.nan, scores).astype(np.float32), spread

    monkeypatch.setattr(TorchScorer, "score_with_spread", nan_first)
    args = ["predict", str(photo_dir), "--checkpoint", checkpoint, "--workers", "0", "--no-progress",
            "--batch-size", "3"]
    for fmt in ("csv", "jsonl", "json"):
        out = tmp_path / f"o.{fmt}"
        assert main([*args, "-o", str(out)]) == 1
        assert "4 scored, 2 failed" in capsys.readouterr().err
        rows = read_rows(out)
        assert [r.error for r in rows] == ["model produced NaN", "", "", "model produced NaN", "", ""]
        assert all(r.score is None if r.error else np.isfinite(r.score) for r in rows)
        if fmt == "json":  # strict JSON: a NaN or Infinity literal would fail here
            json.loads(out.read_text(), parse_constant=pytest.fail)
        elif fmt == "csv":
            assert all(r["score"] == "" or np.isfinite(float(r["score"])) for r in _rows(out))
    assert main(args) == 1
    assert capsys.readouterr().out.count("ERROR") == 2


def test_a_checkpoint_with_a_nan_weight_is_refused_before_any_row(photo_dir, tmp_path, capsys):
    model = create_model("mobilenet_v3_large", head="last", proj_dim=8, preprocessing=Preprocessing(resize=(32, 32)))
    with torch.no_grad():
        model.head.fc.weight[0, 3] = float("nan")
    bad = save_checkpoint(model, tmp_path / "nan.safetensors")  # the hash covers the NaN: only a scan finds it
    out = tmp_path / "x.json"
    assert main(["predict", str(photo_dir), "--checkpoint", str(bad), "--workers", "0", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"resmemnet predict: error: {bad}: tensor head.fc.weight holds 1 NaN or infinite value(s); the "
                   "file is damaged or comes from a run that diverged")
    assert not out.exists()


def test_the_pixel_limit_decides_not_pillows_own_guard(checkpoint, tmp_path, monkeypatch):
    """Issue 21.4: Pillow refused a 14000x14000 scan (196 MP) at its own 179 MP, whatever the limit said."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    big = make_big_png(tmp_path / "scan.png", 14_000)
    args = ["predict", str(big), "--checkpoint", checkpoint, "--workers", "0", "--no-progress", "-o"]
    monkeypatch.setenv(MAX_PIXELS_ENV, "300000000")
    assert main([*args, str(tmp_path / "admitted.csv")]) == 0
    (row,) = read_rows(tmp_path / "admitted.csv")
    assert row.error == "" and 0 <= row.score <= 1

    def decode(self):
        raise AssertionError("an image over the limit was decoded")

    monkeypatch.delenv(MAX_PIXELS_ENV)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    assert main([*args, str(tmp_path / "refused.csv")]) == 1
    (row,) = read_rows(tmp_path / "refused.csv")
    assert "over the limit of 40,000,000" in row.error and "decompression-bomb guard" in row.error


def test_the_summary_counts_successes_not_rows(checkpoint, photo_dir, tmp_path, capsys):
    """Issue 21.6: one missing path printed "1 scored, 1 failed"."""
    missing = ["predict", str(tmp_path / "missing.jpg"), "--checkpoint", checkpoint, "--workers", "0",
               "--no-progress"]
    assert main(missing) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "0 scored, 1 failed"
    out = tmp_path / "o.csv"
    assert main([*missing, "-o", str(out)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "0 scored, 1 failed, 0 already in " + str(out)
    assert main(["predict", str(photo_dir), *missing[2:], "-o", str(out), "--resume"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"6 scored, 0 failed, 1 already in {out} (1 of them failed)"
