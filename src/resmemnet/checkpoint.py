"""The project's one checkpoint format: safetensors weights with JSON metadata inside the file.

safetensors holds raw tensors only, so loading a file from the internet can never run code
(unlike pickle-based .pt files, which are refused). The metadata carries the architecture,
the preprocessing and a SHA-256 of the weights, so a file rebuilds its exact model on its own
and a tampered one is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from resmemnet import __version__
from resmemnet.data.transforms import Preprocessing
from resmemnet.model.resmemnet import ModelConfig, ResMemNet

__all__ = ["FORMAT", "CheckpointError", "atomic_save_file", "load_checkpoint", "read_metadata", "save_checkpoint"]

FORMAT = "resmemnet-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "resmemnet"
_BACKBONE_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, damaged or does not match its own description."""


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(model: ResMemNet, path: str | Path, *, metadata: dict[str, Any] | None = None,
                    include_backbone: bool = True) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written checkpoint.

    `include_backbone=False` stores only what training changed; the backbone is then rebuilt at
    load time from `config.backbone_weights`, which must name an offline-available source.
    """
    path = Path(path)
    if not include_backbone and model.config.backbone_weights is None:
        raise CheckpointError("include_backbone=False needs config.backbone_weights to rebuild the backbone")
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
        "weights_sha256": weights_digest(tensors),
    }
    return atomic_save_file(tensors, path, {_META_KEY: json.dumps(meta)})


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """safetensors.save_file via a temp file + rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickle-based PyTorch file. resmemnet only loads .safetensors checkpoints, "
            "because unpickling a file can run arbitrary code. Convert it where you trust it: "
            "resmemnet.save_checkpoint(model, 'model.safetensors')."
        )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, without loading its tensors."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a resmemnet checkpoint "
                              f"(no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has damaged metadata: {exc}") from exc
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} metadata does not describe a {FORMAT} (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses format version {meta['format_version']}; "
                              f"this resmemnet ({__version__}) reads up to {FORMAT_VERSION}. Upgrade resmemnet.")
    return meta


def load_checkpoint(path: str | Path) -> ResMemNet:
    """Rebuild the exact model (architecture, preprocessing, metadata) from the file alone, on the CPU."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {exc}") from exc
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise CheckpointError(f"{path}: weights do not match the SHA-256 recorded in the file; "
                              "it was altered or damaged")
    try:
        config = ModelConfig.from_dict(meta["config"])
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} describes a model this resmemnet cannot build: {exc}") from exc
    backbone_in_file = bool(meta.get("backbone_in_file", True))
    model = ResMemNet(config, preprocessing=preprocessing, load_backbone_weights=not backbone_in_file)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if backbone_in_file or not k.startswith(_BACKBONE_PREFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit its own architecture: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    model.metadata = {k: v for k, v in meta.items() if k not in ("config", "preprocessing", "weights_sha256")}
    return model.eval()
