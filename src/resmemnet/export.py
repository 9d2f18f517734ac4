"""ONNX export (dynamic batch and spatial size), checked against PyTorch with the ONNX Runtime scorer.

The checkpoint's preprocessing and metadata are copied into the ONNX file's metadata, so the
exported file scores images on its own (`resmemnet.inference.OnnxScorer`, `predict --backend
onnxruntime`) and the preprocessing still has one source: the checkpoint.

`quantize_onnx` turns such a file into an int8 one with ONNX Runtime's static quantisation (QDQ,
per-channel weights, activation ranges calibrated on real photos). Only the trunk is quantised, the
part upstream of the pooled taps; the head (projections holding folded 1/std weights, LayerNorm,
LSTM, Gemm, sigmoid) stays fp32, because it amplifies any error in the pooled features.
"""

from __future__ import annotations

import json
import random
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader

from resmemnet.data.decoded import DecodedImages, collate_decoded
from resmemnet.fileio import atomic_path
from resmemnet.inference import ONNX_METADATA_KEY, OnnxScorer, TorchScorer, eval_mode, model_on
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import PredictInput, predict

__all__ = ["CALIBRATION_METHODS", "FORMATS", "Agreement", "Int8Recipe", "agreement", "calibration_paths",
           "compare_onnx", "export_onnx", "quantize_onnx", "trunk_nodes"]

FORMATS = ("onnx",)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_POOLING = ("ReduceMean", "GlobalAveragePool")  # where the trunk's taps are pooled: the head starts there


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


