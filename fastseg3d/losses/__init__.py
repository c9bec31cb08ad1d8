"""Losses of the self-distilling segmentation methods, on fastseg3d's fused distillation ops."""

from __future__ import annotations

from fastseg3d.losses.dsd import DSDLoss
from fastseg3d.losses.missu import MISSUDistillLoss
from fastseg3d.losses.selfreg import SelfRegLoss

__all__ = ["DSDLoss", "MISSUDistillLoss", "SelfRegLoss"]
