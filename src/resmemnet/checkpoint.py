"""The project's one checkpoint format: safetensors weights with JSON metadata inside the file.

safetensors holds raw tensors only, so loading a file from the internet can never run code
(unlike pickle-based .pt files, which are refused). The metadata carries the architecture and
the preprocessing, so a file rebuilds its exact model on its own. Nothing in a file is trusted
before it is checked: the metadata against a strict schema (types, ranges, known names), the
tensor shapes in the header against the declared architecture (before any tensor is read), and
the SHA-256 recorded in the file, which covers the tensors and, from format version 2 on, the
metadata too. Loading never downloads: a backbone that is not in the file must come from an
offline weight source. Preprocessing must be sane as well as valid (pixel statistics of [0, 1]
images, input sizes a network is run at), and no tensor may hold a NaN or infinite value: either
would turn every score into NaN, or one image into minutes of work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open

from resmemnet import __version__
from resmemnet.fileio import atomic_path
from resmemnet.model.config import ModelConfig
from resmemnet.model.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch

    from resmemnet.model.resmemnet import ResMemNet

# torch, and the model (torchvision), are imported inside the functions that build or hash tensors:
# read_metadata needs neither, so a bad checkpoint is refused before they load.

__all__ = ["FORMAT", "MAX_INPUT_SIDE", "CheckpointError", "load_checkpoint", "read_metadata", "save_checkpoint",
           "save_tensors"]

FORMAT = "resmemnet-checkpoint"
FORMAT_VERSION = 2  # 2: the SHA-256 covers the metadata too; version-1 files (tensors only) still load
_META_KEY = "resmemnet"
_BACKBONE_PREFIX = "backbone."
# Sane preprocessing. Inputs are pixels scaled to [0, 1], so their mean lies in [0, 1] and their standard
# deviation below 1 (1 itself: no normalisation); a std of 1e-300 overflows every input to inf. Memorability
# networks run at 224-512 pixels; 1024 a side already costs ~20 times the compute of 224.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 1024
MIN_STD = 0.01


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, damaged or does not match its own description."""


class _Header(BaseModel):
    """The metadata fields loading relies on; other keys (licence, metrics, ...) pass through unchecked."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["resmemnet-checkpoint"]
    format_version: int = Field(ge=1)
    config: ModelConfig
    preprocessing: Preprocessing
    backbone_in_file: bool = True
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("preprocessing")
    @classmethod
    def _sane(cls, prep: Preprocessing) -> Preprocessing:
        """Ranges beyond Preprocessing's own checks (which only keep it buildable)."""
        if not all(0 <= v <= 1 for v in prep.mean):
            raise ValueError(f"mean must be 3 values in [0, 1] (a mean of pixels in [0, 1]), got {prep.mean}")
        if not all(MIN_STD <= v <= 1 for v in prep.std):
            raise ValueError(f"std must be 3 values in [{MIN_STD}, 1] (a standard deviation of pixels in [0, 1]), "
                             f"got {prep.std}")
        if prep.crop is not None and not all(c <= r for c, r in zip(prep.crop, prep.resize, strict=True)):
            raise ValueError(f"crop {prep.crop} is larger than resize {prep.resize}: a centre crop lies inside the "
                             "resized image")
        for name, size in (("resize", prep.resize), ("crop", prep.crop)):
            if size is not None and not all(MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in size):
                raise ValueError(f"{name} must be (height, width) in {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}, got {size}")
        return prep


