"""`resmemnet explain`: Grad-CAM overlays (PNG), raw heatmaps (.npy) and scores (JSON sidecars), or a contact sheet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from resmemnet.cli.predict import add_model_arguments, read_rows
from resmemnet.data.images import ImageLoadError, load_image
from resmemnet.explain import contact_sheet, explain, resolve_layer
from resmemnet.predict import find_images, iter_predictions, resolve_device
from resmemnet.pretrained import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmaps of what makes images memorable")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="look in subfolders")
    p.add_argument("--output-dir", "-o", help="write NAME.cam.png, NAME.json (and NAME.npy) here")
    p.add_argument("--layer", help="Grad-CAM target module name (default: the model's last backbone stage)")
    p.add_argument("--npy", action="store_true", help="also save each raw heatmap (H, W) float32 as .npy")
    p.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(p)
    p.add_argument("--contact-sheet", metavar="PNG",
                   help="write the top-N and bottom-N images with their heatmaps to one PNG")
    p.add_argument("--top", type=int, default=6, help="N for --contact-sheet")
    p.add_argument("--scores", metavar="FILE",
                   help="for --contact-sheet: a `resmemnet predict` output to rank by (default: score PATHs now)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.output_dir and not args.contact_sheet:
        raise ValueError("Nothing to write: pass --output-dir DIR and/or --contact-sheet FILE.png")
    if not args.paths and not (args.contact_sheet and args.scores):
        raise ValueError("Pass image PATHs (or --contact-sheet with --scores FILE)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    model = load_model(args.checkpoint)
    device = resolve_device(args.device)
    resolve_layer(model, args.layer)  # an unknown layer fails before any work
    failed = 0
    if args.output_dir:
        failed += _write_explanations(find_images(args.paths, recursive=args.recursive), model, device, args)
    if args.contact_sheet:
        failed += _write_contact_sheet(model, device, args)
    return int(failed > 0)


def _write_explanations(paths: list[str], model, device, args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(paths)
    failed = 0
    with tqdm(total=len(paths), unit="img", desc="explain", disable=not args.progress or None,
              file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch: list[tuple[str, Image.Image]] = []
            for path in paths[start:start + args.batch_size]:
                try:
                    batch.append((path, load_image(path)))
                except ImageLoadError as exc:
                    failed += 1
                    print(f"resmemnet explain: skipped {exc}", file=sys.stderr)
            explained = explain([img for _, img in batch], model, layer=args.layer, batch_size=args.batch_size,
                                device=device) if batch else []
            for (path, _), e in zip(batch, explained, strict=True):
                name = names[path]
                e.overlay.save(out / f"{name}.cam.png")
                sidecar = {"path": path, "score": e.score, "layer": args.layer or model.cam_layer,
                           "checkpoint": args.checkpoint, "overlay": f"{name}.cam.png"}
                if args.npy:
                    np.save(out / f"{name}.npy", e.heatmap)
                    sidecar["heatmap"] = f"{name}.npy"
                (out / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            bar.update(len(paths[start:start + args.batch_size]))
    print(f"{len(paths) - failed} explained into {out}, {failed} failed", file=sys.stderr)
    return failed


def _unique_names(paths: list[str]) -> dict[str, str]:
    """Output names from file stems; clashing stems (same name in two folders) get -2, -3, ..."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem, name, k = Path(path).stem, Path(path).stem, 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        names[path] = name
    return names


def _write_contact_sheet(model, device, args: argparse.Namespace) -> int:
    if args.scores:
        rows = read_rows(args.scores)
    else:
        rows = list(iter_predictions(find_images(args.paths, recursive=args.recursive), model,
                                     batch_size=args.batch_size, device=device))
    scored = [r for r in rows if r.score is not None]
    if not scored:
        raise ValueError("No scored images to put on a contact sheet")
    fig = contact_sheet([r.path for r in scored], [r.score for r in scored], model, n=args.top, layer=args.layer,
                        batch_size=args.batch_size, device=device)
    fig.savefig(args.contact_sheet, dpi=100)
    print(f"wrote {args.contact_sheet} ({len(scored)} scored images)", file=sys.stderr)
    return len(rows) - len(scored) if not args.scores else 0