def _paired_scores(model: ResMemNet, onnx_path: str | PathLike[str], inputs: Sequence[PredictInput],
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`inputs` scored by both scorers of the inference core: PyTorch fp32 on the CPU, and ONNX Runtime."""
    torch_scorer = TorchScorer(model, device="cpu", precision="fp32")
    return (predict(inputs, torch_scorer, batch_size=batch_size),
            predict(inputs, OnnxScorer(onnx_path, device="cpu"), batch_size=batch_size))


def compare_onnx(model: ResMemNet, onnx_path: str | PathLike[str], inputs: Sequence[PredictInput], *,
                 batch_size: int = 16) -> float:
    """Largest absolute difference between PyTorch (fp32) and ONNX Runtime scores on `inputs`."""
    torch_scores, onnx_scores = _paired_scores(model, onnx_path, inputs, batch_size)
    return float(np.abs(torch_scores - onnx_scores).max()) if len(inputs) else 0.0


@dataclass(frozen=True)
class Agreement:
    """How closely one set of scores follows the fp32 PyTorch scores of the same images."""

    images: int
    spearman: float
    max_abs_diff: float


def agreement(model: ResMemNet, onnx_path: str | PathLike[str], inputs: Sequence[PredictInput], *,
              batch_size: int = 16) -> Agreement:
    """Spearman rho and largest |difference| between ONNX Runtime scores and PyTorch fp32 scores on `inputs`."""
    if len(inputs) < 2:
        raise ValueError(f"An agreement check needs at least 2 images, got {len(inputs)}")
    torch_scores, onnx_scores = _paired_scores(model, onnx_path, inputs, batch_size)
    rho = float(stats.spearmanr(torch_scores, onnx_scores).statistic)
    return Agreement(len(inputs), rho, float(np.abs(torch_scores - onnx_scores).max()))


@dataclass(frozen=True)
class Int8Recipe:
    """How an int8 model is calibrated and what it quantises; stored in the int8 file's metadata.

    `fp32_blocks` keeps tapped blocks in fp32 by index (0: the stem and first block; -1: the last).
    """

    method: str = "minmax"
    images: int = 300
    percentile: float = 99.999
    op_types: tuple[str, ...] = ("Conv", "Add", "Relu", "MaxPool")
    reduce_range: bool = False
    fp32_blocks: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"Unknown calibration method {self.method!r}; available: {', '.join(CALIBRATION_METHODS)}")
        if self.images < 1:
            raise ValueError(f"--calibration-images must be positive, got {self.images}")


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _upstream(graph, tensors: Sequence[str], producers: dict[str, object]) -> list[str]:
    """Names of the nodes that `tensors` depend on."""
    seen: set[str] = set()
    pending = [producers[t] for t in tensors if t in producers]
    while pending:
        node = pending.pop()
        if node.name not in seen:
            seen.add(node.name)
            pending.extend(producers[t] for t in node.input if t in producers)
    return [node.name for node in graph.node if node.name in seen]


def trunk_nodes(model, recipe: Int8Recipe) -> list[str]:
    """The nodes to quantise: those of `recipe.op_types` upstream of the pooled taps, minus `fp32_blocks`."""
    graph = model.graph
    producers = _producers(graph)
    pools = [node for node in graph.node if node.op_type in _POOLING]
    inner = set(_upstream(graph, [node.input[0] for node in pools], producers))  # e.g. squeeze-excitation pools
    taps = [node.input[0] for node in pools if node.name not in inner]
    if not taps:
        raise ValueError("The ONNX graph has no pooled taps (ReduceMean/GlobalAveragePool); is it a resmemnet export?")
    blocks, before = [], set()
    for tap in taps:  # each block: what its tap needs beyond the previous taps (block 0 includes the stem)
        nodes = set(_upstream(graph, [tap], producers))
        blocks.append(nodes - before)
        before |= nodes
    missing = [i for i in recipe.fp32_blocks if not -len(blocks) <= i < len(blocks)]
    if missing:
        raise ValueError(f"fp32 blocks {missing} do not exist: the model has {len(blocks)} tapped blocks")
    kept = set().union(*(blocks[i] for i in recipe.fp32_blocks)) if recipe.fp32_blocks else set()
    types = {node.name: node.op_type for node in graph.node}
    return [name for name in _upstream(graph, taps, producers) if types[name] in recipe.op_types and name not in kept]


def calibration_paths(paths: Sequence[str], count: int, *, seed: int = 0) -> list[str]:
    """`count` of `paths`, drawn with `seed` (all when fewer), in their original order."""
    if count >= len(paths):
        return list(paths)
    chosen = set(random.Random(seed).sample(range(len(paths)), count))
    return [p for i, p in enumerate(paths) if i in chosen]


def _calibration_batches(paths: Sequence[str], model_path: Path, batch_size: int) -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed batches of `paths` (the ONNX file's own preprocessing), and one line per unreadable photo."""
    prep = OnnxScorer(model_path, device="cpu").preprocessing
    loader = DataLoader(DecodedImages(paths, prep.transforms(), min_size=prep.input_size), batch_size=batch_size,
                        collate_fn=collate_decoded)
    batches, errors = [], []
    for batch in loader:
        errors.extend(f"{item.path}: {item.error}" for item in batch.failed)
        if batch.images is not None:
            batches.append(batch.images.numpy())
    return batches, errors


def quantize_onnx(fp32_path: str | PathLike[str], output: str | PathLike[str], calibration: Sequence[str], *,
                  recipe: Int8Recipe = Int8Recipe(), sources: Sequence[str] = (),
                  batch_size: int = 8) -> tuple[Path, list[str]]:
    """Write an int8 (QDQ, per-channel) copy of an exported fp32 ONNX file, calibrated on the photos `calibration`.

    Returns the file and one line per calibration photo that could not be read (skipped, not fatal).
    The metadata gains `"precision": "int8"` and the recipe: method, options, photos used, `sources` (their folders).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Batches(CalibrationDataReader):  # ORT calls set_range per stride, so histograms stay one batch big
        def __init__(self, batches: list[np.ndarray]):
            self.batches, self.rest = batches, iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.rest, None)
            return None if batch is None else {"images": batch}

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.rest = iter(self.batches[start_index:end_index])

    fp32_path, output = Path(fp32_path), Path(output)
    batches, errors = _calibration_batches(calibration, fp32_path, batch_size)
    if not batches:
        raise ValueError(f"None of the {len(calibration)} calibration photos could be read; pass folders of photos")
    model = onnx.load(fp32_path)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory(prefix="resmemnet-int8-") as tmp:
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(fp32_path, quantized, Batches(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=recipe.reduce_range, nodes_to_quantize=trunk_nodes(model, recipe),
                        op_types_to_quantize=list(recipe.op_types), calibrate_method=methods[recipe.method],
                        extra_options={"CalibStridedMinMax": 1, "CalibPercentile": recipe.percentile})
        int8 = onnx.load(quantized)
    meta = json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])
    meta.update(precision="int8", int8_recipe={**asdict(recipe), "images": sum(len(b) for b in batches),
                                               "sources": list(map(str, sources))})
    del int8.metadata_props[:]
    int8.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(meta))
    with atomic_path(output) as tmp_path:
        onnx.save(int8, tmp_path)
    return output, errors
