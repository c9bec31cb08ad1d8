"""suite=model, case=selfreg_unet: a training step of SelfReg-UNet (a 5-level U-Net, in 1 / out 14) with
:class:`fastseg3d.losses.SelfRegLoss` (DiceCE plus 0.015 x the fused intra-feature and semantic-consistency terms)
against the same network and loss under ``fastseg3d.backend("torch")`` (the eager pooling, sort and MSE composition,
MONAI's DiceCE composition); eager and compiled, 2 x 1 x 128^3 and 160^3 patches. SelfReg adds nothing at inference,
which is the U-Net's fused BatchNorm-activation chains against plain ones."""

from __future__ import annotations

from bench.models import Network, register_network
from fastseg3d.losses import SelfRegLoss
from fastseg3d.networks import selfreg_unet


def _build(cfg: dict, plain: bool):
    return selfreg_unet(3, 1, 14, **cfg)


def _loss(plain: bool):
    # a fixed seed: both variants draw the same channel pairs, step after step
    return SelfRegLoss(weight=0.015, generator=0)


NETWORK = Network(
    name="selfreg_unet",
    in_channels=1,
    out_channels=14,
    build=_build,
    loss=_loss,
    stride=lambda model: model.backbone.divisor,
    plain=('the same network and SelfRegLoss under fastseg3d.backend("torch"): '
           "the eager regularisers, MONAI's DiceCE composition, plain norm chains"),
    quick_cfg={"channels": (4, 8, 8)},
    quick_side=8,
    cfg={},
    graphable=False,  # SelfRegLoss draws its channel pairs on the host and copies them over every step
)
CASE = register_network(NETWORK)
