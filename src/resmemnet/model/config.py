"""The architecture description stored in every checkpoint, checked without importing torch.

Range checks come first and need nothing; names (backbone, head, trunk weights) are then looked up
in their registries, which import torch. So a damaged or hostile checkpoint (a `proj_dim` of 10^9)
is refused in milliseconds, before torch or torchvision load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ENSEMBLE_HEADS", "MAX_DIM", "MAX_MEMBERS", "OUTPUTS", "ModelConfig"]

OUTPUTS = ("sigmoid", "identity")
MAX_DIM = 4096  # proj_dim / hidden_dim above this are damaged or hostile configs, not models
MAX_MEMBERS = 256  # ensemble read-outs (ENSEMBLE_HEADS)
ENSEMBLE_HEADS = ("linear-ensemble", "gated-ensemble")  # pooled-input heads fitted in closed form


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint.

    `output="sigmoid"` squashes the head's value into (0, 1): memorability is a hit rate, and a
    bounded output can never report an impossible score. Human scores sit well inside the range
    (LaMem 0.2-1.0), away from the flat tails, so the squash costs no gradient where it matters.
    """

    backbone: str = "resnet50"
    head: str = "lstm"
    proj_dim: int = 128
    hidden_dim: int = 128
    dropout: float = 0.2
    peephole: bool = False
    output: str = "sigmoid"
    backbone_weights: str | None = None
    members: int = 1  # ensemble members (an ensemble head): the score is their mean, score_std their spread

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"Unknown output {self.output!r}; available: {', '.join(OUTPUTS)}")
        for name in ("proj_dim", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
                raise ValueError(f"{name} must be an integer in 1..{MAX_DIM}, got {value!r}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or not 1 <= self.members <= MAX_MEMBERS:
            raise ValueError(f"members must be an integer in 1..{MAX_MEMBERS}, got {self.members!r}")
        if self.members > 1 and self.head not in ENSEMBLE_HEADS:
            raise ValueError(f"members > 1 needs head 'linear-ensemble' or 'gated-ensemble', not {self.head!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.peephole and self.head != "lstm":
            raise ValueError(f"peephole=True needs head='lstm', not {self.head!r}")
        from resmemnet.model.backbones import BACKBONES  # the registries: torch and torchvision
        from resmemnet.model.heads import HEADS
        from resmemnet.model.weights import trunk_weights

        BACKBONES.get(self.backbone)  # unknown names fail here, listing the choices
        HEADS.get(self.head)
        if self.backbone_weights is not None:
            trunk_weights(self.backbone_weights, self.backbone)  # unknown or unfitting names fail, listing choices

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown model config keys: {sorted(unknown)}")
        return cls(**data)
