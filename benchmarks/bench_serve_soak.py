"""Memory soak of `resmemnet serve`: rounds of large-PNG uploads from concurrent clients, then small requests.

Each round, every client posts one request of `--files` PNGs of `--side` x `--side` pixels (flat
gradients: about 120 kB each on the wire, 108 MB each once decoded) to /v1/predict, all at once.
Then `--small` ordinary requests (one small JPEG each) follow. A thread samples the server
process's RSS (psutil) every 10 ms, so peaks inside a round are seen. Checks:

- RSS at the end <= RSS after warm-up + 1 GB, and no growth over the last 10 rounds;
- peak RSS during a round <= `--max-peak-gb`.

    nice -n 5 .venv/bin/python benchmarks/bench_serve_soak.py                    # the bundled default model
    .venv/bin/python benchmarks/bench_serve_soak.py --checkpoint tiny.safetensors --rounds 3 --files 4 --small 20

It prints the figures, writes them to --output (Markdown, with the command) and --json, and exits 1
if a request failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from bench_serve import HOST, free_port, start_server
from PIL import Image

GB = 2**30
GROWTH_WINDOW = 10  # rounds over which RSS must not grow
GROWTH_TOLERANCE = 64 * 2**20  # sampling noise: one PNG row buffer, allocator slack
SETTLE_S = 2.0  # end-of-round RSS is read once the server is idle and its end-of-burst trim has run


class RssSampler:
    """The peak RSS of one process since the last `reset()`, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def reset(self) -> int:
        """The peak so far; sampling starts again from the current RSS."""
        peak, self.peak = self.peak, self.rss()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.NoSuchProcess:
                return


@dataclass
class Round:
    seconds: float
    peak_rss: int
    end_rss: int
    errors: int


@dataclass
class Soak:
    model: str
    rounds_asked: int
    clients: int
    files: int
    side: int
    png_bytes: int
    start_rss: int = 0
    warm_rss: int = 0
    final_rss: int = 0
    small_requests: int = 0
    small_errors: int = 0
    small_seconds: float = 0.0
    rounds: list[Round] = field(default_factory=list)

    @property
    def peak_rss(self) -> int:
        return max((r.peak_rss for r in self.rounds), default=0)

    @property
    def growth_last_rounds(self) -> int:
        """End-of-round RSS growth over the last GROWTH_WINDOW rounds (all rounds if fewer)."""
        window = self.rounds[-GROWTH_WINDOW:]
        return window[-1].end_rss - window[0].end_rss if window else 0

    @property
    def errors(self) -> int:
        return self.small_errors + sum(r.errors for r in self.rounds)

    def checks(self, max_peak_gb: float) -> dict[str, bool]:
        return {"final RSS <= warm-up RSS + 1 GB": self.final_rss <= self.warm_rss + GB,
                f"no growth over the last {GROWTH_WINDOW} rounds (<= {GROWTH_TOLERANCE // 2**20} MB)":
                    self.growth_last_rounds <= GROWTH_TOLERANCE,
                f"peak RSS during a round <= {max_peak_gb:g} GB": self.peak_rss <= max_peak_gb * GB,
                "no failed request": self.errors == 0}


def _gradient_png(side: int) -> bytes:
    grey = Image.linear_gradient("L").resize((side, side))
    buffer = io.BytesIO()
    Image.merge("RGB", [grey, grey.transpose(Image.Transpose.ROTATE_90), grey]).save(buffer, format="PNG")
    return buffer.getvalue()


def _small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((480, 320)).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


async def _post(client: httpx.AsyncClient, files: list[tuple[str, bytes]]) -> bool:
    """Whether every file of the request was scored; a failure is printed with its reason."""
    try:
        r = await client.post("/v1/predict", files=[("files", f) for f in files])
    except httpx.HTTPError as exc:
        print(f"request failed: {type(exc).__name__}: {exc}", flush=True)
        return False
    if r.status_code == 200 and all(x["score"] is not None for x in r.json()["results"]):
        return True
    print(f"request failed: HTTP {r.status_code}: {r.text[:300]}", flush=True)
    return False


