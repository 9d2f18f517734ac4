"""Grad-CAM heatmaps of what drives a memorability score (the paper's "GradRAM"), via pytorch-grad-cam.

Grad-CAM differentiates the scorer's own forward pass (`TorchScorer.forward`): the same decoding,
model, views, device and precision as `predict`, so an explanation's score is the score `predict`,
`resmemnet predict` and the server give. The target is the raw score itself (a regression target),
the layer is found by name (default: the model's last backbone stage) and the library's hooks live
only inside `with`.
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
from resmemnet.inference import Scorer, TorchScorer, eval_mode, score_paths
from resmemnet.jobs import read_rows, scan_images
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import ModelLike, as_scorer, preprocess
from resmemnet.pretrained import load_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# pytorch-grad-cam (which pulls in scikit-learn) and matplotlib are imported where they are used:
# `import resmemnet` and the CLI's start-up do not pay for them.

__all__ = ["ExplainInput", "ExplainJob", "Explanation", "contact_sheet", "explain", "explain_batch", "resolve_layer",
           "run_explain"]

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


class _ScorerPass(torch.nn.Module):
    """The scorer's forward pass as the module pytorch-grad-cam calls; its model is registered, so the
    library finds the device and the target layer's hooks see the scorer's own pass."""

    def __init__(self, scorer: TorchScorer):
        super().__init__()
        self.model = scorer.model
        self.scorer = scorer

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.scorer.forward(batch)


def _overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.5))


def _to_image_frame(cam: np.ndarray, prep: Preprocessing, size: tuple[int, int]) -> np.ndarray:
    """A CAM over the network input -> a heatmap over the whole (width, height) image.

    With a centre crop the CAM covers only the crop, so it is placed in the resized frame (zero outside).
    """
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


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """The target layer's activations and gradients as fp32: under bf16 or fp16 autocast they are not, and the
    library hands them to NumPy."""
    return t.float()


def _cams(scorer: TorchScorer, batch: torch.Tensor, layer: str | None) -> tuple[np.ndarray, list[float]]:
    """Grad-CAM maps (one per image, over the network input) and scores, from one gradient pass of the scorer.

    A backbone that also reads the mirror image (resmem-experts) runs the target layer once per view, the image's
    first; pytorch-grad-cam maps the first run, so the heatmap is the image's own view, weighted by the gradient
    of the score that both views give.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

    model, name = scorer.model, layer or scorer.model.cam_layer
    target_layer = resolve_layer(model, layer)
    cams, scores = None, []
    # Grad-CAM needs autograd even when called from inside torch.inference_mode (e.g. a server); the clone is an
    # ordinary tensor there. The input requires grad, so a frozen backbone still yields gradients at the layer.
    # cudnn refuses the LSTM backward in eval mode, so it is off here.
    with torch.inference_mode(False), torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), \
            eval_mode(model), _untouched_parameters(model), \
            GradCAM(_ScorerPass(scorer), target_layers=[target_layer], reshape_transform=_fp32) as cam:
        try:
            cams = cam(batch.clone().requires_grad_(True), targets=[RawScoresOutputTarget()] * len(batch))
        except (ValueError, AttributeError) as exc:
            if not cam.activations_and_grads.activations:
                raise ValueError(f"Layer {name!r} never ran in the forward pass (a container whose blocks are "
                                 f"called one by one?); pick a block that runs, e.g. the default "
                                 f"{model.cam_layer}") from exc
            raise ValueError(f"Cannot explain with layer {name!r}: {exc}; pick a convolutional layer such as a "
                             "backbone block") from exc
        scores = cam.outputs.detach().float().cpu().tolist()
    if cams is None:  # GradCAM.__exit__ swallows IndexError (after printing it)
        raise RuntimeError(f"Grad-CAM failed on a batch of {len(batch)} images; see the message above")
    return cams, scores


def explain_batch(scorer: TorchScorer, batch: torch.Tensor, images: Sequence[Image.Image], *,
                  layer: str | None = None) -> list[Explanation]:
    """Explanations of a preprocessed (B, 3, H, W) batch, each heatmap drawn over `images[i]` (the picture to
    show: any size, e.g. the full photo or a thumbnail). Each score is `scorer`'s own for that input."""
    if len(images) != len(batch):
        raise ValueError(f"Need one image to draw on per input; got {len(images)} images for {len(batch)} inputs")
    cams, scores = _cams(scorer, batch, layer)
    results = []
    for image, cam, score in zip(images, cams, scores, strict=True):
        heatmap = _to_image_frame(cam, scorer.preprocessing, image.size)
        results.append(Explanation(score=float(score), heatmap=heatmap, overlay=_overlay(image, heatmap)))
    return results


def _prepared(item: ExplainInput, prep: Preprocessing, transform: Callable) -> tuple[torch.Tensor, Image.Image]:
    """The network's input, decoded as `predict` decodes it, and the picture under the heatmap: a PIL image
    itself, or a file's full decode (the network's may be a reduced-scale JPEG decode)."""
    if isinstance(item, Image.Image):
        image = item.convert("RGB")
        return transform(image), image
    return preprocess(item, prep, transform), load_image(item)


def _torch_scorer(model: ModelLike | Scorer, device: str | torch.device, precision: str) -> TorchScorer:
    scorer = as_scorer(model, device=device, precision=precision)
    if not isinstance(scorer, TorchScorer):
        raise TypeError(f"Grad-CAM needs gradients, which a {type(scorer).__name__} has not; pass a model, "
                        "a checkpoint or a TorchScorer")
    return scorer


