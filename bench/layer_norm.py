"""case=layer_norm: SegFormer3D's LayerNorms before a Linear under bf16 autocast (stage 1's 32 channels on the 32^3
tokens of a 128^3 input, stage 3's 160 on 8^3, B=2): the residual stream's fp32 tokens in, the Linear's bf16 input
out, fused (``fastseg3d.ops.layer_norm`` with ``out_dtype=torch.bfloat16``), against ``F.layer_norm`` as autocast
runs it (fp32 out) followed by the Linear's cast to bf16, eager and compiled. In fp32 everything stays fp32.

The "residual" shapes add the branch before the norm (a block's ``x + attention(...)`` then norm2): the stream fp32,
the branch bf16 (a Linear's output under autocast), the sum written fp32 and the norm bf16, fused
(``fastseg3d.ops.add_layer_norm``) against the add then the norm and cast. The row's output is the norm, so its
backward gives the sum no gradient of its own (in the network the next add does: the model rows count that too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastseg3d
from bench.registry import Case, Setup, compiled, optional_compile, register


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    sizes = [(1, 64, 32, False), (1, 64, 32, True)] if quick else [
        (2, 32 ** 3, 32, False), (2, 8 ** 3, 160, False), (2, 32 ** 3, 32, True), (2, 8 ** 3, 160, True)]
    return [(f"{b}x{n}x{c}" + (" residual" if res else ""), {"b": b, "n": n, "c": c, "residual": res})
            for b, n, c, res in sizes]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, n, c = spec["b"], spec["n"], spec["c"]
    x = torch.randn(b, n, c, device=device).requires_grad_()  # the residual stream: fp32 under autocast
    w = (1.0 + 0.1 * torch.randn(c, device=device)).requires_grad_()
    bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
    if spec.get("residual"):
        return _residual_setup(x, w, bias, dtype, provider, device)
    if provider == "fastseg3d":
        def fwd():
            return fastseg3d.ops.layer_norm(x, w, bias, 1e-5, dtype)
    else:
        def _eager(x, w, b):
            return F.layer_norm(x, (c,), w, b, 1e-5).to(dtype)  # autocast's fp32 norm, the Linear's cast

        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(x, w, bias)
    nbytes_in, nbytes_out = x.numel() * 4, x.numel() * dtype.itemsize
    # fwd reads x and writes y; bwd reads x and dy and writes dx (fp32, as x)
    return Setup(fwd, [x, w, bias], {"fwd": nbytes_in + nbytes_out, "bwd": 2 * nbytes_in + nbytes_out,
                                     "fwd+bwd": 3 * nbytes_in + 2 * nbytes_out})


def _residual_setup(x, w, bias, dtype, provider, device) -> Setup:
    c = x.shape[-1]
    r = torch.randn(x.shape, device=device, dtype=dtype).requires_grad_()  # the branch: a Linear's output
    if provider == "fastseg3d":
        def fwd():
            return fastseg3d.ops.add_layer_norm(x, r, w, bias, 1e-5, dtype)[1]
    else:
        def _eager(x, r, w, b):
            return F.layer_norm(x + r, (c,), w, b, 1e-5).to(dtype)

        fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(x, r, w, bias)
    n, item = x.numel(), dtype.itemsize
    # fwd reads x and r, writes s and y; bwd reads s and dy, writes dx (fp32) and, in another dtype, dr (one
    # gradient serves both inputs of one dtype)
    fwd_bytes = n * (4 + item) + n * (4 + item)
    bwd_bytes = n * (4 + item) + n * (4 + (item if dtype != torch.float32 else 0))
    return Setup(fwd, [x, r, w, bias], {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes})


CASE = register(Case(name="layer_norm", shapes=_shapes, providers=_providers, setup=_setup,
                     optional=optional_compile("")))
