"""suite=model, case=mobileutr: a training step (forward, cross-entropy, backward) and inference of MobileUtr in
3-D (the released ``mobileuvit``, in 1 / out 14 as for BTCV) with fastseg3d's fused depthwise convs and attention
against the same module under ``fastseg3d.backend("torch")``, where every fused op runs its PyTorch reference
(``F.conv3d`` then the activation and residual, ``F.scaled_dot_product_attention``); eager and compiled,
2 x 1 x 96^3 patches as published, and 128^3 and 160^3 as for the other networks."""

from __future__ import annotations

from bench.models import Network, cross_entropy, register_network
from fastseg3d.networks import MobileUtr


def _build(cfg: dict, plain: bool):
    return MobileUtr(spatial_dims=3, in_channels=1, out_channels=14, **cfg)


NETWORK = Network(
    name="mobileutr",
    in_channels=1,
    out_channels=14,
    build=_build,
    loss=cross_entropy,
    stride=lambda model: model.total_stride,
    plain=('the same module under fastseg3d.backend("torch"): '
           'F.conv3d depthwise convs, SDPA attention, plain norm chains'),
    quick_cfg={"dims": (8, 8, 16, 16), "depths": (1, 1, 1, 1, 1), "num_heads": 2},
    quick_side=16,
    cfg={},
    sides=(96, 128, 160),
)
CASE = register_network(NETWORK)
