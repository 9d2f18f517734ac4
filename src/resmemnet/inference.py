"""The one inference core: a `Scorer` turns preprocessed batches into scores, `score_paths` streams files through it.

predict, evaluate, evaluation during training, explain, the feature cache, export's check and the
server all score through here, so device, precision and decoding behave the same everywhere (training's
scorers keep contiguous inputs, `channels_last=False`, the layout its weights train in):

>>> scorer = TorchScorer(model)                  # device="auto", precision="auto" (see resmemnet.runtime)
>>> for rows in score_paths(paths, scorer, workers=4):  # batches sized to the scorer's memory budget
...     print(rows)                              # one list of Prediction per batch, in input order

A scorer never changes the caller's model: it restores train/eval mode after each call, and a model
that must move to another device is copied unless the caller hands it over (`inplace=True`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from resmemnet.data.decoded import DecodedImages, collate_decoded
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.runtime import PrecisionChoice, autocast, choose_precision, resolve_device

__all__ = ["ACTIVATION_BUDGET", "BACKENDS", "MAX_BATCH", "ONNX_METADATA_KEY", "OnnxScorer", "Prediction",
           "ScoreArray", "Scorer", "ScorerSpec", "TorchScorer", "checked", "eval_mode", "int8_onnx_for", "model_on",
           "model_output_error", "precision_for", "score_paths"]

ScoreArray = npt.NDArray[np.float32]  # (B,) scores in [0, 1]
BACKENDS = ("torch", "onnxruntime")
ACTIVATION_BUDGET = 1 << 30  # bytes of activations a default batch may take (weights and decoding come on top)
MAX_BATCH = 32  # beyond this, CPUs gain no speed and decoding workers hold more images in flight
ONNX_METADATA_KEY = "resmemnet"  # the ONNX metadata entry holding the checkpoint's metadata and preprocessing


@dataclass(frozen=True)
class Prediction:
    """One row of a scoring job: a score (and its spread, from scorers that give one) or why there is none."""

    path: str
    score: float | None
    error: str = ""
    score_std: float | None = None


def model_output_error(*values: float | None) -> str:
    """The error for a row whose model output is NaN or infinite ('' when every value is a number or None).

    A non-finite score is no score: it must never be written, ranked or counted as a success.
    """
    for value in values:
        if value is not None and not math.isfinite(value):
            return "model produced NaN" if math.isnan(value) else "model produced an infinite score"
    return ""


def checked(row: Prediction) -> Prediction:
    """`row`, or an error row (no score) when its score or spread is NaN or infinite."""
    error = model_output_error(row.score, row.score_std)
    return Prediction(row.path, None, error) if error else row


def precision_for(device: str | torch.device = "auto", requested: str = "auto", *,
                  checkpoint: str | PathLike[str] | None = None) -> PrecisionChoice:
    """The precision a job for `checkpoint` on `device` would use, and why (for `resmemnet info`)."""
    return choose_precision(requested, resolve_device(device), int8=int8_onnx_for(checkpoint) is not None)


def int8_onnx_for(checkpoint: str | PathLike[str] | None) -> Path | None:
    """The int8 ONNX file a bundled model registers (`meta["int8_onnx"]`, beside its weights), if any.

    Only bundled models have one: a checkpoint path names no int8 file, so it runs in torch.
    """
    from resmemnet.model.weights import get_weights, list_models  # the registry is only needed here
    from resmemnet.pretrained import DEFAULT_MODEL, bundled_file

    name = DEFAULT_MODEL if checkpoint is None else str(checkpoint)
    if name not in list_models():
        return None
    file = get_weights(name).meta.get("int8_onnx")
    return bundled_file(name).parent / file if file else None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; every submodule's own train/eval flag comes back afterwards.

    Restoring per module (not `model.train(was)`) keeps a frozen backbone's BatchNorm in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def model_on(model: nn.Module, device: torch.device, *, memory_format: torch.memory_format | None = None,
             inplace: bool = False) -> nn.Module:
    """`model` on `device` (and in `memory_format`): itself when nothing must change or `inplace`, else a copy.

    `Module.to` changes a module in place, so a caller's model is copied rather than moved behind its back.
    """
    if inplace:
        return model.to(device, memory_format=memory_format) if memory_format else model.to(device)
    if _device_of(model) == device and memory_format is None:
        return model
    moved = copy.deepcopy(model).to(device)
    return moved.to(memory_format=memory_format) if memory_format else moved


class Scorer:
    """A preprocessed (B, 3, H, W) batch -> (B,) float32 scores, plus the preprocessing it expects.

    Scorers that measure their own uncertainty (an ensemble) set `gives_spread` and override
    `score_with_spread`; writers then add a `score_std` column.
    """

    preprocessing: Preprocessing
    device: torch.device = torch.device("cpu")
    gives_spread: bool = False

    def batch_size_for(self, budget: int = ACTIVATION_BUDGET) -> int:
        """The batch size a job uses when the user gives none: ONNX Runtime plans its own memory."""
        return MAX_BATCH

    def __call__(self, batch: torch.Tensor) -> ScoreArray:
        raise NotImplementedError("Scorer subclasses implement __call__")

    def score_with_spread(self, batch: torch.Tensor) -> tuple[ScoreArray, ScoreArray | None]:
        """Scores and their standard deviation (None for a single model)."""
        return self(batch), None


class TorchScorer(Scorer):
    """A ResMemNet with the fast-inference settings: autocast over the backbone, the head in fp32.

    `channels_last` reorders the inputs, and the weights too when the scorer owns them (a copy on
    another device, or `inplace=True`). `compile` wraps the backbone pass in torch.compile.
    """

    def __init__(self, model: ResMemNet, *, device: str | torch.device = "auto", precision: str = "auto",
                 channels_last: bool = True, compile: bool = False, inplace: bool = False):
        self.device = resolve_device(device)
        self.precision = choose_precision(precision, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        owned = inplace or _device_of(model) != self.device
        self.model = model_on(model, self.device, inplace=inplace,
                              memory_format=self.memory_format if owned and channels_last else None)
        self.preprocessing = model.preprocessing
        self._pool_taps = torch.compile(self.model.pool_taps) if compile else self.model.pool_taps

    @property
    def gives_spread(self) -> bool:  # type: ignore[override]
        return self.model.config.members > 1

    def batch_size_for(self, budget: int = ACTIVATION_BUDGET) -> int:
        """As many images as fit `budget` bytes of activations at the model's input size, 1 to MAX_BATCH."""
        return max(1, min(MAX_BATCH, budget // self.model.activation_bytes(self.preprocessing.input_size)))

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """`fn(batch)` on the scorer's device and memory format, in eval mode, under its autocast; autograd stays
        as the caller has it. Every pass through the scorer's model runs here (a feature cache's trunk rows too)."""
        batch = batch.to(self.device, memory_format=self.memory_format, non_blocking=True)
        with eval_mode(self.model), autocast(self.device, self.precision):
            return fn(batch)

    @torch.inference_mode()
    def pool(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled block features of a preprocessed batch, under the scorer's device and precision."""
        return self.apply(self._pool_taps, batch)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,) scores as a tensor, with autograd where the caller enables it: the pass `__call__` runs, which
        Grad-CAM (resmemnet.explain) differentiates, so an explanation's score is the scorer's score."""
        pooled = self.apply(self._pool_taps, batch)
        with eval_mode(self.model):
            return self.model.forward_pooled(pooled.to(self.device).float())

    def __call__(self, batch: torch.Tensor) -> ScoreArray:
        return self.score_pooled(self.pool(batch))

    @torch.inference_mode()
    def score_with_spread(self, batch: torch.Tensor) -> tuple[ScoreArray, ScoreArray | None]:
        """Scores, and for an ensemble the standard deviation of its members' scores (else None)."""
        if not self.gives_spread:
            return self(batch), None
        with eval_mode(self.model):
            members = self.model.forward_members(self.pool(batch)).float()
        return members.mean(dim=1).cpu().numpy(), members.std(dim=1).cpu().numpy()

    @torch.inference_mode()
    def score_pooled(self, pooled: torch.Tensor) -> ScoreArray:
        """Scores from pooled block features (B, sum(channels)), e.g. a feature cache's rows.

        The head is tiny: it runs in fp32, so that scores are not rounded to bf16's 3 significant digits.
        """
        with eval_mode(self.model):
            return self.model.forward_pooled(pooled.to(self.device).float()).float().cpu().numpy()


class OnnxScorer(Scorer):
    """Scores batches with ONNX Runtime (CPU, or CUDA when its provider is installed)."""

    def __init__(self, path: str | PathLike[str], *, device: str | torch.device = "auto", threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No ONNX model at {path}; create one with `resmemnet export --format onnx "
                                    f"--output {path}`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.device = resolve_device(device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else \
            ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path} is not a readable ONNX model ({exc}); re-export it with "
                             "`resmemnet export --format onnx`") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in meta:
            raise ValueError(f"{path} was not written by `resmemnet export` (no {ONNX_METADATA_KEY!r} metadata), "
                             "so its preprocessing is unknown; re-export it from the checkpoint")
        self.metadata = json.loads(meta[ONNX_METADATA_KEY])
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])
        name = self.metadata.get("precision", "fp32")
        self.precision = PrecisionChoice(name, f"stored in {path.name}")

    def __call__(self, batch: torch.Tensor) -> ScoreArray:
        return self.session.run(["scores"], {"images": batch.float().cpu().numpy()})[0].astype(np.float32)


