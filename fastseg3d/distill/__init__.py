"""Training-only self-distillation wrappers: hooks on a backbone's named layers, the backbone alone in ``eval()``."""

from __future__ import annotations

from fastseg3d.distill import presets
from fastseg3d.distill.dsd import DSD, DSDOutput, DeepUp
from fastseg3d.distill.selfreg import SelfReg, SelfRegOutput

__all__ = ["DSD", "DSDOutput", "DeepUp", "SelfReg", "SelfRegOutput", "presets"]
