"""suite=model, case=missu: a training step and inference of MISSU (in 4 / out 4, BraTS) with fastseg3d's fused
transformer attention and channel-KL self-distillation against the same module and loss under
``fastseg3d.backend("torch")`` (SDPA attention, the eager channel-softmax KL); eager and compiled, 2 x 4 x 128^3 and
160^3 patches. The training loss is cross-entropy on the logits plus :class:`fastseg3d.losses.MISSUDistillLoss`
(released "faithful" normalisation) on the training output's (decoder, skip) pairs."""

from __future__ import annotations

import torch.nn.functional as F

from bench.models import Network, register_network
from fastseg3d.losses import MISSUDistillLoss
from fastseg3d.networks import MISSU


def _build(cfg: dict, plain: bool):
    return MISSU(spatial_dims=3, in_channels=4, out_channels=4, **cfg)


def _loss(plain: bool):
    distill = MISSUDistillLoss(reduction="faithful")

    def loss(out, label):
        logits, pairs = out
        students, skips = zip(*pairs)
        return F.cross_entropy(logits.float(), label[:, 0]) + distill(list(students), list(skips))
    return loss


NETWORK = Network(
    name="missu",
    in_channels=4,
    out_channels=4,
    build=_build,
    loss=_loss,
    stride=lambda model: 8,  # three stride-2 encoder convs
    plain=('the same module and loss under fastseg3d.backend("torch"): '
           'SDPA attention, eager channel KL, plain norm chains'),
    quick_cfg={"num_layers": 1, "hidden_dim": 64},
    quick_side=16,
    cfg={},
)
CASE = register_network(NETWORK)
