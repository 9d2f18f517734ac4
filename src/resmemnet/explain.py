"""Grad-CAM heatmaps of what drives a memorability score (the paper's "GradRAM"), via pytorch-grad-cam.

The target is the raw score itself (a regression target), the layer is found by name
(default: the model's last backbone stage) and the library's hooks live only inside `with`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from resmemnet.data.images import ImageLoadError, load_image
from resmemnet.fileio import atomic_write
from resmemnet.inference import TorchScorer, eval_mode, model_on, score_paths
from resmemnet.jobs import read_rows, scan_images
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.pretrained import load_model
from resmemnet.runtime import resolve_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# pytorch-grad-cam (which pulls in scikit-learn) and matplotlib are imported where they are used:
# `import resmemnet` and the CLI's start-up do not pay for them.

__all__ = ["ExplainInput", "ExplainJob", "Explanation", "contact_sheet", "explain", "resolve_layer", "run_explain"]

ExplainInput = str | PathLike[str] | Image.Image


@dataclass
class Explanation:
    """A score, its Grad-CAM heatmap (H, W) in [0, 1] at the image's own resolution, and a blended overlay."""

    score: float
    heatmap: np.ndarray
    overlay: Image.Image


def resolve_layer(model: ResMemNet, layer: str | None = None) -> torch.nn.Module:
    """The module named `layer` (default `model.cam_layer`); an unknown name lists the backbone's stages."""
    name = layer or model.cam_layer
    try:
        return model.get_submodule(name)
    except AttributeError:
        stages = [f"backbone.net.{t}" for t in model.backbone.taps]
        raise ValueError(f"Unknown layer {name!r}; pass a module name of the model, e.g. the default "
                         f"{model.cam_layer!r} or a tapped block: {', '.join(stages[-4:])} "
                         f"(all names: model.named_modules())") from None


@contextlib.contextmanager
def _one_view(model: ResMemNet) -> Iterator[None]:
    """Grad-CAM needs one forward pass per image: a backbone that also reads the mirror image (`flip_views`,
    resmem-experts) reads the image alone while explaining, so its score there can differ slightly."""
    flips = getattr(model.backbone, "flip_views", False)
    if flips:
        model.backbone.flip_views = False
    try:
        yield
    finally:
        if flips:
            model.backbone.flip_views = True


def _overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.5))


def _to_image_frame(cam: np.ndarray, model: ResMemNet, size: tuple[int, int]) -> np.ndarray:
    """A CAM over the network input -> a heatmap over the whole (width, height) image.

    With a centre crop the CAM covers only the crop, so it is placed in the resized frame (zero outside).
    """
    prep = model.preprocessing
    if prep.crop is not None:
        frame = np.zeros(prep.resize, dtype=np.float32)
        top, left = (prep.resize[0] - prep.crop[0]) // 2, (prep.resize[1] - prep.crop[1]) // 2
        frame[top:top + prep.crop[0], left:left + prep.crop[1]] = cam
        cam = frame
    resized = Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@contextlib.contextmanager
