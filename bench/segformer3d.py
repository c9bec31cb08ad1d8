"""suite=model, case=segformer3d: a training step (forward, cross-entropy, backward) and inference of SegFormer3D on
fastseg3d's fused layers against the same network in plain PyTorch layers (the current release's composition, from
:mod:`fastseg3d.reference.segformer3d` with ``sdpa=True``: views around the depthwise conv, an NCDHW copy before
the spatial reduction, ``F.scaled_dot_product_attention``), eager and compiled; 2 x 4 x 128^3 and 160^3 patches,
BraTS's 4 modalities and 3 classes."""

from __future__ import annotations

import math

from bench.models import Network, cross_entropy, register_network
from fastseg3d.networks import SegFormer3D
from fastseg3d.reference.segformer3d import SegFormer3DRef


def _build(cfg: dict, plain: bool):
    return SegFormer3DRef(**cfg, sdpa=True) if plain else SegFormer3D(**cfg)


NETWORK = Network(
    name="segformer3d",
    in_channels=4,
    out_channels=3,
    build=_build,
    loss=cross_entropy,
    stride=lambda model: math.lcm(*model.total_stride),
    plain="the current release's composition in plain layers (fastseg3d.reference.segformer3d.SegFormer3DRef, "
          "sdpa=True)",
    quick_cfg={"embed_dims": (16, 32, 32, 32), "num_heads": (1, 1, 1, 2), "decoder_dim": 32},
    quick_side=32,
    # Batch 2: at 32^3 the stage-4 grid is 1^3, and its Mix-FFN BatchNorm (in both builds) needs more than one value
    # per channel in training.
    quick_batch=2,
    cfg={},
)
CASE = register_network(NETWORK)
