"""suite=model, case=mednext: MONAI's MedNeXt (in 1 / out 14, 32 initial filters, 3^3 kernels, MONAI's default two
blocks per stage) after ``fastseg3d.convert_model(net, norm=True)`` (its depthwise convs on the fused kernel, its
GroupNorms on the fused GroupNorm) against MONAI's own (ATen's depthwise conv3d and GroupNorm); a training step
(forward, cross-entropy, backward) and inference, eager and compiled, 2 x 1 x 128^3 and 160^3."""

from __future__ import annotations

import fastseg3d
from bench.models import Network, cross_entropy, register_network


def _build(cfg: dict, plain: bool):
    from monai.networks.nets import MedNeXt

    net = MedNeXt(spatial_dims=3, in_channels=1, out_channels=14, **cfg)
    return net if plain else fastseg3d.convert_model(net, norm=True)


NETWORK = Network(
    name="mednext",
    in_channels=1,
    out_channels=14,
    build=_build,
    loss=cross_entropy,
    stride=lambda model: 16,
    plain="MONAI's MedNeXt as built (ATen's depthwise conv3d, torch's GroupNorm)",
    quick_cfg={"init_filters": 4, "blocks_down": (1, 1, 1, 1), "blocks_bottleneck": 1, "blocks_up": (1, 1, 1, 1)},
    quick_side=32,  # its norms need more than one voxel at the 1/16 bottleneck
    cfg={"init_filters": 32, "kernel_size": 3},
)
CASE = register_network(NETWORK)