def _untouched_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters need no gradient for a CAM (the input carries it); the caller's flags and .grad come back."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def explain(inputs: ExplainInput | Sequence[ExplainInput], model: ResMemNet | str | PathLike[str] | None = None, *,
            layer: str | None = None, batch_size: int = 8, device: str | torch.device = "auto") -> list[Explanation]:
    """Score and explain images (paths or PIL images), in input order.

    `model` is a loaded model, a checkpoint path or a bundled name; None means the bundled default.
    A given model is left as it was (mode, device, gradients); on another device a copy is explained.
    A bad image raises ImageLoadError naming it.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

    model = model if isinstance(model, ResMemNet) else load_model(model)
    if isinstance(inputs, (str, PathLike, Image.Image)):
        inputs = [inputs]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = model_on(model, resolve_device(device))
    target_layer = resolve_layer(model, layer)
    transform = model.preprocessing.transforms()
    results: list[Explanation] = []
    # Grad-CAM needs autograd even when called from inside torch.inference_mode (e.g. a server).
    # The input requires grad, so a frozen backbone still yields gradients at the target layer.
    # cudnn refuses the LSTM backward in eval mode, so it is off here.
    with torch.inference_mode(False), torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), \
            eval_mode(model), _untouched_parameters(model), _one_view(model), \
            GradCAM(model, target_layers=[target_layer]) as cam:
        for start in range(0, len(inputs), batch_size):
            images = [x.convert("RGB") if isinstance(x, Image.Image) else load_image(x)
                      for x in inputs[start:start + batch_size]]
            batch = torch.stack([transform(img) for img in images]).requires_grad_(True)
            try:
                cams = cam(batch, targets=[RawScoresOutputTarget()] * len(images))
            except (ValueError, AttributeError) as exc:
                if not cam.activations_and_grads.activations:
                    raise ValueError(f"Layer {layer or model.cam_layer!r} never ran in the forward pass (a container "
                                     "whose blocks are called one by one?); pick a block that runs, e.g. the "
                                     f"default {model.cam_layer}") from exc
                raise ValueError(f"Cannot explain with layer {layer or model.cam_layer!r}: {exc}; "
                                 "pick a convolutional layer such as a backbone block") from exc
            scores = cam.outputs.detach().float().cpu().tolist()
            for img, heat, score in zip(images, cams, scores, strict=True):
                heatmap = _to_image_frame(heat, model, img.size)
                results.append(Explanation(score=float(score), heatmap=heatmap, overlay=_overlay(img, heatmap)))
    if len(results) != len(inputs):  # GradCAM.__exit__ swallows IndexError (after printing it)
        raise RuntimeError(f"Grad-CAM stopped after {len(results)} of {len(inputs)} images; see the message above")
    return results



def contact_sheet(paths: Sequence[str | PathLike[str]], scores: Sequence[float],
                  model: ResMemNet | str | PathLike[str] | None = None, *, n: int = 6, layer: str | None = None,
                  batch_size: int = 8, device: str | torch.device = "auto") -> Figure:
    """The n most and n least memorable images, each above its Grad-CAM overlay, in one figure.

    `scores` are the ones already computed for `paths` (e.g. a `resmemnet predict` output); only
    the 2n shown images are explained. Titles show those scores.
    """
    from matplotlib.figure import Figure

    if len(paths) != len(scores) or not paths:
        raise ValueError(f"Need one score per path and at least one image; got {len(paths)} paths, "
                         f"{len(scores)} scores")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    order = [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    n = min(n, max(1, len(order) // 2))  # a small folder is split between the two groups
    groups = {"most memorable": order[:n], "least memorable": order[len(order) - n:]}
    shown = [i for group in groups.values() for i in group]
    images = [load_image(paths[i]) for i in shown]
    explained = explain(images, model, layer=layer, batch_size=batch_size, device=device)
    fig = Figure(figsize=(2.2 * n, 7.8), layout="constrained")
    axes = fig.subplots(4, n, squeeze=False)
    for k, (i, image, e) in enumerate(zip(shown, images, explained, strict=True)):
        row, col = divmod(k, n)
        photo_ax, cam_ax = axes[2 * row, col], axes[2 * row + 1, col]
        photo_ax.imshow(image.resize(_thumb(image.size)))
        cam_ax.imshow(e.overlay.resize(_thumb(image.size)))
        photo_ax.set_title(f"{Path(paths[i]).name}\nscore {scores[i]:.4f}", fontsize=8)
        photo_ax.set_axis_off()
        cam_ax.set_axis_off()
    for row, title in enumerate(groups):
        axes[2 * row, 0].text(-0.1, 0.0, title, transform=axes[2 * row, 0].transAxes, rotation=90,
                              va="center", ha="right", fontsize=11)
    return fig


def _thumb(size: tuple[int, int], longest: int = 256) -> tuple[int, int]:
    scale = longest / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


# ---------------------------------------------------------------- the `resmemnet explain` job
@dataclass(frozen=True)
class ExplainJob:
    """What `resmemnet explain` writes: per-image files into `output_dir`, and/or one contact sheet."""

    sources: Sequence[str] = ()  # files, folders, glob patterns
    output_dir: str | None = None  # NAME.cam.png, NAME.json (and NAME.npy) per image
    contact_sheet: str | None = None  # PNG of the top and bottom images
    scores: str | None = None  # a `resmemnet predict` output to rank the contact sheet by
    recursive: bool = False
    layer: str | None = None
    npy: bool = False
    top: int = 6
    batch_size: int = 8
    checkpoint: str | None = None
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if not self.output_dir and not self.contact_sheet:
            raise ValueError("Nothing to write: pass --output-dir DIR and/or --contact-sheet FILE.png")
        if not self.sources and not (self.contact_sheet and self.scores):
            raise ValueError("Pass image PATHs (or --contact-sheet with --scores FILE)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.top < 1:
            raise ValueError(f"--top must be positive, got {self.top}")
        if self.output_dir and Path(self.output_dir).is_file():
            raise ValueError(f"--output-dir {self.output_dir} is a file; name a folder")


def run_explain(job: ExplainJob, *, log: Callable[[str], None] | None = None) -> int:
    """Run `job`; returns the number of images that could not be explained (they are logged, the rest goes on)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    job.check()
    model = load_model(job.checkpoint)
    device = resolve_device(job.device)
    resolve_layer(model, job.layer)  # an unknown layer fails before any work
    paths: list[str] = []
    if job.sources and (job.output_dir or not job.scores):
        scan = scan_images(job.sources, recursive=job.recursive)
        paths = scan.paths
        for warning in scan.warnings:
            log(f"warning: {warning}")
    failed = _explain_into(paths, model, device, job, log) if job.output_dir else 0
    if job.contact_sheet:
        failed += _contact_sheet_file(paths, model, device, job, log)
    return failed


