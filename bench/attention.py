"""case=attention: the fused attention op against the SDPA backends (each forced), xformers and, on request
(``--providers flex`` or ``all``: each shape and dtype compiles its own kernels), FlexAttention compiled; and
case=attention_block: SegFormer3D's whole attention sub-block (LN -> attention -> proj -> residual), fastseg3d's
module against the published compositions: the current release's (SDPA, ``torch-sdpa``; compiled as
``torch.compile``) and the 2024 release's (explicit softmax, ``torch``), eager and compiled (the autotuned and
CUDA-graph modes optional, but for stages 3 and 4, whose few hundred tokens make the sub-block launch-bound: there
the CUDA-graph mode, ``torch.compile-reduce-overhead``, runs by default).

Shapes: SegFormer3D's four stages (C 32, 64, 160, 256; 1, 2, 5, 8 heads of 32; sr 4, 2, 1, 1) at 128^3, 160^3 and
256^3 inputs.

Rooflines: bytes (q, k, v read, o written), matrix FLOPs ``4 B H N M d`` forward and 2.5x that backward, and
``B H N M`` exponentials forward plus as many again backward (P is recomputed): with head dim 32 the exponential
unit, not the tensor cores, is the binding ceiling at SegFormer3D's sizes (performance.md §2.5).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import fastseg3d
from bench.registry import Case, Setup, compiled, optional_compile, register, require_cuda
from fastseg3d.nn import EfficientSelfAttention3d
from fastseg3d.reference.attention import efficient_self_attention3d_ref

# SegFormer3D's stages (head_dim 32) at 128^3, 160^3, 256^3: stage, C, sr, encoder stride before the stage's grid
_STAGES = [(1, 32, 4, 4), (2, 64, 2, 8), (3, 160, 1, 16), (4, 256, 1, 32)]
_INPUTS = (128, 160, 256)


def _grids(quick: bool):
    if quick:
        yield "tiny", (4, 4, 4), 16, 1, 2
        return
    for side in _INPUTS:
        for stage, c, sr, stride in _STAGES:
            g = side // stride
            yield f"stage{stage}@{side}^3", (g, g, g), c, c // 32, sr


def _shapes(quick: bool):
    out = []
    for name, grid, c, heads, sr in _grids(quick):
        n = grid[0] * grid[1] * grid[2]
        m = n // sr**3
        out.append((f"{name} N{n} M{m} H{heads} d{c // heads}", {"grid": grid, "c": c, "heads": heads, "sr": sr}))
    return out


_SDPA = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
_GPU_ONLY_SDPA = ("sdpa-efficient", "sdpa-cudnn")


def _op_providers(spec):
    providers = ["fastseg3d", *_SDPA]
    if importlib.util.find_spec("xformers") is not None:
        providers.append("xformers")
    return [*providers, "flex"]


def _core_work(b: int, heads: int, n: int, m: int, d: int) -> tuple[dict, dict]:
    """Minimum matrix FLOPs and exponentials of softmax(q k^T) v per mode (backward recomputes P)."""
    flops = 4.0 * b * heads * n * m * d
    exps = float(b * heads * n * m)
    return ({"fwd": flops, "bwd": 2.5 * flops, "fwd+bwd": 3.5 * flops},
            {"fwd": exps, "bwd": exps, "fwd+bwd": 2 * exps})


def _op_setup(spec, dtype, provider, device) -> Setup:
    b, (d0, d1, d2), c, heads, sr = 2, spec["grid"], spec["c"], spec["heads"], spec["sr"]
    n, d = d0 * d1 * d2, c // heads
    m = n // sr**3
    q_lin = torch.randn(b, n, c, device=device, dtype=dtype, requires_grad=True)
    kv_lin = torch.randn(b, m, 2 * c, device=device, dtype=dtype, requires_grad=True)

    def qkv():
        kv = kv_lin.view(b, m, 2, heads, d)
        return q_lin.view(b, n, heads, d), kv[:, :, 0], kv[:, :, 1]

    if provider == "fastseg3d":
        def fwd():
            return fastseg3d.ops.attention(*qkv())
    elif provider == "xformers":
        require_cuda(device, "xformers")
        import xformers.ops as xops

        def fwd():
            return xops.memory_efficient_attention(*qkv())
    elif provider == "flex":
        require_cuda(device, "FlexAttention's compiled kernels")
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def fwd():
            q, k, v = (t.transpose(1, 2) for t in qkv())
            return flex(q, k, v).transpose(1, 2)
    else:
        if provider in _GPU_ONLY_SDPA:
            require_cuda(device, f"SDPA's {_SDPA[provider].lower()} backend")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, _SDPA[provider])

        def fwd():
            q, k, v = (t.transpose(1, 2) for t in qkv())
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    size = torch.finfo(dtype).bits // 8
    io = b * (2 * n + 2 * m) * c * size  # q and the output, k and v
    flops, exps = _core_work(b, heads, n, m, d)
    return Setup(fwd, [q_lin, kv_lin], {"fwd": io, "bwd": 2 * io, "fwd+bwd": 3 * io}, min_flops=flops,
                 min_exps=exps)


def _block_providers(spec):
    # torch-sdpa: the current release's composition (SDPA); torch: the 2024 release's (explicit softmax); the compiled
    # peers compile the current one, the stronger
    return ["fastseg3d", "torch-sdpa", "torch", "torch.compile", "torch.compile-max-autotune",
            "torch.compile-reduce-overhead"]


def _sdpa_choice(b: int, n: int, m: int, heads: int, d: int, dtype, device) -> str | None:
    """The backend ``F.scaled_dot_product_attention`` picks for the published composition's q, k and v (permuted
    views of the Linear outputs), as the ``torch-sdpa`` peer's name does not say which one runs."""
    from torch.nn.attention import SDPBackend

    q = torch.empty(b, n, heads, d, device=device, dtype=dtype).permute(0, 2, 1, 3)
    k, v = torch.empty(b, m, 2, heads, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    try:
        return "sdpa-" + SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower().removesuffix("_attention")
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a private API
        return None


def _block_setup(spec, dtype, provider, device) -> Setup:
    grid, c, heads, sr = spec["grid"], spec["c"], spec["heads"], spec["sr"]
    n = grid[0] * grid[1] * grid[2]
    norm = torch.nn.LayerNorm(c).to(device, dtype)
    attn = EfficientSelfAttention3d(c, heads, sr_ratio=sr).to(device, dtype)
    x = torch.randn(2, n, c, device=device, dtype=dtype, requires_grad=True)

    if provider == "fastseg3d":
        def block(x):
            return x + attn(norm(x), grid)
    else:
        sdpa = provider != "torch"

        def eager(x):
            return x + efficient_self_attention3d_ref(attn, norm(x), grid, sdpa=sdpa)

        block = eager if provider in ("torch", "torch-sdpa") else compiled(eager, provider, device)
    size = torch.finfo(dtype).bits // 8
    b, m = x.shape[0], n // sr**3
    io = 2 * b * n * c * size
    core_flops, exps = _core_work(b, heads, n, m, c // heads)
    # the q, kv and output projections and the patchify (kernel = stride = sr) conv: 2 FLOPs per MAC
    patchify = m * c * sr**3 * c if sr > 1 else 0
    linear = 2.0 * b * (n * c * c + patchify + m * c * 2 * c + n * c * c)
    flops = {"fwd": core_flops["fwd"] + linear, "bwd": core_flops["bwd"] + 2 * linear,
             "fwd+bwd": core_flops["fwd+bwd"] + 3 * linear}
    backend = _sdpa_choice(b, n, m, heads, c // heads, dtype, device) if provider == "torch-sdpa" else None
    return Setup(lambda: block(x), [x, *attn.parameters(), *norm.parameters()],
                 {"fwd": io, "bwd": 2 * io, "fwd+bwd": 3 * io}, min_flops=flops, min_exps=exps, backend=backend)


register(Case(name="attention", shapes=_shapes, providers=_op_providers, setup=_op_setup,
              optional=lambda spec: ("flex",)))
_OPTIONAL = optional_compile("")


def _block_optional(spec) -> tuple[str, ...]:
    # stages 3 and 4 (no spatial reduction, N of 64 to 4,096) are launch-bound: the CUDA-graph peer by default
    return tuple(p for p in _OPTIONAL(spec) if spec["sr"] > 1 or not p.endswith("reduce-overhead"))


register(Case(name="attention_block", shapes=_shapes, providers=_block_providers, setup=_block_setup,
              optional=_block_optional))