def weights_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order, then the metadata (version 2)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if metadata is not None:
        unhashed = {k: v for k, v in metadata.items() if k != "weights_sha256"}
        digest.update(json.dumps(unhashed, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def save_checkpoint(model: ResMemNet, path: str | Path, *, metadata: dict[str, Any] | None = None,
                    include_backbone: bool = True) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written checkpoint.

    `include_backbone=False` stores only what training changed; the backbone is then rebuilt at
    load time from `config.backbone_weights`, which must name an offline weight source.
    """
    path = Path(path)
    if not include_backbone:
        _offline_trunk(model.config, f"include_backbone=False for {path}")
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()
               if include_backbone or not k.startswith(_BACKBONE_PREFIX)}
    meta = {
        **model.metadata,
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resmemnet_version": __version__,
        "config": model.config.to_dict(),
        "preprocessing": model.preprocessing.to_dict(),
        "backbone_in_file": include_backbone,
    }
    meta = json.loads(json.dumps(meta))  # hash exactly what a reader will parse (tuples become lists)
    meta["weights_sha256"] = weights_digest(tensors, meta)
    return save_tensors(tensors, path, {_META_KEY: json.dumps(meta)})


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """safetensors.save_file through resmemnet.fileio.atomic_path: readers see the old file or the new one."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass the .safetensors file in it")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")


def _looks_pickled(path: Path) -> bool:
    """torch.save output: a zip archive, or a bare pickle (protocol 2-5). Asked only of non-safetensors files."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _offline_trunk(config: ModelConfig, what: str) -> None:
    """A backbone rebuilt from a named source must never need a download."""
    from resmemnet.model.weights import trunk_weights

    if config.backbone_weights is None:
        raise CheckpointError(f"{what} needs config.backbone_weights to rebuild the backbone")
    weights = trunk_weights(config.backbone_weights, config.backbone)
    if not weights.meta["offline"]:
        raise CheckpointError(f"{what}: backbone weights {weights.name!r} need a download, and a checkpoint "
                              "never triggers one; store the backbone in the file (include_backbone=True) "
                              "or use an offline source (resmemnet info --list)")


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'metadata'}: {e['msg']}" for e in exc.errors())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, checked against the schema, without reading its tensors."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(path, framework="numpy") as f:  # the header only; "pt" would import torch
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError) as exc:
        if _looks_pickled(path):
            raise CheckpointError(
                f"{path} is a pickle-based PyTorch file. resmemnet only loads .safetensors checkpoints, "
                "because unpickling a file can run arbitrary code. Convert it where you trust it: "
                "resmemnet.save_checkpoint(model, 'model.safetensors')."
            ) from None
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a resmemnet checkpoint "
                              f"(no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has damaged metadata: {exc}") from exc
    except RecursionError:  # hostile nesting ([[[[...): no real metadata is more than a few levels deep
        raise CheckpointError(f"{path} has damaged metadata: nested too deeply to read "
                              f"({len(raw):,} characters)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} metadata does not describe a {FORMAT} (format={found!r})")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses format version {version}; "
                              f"this resmemnet ({__version__}) reads up to {FORMAT_VERSION}. Upgrade resmemnet.")
    for key, kind in (("config", ModelConfig), ("preprocessing", Preprocessing)):
        section = meta.get(key)
        unknown = sorted(set(section) - {f.name for f in fields(kind)}) if isinstance(section, dict) else []
        if unknown:
            raise CheckpointError(f"{path} has invalid metadata: {key}: unknown keys {unknown}")
    try:
        header = _Header.model_validate_json(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path} has invalid metadata: {_one_line(exc)}") from None
    except ValueError as exc:  # ModelConfig / Preprocessing checks: ranges and known names
        raise CheckpointError(f"{path} describes a model this resmemnet cannot build: {exc}") from None
    if not header.backbone_in_file:
        _offline_trunk(header.config, f"{path} holds no backbone")
    return meta


def _check_tensor_shapes(path: Path, config: ModelConfig, backbone_in_file: bool) -> None:
    """Compare the header's shapes with the declared architecture, built on the meta device (no memory)."""
    import torch

    from resmemnet.model.resmemnet import ResMemNet

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ResMemNet(config).state_dict().items()
                    if backbone_in_file or not k.startswith(_BACKBONE_PREFIX)}
    with safe_open(path, framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its own architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    wrong = [f"{k} is {found[k]}, expected {v}" for k, v in sorted(expected.items()) if found[k] != v]
    if wrong:
        raise CheckpointError(f"{path} does not fit its own architecture: {'; '.join(wrong[:3])}")


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One NaN or infinite weight makes every score NaN; the hash cannot tell (it covers the NaN too)."""
    import torch

    for name, tensor in sorted(tensors.items()):
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN or infinite value(s); the file is "
                                      "damaged or comes from a run that diverged")


def load_checkpoint(path: str | Path) -> ResMemNet:
    """Rebuild the exact model (architecture, preprocessing, metadata) from the file alone, on the CPU."""
    from safetensors.torch import load_file

    from resmemnet.model.resmemnet import ResMemNet
    from resmemnet.model.weights import trunk_weights

    path = Path(path)
    meta = read_metadata(path)
    config, preprocessing = ModelConfig.from_dict(meta["config"]), Preprocessing.from_dict(meta["preprocessing"])
    backbone_in_file = meta.get("backbone_in_file", True)
    _check_tensor_shapes(path, config, backbone_in_file)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {exc}") from exc
    covered = meta if meta["format_version"] >= 2 else None
    if weights_digest(tensors, covered) != meta["weights_sha256"]:
        what = "weights and metadata do" if covered else "weights do"
        raise CheckpointError(f"{path}: {what} not match the SHA-256 recorded in the file; it was altered or damaged")
    _check_finite(path, tensors)
    model = ResMemNet(config, preprocessing=preprocessing)
    if not backbone_in_file:
        weights = trunk_weights(config.backbone_weights, config.backbone)
        model.backbone.load_trunk(weights.get_state_dict(config.backbone), source=f"weights {weights.name!r}")
    model.load_state_dict(tensors, strict=backbone_in_file)
    model.metadata = {k: v for k, v in meta.items() if k not in ("config", "preprocessing", "weights_sha256")}
    return model.eval()
