"""Peak memory and speed of `resmemnet predict` for each bundled model, against resmem's batched loop, in one run.

    python benchmarks/bench_memory.py --limit 120 --repeats 2
    python benchmarks/bench_memory.py --limit 120 --before 37a0f12     # also the code of an earlier commit

Each row is one whole process under GNU time on the same bsds500 + osie photos (see bench_default.py, whose
resmem loop, timing and photo links this reuses): resmem's own network and transform at batch 16, then
`resmemnet predict DIR -o x.csv --checkpoint NAME` with no other flag, for resmemnet-small (the default) and
resmemnet-large. With --before REV, the same commands also run on REV's code (a `git worktree` of REV put first
on PYTHONPATH, same virtual environment), alternated with today's, so "speed no worse than before" is measured
side by side. Writes --output (Markdown) and --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import ROOT, cpu_info, flags_text, read_scores, scratch_photos, timed

MODELS = ("resmemnet-small", "resmemnet-large")


def worktree(rev: str, scratch: Path) -> Path:
    """REV's source tree, checked out beside the scratch files (removed again by `drop_worktree`)."""
    path = scratch / f"src-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                       capture_output=True)
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=120, help="the first N photos (0: all 1,200)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--before", help="also run these commands on the code of this git revision")
    parser.add_argument("--out", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "memory.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "memory.json")
    args = parser.parse_args()

    scratch, photos = scratch_photos(args.out, args.limit, "bench_memory_")
    folder = str(scratch / "photos")
    exe = str(Path(sys.executable).parent / "resmemnet")
    codes = {"now": dict(os.environ)}
    old = worktree(args.before, scratch) if args.before else None
    if old:
        codes[args.before] = {**os.environ, "PYTHONPATH": str(old / "src")}
    rows = [(model, code) for model in MODELS for code in codes]
    runs: list[dict[str, object]] = []
    try:
        for repeat in range(args.repeats):
            out = scratch / f"resmem-{repeat}.csv"
            base = timed([sys.executable, str(ROOT / "benchmarks" / "bench_default.py"), "--resmem-child", folder,
                          str(out)], scratch, codes["now"])
            count, scores = read_scores(out)
            runs.append({**base, "row": "resmem", "model": "resmem", "code": "-", "repeat": repeat,
                         "all_rows": count == len(scores) == len(photos)})
            for i, (model, code) in enumerate(rows):
                out = scratch / f"{i}-{repeat}.csv"
                run = timed([exe, "predict", folder, "-o", str(out), "--checkpoint", model], scratch, codes[code])
                count, scores = read_scores(out)
                runs.append({**run, "row": f"{model} ({code})", "model": model, "code": code, "repeat": repeat,
                             "all_rows": count == len(scores) == len(photos)})
                print(f"repeat {repeat}: {model} ({code}): {run['seconds']:.1f} s, {run['max_rss_kb'] / 1e6:.2f} GB",
                      flush=True)
    finally:
        if old:
            drop_worktree(old)

    resmem_seconds = {r["repeat"]: r["seconds"] for r in runs if r["row"] == "resmem"}
    resmem_rss = {r["repeat"]: r["max_rss_kb"] for r in runs if r["row"] == "resmem"}
    for run in runs:
        run["images_per_s"] = len(photos) / run["seconds"]
        run["speed_vs_resmem"] = resmem_seconds[run["repeat"]] / run["seconds"]
        run["rss_vs_resmem"] = run["max_rss_kb"] / resmem_rss[run["repeat"]]
    names = ["resmem", *(f"{m} ({c})" for m, c in rows)]
    summary = {name: {key: statistics.median(r[key] for r in runs if r["row"] == name)
                      for key in ("images_per_s", "speed_vs_resmem", "max_rss_kb", "rss_vs_resmem", "tree_peak_rss_kb")}
               | {"all_rows": all(r["all_rows"] for r in runs if r["row"] == name)} for name in names}
    command = shlex.join(["python", "benchmarks/bench_memory.py", *sys.argv[1:]])
    date = datetime.now().isoformat(timespec="minutes")
    cpu = cpu_info()
    args.json.write_text(json.dumps({"command": command, "date": date, "photos": len(photos), "cpu": cpu,
                                     "summary": summary, "runs": runs}, indent=2))
    flags = flags_text(cpu)
    lines = [f"Command: `{command}`", "", f"Date: {date}", "",
             f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; flags: {flags}", "",
             f"{len(photos)} bsds500 + osie photos, {args.repeats} repeat(s), medians; each resmemnet row is "
             "`resmemnet predict DIR -o x.csv --checkpoint MODEL` (no other flag) on the code named in brackets.", "",
             "| row | images/s | speed vs resmem | peak RSS GB (tree) | RSS vs resmem | all rows |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['images_per_s']:.2f} | {s['speed_vs_resmem']:.2f}x | "
                     f"{s['max_rss_kb'] / 1e6:.2f} ({s['tree_peak_rss_kb'] / 1e6:.2f}) | {s['rss_vs_resmem']:.2f}x | "
                     f"{'yes' if s['all_rows'] else 'NO'} |")
    lines += ["", "Peak RSS is the largest single process (GNU time's `%M`); in brackets the peak summed RSS of "
              "its process tree, decoding workers included (polled every 0.1 s)."]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
