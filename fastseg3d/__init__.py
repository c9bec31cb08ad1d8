"""fastseg3d: fused GPU kernels, drop-in layers and models for 3D medical image segmentation."""

from __future__ import annotations

__version__ = "0.1.0"

from fastseg3d import backends, distill, info, losses, networks, nn, ops, reference
from fastseg3d.backends import backend, check_finite, get_backend
from fastseg3d.patch import convert_model, revert_model

__all__ = [
    "__version__",
    "backend",
    "backends",
    "check_finite",
    "convert_model",
    "distill",
    "get_backend",
    "info",
    "losses",
    "networks",
    "nn",
    "ops",
    "reference",
    "revert_model",
]
