"""ONNX export (dynamic batch and spatial size) and an ONNX Runtime scorer for `predict --backend onnxruntime`.

The checkpoint's preprocessing and metadata are copied into the ONNX file's metadata, so the
exported file scores images on its own and the preprocessing still has one source: the checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from resmemnet.data.transforms import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import PredictInput, Scorer, predict, resolve_device

__all__ = ["FORMATS", "OnnxScorer", "compare_onnx", "export_onnx"]

FORMATS = ("onnx",)
_META_KEY = "resmemnet"


def export_onnx(model: ResMemNet, path: str | PathLike[str], *, opset: int = 18) -> Path:
    """Write `model` as ONNX with input `images` (batch, 3, height, width), all but channels dynamic.

    Uses the torch.export-based exporter; the file is written to a temporary name and renamed.
    """
    path = Path(path)
    model = model.eval().cpu()
    h, w = model.preprocessing.input_size
    example = torch.zeros(2, 3, h, w)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=32),
            3: torch.export.Dim("width", min=32)}
    with warnings.catch_warnings():  # torch.export's internal deprecation notes say nothing to a user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["scores"],
                                    dynamic_shapes={"images": dims}, opset_version=opset, dynamo=True,
                                    external_data=False, verbose=False)
    meta = {**model.metadata, "config": model.config.to_dict(), "preprocessing": model.preprocessing.to_dict()}
    program.model.metadata_props[_META_KEY] = json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OnnxScorer(Scorer):
    """Scores batches with ONNX Runtime (CPU, or CUDA when its provider is installed)."""

    def __init__(self, path: str | PathLike[str], *, device: str | torch.device = "cpu", threads: int | None = None):
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
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        if _META_KEY not in meta:
            raise ValueError(f"{path} was not written by `resmemnet export` (no {_META_KEY!r} metadata), so its "
                             "preprocessing is unknown; re-export it from the checkpoint")
        self.metadata = json.loads(meta[_META_KEY])
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(["scores"], {"images": batch.float().cpu().numpy()})[0].astype(np.float32)


def compare_onnx(model: ResMemNet, onnx_path: str | PathLike[str], inputs: Sequence[PredictInput], *,
                 batch_size: int = 16) -> float:
    """Largest absolute difference between PyTorch (fp32) and ONNX Runtime scores on `inputs`."""
    torch_scores = predict(inputs, model, batch_size=batch_size)
    onnx_scores = predict(inputs, OnnxScorer(onnx_path), batch_size=batch_size)
    return float(np.abs(torch_scores - onnx_scores).max()) if len(inputs) else 0.0
