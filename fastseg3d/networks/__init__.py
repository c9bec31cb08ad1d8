"""Networks of the published methods, built on fastseg3d's fused layers, with MONAI-style constructors."""

from __future__ import annotations

from fastseg3d.networks.missu import MISSU
from fastseg3d.networks.mobileutr import MobileUtr, MobileUtrL
from fastseg3d.networks.segformer3d import MixFFN3d, SegFormer3D
from fastseg3d.networks.unet import UNet, dsd_unet, selfreg_unet

__all__ = ["MISSU", "MixFFN3d", "MobileUtr", "MobileUtrL", "SegFormer3D", "UNet", "dsd_unet", "selfreg_unet"]
