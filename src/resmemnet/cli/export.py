"""`resmemnet export`: a checkpoint as an ONNX model (dynamic batch and spatial size), checked against PyTorch.

`--int8 --calibrate DIR` writes an int8 model instead (ONNX Runtime static quantisation, calibrated
on photos from DIR); its `--check` reports Spearman rho against PyTorch fp32, since int8 scores
differ from fp32 by more than a tolerance but must keep their order.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from resmemnet.cli import COMMANDS
from resmemnet.export import (
    CALIBRATION_METHODS,
    FORMATS,
    Int8Recipe,
    agreement,
    calibration_paths,
    compare_onnx,
    export_onnx,
    quantize_onnx,
)
from resmemnet.jobs import scan_images
from resmemnet.pretrained import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", "-o", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default model)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--check", nargs="*", metavar="PATH", default=None,
                   help="images, folders or globs to compare ONNX Runtime against PyTorch on")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed score difference for --check")
    p.add_argument("--int8", action="store_true", help="write an int8 model (needs --calibrate)")
    p.add_argument("--calibrate", nargs="+", metavar="DIR", help="folders of real photos to calibrate int8 on")
    p.add_argument("--calibration-images", type=int, default=Int8Recipe.images,
                   help="photos drawn (seed 0) from --calibrate")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=Int8Recipe.method)
    p.add_argument("--min-spearman", type=float, default=0.995,
                   help="smallest allowed Spearman rho against PyTorch fp32 for --check with --int8")
    p.set_defaults(func=run)


def _int8(args: argparse.Namespace, model, check: list[str]) -> int:
    recipe = Int8Recipe(method=args.calibration_method, images=args.calibration_images)
    if len(check) == 1:
        raise ValueError("--check with --int8 compares rankings: pass at least 2 images")
    scan = scan_images(args.calibrate, recursive=True)
    for warning in scan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    photos = calibration_paths(scan.paths, recipe.images, seed=recipe.seed)
    overlap = set(photos) & set(check)
    if overlap:
        print(f"warning: {len(overlap)} --check images also calibrate; the check then flatters int8", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="resmemnet-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", opset=args.opset)
        path, errors = quantize_onnx(fp32, args.output, photos, recipe=recipe, sources=args.calibrate)
    for error in errors:
        print(f"warning: calibration skipped {error}", file=sys.stderr)
    print(f"wrote {path} (int8, {recipe.method} calibration on {len(photos) - len(errors)} photos)", file=sys.stderr)
    if not check:
        return 0
    result = agreement(model, path, check)
    print(f"int8 vs pytorch fp32 over {result.images} images: Spearman {result.spearman:.4f} (minimum "
          f"{args.min_spearman}), max |diff| {result.max_abs_diff:.2e}")
    return int(result.spearman < args.min_spearman)


def run(args: argparse.Namespace) -> int:
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be 0 or more, got {args.tolerance}")
    if args.int8 != bool(args.calibrate):
        raise ValueError("--int8 and --calibrate DIR go together: int8 needs real photos to calibrate on, e.g. "
                         "--int8 --calibrate photos/")
    model = load_model(args.checkpoint)
    scan = scan_images(args.check) if args.check else None  # a --check typo fails before the slow export
    if scan:
        for warning in scan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.int8:
        return _int8(args, model, scan.paths if scan else [])
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"wrote {path}", file=sys.stderr)
    if scan:
        paths = scan.paths
        diff = compare_onnx(model, path, paths)
        print(f"max |onnxruntime - pytorch| over {len(paths)} images: {diff:.2e} (tolerance {args.tolerance:.0e})")
        if diff > args.tolerance:
            return 1
    return 0
