"""Grad-CAM heatmaps of what drives a memorability score (the paper's "GradRAM"), via pytorch-grad-cam.

The target is the raw score itself (a regression target), the layer is found by name
(default: the model's last backbone stage) and the library's hooks live only inside `with`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

from resmemnet.data.images import load_image
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import resolve_device
from resmemnet.pretrained import load_model

__all__ = ["ExplainInput", "Explanation", "contact_sheet", "explain", "resolve_layer"]

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


def _overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
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


def explain(inputs: ExplainInput | Sequence[ExplainInput], model: ResMemNet | str | PathLike[str] | None = None, *,
            layer: str | None = None, batch_size: int = 8, device: str | torch.device = "cpu") -> list[Explanation]:
    """Score and explain images (paths or PIL images), in input order.

    `model` is a loaded model, a checkpoint path or a bundled name; None means the bundled default.
    A bad image raises ImageLoadError naming it.
    """
    model = model if isinstance(model, ResMemNet) else load_model(model)
    if isinstance(inputs, (str, PathLike, Image.Image)):
        inputs = [inputs]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = model.eval().to(resolve_device(device))
    target_layer = resolve_layer(model, layer)
    transform = model.preprocessing.transforms()
    results: list[Explanation] = []
    # Grad-CAM needs autograd even when called from inside torch.inference_mode (e.g. a server).
    # The input requires grad, so a frozen backbone still yields gradients at the target layer.
    # cudnn refuses the LSTM backward in eval mode, so it is off here.
    with torch.inference_mode(False), torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), \
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
                                     "whose blocks are called one by one?); pick a block that runs, e.g. "
                                     f"backbone.net.{model.backbone.taps[-1]}") from exc
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
                  batch_size: int = 8, device: str | torch.device = "cpu") -> Figure:
    """The n most and n least memorable images, each above its Grad-CAM overlay, in one figure.

    `scores` are the ones already computed for `paths` (e.g. a `resmemnet predict` output); only
    the 2n shown images are explained. Titles show those scores.
    """
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
