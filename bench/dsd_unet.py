"""suite=model, case=dsd_unet: a training step of DSD-UNet (a 5-level U-Net with DSD's 4 + 4 deconv heads, in 1 / out
14) with :class:`fastseg3d.losses.DSDLoss` (five DiceCE terms and six T = 3 KL terms, the KL terms in one fused pass
per teacher, the DiceCE terms keeping only the logits) against the same network and loss under
``fastseg3d.backend("torch")`` (the eager KL composition, MONAI's DiceCE composition); eager and compiled, 2 x 1 x
128^3 and 160^3 patches. Inference (the heads are skipped in eval) is the U-Net's fused BatchNorm-activation chains
against plain ones."""

from __future__ import annotations

from bench.models import Network, register_network
from fastseg3d.losses import DSDLoss
from fastseg3d.networks import dsd_unet


def _build(cfg: dict, plain: bool):
    return dsd_unet(3, 1, 14, **cfg)


def _loss(plain: bool):
    return DSDLoss(num_classes=14)


NETWORK = Network(
    name="dsd_unet",
    in_channels=1,
    out_channels=14,
    build=_build,
    loss=_loss,
    stride=lambda model: model.backbone.divisor,
    plain=('the same network and DSDLoss under fastseg3d.backend("torch"): '
           "the eager KL composition, MONAI's DiceCE composition, plain norm chains"),
    quick_cfg={"channels": (4, 8, 8)},
    quick_side=8,
    cfg={},
)
CASE = register_network(NETWORK)
