"""Training and evaluation: configs, the training loop, checkpoints, sliding-window inference, metrics, plots.

The command line (``fastseg3d train | eval``) is a thin layer over this package; everything it does can be done
from Python:

Example:
    >>> from fastseg3d.train import load_config
    >>> cfg = load_config("quickstart", ["train.epochs=2"])
    >>> cfg["model"]["name"], cfg["train"]["epochs"]
    ('segformer3d', 2)
"""

from __future__ import annotations

from fastseg3d.train.checkpoint import atomic_save, load_checkpoint, unwrap_model
from fastseg3d.train.config import DEFAULTS, SetupError, load_config, save_config
from fastseg3d.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "DEFAULTS",
    "NonFiniteLossError",
    "SetupError",
    "Trainer",
    "atomic_save",
    "load_checkpoint",
    "load_config",
    "save_config",
    "unwrap_model",
]
