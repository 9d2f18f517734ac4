"""`resmemnet export`: a checkpoint as an ONNX model (dynamic batch and spatial size), checked against PyTorch."""

from __future__ import annotations

import argparse
import sys

from resmemnet.export import FORMATS, compare_onnx, export_onnx
from resmemnet.jobs import scan_images
from resmemnet.pretrained import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for other runtimes (ONNX)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", "-o", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--checkpoint", help="checkpoint path or bundled model name (default: the bundled default model)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--check", nargs="*", metavar="PATH", default=None,
                   help="images, folders or globs to compare ONNX Runtime against PyTorch on")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed score difference for --check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be 0 or more, got {args.tolerance}")
    model = load_model(args.checkpoint)
    scan = scan_images(args.check) if args.check else None  # a --check typo fails before the slow export
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"wrote {path}", file=sys.stderr)
    if scan:
        for warning in scan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        paths = scan.paths
        diff = compare_onnx(model, path, paths)
        print(f"max |onnxruntime - pytorch| over {len(paths)} images: {diff:.2e} (tolerance {args.tolerance:.0e})")
        if diff > args.tolerance:
            return 1
    return 0
