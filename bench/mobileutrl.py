"""suite=model, case=mobileutrl: MobileUtr-L in 3-D (the released ``mobileuvit_l``, in 1 / out 14 as for BTCV,
11,060,206 parameters) as ``case=mobileutr`` measures MobileUtr: a training step (forward, cross-entropy, backward)
and inference with fastseg3d's fused depthwise convs and attention against the same module under
``fastseg3d.backend("torch")``; eager and compiled, 2 x 1 x 96^3 patches as published, and 128^3 and 160^3."""

from __future__ import annotations

from bench.models import Network, cross_entropy, register_network
from fastseg3d.networks import MobileUtrL


def _build(cfg: dict, plain: bool):
    return MobileUtrL(spatial_dims=3, in_channels=1, out_channels=14, **cfg)


NETWORK = Network(
    name="mobileutrl",
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
