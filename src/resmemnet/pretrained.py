"""The models bundled with the package, as weights objects, and `load_model` by name or path.

A bundled model is a name and a file: its architecture, preprocessing, licence, training data and held-out
metric are read from the file's own header (`read_metadata`: JSON only, no tensors), which
`resmemnet train --config configs/<name>.toml` wrote, so nothing here can drift from what was built. What is
stated here is only what a header cannot know: which model to pick, and for what.
"""

from __future__ import annotations

from pathlib import Path

from resmemnet.checkpoint import CheckpointError, load_checkpoint, read_metadata
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ModelConfig, ResMemNet
from resmemnet.model.weights import Weights, get_weights, list_models, register_weights

__all__ = ["DEFAULT_MODEL", "bundled_file", "load_model", "resolve_checkpoint"]

DEFAULT_MODEL: str | None = "resmemnet-small"
_WEIGHTS_DIR = Path(__file__).parent / "weights"


def _bundle(name: str, *, use: str) -> Weights | None:
    """Register the bundled model in weights/<name>.safetensors from its header; `use` says when to pick it."""
    path = _WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():  # a partial install: the model is simply not offered (resolve_checkpoint lists the rest)
        return None
    meta = read_metadata(path)
    arch = ModelConfig.from_dict(meta["config"])
    return register_weights(Weights(
        name=name, kind="model", arch=arch, loader=lambda: _load_bundled(name, path, arch),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        meta={"licence": meta["licence"], "offline": True, "file": path.name, "config_file": meta["config_file"],
              "training_data": meta["training_data"], "use": use,
              "metrics": {"lnsim_held_out_spearman": round(meta["test_spearman"], 3)}},
    ))


def _load_bundled(name: str, path: Path, arch: ModelConfig) -> ResMemNet:
    if not path.is_file():
        raise CheckpointError(f"The bundled model {name!r} has no file at {path}; reinstall resmemnet "
                              f"or rebuild it (resmemnet train --config configs/{name}.toml)")
    model = load_checkpoint(path)
    if model.config != arch:
        raise CheckpointError(f"{path} changed since it was registered ({model.config} against {arch}); "
                              "restart the program")
    return model


_bundle("resmemnet-small", use="the default: a ResNet-50 ResMem-Net distilled from resmemnet-large; more accurate "
                               "than resmem on held-out LNSIM photos, several times faster, in less memory")
_bundle("resmemnet-large", use="the most accurate: two trunks, a gated ridge ensemble and score_std; several times "
                               "slower than the default and a few GB of memory (needs pip install 'resmemnet[large]')")


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
