"""case=dwconv3d: the fused depthwise 3x3x3 conv (bias) against ATen's native kernel (NCDHW), cuDNN
(channels_last_3d), SegFormer3D's released token path (views around the conv), and torch.compile; and MobileUtr's
7x7x7 and 9x9x9 depthwise convs ('same' padding) at its 96^3 and 128^3 inputs (NCDHW) and its 96^3 input
(channels-last).

Compiled peers: on volumes ``torch.compile-max-autotune`` by default (the default mode leaves the conv an extern
call, i.e. the eager kernel); on tokens ``torch.compile`` by default. The other modes, CUDA graphs included (for
the launch-bound 8^3 and 4^3 token stages), are optional providers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastseg3d
from bench.registry import Case, Setup, compile_variant, compiled, register

# SegFormer3D's Mix-FFN at a 128^3 input: tokens (B, D*H*W, 4*embed_dim) per stage.
_TOKEN_STAGES = [(2, 32, 128), (2, 16, 256), (2, 8, 640), (2, 4, 1024)]
_VOLUMES = [(2, 32, 128), (2, 64, 64), (2, 128, 32)]
# MobileUtr's large kernels: (B, C, side, kernel) of its ConvUtr stage 3 and LGL blocks at 96^3 and 128^3 inputs
_LARGE = [(2, 32, 24, 7), (2, 64, 12, 9), (2, 32, 32, 7), (2, 64, 16, 9)]


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    volumes = [(1, 4, 8)] if quick else _VOLUMES
    stages = [(1, 4, 8)] if quick else _TOKEN_STAGES
    out = []
    for layout in ("ncdhw", "channels_last"):
        for b, c, s in volumes:
            out.append((f"{b}x{c}x{s}^3 {layout}", {"layout": layout, "b": b, "c": c, "s": s, "k": 3}))
    for b, c, s, k in [(1, 4, 8, 5)] if quick else _LARGE:
        out.append((f"{b}x{c}x{s}^3 ncdhw k{k}", {"layout": "ncdhw", "b": b, "c": c, "s": s, "k": k}))
    # the same convs on channels-last volumes (channel-major column tiles), at the 96^3 input
    for b, c, s, k in [] if quick else _LARGE[:2]:
        out.append((f"{b}x{c}x{s}^3 channels_last k{k}", {"layout": "channels_last", "b": b, "c": c, "s": s, "k": k}))
    for b, s, c in stages:
        out.append((f"{b}x{s ** 3}x{c} tokens {s}^3", {"layout": "tokens", "b": b, "c": c, "s": s, "k": 3}))
    return out


def _providers(spec: dict) -> list[str]:
    compiles = ["torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]
    if spec["layout"] == "tokens":
        return ["fastseg3d", "torch", *compiles]
    peer = "aten-native" if spec["layout"] == "ncdhw" else "cudnn-channels-last"
    return ["fastseg3d", f"torch ({peer})", *compiles]


def _conv(x, w, bias):
    return F.conv3d(x, w, bias, padding=w.shape[-1] // 2, groups=x.shape[1])


def _official_token_path(x, w, bias, s):
    # SegFormer3D's DWConv as released: the tokens viewed as a channels-last volume (no copy), the conv (cuDNN takes
    # that layout), and its channels-last output viewed back as tokens.
    b, _, c = x.shape
    vol = x.transpose(1, 2).view(b, c, s, s, s)
    return F.conv3d(vol, w, bias, padding=1, groups=c).flatten(2).transpose(1, 2)


def _conv_backend(x, w, bias) -> str | None:
    """The algorithm family ATen selects for this depthwise conv (cudnn, slow_conv_dilated3d, ...), as the peer's
    name only says which one it should be."""
    try:
        return str(torch._C._select_conv_backend(x, w, bias, [1] * 3, [w.shape[-1] // 2] * 3, [1] * 3, False,
                                                 [0] * 3, x.shape[1])).rsplit(".", 1)[-1]
    except (AttributeError, RuntimeError, TypeError):  # a private API
        return None


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, c, s, k = spec["b"], spec["c"], spec["s"], spec["k"]
    backend = None
    w = (torch.randn(c, 1, k, k, k, device=device) / k**1.5).to(dtype).requires_grad_()
    bias = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
    if spec["layout"] == "tokens":
        x = torch.randn(b, s**3, c, device=device, dtype=dtype, requires_grad=True)
        if provider == "fastseg3d":
            def fwd():
                return fastseg3d.ops.dwconv3d_tokens(x, (s, s, s), w, bias)
        else:
            fn = _official_token_path if provider == "torch" else compiled(_official_token_path, provider, device)
            if provider == "torch":
                backend = _conv_backend(x.transpose(1, 2).view(b, c, s, s, s), w, bias)

            def fwd():
                return fn(x, w, bias, s)
    else:
        fmt = torch.channels_last_3d if spec["layout"] == "channels_last" else torch.contiguous_format
        x = torch.randn(b, c, s, s, s, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        if provider == "fastseg3d":
            def fwd():
                return fastseg3d.ops.dwconv3d(x, w, bias)
        else:
            fn = _conv if compile_variant(provider) is None else compiled(_conv, provider, device)
            if compile_variant(provider) is None:
                backend = _conv_backend(x, w, bias)

            def fwd():
                return fn(x, w, bias)
    nbytes = x.numel() * x.element_size()
    # fwd reads x and writes y; bwd reads x and dy and writes dx (weights are negligible). k^3 fp32 FMAs per output
    # in fwd, k^3 for dx and k^3 for dw per element in bwd, whatever the I/O dtype: the FMA-pipe bound.
    flops = 2.0 * k**3 * x.numel()
    return Setup(fwd, [x, w, bias], {"fwd": 2 * nbytes, "bwd": 3 * nbytes, "fwd+bwd": 5 * nbytes},
                 min_flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops}, flops_on="fma", backend=backend)


def _optional(spec: dict) -> tuple[str, ...]:
    if spec["layout"] == "tokens":
        return ("torch.compile-max-autotune", "torch.compile-reduce-overhead")
    return ("torch.compile", "torch.compile-reduce-overhead")


CASE = register(Case(name="dwconv3d", shapes=_shapes, providers=_providers, setup=_setup, optional=_optional))
