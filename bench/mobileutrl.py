"""suite=model, case=mobileutrl: MobileUtr-L in 3-D (the released ``mobileuvit_l``, in 1 / out 14 as for BTCV,
11,060,206 parameters), measured as ``case=mobileutr`` measures MobileUtr (the same loss, peer, quick configuration
and sides: 96^3 as published, 128^3, 160^3)."""

from __future__ import annotations

import dataclasses

from bench.mobileutr import NETWORK as MOBILEUTR
from bench.models import register_network
from fastseg3d.networks import MobileUtrL


def _build(cfg: dict, plain: bool):
    return MobileUtrL(spatial_dims=3, in_channels=1, out_channels=14, **cfg)


NETWORK = dataclasses.replace(MOBILEUTR, name="mobileutrl", build=_build)
CASE = register_network(NETWORK)
