"""resmemnet: predict, explain and train image memorability models (ResMem-Net, PeerJ CS 2021)."""

__version__ = "0.1.0"

from resmemnet.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from resmemnet.data.images import ImageLoadError, load_image
from resmemnet.explain import Explanation, explain
from resmemnet.model.backbones import BACKBONES, BackboneWeightsError
from resmemnet.model.heads import HEADS
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ModelConfig, ResMemNet, create_model
from resmemnet.model.weights import Weights, get_weights, list_models, list_weights
from resmemnet.predict import predict
from resmemnet.pretrained import load_model

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneWeightsError",
    "CheckpointError",
    "Explanation",
    "ImageLoadError",
    "ModelConfig",
    "Preprocessing",
    "ResMemNet",
    "Weights",
    "__version__",
    "create_model",
    "explain",
    "get_weights",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "load_image",
    "load_model",
    "predict",
    "read_metadata",
    "save_checkpoint",
]
