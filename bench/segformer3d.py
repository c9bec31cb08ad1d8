"""suite=model, case=segformer3d: a training step (forward, loss, backward) and inference of SegFormer3D on fastseg3d's
fused layers against the same network in plain PyTorch layers (the published composition), eager and compiled."""

from __future__ import annotations

import contextlib

import torch

from bench.registry import MODEL_MODES, Case, Setup, register
from fastseg3d.networks import SegFormer3D
from fastseg3d.reference.segformer3d import SegFormer3DRef

_SMALL = dict(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32)


def _shapes(quick: bool):
    if quick:
        return [("2x4x32^3 small", dict(b=2, side=32, cfg=_SMALL))]
    return [(f"2x4x{s}^3", dict(b=2, side=s, cfg={})) for s in (128, 160)]


def _providers(spec):
    return ["fastseg3d", "fastseg3d+torch.compile", "plain", "plain+torch.compile"]


def _setup(spec, dtype, provider, device) -> Setup:
    cfg = spec["cfg"]
    model = (SegFormer3D(**cfg) if provider.startswith("fastseg3d") else SegFormer3DRef(**cfg)).to(device)
    run = torch.compile(model) if provider.endswith("torch.compile") else model
    x = torch.randn(spec["b"], 4, spec["side"], spec["side"], spec["side"], device=device)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def train_step():
        model.train()
        with autocast():
            loss = run(x).float().square().mean()
        loss.backward()

    def infer():
        model.eval()
        with torch.no_grad(), autocast():
            return run(x)

    return Setup(None, list(model.parameters()), {}, runners={"train_step": train_step, "infer": infer})


register(Case(name="segformer3d", shapes=_shapes, providers=_providers, setup=_setup, modes=MODEL_MODES,
              suite="model"))
