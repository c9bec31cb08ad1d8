"""case=group_norm_act: GroupNorm(8 groups) -> ReLU as MISSU's blocks run it, fused, against the eager composition
as bf16 autocast runs it (GroupNorm in fp32 on a copy of the input, the ReLU in fp32, the next conv's cast back to
the input's dtype: ``fastseg3d.reference.group_norm_act``) and torch.compile of it.

Shapes: MISSU's first and third encoder levels at a 128^3 input, B=2: 16 channels at 128^3, 64 at 32^3 (NCDHW).
"""

from __future__ import annotations

import torch

import fastseg3d
from bench.registry import Case, Setup, compiled, optional_compile, register
from fastseg3d.reference.group_norm_act import group_norm_act_ref

_GROUPS = 8


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    levels = [(1, 16, 8)] if quick else [(2, 16, 128), (2, 64, 32)]
    return [(f"{b}x{c}x{s}^3 G{_GROUPS} relu", {"b": b, "c": c, "s": s}) for b, c, s in levels]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile"]


def _eager(x, w, b):
    return group_norm_act_ref(x, _GROUPS, w, b, 1e-5, "relu")


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, c, s = spec["b"], spec["c"], spec["s"]
    x = torch.randn(b, c, s, s, s, device=device, dtype=dtype, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(c, device=device)).requires_grad_()  # fp32 parameters, as under autocast
    bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
    if provider == "fastseg3d":
        def fwd():
            return fastseg3d.ops.group_norm_act(x, _GROUPS, w, bias, 1e-5, "relu")
    else:
        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(x, w, bias)
    nbytes = x.numel() * x.element_size()
    # fwd reads x and writes y; bwd reads x and dy and writes dx (the statistics and parameters are negligible)
    return Setup(fwd, [x, w, bias], {"fwd": 2 * nbytes, "bwd": 3 * nbytes, "fwd+bwd": 5 * nbytes})


CASE = register(Case(name="group_norm_act", shapes=_shapes, providers=_providers, setup=_setup,
                     optional=optional_compile("")))