def _explain_into(paths: list[str], model: ResMemNet, device: torch.device, job: ExplainJob,
                  log: Callable[[str], None]) -> int:
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(paths)
    failed = 0
    with tqdm(total=len(paths), unit="img", desc="explain", disable=not job.progress or None,
              file=sys.stderr) as bar:
        for start in range(0, len(paths), job.batch_size):
            batch: list[tuple[str, Image.Image]] = []
            for path in paths[start:start + job.batch_size]:
                try:
                    batch.append((path, load_image(path)))
                except ImageLoadError as exc:
                    failed += 1
                    log(f"resmemnet explain: skipped {exc}")
            explained = explain([img for _, img in batch], model, layer=job.layer, batch_size=job.batch_size,
                                device=device) if batch else []
            for (path, _), e in zip(batch, explained, strict=True):
                name = names[path]
                e.overlay.save(out / f"{name}.cam.png")
                sidecar = {"path": path, "score": e.score, "layer": job.layer or model.cam_layer,
                           "checkpoint": job.checkpoint, "overlay": f"{name}.cam.png"}
                if job.npy:
                    np.save(out / f"{name}.npy", e.heatmap)
                    sidecar["heatmap"] = f"{name}.npy"
                with atomic_write(out / f"{name}.json", encoding="utf-8") as f:
                    f.write(json.dumps(sidecar, indent=2) + "\n")
            bar.update(len(paths[start:start + job.batch_size]))
    log(f"{len(paths) - failed} explained into {out}, {failed} failed")
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


def _contact_sheet_file(paths: list[str], model: ResMemNet, device: torch.device, job: ExplainJob,
                        log: Callable[[str], None]) -> int:
    """Write the contact sheet; returns the images that could not be scored for it (0 when --scores ranks)."""
    if job.scores:
        rows = read_rows(job.scores)
    else:
        scorer = TorchScorer(model, device=device, precision="fp32")
        rows = [r for batch in score_paths(paths, scorer, batch_size=job.batch_size) for r in batch]
    scored = [r for r in rows if r.score is not None]
    if not scored:
        raise ValueError("No scored images to put on a contact sheet")
    fig = contact_sheet([r.path for r in scored], [r.score for r in scored], model, n=job.top, layer=job.layer,
                        batch_size=job.batch_size, device=device)
    fig.savefig(job.contact_sheet, dpi=100)
    log(f"wrote {job.contact_sheet} ({len(scored)} scored images)")
    return 0 if job.scores else len(rows) - len(scored)