def explain(inputs: ExplainInput | Sequence[ExplainInput], model: ModelLike | TorchScorer = None, *,
            layer: str | None = None, batch_size: int = 8, device: str | torch.device = "auto",
            precision: str = "fp32") -> list[Explanation]:
    """Score and explain images (paths or PIL images), in input order; each score is `predict`'s for the input.

    `model` is a loaded model, a checkpoint path, a bundled name or a TorchScorer (whose device and precision
    then apply); None means the bundled default. Like `predict`, a library call is exact fp32 unless asked
    otherwise. A given model is left as it was (mode, device, gradients). A bad image raises ImageLoadError.
    """
    if isinstance(inputs, (str, PathLike, Image.Image)):
        inputs = [inputs]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scorer = _torch_scorer(model, device, precision)
    resolve_layer(scorer.model, layer)  # an unknown layer fails before any decoding
    transform = scorer.preprocessing.transforms()
    results: list[Explanation] = []
    for start in range(0, len(inputs), batch_size):
        prepared = [_prepared(x, scorer.preprocessing, transform) for x in inputs[start:start + batch_size]]
        results += explain_batch(scorer, torch.stack([x for x, _ in prepared]), [img for _, img in prepared],
                                 layer=layer)
    return results


def contact_sheet(paths: Sequence[str | PathLike[str]], scores: Sequence[float],
                  model: ModelLike | TorchScorer = None, *, n: int = 6, layer: str | None = None,
                  batch_size: int = 8, device: str | torch.device = "auto", precision: str = "fp32") -> Figure:
    """The n most and n least memorable images, each above its Grad-CAM overlay, in one figure.

    `scores` are the ones already computed for `paths` (e.g. a `resmemnet predict` output); only
    the 2n shown images are explained. Titles show those scores. `model` is as for `explain`.
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
    explained = explain([paths[i] for i in shown], model, layer=layer, batch_size=batch_size, device=device,
                        precision=precision)
    images = [load_image(paths[i]) for i in shown]
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
    precision: str = "auto"  # the CLI's policy (resmemnet.runtime), as for `resmemnet predict`
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
    # One scorer for the whole job, under the CLI's device and precision policy, as `resmemnet predict` builds it.
    scorer = TorchScorer(load_model(job.checkpoint), device=job.device, precision=job.precision, inplace=True)
    resolve_layer(scorer.model, job.layer)  # an unknown layer fails before any work
    paths: list[str] = []
    if job.sources and (job.output_dir or not job.scores):
        scan = scan_images(job.sources, recursive=job.recursive)
        paths = scan.paths
        for warning in scan.warnings:
            log(f"warning: {warning}")
    failed = _explain_into(paths, scorer, job, log) if job.output_dir else 0
    if job.contact_sheet:
        failed += _contact_sheet_file(paths, scorer, job, log)
    return failed


def _explain_into(paths: list[str], scorer: TorchScorer, job: ExplainJob, log: Callable[[str], None]) -> int:
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(paths)
    transform = scorer.preprocessing.transforms()
    failed = 0
    with tqdm(total=len(paths), unit="img", desc="explain", disable=not job.progress or None,
              file=sys.stderr) as bar:
        for start in range(0, len(paths), job.batch_size):
            batch: list[tuple[str, torch.Tensor, Image.Image]] = []
            for path in paths[start:start + job.batch_size]:
                try:
                    batch.append((path, *_prepared(path, scorer.preprocessing, transform)))
                except ImageLoadError as exc:
                    failed += 1
                    log(f"resmemnet explain: skipped {exc}")
            explained = explain_batch(scorer, torch.stack([x for _, x, _ in batch]), [img for _, _, img in batch],
                                      layer=job.layer) if batch else []
            for (path, _, _), e in zip(batch, explained, strict=True):
                _write_explanation(out, names[path], path, e, job, scorer)
            bar.update(len(paths[start:start + job.batch_size]))
    log(f"{len(paths) - failed} explained into {out}, {failed} failed")
    return failed


def _write_explanation(out: Path, name: str, path: str, e: Explanation, job: ExplainJob, scorer: TorchScorer) -> None:
    """NAME.cam.png, NAME.json (and NAME.npy) for one image; the sidecar names the precision the score is at."""
    e.overlay.save(out / f"{name}.cam.png")
    sidecar = {"path": path, "score": e.score, "layer": job.layer or scorer.model.cam_layer,
               "checkpoint": job.checkpoint, "precision": scorer.precision.name, "overlay": f"{name}.cam.png"}
    if job.npy:
        np.save(out / f"{name}.npy", e.heatmap)
        sidecar["heatmap"] = f"{name}.npy"
    with atomic_write(out / f"{name}.json", encoding="utf-8") as f:
        f.write(json.dumps(sidecar, indent=2) + "\n")


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


def _contact_sheet_file(paths: list[str], scorer: TorchScorer, job: ExplainJob, log: Callable[[str], None]) -> int:
    """Write the contact sheet; returns the images that could not be scored for it (0 when --scores ranks)."""
    if job.scores:
        rows = read_rows(job.scores)
    else:
        rows = [r for batch in score_paths(paths, scorer, batch_size=job.batch_size) for r in batch]
    scored = [r for r in rows if r.score is not None]
    if not scored:
        raise ValueError("No scored images to put on a contact sheet")
    fig = contact_sheet([r.path for r in scored], [r.score for r in scored], scorer, n=job.top, layer=job.layer,
                        batch_size=job.batch_size)
    fig.savefig(job.contact_sheet, dpi=100)
    log(f"wrote {job.contact_sheet} ({len(scored)} scored images)")
    return 0 if job.scores else len(rows) - len(scored)
