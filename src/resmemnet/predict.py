"""Scoring images with a model; preprocessing always comes from the model's checkpoint.

A `Scorer` turns a preprocessed batch into scores: `TorchScorer` (channels_last, autocast to
bf16/fp16, inference_mode, optional torch.compile) or the ONNX Runtime one in `resmemnet.export`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from resmemnet.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from resmemnet.data.transforms import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.pretrained import load_model

__all__ = ["PRECISIONS", "PredictInput", "Prediction", "Scorer", "TorchScorer", "find_images", "iter_batches",
           "iter_predictions", "predict", "resolve_device", "resolve_precision"]

PredictInput = str | PathLike[str] | Image.Image | torch.Tensor
ModelLike = ResMemNet | str | PathLike[str] | None
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Prediction:
    """One row of a scoring job: a score, or the reason the file could not be scored."""

    path: str
    score: float | None
    error: str = ""


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present, else CPU; other names pass through to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return device


def _cpu_has_bf16() -> bool:
    # oneDNN runs bf16 natively only with AVX512-BF16/AMX; elsewhere it is emulated and slower than fp32.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> fp16 autocast on a GPU, bf16 on a CPU that computes it natively, else fp32.

    bf16 ranks agree with fp32 (Spearman 0.9996 for the bundled model on real photos) at 1.5x the
    speed; see benchmarks/predict.md.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for GPUs; on a CPU use --precision bf16 or fp32")
    return precision


class Scorer:
    """A preprocessed (B, 3, H, W) batch -> (B,) float32 scores, plus the preprocessing it expects."""

    preprocessing: Preprocessing
    device: torch.device = torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError("Scorer subclasses implement __call__")


class TorchScorer(Scorer):
    """A ResMemNet in eval mode with the fast-inference settings applied once; autocast covers the backbone."""

    def __init__(self, model: ResMemNet, *, device: str | torch.device = "cpu", precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.preprocessing = model.preprocessing
        self.pool_taps = torch.compile(self.model.pool_taps) if compile else self.model.pool_taps

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, memory_format=self.memory_format, non_blocking=True)
        with torch.autocast(self.device.type, dtype=_DTYPES.get(self.precision), enabled=self.precision != "fp32"):
            pooled = self.pool_taps(batch)
        # The head is tiny: run it in fp32, so that scores are not rounded to bf16's 3 significant digits.
        return self.model.forward_pooled(pooled.float()).float().cpu().numpy()


def _scorer(model: ModelLike | Scorer, device: str | torch.device, precision: str) -> Scorer:
    if isinstance(model, Scorer):
        return model
    return TorchScorer(model if isinstance(model, ResMemNet) else load_model(model), device=device,
                       precision=precision)


def _to_tensor(item: PredictInput, preprocessing: Preprocessing,
               transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"A tensor input must be one preprocessed image (3, H, W), got {tuple(item.shape)}")
        return item
    if isinstance(item, Image.Image):
        image = item.convert("RGB")
    elif isinstance(item, (str, PathLike)):
        image = load_image(item, min_size=preprocessing.input_size)
    else:
        raise TypeError(f"Cannot score a {type(item).__name__}; pass paths, PIL images or (3, H, W) tensors")
    return transform(image)


def predict(inputs: PredictInput | Sequence[PredictInput], model: ModelLike | Scorer = None, *,
            batch_size: int = 32, device: str | torch.device = "cpu", precision: str = "fp32") -> np.ndarray:
    """Memorability scores in input order, as a float array of shape (n,).

    `inputs` may be paths, PIL images or preprocessed (3, H, W) tensors (a (B, 3, H, W) batch too).
    `model` is a loaded model, a checkpoint path, a bundled name or a Scorer; None means the bundled default.
    A bad image raises ImageLoadError naming it; `iter_predictions` reports it as a row instead.
    """
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        inputs = list(inputs)
    elif isinstance(inputs, (str, PathLike, Image.Image, torch.Tensor)):
        inputs = [inputs]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scorer = _scorer(model, device, precision)
    transform = scorer.preprocessing.transforms()  # built once per call, not once per image
    scores: list[np.ndarray] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        scores.append(scorer(torch.stack([_to_tensor(x, scorer.preprocessing, transform) for x in chunk])))
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


class _DecodedFiles(Dataset):
    """Decodes in DataLoader workers; a bad file becomes an error string, never an exception."""

    def __init__(self, paths: Sequence[str | Path], preprocessing: Preprocessing):
        self.paths = [str(p) for p in paths]
        self.transform = preprocessing.transforms()
        self.min_size = preprocessing.input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        path = self.paths[index]
        try:
            return path, self.transform(load_image(path, min_size=self.min_size)), ""
        except ImageLoadError as exc:
            return path, None, exc.reason


def _collate(items: list[tuple[str, torch.Tensor | None, str]]) -> list[tuple[str, torch.Tensor | None, str]]:
    return items


def iter_batches(paths: Sequence[str | Path], model: ModelLike | Scorer = None, *, batch_size: int = 32,
                 workers: int = 0, device: str | torch.device = "cpu", precision: str = "fp32",
                 ) -> Iterator[list[Prediction]]:
    """Like `iter_predictions`, one list per batch: the unit a writer flushes."""
    scorer = _scorer(model, device, precision)
    loader = DataLoader(_DecodedFiles(paths, scorer.preprocessing), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=scorer.device.type == "cuda")
    for items in loader:
        good = [(p, t) for p, t, _ in items if t is not None]
        scores: dict[str, float] = {}
        if good:
            # Tensors of different sizes cannot share a batch; Preprocessing always resizes to one size.
            batch_scores = scorer(torch.stack([t for _, t in good]))
            scores = {p: float(s) for (p, _), s in zip(good, batch_scores, strict=True)}
        yield [Prediction(path, scores[path], "") if tensor is not None else Prediction(path, None, error)
               for path, tensor, error in items]


def iter_predictions(paths: Sequence[str | Path], model: ModelLike | Scorer = None, *, batch_size: int = 32,
                     workers: int = 0, device: str | torch.device = "cpu", precision: str = "fp32",
                     ) -> Iterator[Prediction]:
    """Stream one Prediction per path, in input order; bad files give error rows and the run goes on.

    Memory stays bounded (a few batches in flight per worker) whatever the number of paths.
    """
    for rows in iter_batches(paths, model, batch_size=batch_size, workers=workers, device=device,
                             precision=precision):
        yield from rows


def find_images(sources: Iterable[str | PathLike[str]], *, recursive: bool = False) -> list[str]:
    """Files, directories and glob patterns -> image paths in a stable (sorted, de-duplicated) order.

    Named files are kept whatever they are, so a missing or bad one becomes an error row; directories
    contribute files with an image extension (IMAGE_EXTENSIONS). A pattern or directory that matches nothing fails.
    """
    found: dict[str, None] = {}
    for source in map(str, sources):
        if Path(source).is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(str(p) for p in Path(source).glob(pattern)
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {source}"
                                        + ("" if recursive else "; use --recursive to look in subfolders"))
        elif glob.has_magic(source):
            files = sorted(p for p in glob.glob(source, recursive=recursive) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"No files match {source!r}")
        else:
            files = [source]
        found.update(dict.fromkeys(files))
    return list(found)

