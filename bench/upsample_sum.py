"""case=upsample_sum: SegFormer3D's decoder sum, its four 256-channel maps (at 1/4, 1/8, 1/16 and 1/32 of a 128^3
input, B=2, bf16, channels-last, as the decoder's linear layers leave them) brought to the first one's size and
added, fused, against the plain composition (``fastseg3d.reference.upsample_sum``: three F.interpolate calls and
three adds, in fp32 under bf16 autocast as the training step runs them) and torch.compile of it. Every provider
runs under bf16 autocast; fp32 runs without.
"""

from __future__ import annotations

import contextlib

import torch

import fastseg3d
from bench.registry import Case, Setup, compiled, optional_compile, register
from fastseg3d.reference.upsample_sum import upsample_sum_ref


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, c, side = (1, 8, 8) if quick else (2, 256, 32)
    return [(f"{b}x{c}x{side}^3 4 maps", {"b": b, "c": c, "sides": (side, side // 2, side // 4, side // 8)})]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, c, sides = spec["b"], spec["c"], spec["sides"]
    # the decoder's order: the deepest map first, the full-size one last
    parts = [torch.randn(b, c, s, s, s, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_() for s in reversed(sides)]
    size = (sides[0],) * 3
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and device.type == "cuda"
                else contextlib.nullcontext())

    if provider == "fastseg3d":
        def _run(*xs):
            return fastseg3d.ops.upsample_sum(list(xs), size)
    else:
        def _eager(*xs):
            return upsample_sum_ref(list(xs), size)

        _run = _eager if provider == "torch" else compiled(_eager, provider, device)

    def fwd():
        with autocast:
            return _run(*parts)

    out_size = 4 if dtype != torch.float32 else dtype.itemsize  # fp32 under autocast
    out_bytes = b * c * sides[0] ** 3 * out_size
    in_bytes = sum(p.numel() for p in parts) * dtype.itemsize
    # fwd reads the maps and writes the sum; bwd reads the sum's gradient once per resized map and writes each map's
    # gradient
    return Setup(fwd, parts, {"fwd": in_bytes + out_bytes, "bwd": 3 * out_bytes + in_bytes,
                              "fwd+bwd": 4 * out_bytes + 2 * in_bytes})


CASE = register(Case(name="upsample_sum", shapes=_shapes, providers=_providers, setup=_setup,
                     optional=optional_compile("")))
