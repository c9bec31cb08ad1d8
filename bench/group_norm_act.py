"""case=group_norm_act: GroupNorm(8 groups) -> ReLU as MISSU's blocks run it, affine InstanceNorm -> LeakyReLU as
the U-Nets' blocks run it, GELU -> InstanceNorm (the activation first) as MobileUtr's ConvUtr runs it, and a
training BatchNorm -> GELU as SegFormer3D's Mix-FFN runs it (``fastseg3d.nn.recompute.norm_act``, running
statistics updated), fused, against the eager composition as bf16 autocast runs it (GroupNorm in fp32 on a copy of
the input, the activation in fp32, the next conv's cast back to the input's dtype:
``fastseg3d.reference.group_norm_act``; MobileUtr's GELU and InstanceNorm, and BatchNorm and its GELU, in bf16,
each written) and torch.compile of it.

Shapes: MISSU's first and third encoder levels at a 128^3 input, B=2: 16 channels at 128^3, 64 at 32^3 (NCDHW);
the U-Net's first level, 32 channels at 128^3, B=2, channels-last; MobileUtr's first ConvUtr stage's expanded
channels at its 96^3 benchmark input, B=4: 64 channels at 96^3; SegFormer3D's first Mix-FFN at a 128^3 input, B=2:
128 channels at 32^3 (the token layout: channels-last).
"""

from __future__ import annotations

import torch

import fastseg3d
from bench.registry import Case, Setup, compiled, optional_compile, register
from fastseg3d.nn.recompute import norm_act
from fastseg3d.reference.group_norm_act import group_norm_act_ref


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    missu = [(1, 16, 8)] if quick else [(2, 16, 128), (2, 64, 32)]
    out = [(f"{b}x{c}x{s}^3 G8 relu", {"b": b, "c": c, "s": s, "groups": 8, "act": "relu", "layout": "ncdhw"})
           for b, c, s in missu]
    for b, c, s in [(1, 8, 8)] if quick else [(2, 32, 128)]:
        out.append((f"{b}x{c}x{s}^3 instance leaky_relu channels_last",
                    {"b": b, "c": c, "s": s, "groups": c, "act": "leaky_relu", "layout": "channels_last"}))
    for b, c, s in [(1, 8, 8)] if quick else [(4, 64, 96)]:
        out.append((f"{b}x{c}x{s}^3 gelu first instance",
                    {"b": b, "c": c, "s": s, "groups": c, "act": "gelu", "layout": "ncdhw", "first": True}))
    for b, c, s in [(2, 8, 8)] if quick else [(2, 128, 32)]:
        out.append((f"{b}x{c}x{s}^3 batch gelu channels_last",
                    {"b": b, "c": c, "s": s, "groups": c, "act": "gelu", "layout": "channels_last", "batch": True}))
    return out


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, c, s, groups, act = spec["b"], spec["c"], spec["s"], spec["groups"], spec["act"]
    fmt = torch.channels_last_3d if spec["layout"] == "channels_last" else torch.contiguous_format
    x = torch.randn(b, c, s, s, s, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    first = spec.get("first", False)
    w = (1.0 + 0.1 * torch.randn(c, device=device)).requires_grad_()  # fp32 parameters, as under autocast
    bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
    params = [w, bias]
    if first:  # MobileUtr's InstanceNorm has no affine parameters
        w = bias = None
        params = []
    if spec.get("batch"):  # a training BatchNorm module: its parameters, running statistics and batch count
        bn = torch.nn.BatchNorm3d(c).to(device)
        params = [bn.weight, bn.bias]

        def _eager(x):
            return torch.nn.functional.gelu(bn(x))

        fn = (lambda x: norm_act(x, bn, act)) if provider == "fastseg3d" else _eager if provider == "torch" else \
            compiled(_eager, provider, device)

        def fwd():
            return fn(x)
    elif provider == "fastseg3d":
        def fwd():
            return fastseg3d.ops.group_norm_act(x, groups, w, bias, 1e-5, act, activation_first=first)
    elif first:  # as MobileUtr's plain blocks run under autocast: GELU and InstanceNorm in bf16
        def _eager(x):
            return torch.nn.functional.instance_norm(torch.nn.functional.gelu(x))

        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(x)
    else:
        def _eager(x, w, b):
            return group_norm_act_ref(x, groups, w, b, 1e-5, act)

        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(x, w, bias)
    nbytes = x.numel() * x.element_size()
    # fwd reads x and writes y; bwd reads x and dy and writes dx (the statistics and parameters are negligible)
    return Setup(fwd, [x, *params], {"fwd": 2 * nbytes, "bwd": 3 * nbytes, "fwd+bwd": 5 * nbytes})


CASE = register(Case(name="group_norm_act", shapes=_shapes, providers=_providers, setup=_setup,
                     optional=optional_compile("")))