async def _soak(url: str, soak: Soak, sampler: RssSampler, png: bytes, small: int) -> None:
    large = [(f"large{i}.png", png) for i in range(soak.files)]
    photo = [("small.jpg", _small_jpeg())]
    # Drop idle connections well before the server does (ServeSettings.keep_alive_s, 5 s, httpx's own default):
    # with equal timeouts a request can go out on a connection the server is closing at that moment.
    limits = httpx.Limits(max_connections=soak.clients, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=1800) as client:
        # Warm-up: the model's first calls, the thread pool, the allocator's steady state.
        if not await _post(client, large) or not all(await asyncio.gather(*(_post(client, photo) for _ in range(4)))):
            raise RuntimeError("the warm-up requests failed; is the server healthy?")
        soak.warm_rss = sampler.rss()
        print(f"warm-up done: RSS {soak.warm_rss / GB:.2f} GB", flush=True)
        for i in range(soak.rounds_asked):
            sampler.reset()
            start = time.perf_counter()
            ok = await asyncio.gather(*(_post(client, large) for _ in range(soak.clients)))
            seconds = time.perf_counter() - start
            await asyncio.sleep(SETTLE_S)
            soak.rounds.append(Round(seconds, sampler.reset(), sampler.rss(), ok.count(False)))
            r = soak.rounds[-1]
            print(f"round {i + 1}/{soak.rounds_asked}: {r.seconds:.1f} s, peak {r.peak_rss / GB:.2f} GB, "
                  f"end {r.end_rss / GB:.2f} GB, errors {r.errors}", flush=True)
        start = time.perf_counter()
        ok = []
        for _ in range(0, small, soak.clients):
            ok += await asyncio.gather(*(_post(client, photo) for _ in range(soak.clients)))
        soak.small_requests, soak.small_errors = len(ok), ok.count(False)
        soak.small_seconds = time.perf_counter() - start
    await asyncio.sleep(SETTLE_S)
    soak.final_rss = sampler.rss()


def _report(soak: Soak, command: str, max_peak_gb: float) -> str:
    checks = soak.checks(max_peak_gb)
    lines = [
        "# Server memory soak", "",
        f"Command: `{command}`", "",
        f"Model: {soak.model}. Each round: {soak.clients} concurrent clients, each posting {soak.files} PNGs of "
        f"{soak.side}x{soak.side} ({soak.png_bytes:,} bytes each, {soak.files * soak.png_bytes / 2**20:.1f} MB "
        f"per request) to /v1/predict; then {soak.small_requests} requests of one small JPEG. RSS of the server "
        f"process (psutil, sampled every 10 ms); end-of-round and final RSS are read {SETTLE_S:g} s after the last "
        "response, once the server is idle.", "",
        "| figure | value |", "|---|---|",
        f"| RSS at start (model loaded) | {soak.start_rss / GB:.2f} GB |",
        f"| RSS after warm-up | {soak.warm_rss / GB:.2f} GB |",
        f"| peak RSS during a round | {soak.peak_rss / GB:.2f} GB |",
        f"| RSS after the last round | {soak.rounds[-1].end_rss / GB:.2f} GB |" if soak.rounds else "",
        f"| growth over the last {min(GROWTH_WINDOW, len(soak.rounds))} rounds | "
        f"{soak.growth_last_rounds / 2**20:+.0f} MB |",
        f"| RSS at the end (after the small requests) | {soak.final_rss / GB:.2f} GB |",
        f"| rounds, mean seconds per round | {len(soak.rounds)}, "
        f"{sum(r.seconds for r in soak.rounds) / max(1, len(soak.rounds)):.1f} s |",
        f"| small requests, seconds | {soak.small_requests}, {soak.small_seconds:.1f} s |",
        f"| failed requests | {soak.errors} |", "",
        "| check | holds |", "|---|---|", *(f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in checks.items()),
        "", "| round | seconds | peak RSS (GB) | end RSS (GB) | errors |", "|---|---|---|---|---|",
        *(f"| {i} | {r.seconds:.1f} | {r.peak_rss / GB:.2f} | {r.end_rss / GB:.2f} | {r.errors} |"
          for i, r in enumerate(soak.rounds, start=1)),
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="model to serve (default: the bundled default model)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--files", type=int, default=16, help="large PNGs per request")
    p.add_argument("--side", type=int, default=6000, help="width and height of each large PNG")
    p.add_argument("--small", type=int, default=200, help="small requests after the rounds")
    p.add_argument("--max-peak-gb", type=float, default=2.5)
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("serve_soak.md"))
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    png = _gradient_png(args.side)
    soak = Soak(model=str(args.checkpoint or "the bundled default"), rounds_asked=args.rounds,
                clients=args.clients, files=args.files, side=args.side, png_bytes=len(png))
    port = free_port()
    server = start_server(args.checkpoint, port, [], ready_s=900)  # a loaded, shared CPU starts slowly
    try:
        sampler = RssSampler(server.pid)
        soak.start_rss = sampler.rss()
        try:
            asyncio.run(_soak(f"http://{HOST}:{port}", soak, sampler, png, args.small))
        finally:
            sampler.stop()
    finally:
        server.terminate()
        server.wait(timeout=30)
    command = shlex.join(["python", "benchmarks/bench_serve_soak.py", *(sys.argv[1:] if argv is None else argv)])
    report = _report(soak, command, args.max_peak_gb)
    print(report)
    args.output.write_text(report)
    if args.json:
        figures = {**asdict(soak), "peak_rss": soak.peak_rss, "growth_last_rounds": soak.growth_last_rounds,
                   "errors": soak.errors, "checks": soak.checks(args.max_peak_gb)}
        args.json.write_text(json.dumps(figures, indent=1))
    failed = [name for name, ok in soak.checks(args.max_peak_gb).items() if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
