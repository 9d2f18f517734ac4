"""ONNX export (dynamic batch and spatial size), checked against PyTorch with the ONNX Runtime scorer.

The checkpoint's preprocessing and metadata are copied into the ONNX file's metadata, so the
exported file scores images on its own (`resmemnet.inference.OnnxScorer`, `predict --backend
onnxruntime`) and the preprocessing still has one source: the checkpoint.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from resmemnet.fileio import atomic_path
from resmemnet.inference import ONNX_METADATA_KEY, OnnxScorer, eval_mode, model_on
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import PredictInput, predict

__all__ = ["FORMATS", "compare_onnx", "export_onnx"]

FORMATS = ("onnx",)


def export_onnx(model: ResMemNet, path: str | PathLike[str], *, opset: int = 18) -> Path:
    """Write `model` as ONNX with input `images` (batch, 3, height, width), all but channels dynamic.

    Uses the torch.export-based exporter; the file appears only once complete. `model` is left as it was.
    """
    path = Path(path)
    model = model_on(model, torch.device("cpu"))
    h, w = model.preprocessing.input_size
    example = torch.zeros(2, 3, h, w)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=32),
            3: torch.export.Dim("width", min=32)}
    with eval_mode(model), warnings.catch_warnings():  # torch.export's deprecation notes say nothing to a user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["scores"],
                                    dynamic_shapes={"images": dims}, opset_version=opset, dynamo=True,
                                    external_data=False, verbose=False)
    meta = {**model.metadata, "config": model.config.to_dict(), "preprocessing": model.preprocessing.to_dict()}
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(meta)
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
    return path


def compare_onnx(model: ResMemNet, onnx_path: str | PathLike[str], inputs: Sequence[PredictInput], *,
                 batch_size: int = 16) -> float:
    """Largest absolute difference between PyTorch (fp32) and ONNX Runtime scores on `inputs`."""
    torch_scores = predict(inputs, model, batch_size=batch_size, device="cpu", precision="fp32")
    onnx_scores = predict(inputs, OnnxScorer(onnx_path, device="cpu"), batch_size=batch_size)
    return float(np.abs(torch_scores - onnx_scores).max()) if len(inputs) else 0.0
