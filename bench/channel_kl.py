"""case=channel_kl: MISSU's channel-softmax KL self-distillation (three decoder levels, released "faithful"
normalisation, teacher detached) against the eager PyTorch composition (log_softmax, softmax, sum) and
torch.compile of it (the autotuned and CUDA-graph modes optional).

Shapes: a 128^3 input at B=2, i.e. the pairs (y4, x3_1) 64@32^3, (y3, x2_1) 32@64^3 and (y2, x1_1) 16@128^3.
"""

from __future__ import annotations

import torch

from bench.registry import LOSS_MODES, Case, Setup, compiled, optional_compile, register
from fastseg3d.ops.channel_kl import channel_kl
from fastseg3d.reference.channel_kl import channel_kl_ref


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, s = (1, 8) if quick else (2, 128)
    levels = [(64, s // 4), (32, s // 2), (16, s)]
    return [(f"{b}x3 levels {s}^3 input", {"b": b, "levels": levels})]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _eager(pairs):
    total = 0.0
    for student, teacher in pairs:
        total = total + channel_kl_ref(student, teacher, "faithful")
    return total


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b = spec["b"]
    pairs = [
        (torch.randn(b, c, s, s, s, device=device, dtype=dtype, requires_grad=True),
         torch.randn(b, c, s, s, s, device=device, dtype=dtype))
        for c, s in spec["levels"]
    ]
    if provider == "fastseg3d":
        def fwd():
            return sum(channel_kl(student, teacher, "faithful") for student, teacher in pairs)
    else:
        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(pairs)
    nbytes = sum(s.numel() * s.element_size() for s, _ in pairs)
    # fwd reads student and teacher; the fused backward writes the student gradient (computed in forward).
    return Setup(fwd, [s for s, _ in pairs], {"fwd": 2 * nbytes, "fwd+bwd": 3 * nbytes})


CASE = register(Case(name="channel_kl", shapes=_shapes, providers=_providers, setup=_setup, modes=LOSS_MODES,
                     optional=optional_compile("")))
