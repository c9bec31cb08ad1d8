"""Losses of the self-distilling segmentation methods, on fastseg3d's fused distillation ops, and a DiceCE that
keeps only the logits and the label for backward."""

from __future__ import annotations

from fastseg3d.losses.dice_ce import DiceCELoss, dice_ce
from fastseg3d.losses.dsd import DSDLoss
from fastseg3d.losses.missu import MISSUDistillLoss
from fastseg3d.losses.selfreg import SelfRegLoss

__all__ = ["DSDLoss", "DiceCELoss", "MISSUDistillLoss", "SelfRegLoss", "dice_ce"]
