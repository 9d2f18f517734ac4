"""Training: the paper's recipe (configs/paper.toml), the bundled models' recipes (configs/resmemnet-*.toml),
a frozen-phase feature cache, DDP and cross-validation.

>>> from resmemnet.train import load_config, load_split, train
>>> config = load_config("configs/paper.toml", ["model.backbone_weights=none", "phases.0.epochs=2"])
>>> result = train(config, load_split("lnsim", "../shared/datasets/lnsim", split=0), "runs/lnsim-0")
>>> result.best_checkpoint, result.test["spearman"]
"""

from resmemnet.data import load_split
from resmemnet.evaluate import Evaluation, evaluate
from resmemnet.train.cache import FeatureCache, build_feature_cache
from resmemnet.train.config import PhaseConfig, TrainConfig, load_config
from resmemnet.train.crossval import CrossValResult, run_crossval
from resmemnet.train.loop import TrainingDiverged, train
from resmemnet.train.state import RunResult, TrainState

__all__ = ["CrossValResult", "Evaluation", "FeatureCache", "PhaseConfig", "RunResult", "TrainConfig", "TrainState",
           "TrainingDiverged", "build_feature_cache", "evaluate", "load_config", "load_split", "run_crossval", "train"]
