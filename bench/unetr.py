"""suite=model, case=unetr: MONAI's UNETR as for BTCV (in 1 / out 14, 96^3, feature size 16, ViT-B/16: 12 blocks of
12 heads of 64) after ``fastseg3d.convert_model`` (its SABlocks on the flash-style attention: q, k and v read as
views of the qkv projection, no N x N matrix) against MONAI's own (einsum scores, softmax and its probabilities
saved for backward); a training step (forward, cross-entropy, backward) and inference, eager and compiled,
2 x 1 x 96^3 (UNETR is built for one input size)."""

from __future__ import annotations

import fastseg3d
from bench.models import Network, cross_entropy, register_network


def _build(cfg: dict, plain: bool):
    from monai.networks.nets import UNETR

    net = UNETR(1, 14, norm_name="instance", res_block=True, proj_type="conv", **cfg)
    return net if plain else fastseg3d.convert_model(net)


NETWORK = Network(
    name="unetr",
    in_channels=1,
    out_channels=14,
    build=_build,
    loss=cross_entropy,
    stride=lambda model: 16,
    plain="MONAI's UNETR as built (SABlock: einsum scores and softmax, the N x N probabilities saved)",
    quick_cfg={"img_size": 16, "feature_size": 8, "hidden_size": 64, "mlp_dim": 128, "num_heads": 4},
    quick_side=16,
    cfg={"img_size": 96, "feature_size": 16},
    sides=(96,),
)
CASE = register_network(NETWORK)