@dataclass(frozen=True)
class ScorerSpec:
    """Which scorer a job builds; each rank of a sharded job builds its own on its own device."""

    checkpoint: str | None = None  # path or bundled name; None: the bundled default
    backend: str = "torch"
    onnx: str | None = None  # for backend onnxruntime
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and not self.onnx:
            raise ValueError("--backend onnxruntime needs --onnx MODEL.onnx (make one with `resmemnet export "
                             "--format onnx --output MODEL.onnx`)")

    def build(self, *, local_rank: int = 0) -> Scorer:
        """The scorer; with backend torch, a bundled model's int8 ONNX file when the precision policy picks int8."""
        device = resolve_device(self.device, local_rank=local_rank)
        if self.backend == "onnxruntime":
            scorer = OnnxScorer(self.onnx, device=device)
            if self.precision not in ("auto", scorer.precision.name):
                raise ValueError(f"{self.onnx} is a {scorer.precision.name} model, not {self.precision}; drop "
                                 "--precision or pass the matching --onnx file")
            return scorer
        int8_file = int8_onnx_for(self.checkpoint)
        if choose_precision(self.precision, device, int8=int8_file is not None).name == "int8":
            return OnnxScorer(int8_file, device=device)
        from resmemnet.pretrained import load_model  # loading needs the weights registry, scoring does not

        return TorchScorer(load_model(self.checkpoint), device=device, precision=self.precision,
                           channels_last=self.channels_last, compile=self.compile, inplace=True)


def score_paths(paths: Sequence[str | PathLike[str]], scorer: Scorer, *, batch_size: int | None = None,
                workers: int = 0) -> Iterator[list[Prediction]]:
    """One list of Predictions per batch of `paths`, in input order; a bad file is an error row, never a stop,
    and so is a NaN or infinite score (never a number).

    Decoding runs in `workers` DataLoader processes; memory stays bounded whatever the number of paths.
    Without a `batch_size`, the scorer sizes batches to its memory budget (`Scorer.batch_size_for`).
    """
    batch_size = scorer.batch_size_for() if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prep = scorer.preprocessing
    dataset = DecodedImages(paths, prep.transforms(), min_size=prep.input_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded,
                        pin_memory=scorer.device.type == "cuda")
    for batch in loader:
        rows: dict[int, Prediction] = {item.index: Prediction(item.path, None, item.error) for item in batch.failed}
        if batch.images is not None:
            scores, spread = scorer.score_with_spread(batch.images)
            for k, (index, path) in enumerate(zip(batch.indices.tolist(), batch.paths, strict=True)):
                std = None if spread is None else float(spread[k])
                rows[index] = checked(Prediction(path, float(scores[k]), "", std))
        yield [rows[i] for i in sorted(rows)]
