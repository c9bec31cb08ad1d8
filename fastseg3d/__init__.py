"""fastseg3d: fused GPU kernels, drop-in layers and models for 3D medical image segmentation."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

from fastseg3d import backends, distill, losses, networks, nn, ops, reference
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


def __getattr__(name: str):
    # imported on first use, so that ``python -m fastseg3d.info`` runs the module once, as __main__
    if name == "info":
        return importlib.import_module("fastseg3d.info")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
