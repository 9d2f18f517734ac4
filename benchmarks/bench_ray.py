"""Whole-run images/s of `resmemnet predict`: the local engine next to `--engine ray` with 1 and 2 actors, in one run.

    .venv/bin/python benchmarks/bench_ray.py                 # 600 bsds500 + osie photos, 3 rounds
    .venv/bin/python benchmarks/bench_ray.py --limit 64 --rounds 1

Ray runs locally on --cpus CPUs (the local engine gets the same cores: --workers decoding processes and
torch's threads). Each arm is one whole job from JPEG files to a written CSV: scan, model loading (in each
actor for Ray), decoding, scoring, writing, with the bundled default model at precision `auto`. Ray itself
starts once, before any arm (a cluster is up before its jobs run), and its start-up is reported on its own.
Other programs share this machine, so the arms run interleaved, in a rotated order in each round, after
one warm-up pass of each arm on 32 photos (first imports in the worker processes), and each arm starts once
the last one's processes have exited (Ray's actors outlive their run by a few seconds, and two torch threads
that share their cores with other busy processes spin instead of computing). The table gives each arm's
median over the rounds, the per-round ratios, and the CPU seconds per image of this process and all its
descendants (Ray's daemons and workers, DataLoader workers): the cost of an engine, which other programs'
load changes much less than it changes images/s. Each arm also scores the first 32 photos alone in every
round: that time is the arm's cost per job (start-up), and (N - 32) / (t(N) - t(32)) its rate once running.
Writes --output (Markdown) and --json.

A Ray CPU actor runs one torch thread per CPU it holds: by default one actor holds every CPU of the node, as
the local engine's torch threads do ("Ray, 1 actor"); "Ray, 2 actors" gives each of two actors one CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import DATASETS, cpu_info, flags_text


class _CpuMeter:
    """CPU seconds of this process and its descendants while running; a process that exits counts up to its last
    sample (0.1 s apart)."""

    def __init__(self):
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.seen[proc.pid] = times.user + times.system
            except psutil.Error:
                continue

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            self._sample()

    def __enter__(self) -> _CpuMeter:
        self._sample()
        self.before = dict(self.seen)
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        self.seconds = sum(t - self.before.get(pid, 0.0) for pid, t in self.seen.items())


def _settle() -> None:
    """Wait until the last run's scoring actors have exited (DataLoader workers are joined before a run ends)."""
    def actors() -> bool:
        for proc in psutil.Process().children(recursive=True):
            try:
                if "MapWorker" in " ".join(proc.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and actors():
        time.sleep(0.2)
    time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=600, help="the first N bsds500 + osie photos (sorted)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs, and the local engine's decoding workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("ray.md"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("ray.json"))
    args = parser.parse_args()

    import ray

    from resmemnet.inference import ScorerSpec, precision_for
    from resmemnet.jobs import ScoringJob, read_rows, run_scoring, scan_images
    from resmemnet.ray import RayOptions, run_ray_scoring

    photos = scan_images([DATASETS / "bsds500", DATASETS / "osie"], recursive=True).paths[:args.limit]
    spec = ScorerSpec()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - start
    scratch = Path(tempfile.mkdtemp(prefix="bench_ray_"))

    def job(name: str, paths: list[str]) -> ScoringJob:
        return ScoringJob(paths, output=str(scratch / f"{name}.csv"), overwrite=True, batch_size=args.batch_size,
                          workers=args.cpus, progress=False)

    quiet = {"log": lambda _: None}

    arms: dict[str, Callable[[ScoringJob], object]] = {
        "local engine": lambda j: run_scoring(j, spec, **quiet),
        f"Ray, 1 actor x {args.cpus} CPUs (default)": lambda j: run_ray_scoring(j, spec, RayOptions(), **quiet),
        f"Ray, {args.cpus} actors x 1 CPU": lambda j: run_ray_scoring(j, spec, RayOptions(actors=args.cpus),
                                                                       **quiet),
    }
    names = list(arms)
    for k, arm in enumerate(arms.values()):  # warm-up: worker processes import torch once
        arm(job(f"warm{k}", photos[:32]))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    short: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _settle()
            start = time.perf_counter()
            with _CpuMeter() as meter:
                arms[name](job(str(names.index(name)), photos))
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(meter.seconds / len(photos))
            _settle()
            start = time.perf_counter()
            arms[name](job("short", photos[:32]))
            short[name].append(time.perf_counter() - start)
            print(f"round {r + 1} {name}: {len(photos) / seconds[name][-1]:.1f} images/s, "
                  f"{cpu[name][-1] * 1000:.0f} CPU ms/image, {short[name][-1]:.1f} s for 32", file=sys.stderr)
    rows = {name: read_rows(scratch / f"{k}.csv") for k, name in enumerate(names)}
    worst = max(abs(a.score - b.score) for name in names[1:] for a, b in zip(rows[names[0]], rows[name], strict=True)
                if a.score is not None)
    ray.shutdown()
    imports = []
    for _ in range(3):  # what each new actor process pays before its model loads
        _settle()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import resmemnet.ray"], check=True)
        imports.append(time.perf_counter() - start)

    local = names[0]
    cpu = cpu_info()
    result = {
        "photos": len(photos), "cpus": args.cpus, "rounds": args.rounds, "batch_size": args.batch_size,
        "precision": precision_for().name, "ray_start_s": ray_start, "max_abs_score_difference": worst,
        "seconds": seconds, "seconds_for_32": short, "cpu_s_per_image": cpu,
        "images_per_s": {name: len(photos) / statistics.median(s) for name, s in seconds.items()},
        "cpu_ms_per_image": {name: 1000 * statistics.median(c) for name, c in cpu.items()},
        "start_s": {name: statistics.median(s) for name, s in short.items()},
        "running_images_per_s": {name: (len(photos) - 32) / (statistics.median(seconds[name]) - statistics.median(s))
                                 for name, s in short.items()},
        "ratio_to_local_per_round": {name: [seconds[local][r] / s for r, s in enumerate(seconds[name])]
                                     for name in names[1:]},
        "import_s": statistics.median(imports),
        "cpu": cpu,
        "machine": f"{cpu['model']}, {os.cpu_count()} logical CPUs, load average "
                   f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after",
    }
    result["photos_for_85_percent"] = {name: _photos_for(0.85, result, local, name) for name in names[1:]}
    args.json.write_text(json.dumps(result, indent=2))
    args.output.write_text(_markdown(result, names))
    print(args.output.read_text())
    return 0


def _photos_for(share: float, result: dict, local: str, name: str) -> float | None:
    """The photos per job from which arm `name` reaches `share` of the local engine's whole-run images/s, each arm
    modelled as its 32-photo time plus the rest at its running rate; None if its running rate is too low."""
    s_local, s_arm = result["start_s"][local], result["start_s"][name]
    r_local, r_arm = result["running_images_per_s"][local], result["running_images_per_s"][name]
    gain = 1 / r_local - share / r_arm  # seconds per photo that the arm catches up
    if gain <= 0:
        return None
    return 32 + max(0.0, share * s_arm - s_local) / gain


def _markdown(result: dict, names: list[str]) -> str:
    command = "python benchmarks/bench_ray.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    local = result["images_per_s"][names[0]]
    flags = flags_text(result["cpu"])
    lines = [
        "# `resmemnet predict`: the local engine and `--engine ray` (CPU)", "",
        f"Reproduce: `{command.strip()}` (writes this file and `ray.json`).", "",
        f"{result['photos']} bsds500 + osie photos, bundled default model at precision {result['precision']}, batch "
        f"{result['batch_size']}, {result['cpus']} CPUs for every arm ({result['machine']}; flags {flags}; shared "
        f"with other jobs). Whole runs from JPEG files to a written CSV; the arms ran interleaved, "
        f"{result['rounds']} rounds in a rotated order; images/s is each arm's median. Largest score difference "
        f"between an engine's rows and the local engine's: {result['max_abs_score_difference']:.1e}. Ray's own "
        "start-up, once per cluster: "
        f"{result['ray_start_s']:.1f} s (not in the arms).", "",
        "| engine | images/s | vs local engine | per round | CPU ms/image | vs local engine | 32 photos, s | "
        "images/s once running | vs local engine |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    running = result["running_images_per_s"][names[0]]
    local_cpu = result["cpu_ms_per_image"][names[0]]
    for name in names:
        rounds = result["ratio_to_local_per_round"].get(name)
        per_round = ", ".join(f"{r:.2f}" for r in rounds) if rounds else ""
        lines.append(f"| {name} | {result['images_per_s'][name]:.1f} | {result['images_per_s'][name] / local:.2f} | "
                     f"{per_round} | {result['cpu_ms_per_image'][name]:.0f} | "
                     f"{result['cpu_ms_per_image'][name] / local_cpu:.2f} | {result['start_s'][name]:.1f} | "
                     f"{result['running_images_per_s'][name]:.1f} | "
                     f"{result['running_images_per_s'][name] / running:.2f} |")
    lines += [
        "", "A Ray job pays to start its scoring actors: a new process each, which starts a Ray worker, imports "
        "torch, torchvision and Ray Data, and loads the model: the \"32 photos\" column. That cost is per job, not "
        "per image, and it is most of Ray's gap at this size; \"once running\" is the rate after it. A CPU actor "
        "decodes its own batches in threads, two batches at a time (one decodes while the other scores), so no "
        "decoding process has to start and import torch per job. Here a new Python process takes "
        f"{result['import_s']:.1f} s to `import resmemnet.ray` (torch, torchvision, Ray Data), before any model "
        "loads. So Ray's whole-run images/s reach 85% of the local engine's from about "
        + "; ".join(f"{n:,.0f} photos per job ({name})" if n else f"never ({name})"
                    for name, n in result["photos_for_85_percent"].items()) + ", by the columns above.",
        "", "## On N nodes", "",
        "Nothing in a run is shared between images except the driver's list of paths and the rows it receives, "
        "so throughput grows with the number of scoring actors until the driver's share becomes the limit. "
        "By default each CPU node gets one actor holding all its cores (`--cpus-per-actor`), which decodes and "
        "scores its batches; the driver only lists the inputs and writes rows of a few dozen bytes each (a Parquet "
        "output is written by the workers themselves). On N CPU nodes images/s is about N x the single-node rate "
        "once running, less the per-job start-up above, which the nodes pay in parallel. With GPUs "
        "(`--gpus-per-actor 1`) Ray tasks decode on every node's CPUs and the decoded tensors (a few hundred kB "
        "per image) travel through the object store to the GPU actors, so each GPU's throughput is bounded by the "
        "CPUs that decode for it, as it is for the local engine.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
