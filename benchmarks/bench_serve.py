"""Load test of `resmemnet serve` on loopback: requests/s and p50/p95 latency at several client counts.

Each server configuration runs as its own `resmemnet serve` process on 127.0.0.1; the clients are
async httpx in this process. Every level is bounded by a request count and a time limit, and any
failed request is counted and makes the script exit 1. By default it compares micro-batching
(the server's defaults) with batching off (--max-batch 1), side by side in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_serve.py                      # tiny untrained model
    .venv/bin/python benchmarks/bench_serve.py --checkpoint model.safetensors --requests 400

Without --checkpoint a tiny model (mobilenet_v3_large, 64x64 inputs) is built, so the numbers
measure the server (upload, decode, batching, HTTP) more than the network; say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only, never configurable
SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bsds500" / "test"


@dataclass
class Level:
    config: str
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        p50, p95 = np.percentile(self.latencies_ms, [50, 95]) if len(self.latencies_ms) else (float("nan"),) * 2
        return (f"| {self.config:<25} | {self.clients:>7} | {self.requests:>8} | {self.errors:>6} | {self.rps:>8.1f} "
                f"| {p50:>8.1f} | {p95:>8.1f} |")


def _photo() -> tuple[str, bytes]:
    """One real photo when the shared data is present (else a generated 481x321 JPEG), sent by every request."""
    real = sorted(SHARED_PHOTOS.glob("*.jpg"))
    if real:
        return real[0].name, real[0].read_bytes()
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (321, 481, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return "generated.jpg", buffer.getvalue()


def tiny_checkpoint(folder: Path) -> Path:
    from resmemnet import Preprocessing, create_model, save_checkpoint

    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(64, 64)))
    return save_checkpoint(model.eval(), folder / "tiny.safetensors", metadata={"description": "benchmark only"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path | None, port: int, extra: list[str], ready_s: float = 120
                 ) -> subprocess.Popen[bytes]:
    """`resmemnet serve` on loopback (the bundled default model when checkpoint is None), once /healthz answers."""
    cli = "import sys; from resmemnet.cli import main; sys.exit(main())"
    model = [] if checkpoint is None else ["--checkpoint", str(checkpoint)]
    cmd = [sys.executable, "-c", cli, "serve", "--host", HOST, "--port", str(port), *model, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server did not answer /healthz within {ready_s:g} s")


async def _level(url: str, config: str, clients: int, total: int, max_seconds: float, photo: tuple[str, bytes]
                 ) -> Level:
    latencies: list[float] = []
    errors = 0
    issued = 0
    # Idle connections expire before the server's 5 s keep-alive (see bench_serve_soak.py).
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for _ in range(min(clients, 4)):  # warm-up: connections, first model call
            await client.post("/v1/predict", files=[("files", photo)])
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal errors, issued
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", files=[("files", photo)])
                    ok = r.status_code == 200 and r.json()["results"][0]["score"] is not None
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(1000 * (time.perf_counter() - t0))
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return Level(config, clients, len(latencies), errors, elapsed, np.array(latencies))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="model to serve (default: a tiny untrained model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=200, help="requests per level (upper bound)")
    p.add_argument("--seconds", type=float, default=20.0, help="time limit per level")
    p.add_argument("--max-wait-ms", type=float, help="batching window of the batched server (default: the server's)")
    p.add_argument("--no-compare", action="store_true", help="only the batched server")
    args = p.parse_args(argv)
    configs = {"batched (defaults)": []}
    if args.max_wait_ms is not None:
        configs = {f"batched, wait {args.max_wait_ms:g} ms": ["--max-wait-ms", str(args.max_wait_ms)]}
    if not args.no_compare:
        configs["unbatched (--max-batch 1)"] = ["--max-batch", "1"]
    photo = _photo()
    levels: list[Level] = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
        for name, extra in configs.items():
            port = free_port()
            server = start_server(checkpoint, port, extra)
            try:
                for clients in args.clients:
                    levels.append(asyncio.run(_level(f"http://{HOST}:{port}", name, clients, args.requests,
                                                     args.seconds, photo)))
                    print(levels[-1].row(), flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(f"\nmodel: {args.checkpoint or 'tiny untrained mobilenet_v3_large, 64x64 input'}; photo: {photo[0]} "
          f"({len(photo[1]):,} bytes), one image per request, POST /v1/predict")
    print("| config                    | clients | requests | errors |    req/s | p50 (ms) | p95 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        print(level.row())
    if not args.no_compare:
        by_key = {(lv.config, lv.clients): lv for lv in levels}
        for clients in args.clients:
            batched, unbatched = (by_key[(c, clients)] for c in configs)
            print(f"batched / unbatched req/s at {clients} clients: {batched.rps / unbatched.rps:.2f}x")
    errors = sum(level.errors for level in levels)
    if errors:
        print(f"FAILED: {errors} requests failed", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
