"""Memory bounds: the shared pixel budget, handing memory back, and the caller's model left alone."""

import io
import json
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from resmemnet.serve import ServeSettings, create_app
from resmemnet.serve.memory import PixelBudget, release_memory
from tests.serve.conftest import photo_bytes

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve_soak.py"


def test_pixel_budget_makes_decoding_wait_for_free_pixels():
    budget = PixelBudget(100)
    entered = threading.Event()

    def second() -> None:
        with budget.hold(60):
            entered.set()

    with budget.hold(60):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.2) and budget.in_use == 60  # 60 + 60 > 100: the second one waits
    thread.join(timeout=10)
    assert entered.is_set() and budget.in_use == 0
    with budget.hold(10**9):  # larger than the whole budget: decoded alone, never refused
        assert budget.in_use == 100
    assert budget.in_use == 0


def test_release_memory_is_safe_to_call_anywhere():
    release_memory()  # glibc malloc_trim on Linux, a no-op elsewhere; it must never raise
    release_memory()


_ALLOCATOR_PROBE = """
import numpy as np, psutil
from resmemnet.serve.memory import MMAP_THRESHOLD, tune_allocator
assert tune_allocator()
large = np.ones(20 * 2**20 // 8)
del large  # untuned, freeing this raises glibc's mmap threshold to 20 MB, and 2 MiB buffers stay
process = psutil.Process()
size = 2 * MMAP_THRESHOLD
before = process.memory_info().rss
chunks = [np.ones(size // 8) for _ in range(64)]  # 128 MiB in 2 MiB buffers
pinned = np.ones(size // 8)  # on a heap it would sit above the chunks and stop the heap shrinking
held = process.memory_info().rss
del chunks
after = process.memory_info().rss
assert held - before >= 100 * 2**20, "the buffers were never touched"
assert after - before <= 32 * 2**20, f"{(after - before) / 2**20:.0f} MiB kept after the buffers were freed"
assert pinned.sum() == size // 8
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_returns_freed_buffers_even_below_a_live_one():
    # A fresh interpreter: the allocator's state is process-wide, and earlier tests' threads would blur RSS.
    proc = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_create_app_leaves_the_callers_model_alone(tiny_model):
    tiny_model.train()
    try:
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        app = create_app(tiny_model, ServeSettings())
        assert tiny_model.training  # the scorer runs it in eval mode, call by call
        with TestClient(app) as c:
            assert c.post("/v1/predict", files=[("files", ("a.jpg", photo_bytes(0)))]).status_code == 200
        after = tiny_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    finally:
        tiny_model.eval()


def test_an_eval_model_on_the_right_device_is_used_without_a_copy(tiny_model, monkeypatch):
    def no_copy(_):
        raise AssertionError("create_app copied a model it could use as it is")

    monkeypatch.setattr("resmemnet.inference.copy.deepcopy", no_copy)
    create_app(tiny_model.eval(), ServeSettings(device="cpu"))


def test_a_burst_of_large_pngs_is_scored_within_the_budget(tiny_model):
    """Large flat PNGs (a few kB, 16 MP decoded each) are shrunk on decoding, and the budget is returned."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((4000, 4000)).convert("RGB").save(buffer, format="PNG")
    settings = ServeSettings(decode_pixels=20_000_000)
    app = create_app(tiny_model, settings)
    with TestClient(app) as c:
        r = c.post("/v1/predict", files=[("files", (f"big{i}.png", buffer.getvalue())) for i in range(3)])
        assert r.status_code == 200 and all(x["score"] is not None for x in r.json()["results"])
        r = c.post("/v1/explain?format=png", files=[("files", ("big.png", buffer.getvalue()))])
        assert r.status_code == 200 and max(Image.open(io.BytesIO(r.content)).size) == settings.overlay_max_side
    assert app.state.pixel_budget.in_use == 0


@pytest.mark.slow
def test_soak_memory_stays_bounded(tiny_checkpoint, tmp_path):
    """A short run of benchmarks/bench_serve_soak.py: 3 rounds of 4 concurrent 4 x 6000x6000 PNG requests,
    then 20 small ones, against a `resmemnet serve` process; bounds relative to its RSS after warm-up."""
    figures_path = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--checkpoint", str(tiny_checkpoint), "--rounds", "3",
                          "--files", "4", "--small", "20", "--output", str(tmp_path / "soak.md"),
                          "--json", str(figures_path)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(figures_path.read_text())
    assert figures["errors"] == 0 and figures["small_requests"] == 20 and len(figures["rounds"]) == 3
    warm = figures["warm_rss"]
    # Unbounded decoding would hold 16 decoded PNGs (2.3 GB) at the peak; the budget holds one at a time.
    assert figures["peak_rss"] <= warm + 2**30
    assert figures["final_rss"] <= warm + 256 * 2**20
    assert figures["growth_last_rounds"] <= 64 * 2**20
