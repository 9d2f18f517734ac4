"""The default `resmemnet predict DIR -o x.csv` against the `resmem` package, each as a whole process.

    nice -n 5 .venv/bin/python benchmarks/bench_default.py                 # all 1,200 bsds500 + osie photos
    nice -n 5 .venv/bin/python benchmarks/bench_default.py --limit 64 --repeats 3

The photos are symlinked into one flat scratch folder DIR, read once so every run finds them cached, and
each row is one process under GNU time (wall seconds from start-up to exit, imports and model load
included; max RSS of its largest single process, plus the peak summed RSS of its process tree, polled):

- resmem: resmem's own network and transform, fp32, a DataLoader with batch_size=16 and 2 workers
  (this script run as `--resmem-child DIR OUT.csv`);
- resmemnet (default): `resmemnet predict DIR -o x.csv`, no other flags: the default model and settings;
- --precision fp32 (int8/bf16 off: the plain torch path), and --precision bf16 if the CPU has bf16 units.

--checkpoint X adds `--checkpoint X` to the resmemnet rows. Runs alternate (resmem, then each resmemnet
row) --repeats times; ratios compare with the resmem run of the same repeat, and the table gives medians.
Each CSV is checked for one scored row per photo, and each resmemnet row's scores are compared with
resmem's (Spearman) as a sanity check. Writes --output (Markdown) and --json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def resmem_child(folder: str, output: str) -> int:
    """resmem's batched loop: its model and transform, batches of 16, 2 decoding workers, path,score CSV."""
    import torch
    from PIL import Image
    from resmem import ResMem, transformer
    from torch.utils.data import DataLoader, Dataset

    paths = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    class Files(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
            return paths[i], transformer(Image.open(paths[i]).convert("RGB"))

    model = ResMem(pretrained=True).eval()
    with open(output, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(("path", "score"))
        for names, images in DataLoader(Files(), batch_size=16, num_workers=2):
            writer.writerows(zip(names, model(images).flatten().tolist(), strict=True))
    return 0


def cpu_info() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(found[1].split()) if found else set()
    import torch

    return {"model": model[1].strip() if model else "unknown", "flags": {f: f in flags for f in CPU_FLAGS},
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def flags_text(cpu: dict[str, object]) -> str:
    """The CPU_FLAGS that `cpu_info` found, for a benchmark's Markdown."""
    return ", ".join(f for f, present in cpu["flags"].items() if present) or "none of " + ", ".join(CPU_FLAGS)


def resmemnet_info(exe: str, checkpoint: str | None) -> dict[str, object]:
    """What `resmemnet info --json` says: the model it loads and the precision `predict` would pick."""
    extra = ["--checkpoint", checkpoint] if checkpoint else []
    result = subprocess.run([exe, "info", "--json", *extra], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    info = json.loads(result.stdout)
    metadata = info.get("metadata") or {}
    return {"checkpoint": info.get("checkpoint"), "name": metadata.get("name"),
            "backbone": info.get("backbone"), "precision": info.get("precision")}


def link_photos(limit: int, folder: Path) -> list[Path]:
    """The bsds500 + osie photos (or the first `limit`) as symlinks with unique names in one flat folder."""
    from resmemnet.jobs import scan_images

    paths = scan_images([DATASETS / "bsds500", DATASETS / "osie"], recursive=True).paths
    paths = paths[:limit] if limit else paths
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    links = []
    for i, path in enumerate(paths):
        link = folder / f"{i:04d}_{Path(path).name}"
        link.symlink_to(Path(path).resolve())
        link.read_bytes()  # into the page cache, so the first run is not the only one reading the disk
        links.append(link)
    return links


def scratch_photos(out: Path | None, limit: int, prefix: str) -> tuple[Path, list[Path]]:
    """The scratch folder (`out`, or a new temp dir) and the photo links in its `photos/`."""
    scratch = (out or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch, link_photos(limit, scratch / "photos")


def timed(command: list[str], scratch: Path, env: dict[str, str]) -> dict[str, float]:
    """One process under GNU time: wall seconds, max RSS (KB) of its largest process, peak tree RSS (KB)."""
    import psutil

    timing = scratch / "time.txt"
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)][1:]  # leave out the time process itself
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, stderr = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    seconds, max_rss_kb = timing.read_text().split()[-2:]
    return {"seconds": float(seconds), "max_rss_kb": int(max_rss_kb), "tree_peak_rss_kb": peak[0] // 1024}


def read_scores(path: Path) -> tuple[int, dict[str, float]]:
    """Rows in a CSV and its scores by file name."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return len(rows), {Path(r["path"]).name: float(r["score"]) for r in rows if r.get("score")}


def report(run: dict[str, object], base: dict[str, object], photos: int) -> None:
    """Adds the rates and the ratios to the resmem run of the same repeat, and prints a line."""
    run["images_per_s"] = photos / run["seconds"]
    run["speed_vs_resmem"] = base["seconds"] / run["seconds"]
    run["rss_vs_resmem"] = run["max_rss_kb"] / base["max_rss_kb"]
    print(f"repeat {run['repeat']}: {run['row']}: {run['seconds']:.1f} s, {run['max_rss_kb'] / 1e6:.2f} GB, "
          f"{run['scored']}/{run['rows']} rows scored", flush=True)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--resmem-child":
        return resmem_child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="the first N photos (0: all 1,200)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--checkpoint", help="add --checkpoint X to the resmemnet rows (default: the default model)")
    parser.add_argument("--isa", help="cap oneDNN at this instruction set in every row (e.g. AVX2: what torch does "
                                      "on a CPU without AVX-512 or AMX; resmem's run is capped the same way)")
    parser.add_argument("--out", type=Path, help="scratch folder for the photo links and CSVs (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "default_speed.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "default_speed.json")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    scratch, photos = scratch_photos(args.out, args.limit, "bench_default_")
    folder = str(scratch / "photos")
    exe = str(Path(sys.executable).parent / "resmemnet")
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": args.isa} if args.isa else {})}
    cpu = cpu_info()
    info = resmemnet_info(exe, args.checkpoint)
    extra = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    ours = {"resmemnet (default)": extra, "resmemnet --precision fp32": [*extra, "--precision", "fp32"]}
    if (cpu["flags"]["avx512_bf16"] or cpu["flags"]["amx_bf16"]) and not args.isa:
        ours["resmemnet --precision bf16"] = [*extra, "--precision", "bf16"]

    runs: list[dict[str, object]] = []
    for repeat in range(args.repeats):
        out = scratch / f"resmem-{repeat}.csv"
        base = timed([sys.executable, str(Path(__file__).resolve()), "--resmem-child", folder, str(out)], scratch, env)
        count, theirs = read_scores(out)
        names = sorted(theirs)
        base.update(row="resmem", repeat=repeat, rows=count, scored=len(theirs), spearman_vs_resmem=None)
        report(base, base, len(photos))
        runs.append(base)
        for i, (row, flags) in enumerate(ours.items()):
            out = scratch / f"resmemnet{i}-{repeat}.csv"
            run = timed([exe, "predict", folder, "-o", str(out), *flags], scratch, env)
            count, scores = read_scores(out)
            common = [n for n in names if n in scores]
            rho = spearmanr([scores[n] for n in common], [theirs[n] for n in common])[0] if len(common) > 2 else None
            run.update(row=row, repeat=repeat, rows=count, scored=len(scores),
                       spearman_vs_resmem=None if rho is None else float(rho))
            report(run, base, len(photos))
            runs.append(run)

    def median(row: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["row"] == row and r[key] is not None]
        return statistics.median(values) if values else None

    summary = {row: {key: median(row, key) for key in ("images_per_s", "speed_vs_resmem", "max_rss_kb",
                                                         "rss_vs_resmem", "tree_peak_rss_kb", "spearman_vs_resmem")}
               | {"all_rows_written": all(r["rows"] == r["scored"] == len(photos) for r in runs if r["row"] == row)}
               for row in ["resmem", *ours]}
    command = shlex.join(["python", "benchmarks/bench_default.py", *sys.argv[1:]])
    date = datetime.now().isoformat(timespec="minutes")
    result = {"command": command, "date": date, "photos": len(photos), "repeats": args.repeats, "cpu": cpu,
              "onednn_max_cpu_isa": args.isa,
              "resmemnet_info": info, "commands": {"resmem": "bench_default.py --resmem-child DIR x.csv",
                                                   **{row: shlex.join(["resmemnet", "predict", "DIR", "-o", "x.csv",
                                                                       *flags]) for row, flags in ours.items()}},
              "summary": summary, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    flags = flags_text(cpu)
    precision = info.get("precision") or {}
    model = info.get("name") or info.get("checkpoint") or "?"
    lines = [f"Command: `{command}`", "", f"Date: {date}", "",
             f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, torch threads {cpu['torch_threads']}; "
             f"flags: {flags}" + (f"; every row with ONEDNN_MAX_CPU_ISA={args.isa}" if args.isa else ""), "",
             f"{len(photos)} bsds500 + osie photos, {args.repeats} repeat(s), medians. Model: {model}; "
             f"`resmemnet info` precision: {precision.get('name', '?')} ({precision.get('reason', '?')}).", "",
             "| row | command | images/s | speed vs resmem | peak RSS GB (tree) | RSS vs resmem | all rows | "
             "Spearman vs resmem |", "|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        rho = "-" if s["spearman_vs_resmem"] is None else f"{s['spearman_vs_resmem']:.3f}"
        lines.append(f"| {row} | `{result['commands'][row]}` | {s['images_per_s']:.2f} | "
                     f"{s['speed_vs_resmem']:.2f}x | {s['max_rss_kb'] / 1e6:.2f} ({s['tree_peak_rss_kb'] / 1e6:.2f}) | "
                     f"{s['rss_vs_resmem']:.2f}x | {'yes' if s['all_rows_written'] else 'NO'} | {rho} |")
    lines += ["", "Each row is one whole process timed by GNU time (start-up and model load included); peak RSS "
              "is its largest single process (`%M`), in brackets the peak summed RSS of its process tree "
              "(polled every 0.1 s). DIR holds symlinks to the photos, read once beforehand."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
