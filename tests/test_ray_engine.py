"""`resmemnet predict --engine ray`: the local engine's rows from a Ray actor pool, through a killed actor,
bad files, resume, file:// URIs and Parquet. Ray starts once for the module (2 CPUs, no dashboard)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'resmemnet[ray]'")

from resmemnet import Preprocessing, create_model, save_checkpoint  # noqa: E402
from resmemnet.cli import main  # noqa: E402
from resmemnet.inference import Prediction, ScorerSpec  # noqa: E402
from resmemnet.jobs import ScoringJob, read_rows, run_scoring, scan_images  # noqa: E402
from resmemnet.ray import RayOptions, _read, run_ray_scoring, scan_sources, score  # noqa: E402
from tests.conftest import make_photo, shared_dataset  # noqa: E402

pytestmark = pytest.mark.slow  # Ray and its actors' torch imports take seconds on 2 cores


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # one GPU declared, none behind it: the GPU layout runs, and its scorer falls back to the CPU
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(32, 32)))
    return str(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


def _same_rows(got: list[Prediction], want: list[Prediction]) -> None:
    """Same paths and errors in the same order, scores to 1e-5."""
    assert [(r.path, r.error) for r in got] == [(r.path, r.error) for r in want]
    assert [r.score is None for r in got] == [r.score is None for r in want]
    np.testing.assert_allclose([r.score for r in got if r.score is not None],
                               [r.score for r in want if r.score is not None], atol=1e-5)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        make_photo(folder / f"img{i:03d}.jpg", seed=i)
    return folder


@pytest.mark.parametrize(("nodes", "gpus", "options", "spare", "want"), [
    ([16, 16], 0, RayOptions(), 0, (2, 16)),  # a CPU scorer per node, with all its CPUs
    ([16, 16], 0, RayOptions(), 1, (2, 15)),  # a user's dataset keeps one CPU for its read tasks
    ([8, 16], 0, RayOptions(), 0, (3, 8)),  # sized to the smallest node, so that every actor can be placed
    ([2], 0, RayOptions(actors=2), 0, (2, 1)),  # --actors shares the CPUs
    ([16, 16], 0, RayOptions(cpus_per_actor=4), 0, (8, 4)),
    ([16, 16], 4, RayOptions(gpus_per_actor=1), 0, (4, 1)),  # a GPU scorer needs one CPU
    ([16, 16], 4, RayOptions(gpus_per_actor=0.5, cpus_per_actor=2), 0, (8, 2)),
])
def test_the_scoring_pool_is_sized_to_the_cluster(monkeypatch, nodes, gpus, options, spare, want):
    from resmemnet import ray as engine

    monkeypatch.setattr(engine.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": float(c)}} for c in nodes])
    monkeypatch.setattr(engine.ray, "cluster_resources", lambda: {"CPU": float(sum(nodes)), "GPU": float(gpus)})
    pool = engine._pool(options, spare_cpus=spare)
    assert (pool.actors, pool.cpus) == want


@pytest.mark.parametrize(("options", "message"), [
    (RayOptions(actors=3, cpus_per_actor=16), "3 scoring actor(s) with 16 CPU each need 48 CPUs; the Ray cluster "
                                              "has 32"),
    (RayOptions(gpus_per_actor=1), "need 1 GPUs; the Ray cluster has 0; drop --gpus-per-actor"),
])
def test_a_pool_the_cluster_cannot_hold_is_refused(monkeypatch, options, message):
    from resmemnet import ray as engine

    monkeypatch.setattr(engine.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 16.0}}] * 2)
    monkeypatch.setattr(engine.ray, "cluster_resources", lambda: {"CPU": 32.0})
    with pytest.raises(ValueError, match=re.escape(message)):
        engine._pool(options, spare_cpus=0)


def test_the_local_engine_never_imports_ray(checkpoint, tmp_path, capsys):
    make_photo(tmp_path / "a.jpg")
    code = ("import sys; from resmemnet.cli import main; "
            f"rc = main(['predict', {str(tmp_path / 'a.jpg')!r}, '--checkpoint', {checkpoint!r}, '--workers', '0', "
            "'--no-progress']); sys.exit(rc or 3 * ('ray' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert main(["predict", str(tmp_path / "a.jpg"), "--checkpoint", checkpoint, "--actors", "2"]) == 2
    assert "--actors, --gpus-per-actor and --cpus-per-actor are for --engine ray" in capsys.readouterr().err


def test_forty_real_photos_get_the_local_engines_rows_in_its_order(tmp_path):
    photos = scan_images([shared_dataset("bsds500"), shared_dataset("osie")], recursive=True).paths
    photos = photos[::len(photos) // 40][:40]
    local, on_ray = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert main(["predict", *photos, "-o", str(local), "--workers", "2", "--no-progress"]) == 0
    assert main(["predict", *photos, "-o", str(on_ray), "--engine", "ray", "--no-progress"]) == 0
    rows = read_rows(on_ray)
    assert [r.path for r in rows] == photos
    _same_rows(rows, read_rows(local))


def test_bad_files_are_error_rows_resume_scores_nothing_new_and_a_file_uri_is_its_path(checkpoint, tmp_path):
    folder = _photos(tmp_path / "photos", 6)
    good = (folder / "img000.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_text("not an image\n")
    sources = [str(folder), str(tmp_path / "missing.jpg")]
    args = ["--checkpoint", checkpoint, "--batch-size", "4", "--no-progress"]
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(["predict", *sources, "-o", str(local), "--workers", "0", *args]) == 1  # error rows: exit 1
    assert main(["predict", *sources, "-o", str(on_ray), "--engine", "ray", "--actors", "2", *args]) == 1
    rows = read_rows(on_ray)
    _same_rows(rows, read_rows(local))
    errors = {Path(r.path).name: r.error for r in rows if r.error}
    assert errors.keys() == {"corrupt.jpg", "notes.png", "missing.jpg"}
    assert "truncated" in errors["corrupt.jpg"] and "not an image" in errors["notes.png"]
    assert errors["missing.jpg"] == "file not found"

    written = on_ray.read_bytes()
    job = ScoringJob(sources, output=str(on_ray), resume=True, batch_size=4, progress=False)
    result = run_ray_scoring(job, ScorerSpec(checkpoint))
    assert (result.scored, result.already, result.failed) == (0, 9, 3) and on_ray.read_bytes() == written

    uris = ["file://" + str(folder), "file://" + str(tmp_path / "missing.jpg")]
    run_ray_scoring(ScoringJob(uris, output=str(tmp_path / "uri.csv"), batch_size=4, progress=False),
                    ScorerSpec(checkpoint))
    by_uri = read_rows(tmp_path / "uri.csv")
    assert [r.path for r in by_uri] == ["file://" + r.path for r in rows]
    _same_rows([Prediction(r.path.removeprefix("file://"), r.score, r.error) for r in by_uri], rows)


def test_uris_are_scanned_by_the_local_scans_rules(tmp_path):
    folder = _photos(tmp_path / "photos", 3)
    (folder / "sub").mkdir()
    make_photo(folder / "sub" / "deep.png")
    (folder / "notes.txt").write_text("not an image name")
    for sources, recursive in ([str(folder)], False), ([str(folder)], True), ([f"{folder}/*/*.png"], False), \
                              ([f"{folder}/**/*.png", f"{folder}/img001.jpg"], True):
        uris = scan_sources(["file://" + s for s in sources], recursive=recursive).paths
        assert uris == ["file://" + p for p in scan_images(sources, recursive=recursive).paths]
    spaced = make_photo(folder / "a b.jpg")
    uri = f"file://{folder}/a%20b.jpg"  # listed percent-encoded, read back from its own file
    assert scan_sources(["file://" + str(folder)]).paths[0] == uri and _read(uri) == spaced.read_bytes()


def test_a_parquet_output_holds_the_same_rows_and_resumes(checkpoint, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    folder = _photos(tmp_path / "photos", 5)
    (folder / "junk.jpg").write_bytes(b"junk")
    local = tmp_path / "local.csv"
    run_scoring(ScoringJob([str(folder)], output=str(local), workers=0, progress=False), ScorerSpec(checkpoint))
    job = ScoringJob([str(folder)], output=str(tmp_path / "scores.parquet"), batch_size=2, progress=False)
    result = run_ray_scoring(job, ScorerSpec(checkpoint), RayOptions(actors=1))
    assert (result.scored, result.already, result.failed) == (5, 0, 1)
    table = pq.read_table(tmp_path / "scores.parquet").sort_by("path")
    assert table.column_names == ["path", "score", "error"]
    _same_rows([Prediction(**r) for r in table.to_pylist()], read_rows(local))
    with pytest.raises(ValueError, match="already holds Parquet files; pass --resume"):
        run_ray_scoring(job, ScorerSpec(checkpoint))
    again = run_ray_scoring(ScoringJob([str(folder)], output=job.output, resume=True, progress=False),
                            ScorerSpec(checkpoint))
    assert (again.scored, again.already, again.failed) == (0, 6, 1)
    assert pq.read_table(tmp_path / "scores.parquet").num_rows == 6


def test_score_adds_columns_to_a_users_dataset(checkpoint, tmp_path):
    folder = _photos(tmp_path / "photos", 3)
    paths = [str(p) for p in sorted(folder.glob("*.jpg"))] + [str(tmp_path / "gone.png")]
    ds = ray.data.from_items([{"path": p, "label": i} for i, p in enumerate(paths)])
    scored = score(ds, checkpoint, batch_size=2, options=RayOptions(actors=1))
    rows = sorted(scored.take_all(), key=lambda r: r["label"])
    assert [r["path"] for r in rows] == paths and [r["label"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["score"] is None and rows[-1]["error"] == "file not found"
    assert all(0 <= r["score"] <= 1 and r["score_std"] is None for r in rows[:3])
    with pytest.raises(ValueError, match="needs a 'file' column"):
        score(ds, checkpoint, column="file")


def test_gpu_scorers_are_fed_by_decoding_tasks_and_give_the_cpu_scorers_rows(checkpoint, tmp_path):
    folder = _photos(tmp_path / "photos", 5)
    paths = [str(p) for p in sorted(folder.glob("*.jpg"))] + [str(tmp_path / "gone.png")]
    ds = ray.data.from_items([{"path": p} for p in paths])
    on_gpus = score(ds, checkpoint, batch_size=2, options=RayOptions(gpus_per_actor=1)).materialize()
    on_cpus = score(ds, checkpoint, batch_size=2, options=RayOptions(actors=1)).materialize()
    assert "MapBatches(_decode)" in on_gpus.stats() and "MapBatches(_decode)" not in on_cpus.stats()
    rows = [sorted(d.take_all(), key=lambda r: r["path"]) for d in (on_gpus, on_cpus)]
    _same_rows(*[[Prediction(r["path"], r["score"], r["error"]) for r in got] for got in rows])
    errors = {r["path"]: r["error"] for r in rows[0]}
    assert errors.pop(paths[-1]) == "file not found" and set(errors.values()) == {""}


def test_a_killed_scoring_actor_is_restarted_and_every_row_written_once(checkpoint, tmp_path):
    """SIGKILL one actor's process mid-run; Ray restarts it and retries its batch."""
    folder = _photos(tmp_path / "photos", 48)
    started = tmp_path / "actors"
    started.mkdir()

    @dataclass(frozen=True)
    class SlowSpec(ScorerSpec):  # defined here, so Ray ships it to the actors by value
        started: str = ""

        def build(self, *, local_rank: int = 0):
            scorer = ScorerSpec.build(self, local_rank=local_rank)
            (Path(self.started) / str(os.getpid())).touch()
            fast = scorer.score_with_spread

            def slow(batch):
                time.sleep(0.25)  # a run long enough to be killed in the middle of
                return fast(batch)

            scorer.score_with_spread = slow
            return scorer

    output = tmp_path / "scores.csv"

    def kill_one_actor_mid_run() -> None:
        while not output.exists() or output.read_text().count("\n") < 6:  # header + a few batches written
            time.sleep(0.05)
        os.kill(int(next(started.iterdir()).name), signal.SIGKILL)

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    job = ScoringJob([str(folder)], output=str(output), batch_size=2, progress=False)
    result = run_ray_scoring(job, SlowSpec(checkpoint, started=str(started)), RayOptions(actors=2))
    killer.join(timeout=1)
    assert not killer.is_alive(), "the run ended before an actor could be killed"
    assert len(list(started.iterdir())) == 3  # two actors, and the one restarted in place of the killed one
    rows = read_rows(output)
    assert [r.path for r in rows] == [str(p) for p in sorted(folder.glob("*.jpg"))]  # each once, in order
    assert result.scored == 48 and not any(r.error for r in rows)
