"""fastseg3d.ops.attention: CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.attention import attention, attention_unsupported_reasons
from fastseg3d.reference.attention import attention_backward_ref, attention_forward_ref
from tests.utils import ZERO_FILLS, AtenOps, assert_close


def _qkv(b, n, m, h, d, dtype, device, layout="linear"):
    """q, k, v as the module makes them: strided views of Linear outputs (``linear``), or contiguous tensors."""
    if layout == "linear":
        q = torch.randn(b, n, h * d, device=device).to(dtype).view(b, n, h, d)
        kv = torch.randn(b, m, 2 * h * d, device=device).to(dtype).view(b, m, 2, h, d)
        leaves = [q, kv]
        return leaves, (lambda q, kv: (q, kv[:, :, 0], kv[:, :, 1]))
    leaves = [torch.randn(b, t, h, d, device=device).to(dtype) for t in (n, m, m)]
    return leaves, (lambda q, k, v: (q, k, v))


def _sdpa64(q, k, v, scale):
    out = F.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def check_against_sdpa(b, n, m, h, d, dtype, device, scale=None, layout="linear", grad="random", offset=0.0,
                       tolerance=None):
    """``offset`` > 0 pushes every logit far below zero (q >= offset, k <= -offset), so lse is very negative;
    ``tolerance``: (dtype, factor), that dtype's tolerances times the factor (default: ``dtype``'s)."""
    tol_dtype, factor = tolerance or (dtype, 1.0)
    leaves, split = _qkv(b, n, m, h, d, dtype, device, layout)
    if offset:
        q, k, _ = split(*leaves)
        q.copy_(q.abs() + offset)
        k.copy_(-(k.abs() + offset))
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    with fastseg3d.backend("triton"):
        out = attention(*split(*ours), scale=scale)
    expected = _sdpa64(*split(*ref), scale)
    assert out.dtype == dtype and out.shape == (b, n, h, d) and out.is_contiguous()
    assert_close("out", out, expected, tol_dtype, scale=factor)
    if grad == "sum":
        out.float().sum().backward()
        expected.sum().backward()
    else:
        g = torch.randn(expected.shape, device=device, dtype=torch.float64)
        out.backward(g.to(dtype))
        expected.backward(g.to(dtype).double())
    for i, (a, e) in enumerate(zip(ours, ref)):
        # Inputs are N(0, 1), so gradients are O(1): a floor of 1 keeps exact-zero references (M = 1) meaningful.
        assert_close(f"grad[{i}]", a.grad, e.grad, tol_dtype, scale=2.0 * factor, floor=1.0)


def check_flash_rule(b, n, m, h, d, dtype, device):
    """flash-attention's rule for low precision: against a float64 reference, the kernel's largest error in the
    output and in each gradient is at most twice that of PyTorch's attention composition run in the same dtype
    (scores, softmax and product each rounded to it), plus a small floor."""
    leaves, split = _qkv(b, n, m, h, d, dtype, device, "contiguous")
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    low = [t.detach().clone().requires_grad_() for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    scale = d ** -0.5
    with fastseg3d.backend("triton"):
        out = attention(*split(*ours))
    q, k, v = (t.transpose(1, 2) for t in split(*low))
    out_low = (torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v).transpose(1, 2)
    expected = _sdpa64(*split(*ref), scale)
    g = torch.randn(expected.shape, device=device, dtype=torch.float64).to(dtype)
    for o, ins in ((out, ours), (out_low, low), (expected, ref)):
        o.backward(g.to(o.dtype))
    pairs = [("out", out, out_low, expected)] + [
        (f"grad[{i}]", a.grad, p.grad, e.grad) for i, (a, p, e) in enumerate(zip(ours, low, ref))]
    for name, got, torch_low, want in pairs:
        err = (got.double() - want).abs().max().item()
        torch_err = (torch_low.double() - want).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, f"{name}: error {err:.3e}, PyTorch's in {dtype}: {torch_err:.3e}"


# ------------------------------------------------------------------------------------------------------
# CPU tier


def test_forward_and_backward_references_match_autograd():
    q = torch.randn(2, 13, 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, 2, 16, dtype=torch.float64, requires_grad=True)
    out, lse = attention_forward_ref(q, k, v, 0.3)
    expected = _sdpa64(q, k, v, 0.3)
    assert_close("out", out, expected, torch.float64)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.3
    assert_close("lse", lse, torch.logsumexp(scores, -1), torch.float32)  # lse is kept in fp32
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, (q, k, v), g)
    lse64 = torch.logsumexp(scores, -1).detach()
    got = attention_backward_ref(g, q.detach(), k.detach(), v.detach(), out.detach(), lse64, 0.3)
    for name, a, e in zip(("dq", "dk", "dv"), got, grads):
        assert_close(name, a, e, torch.float64)


@pytest.mark.parametrize("scale", [None, 0.2])
def test_cpu_default_backend_matches_sdpa(scale):
    check_against_sdpa_cpu = attention  # the auto backend runs the reference on CPU
    q = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    kv = torch.randn(2, 5, 2, 3, 8, dtype=torch.float64)
    out = check_against_sdpa_cpu(q, kv[:, :, 0], kv[:, :, 1], scale)
    assert_close("out", out, _sdpa64(q, kv[:, :, 0], kv[:, :, 1], scale), torch.float64)


def test_opcheck():
    leaves, split = _qkv(2, 9, 5, 2, 16, torch.float32, "cpu")
    q, k, v = split(*[t.requires_grad_() for t in leaves])
    torch.library.opcheck(torch.ops.fastseg3d.attention.default, (q, k, v, 0.25))
    out, lse = torch.ops.fastseg3d.attention(q, k, v, 0.25)
    g = torch.randn_like(out)
    args = (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 0.25)
    torch.library.opcheck(torch.ops.fastseg3d.attention_backward.default, args)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    leaves, split = _qkv(2, 11, 6, 2, 16, torch.float32, "cpu")

    def fn(q, kv):
        return torch.ops.fastseg3d.attention(*split(q, kv), 0.3)[0]

    eager = [t.detach().clone().requires_grad_() for t in leaves]
    comp = [t.detach().clone().requires_grad_() for t in leaves]
    out_e = fn(*eager)
    out_c = torch.compile(fn, fullgraph=True)(*comp)
    assert_close("out", out_c, out_e, torch.float32)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    for a, e in zip(comp, eager):
        assert_close("grad", a.grad, e.grad, torch.float32)


def test_meta_outputs_are_the_real_ones():
    """The ops' meta branches give the shapes, dtypes and strides the real ops give, forward and backward (the fake
    implementations run them, so opcheck compares the fake with itself there)."""
    q, k, v = torch.randn(2, 9, 3, 16), torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    real = torch.ops.fastseg3d.attention(q, k, v, 0.25)
    meta = torch.ops.fastseg3d.attention(q.to("meta"), k.to("meta"), v.to("meta"), 0.25)
    g = torch.randn_like(real[0])
    real_b = torch.ops.fastseg3d.attention_backward(g, q, k, v, *real, 0.25)
    meta_b = torch.ops.fastseg3d.attention_backward(*(t.to("meta") for t in (g, q, k, v, *real)), 0.25)
    for a, m in zip((*real, *real_b), (*meta, *meta_b)):
        assert (a.shape, a.dtype, a.stride()) == (m.shape, m.dtype, m.stride())


def test_meta_device_allocates_no_score_matrix():
    """Forward and backward on the meta device, recording every tensor created: none is near N x M (the
    reference's scores, 2**31 elements here, fail the bound)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    b, n, m, h, d = 2, 262_144, 4096, 1, 32
    leaves, split = _qkv(b, n, m, h, d, torch.bfloat16, "meta")
    q, k, v = split(*[t.requires_grad_() for t in leaves])
    with LargestTensor() as mode:
        out = attention(q, k, v)
        out.sum().backward()
    assert out.device.type == "meta" and out.shape == (b, n, h, d)
    assert leaves[1].grad.shape == leaves[1].shape
    assert mode.largest <= 2 * b * n * h * d < n * m


def test_autocast_casts_inputs():
    q = torch.randn(1, 5, 1, 16)
    kv = torch.randn(1, 3, 2, 1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, kv[:, :, 0], kv[:, :, 1])
        mixed = attention(q, kv[:, :, 0].bfloat16(), kv[:, :, 1])  # SDPA takes mixed dtypes under autocast too
    assert out.dtype == mixed.dtype == torch.bfloat16


def test_reference_output_is_contiguous_on_every_sdpa_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastseg3d.reference.attention import attention_ref

    kv = torch.randn(2, 7, 2, 3, 8).unbind(2)
    with sdpa_kernel(SDPBackend.MATH):
        out = attention_ref(torch.randn(2, 9, 3, 8), *kv)
    assert out.shape == (2, 9, 3, 8) and out.is_contiguous()


def test_scale_accepts_any_real_number():
    import numpy as np

    x = torch.randn(1, 4, 1, 16)
    expected = attention(x, x, x, scale=0.5)
    assert_close("out", attention(x, x, x, scale=np.float32(0.5)), expected, torch.float32)


def test_tf32_follows_both_pytorch_apis():
    """fp32 attention reads PyTorch's TF32 setting: the legacy flag raises once the new API has been used, so
    reading it would fail every fp32 call of such a user (a process of its own: the setting is global)."""
    code = (
        "import torch\n"
        "from fastseg3d.backends import tf32_matmul_allowed\n"
        "from fastseg3d.kernels.attention import _precision\n"
        "assert not tf32_matmul_allowed() and _precision(torch.float32) == 'ieee'\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "assert tf32_matmul_allowed()\n"
        "torch.backends.cuda.matmul.allow_tf32 = False\n"
        "torch.backends.fp32_precision = 'tf32'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'none'\n"
        "assert tf32_matmul_allowed() and _precision(torch.float32) == 'tf32'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "assert not tf32_matmul_allowed() and _precision(torch.bfloat16) is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr


def test_launches_take_64bit_row_offsets_where_offsets_reach_2_31():
    """MISSU's q, k and v are views of its qkv output (token stride 3 x 512): at a 960^3 input their offsets pass
    2^31 although every stride fits 32 bits; SegFormer3D's stage 1 at 128^3 stays in 32 bits (meta tensors:
    nothing is allocated or run)."""
    pytest.importorskip("triton")
    from bench.sass import _captured
    from fastseg3d.kernels.attention import attention_bwd, attention_fwd

    def flags(b, n, h, d):
        qkv = torch.empty(b, n, 3, h, d, device="meta", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
        out, grad = torch.empty(b, n, h, d, device="meta", dtype=torch.bfloat16), torch.empty_like(q)
        lse = torch.empty(b, h, n, device="meta")
        launches = _captured(lambda: attention_fwd(q, k, v, 0.125, out, lse))
        launches += _captured(lambda: attention_bwd(grad, q, k, v, out, lse, 0.125, *(torch.empty_like(t)
                                                                                        for t in (q, k, v))))
        return {fn.__name__: kw["INT64"] for fn, _, kw in launches if fn.__name__.startswith("_attn")}

    kernels = {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    missu = flags(1, 120**3, 8, 64)
    assert set(missu) == kernels
    # o, do and dq are contiguous (stride 512): only the kernels reading q, k or v need 64 bits
    assert missu == {"_attn_fwd_kernel": True, "_attn_bwd_delta_kernel": False, "_attn_bwd_dkdv_kernel": True,
                     "_attn_bwd_dq_kernel": True}
    assert not any(flags(2, 32**3, 1, 32).values())


def test_unsupported_cases_report_reasons():
    q = torch.randn(1, 4, 2, 24, device="meta")
    assert any("head_dim=24" in r for r in attention_unsupported_reasons(q, q, q))
    q = torch.randn(1, 4, 2, 32, device="meta", dtype=torch.float64)
    assert any("dtype" in r for r in attention_unsupported_reasons(q, q, q))
    t = torch.randn(1, 32, 2, 4, device="meta").transpose(1, 3)
    assert any("unit-stride" in r for r in attention_unsupported_reasons(t, t, t))
    for which in range(3):  # each operand on its own
        args = [torch.empty(1, 4, 2, 32, device="meta")] * 3
        args[which] = torch.empty(1, 4, 32, 2, device="meta").transpose(2, 3)
        assert any("unit-stride" in r for r in attention_unsupported_reasons(*args)), which
    for d in (8, 256):  # tl.dot needs K >= 16 (d = 8 runs in the interpreter but does not compile for sm_90)
        q = torch.empty(1, 4, 2, d, device="meta")
        assert any(f"head_dim={d}" in r for r in attention_unsupported_reasons(q, q, q))
    for b, h in ((65536, 1), (32768, 2)):  # the grid's y axis
        q = torch.empty(b, 4, h, 16, device="meta")
        assert any("batch x heads" in r for r in attention_unsupported_reasons(q, q, q))
    q = torch.empty(65535, 4, 1, 16, device="meta")
    assert attention_unsupported_reasons(q, q, q) == []
    # no heads: the backward's partial sums would be launched with a block of 0 heads x d
    q, kv = torch.randn(2, 5, 0, 16, device="meta"), torch.randn(2, 3, 0, 16, device="meta")
    assert "no tokens or no heads" in attention_unsupported_reasons(q, kv, kv)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="head_dim=24"):
        x = torch.randn(1, 4, 2, 24)
        attention(x, x, x)


_BAD = [
    (lambda: attention(torch.randn(2, 4, 32), torch.randn(2, 4, 1, 32), torch.randn(2, 4, 1, 32)), ValueError,
     "q must be 4-D"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 4, 1, 32)), ValueError,
     "k and v must have one shape"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(3, 3, 1, 32), torch.randn(3, 3, 1, 32)), ValueError,
     "must agree"),
    (lambda: attention(torch.randn(2, 4, 2, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32)), ValueError,
     "must agree"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32).half(), torch.randn(2, 3, 1, 32).half()),
     TypeError, "k has dtype"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32, device="meta")),
     TypeError, "v is on"),
    (lambda: attention(torch.randn(2, 4, 1, 0), torch.randn(2, 3, 1, 0), torch.randn(2, 3, 1, 0)), ValueError,
     "head_dim >= 1"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32), scale=-1.0),
     ValueError, "scale"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32),
                       scale=float("inf")), ValueError, "scale must be a positive finite number"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32),
                       scale=float("nan")), ValueError, "scale must be a positive finite number"),
    (lambda: attention(torch.ones(2, 4, 1, 32, dtype=torch.long), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32)),
     TypeError, "floating"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32),
                       scale=torch.tensor(0.5)), TypeError, "scale must be a Python or NumPy real number"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32),
                       dropout_p=torch.tensor(0.1)), TypeError, "dropout_p must be a Python or NumPy real number"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32), dropout_p=True),
     TypeError, "dropout_p must be a Python or NumPy real number"),
    (lambda: attention(torch.randn(2, 4, 1, 32), torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32), dropout_p=1.0),
     ValueError, "dropout_p must be a number in"),
]


@pytest.mark.parametrize("call,exc,match", _BAD, ids=[m for _, _, m in _BAD])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------------
# Interpreter tier

_INTERPRET_CASES = [
    # B, N, M, H, d, dtype, scale, layout
    (2, 37, 11, 1, 32, torch.float32, None, "linear"),
    (1, 100, 64, 2, 32, torch.float32, 0.1, "linear"),
    (1, 70, 70, 3, 16, torch.float32, None, "contiguous"),
    (2, 33, 129, 2, 64, torch.float32, 0.05, "linear"),
    (2, 37, 11, 1, 32, torch.float16, None, "linear"),
    (1, 100, 64, 2, 32, torch.float16, 0.3, "contiguous"),
    (1, 70, 70, 3, 16, torch.float16, None, "linear"),
    (1, 33, 129, 2, 64, torch.float16, None, "linear"),
    (1, 20, 1, 1, 128, torch.float32, None, "linear"),
    # N a multiple of the query block, M of the key block: the unmasked loops
    (1, 64, 32, 2, 16, torch.float32, None, "linear"),
    (2, 128, 48, 1, 32, torch.float16, 0.2, "contiguous"),
    # a scale that underflows fp32 in log2 units, with padded keys: a uniform softmax, no NaN
    (1, 37, 11, 1, 16, torch.float32, 1e-300, "linear"),
    # bf16 (conftest's _bf16_as_on_gpu: the interpreter's own bf16 dot multiplies bit patterns)
    (2, 37, 11, 1, 32, torch.bfloat16, None, "linear"),
    (1, 100, 64, 2, 32, torch.bfloat16, 0.3, "contiguous"),
    (1, 70, 70, 3, 16, torch.bfloat16, None, "linear"),
    (1, 33, 129, 2, 64, torch.bfloat16, None, "linear"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("b,n,m,h,d,dtype,scale,layout", _INTERPRET_CASES,
                         ids=[f"B{c[0]}-N{c[1]}-M{c[2]}-H{c[3]}-d{c[4]}-{str(c[5])[6:]}-s{c[6]}-{c[7]}"
                              for c in _INTERPRET_CASES])
def test_interpret_kernel_matches_sdpa(poison, b, n, m, h, d, dtype, scale, layout):
    check_against_sdpa(b, n, m, h, d, dtype, "cpu", scale, layout)


@pytest.mark.interpret
@pytest.mark.parametrize("n,m", [(37, 11), (40, 75)])
def test_interpret_very_negative_logits_with_padded_keys(poison, n, m):
    """Every logit near -190: a padded key's exp(0 - lse) would overflow, so the masks of the key tail matter."""
    check_against_sdpa(1, n, m, 1, 16, torch.float32, "cpu", layout="contiguous", offset=6.0)


@pytest.mark.interpret
@pytest.mark.parametrize("n,m,h,d", [(37, 11, 1, 32), (70, 70, 3, 16)])
def test_interpret_flash_attention_error_rule(poison, n, m, h, d):
    check_flash_rule(1, n, m, h, d, torch.float16, "cpu")


@pytest.mark.interpret
def test_interpret_expanded_grad_output(poison):
    check_against_sdpa(1, 21, 9, 2, 16, torch.float32, "cpu", grad="sum")


@pytest.mark.interpret
@pytest.mark.parametrize("b,n,m,h,d,splits", [(1, 200, 40, 2, 16, 4), (1, 150, 17, 1, 32, 25), (2, 129, 64, 1, 64, 3)])
def test_interpret_dkdv_row_splits(poison, monkeypatch, b, n, m, h, d, splits):
    """The GPU splits the query rows of the dk/dv kernel among programs (a workspace summed in a fixed order);
    the interpreter takes one split unless forced, so force it here (more splits than row blocks included)."""
    import fastseg3d.kernels.attention as kernels

    monkeypatch.setattr(kernels, "_row_splits", lambda n_row_blocks, n_programs, device: splits)
    check_against_sdpa(b, n, m, h, d, torch.float32, "cpu")


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["linear", "contiguous"])
def test_interpret_64bit_row_offsets(poison, monkeypatch, layout):
    """Every kernel's 64-bit row offsets (taken where an operand's offsets reach 2^31), forced on a small case."""
    import fastseg3d.kernels.attention as kernels

    monkeypatch.setattr(kernels, "needs_int64", lambda *tensors: True)
    check_against_sdpa(1, 37, 11, 2, 16, torch.float32, "cpu", layout=layout)


@pytest.mark.interpret
@pytest.mark.parametrize("n,m,d,dtype", [(128, 40, 16, torch.float32), (256, 100, 32, torch.float16)])
def test_interpret_gpu_tiles_with_row_splits(poison, monkeypatch, n, m, d, dtype):
    """The tiles a GPU launch takes (fp32's FMA-unit tables: dk/dv tiles smaller than dq's) on a GPU of one SM,
    whose dk/dv kernel splits the query rows in two, with unmasked row loops (N a multiple of the row tile)."""
    from bench.sass import _captured
    import fastseg3d.kernels.attention as kernels
    from fastseg3d.kernels import utils as kernel_utils

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernel_utils, "sm_count", lambda device: 1)
    q, k, v = (torch.empty(1, t, 1, d, dtype=dtype, device="meta") for t in (n, m, m))
    out, lse = torch.empty_like(q), torch.empty(1, 1, n, device="meta")
    launches = _captured(lambda: kernels.attention_bwd(out, q, k, v, out, lse, 0.25, *(torch.empty_like(t) for t in
                                                                                         (q, k, v))))
    dkdv = next(kw for _, _, kw in launches if "ROW_TAIL" in kw)
    dq = next(kw for _, _, kw in launches if "KEY_TAIL" in kw)
    assert not dkdv["ROW_TAIL"] and dkdv["BLOCK_M"] < n // 2, dkdv
    if dtype == torch.float32:
        assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"]) != (dq["BLOCK_M"], dq["BLOCK_N"])
    check_against_sdpa(1, n, m, 1, d, dtype, "cpu", layout="contiguous")


@pytest.mark.interpret
@pytest.mark.parametrize("sparse", ["q", "k", "v"])
def test_interpret_64bit_offsets_of_a_sparse_view(poison, sparse):
    """One operand a small view whose rows lie 2^28 elements apart (a storage of 3 to 10 GiB reserved, a few pages
    touched): its last rows' offsets pass 2^31, so the kernels' 64-bit offsets are needed for real, forward and
    every gradient."""
    from bench.sass import _captured
    import fastseg3d.kernels.attention as kernels

    n, m, d = 37, 11, 16
    tensors = {"q": torch.randn(1, n, 1, d, dtype=torch.float16), "k": torch.randn(1, m, 1, d, dtype=torch.float16),
               "v": torch.randn(1, m, 1, d, dtype=torch.float16)}
    rows = tensors[sparse].shape[1]
    view = torch.empty(rows * 2**28, dtype=torch.float16).as_strided((1, rows, 1, d), (rows * 2**28, 2**28, d, 1))
    tensors[sparse] = view.copy_(tensors[sparse])
    q, k, v = tensors.values()
    launches = _captured(lambda: kernels.attention_fwd(q, k, v, 0.25, torch.empty(1, n, 1, d, device="meta"),
                                                       torch.empty(1, 1, n, device="meta")))
    assert launches[0][2]["INT64"]
    ours = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with fastseg3d.backend("triton"):
        out = attention(*ours)
    expected = _sdpa64(*ref, d ** -0.5)
    assert_close("out", out, expected, torch.float16)
    g = torch.randn(expected.shape, dtype=torch.float64).half()
    out.backward(g)
    expected.backward(g.double())
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert_close(f"grad[{i}]", a.grad, e.grad, torch.float16, scale=2.0, floor=1.0)


# ------------------------------------------------------------------------------------------------------
# GPU tier

_GPU_CASES = [
    (b, n, m, h, d, dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for b, n, m, h, d in [(2, 32768, 512, 1, 32), (2, 4096, 512, 2, 32), (2, 4096, 4096, 2, 16), (1, 4096, 64, 1, 64),
                          (2, 1000, 333, 4, 128), (1, 513, 77, 3, 32)]
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,n,m,h,d,dtype", _GPU_CASES,
                         ids=[f"B{c[0]}-N{c[1]}-M{c[2]}-H{c[3]}-d{c[4]}-{str(c[5])[6:]}" for c in _GPU_CASES])
def test_gpu_kernel_matches_sdpa(poison, no_tf32, b, n, m, h, d, dtype):
    check_against_sdpa(b, n, m, h, d, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n,m,h,d", [(2, 32768, 512, 1, 32), (2, 4096, 512, 2, 32), (1, 4096, 4096, 1, 64),
                                       (2, 1000, 333, 4, 128)])
def test_gpu_flash_attention_error_rule(poison, no_tf32, b, n, m, h, d, dtype):
    check_flash_rule(b, n, m, h, d, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("b,n,m,h,d", [(2, 4096, 512, 2, 32), (1, 4096, 64, 1, 64), (2, 1000, 333, 4, 128)])
def test_gpu_fp32_where_tf32_is_allowed(poison, b, n, m, h, d):
    """fp32 where PyTorch allows TF32 matmuls: the kernels' dots take TF32 (and the tiles chosen for it). TF32 keeps
    fp16's 10-bit mantissa, and the tensor cores drop the rest of each fp32 operand (q, k and v here, where fp16
    inputs are exact): with every dot's operands truncated so, a float64 emulation of these cases errs by up to
    1.7e-3 relative RMS in the output, so twice fp16's tolerances apply."""
    state = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_against_sdpa(b, n, m, h, d, torch.float32, "cuda", tolerance=(torch.float16, 2.0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = state


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    leaves, split = _qkv(2, 32768, 512, 1, 32, torch.bfloat16, "cuda")
    results = []
    for _ in range(3):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        with fastseg3d.backend("triton"):
            out = attention(*split(*ins))
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in ins])
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


@pytest.mark.gpu
def test_gpu_memory_far_below_score_matrix():
    b, n, m, h, d = 1, 262_144, 4096, 1, 32
    leaves, split = _qkv(b, n, m, h, d, torch.bfloat16, "cuda")
    ins = [t.requires_grad_() for t in leaves]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with fastseg3d.backend("triton"):
        out = attention(*split(*ins))
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    score_matrix = b * h * n * m * 2  # one bf16 N x M matrix: 2 GiB
    assert extra < score_matrix / 20, f"peak extra memory {extra / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    leaves, split = _qkv(2, 4096, 512, 2, 32, torch.bfloat16, "cuda")

    def fn(q, kv):
        return attention(*split(q, kv))

    eager = [t.detach().clone().requires_grad_() for t in leaves]
    comp = [t.detach().clone().requires_grad_() for t in leaves]
    with fastseg3d.backend("triton"):
        out_e = fn(*eager)
        out_c = torch.compile(fn, fullgraph=True)(*comp)
    assert_close("out", out_c, out_e, torch.bfloat16)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    for a, e in zip(comp, eager):
        assert_close("grad", a.grad, e.grad, torch.bfloat16)


def test_backward_fills_no_zeros_for_the_log_sum_exp():
    """The op's log-sum-exp output gets no gradient: autograd would otherwise fill a (B, H, N) fp32 tensor of zeros
    for it in every backward (a launch per attention layer)."""
    q = torch.randn(2, 37, 2, 32, requires_grad=True)
    kv = torch.randn(2, 11, 2, 2, 32, requires_grad=True)
    out = torch.ops.fastseg3d.attention(q, *kv.unbind(2), 0.2)[0]
    with AtenOps() as log:
        out.sum().backward()
    assert "fastseg3d::attention_backward" in log.ops
    assert not ZERO_FILLS & set(log.ops), log.ops
    # the eager path (no dispatcher) runs the same formulas through its own autograd.Function
    from fastseg3d.ops.attention import _attention_op

    out = _attention_op(q, *kv.unbind(2), 0.2)[0]
    assert type(out.grad_fn).__name__ == "attention_eagerBackward"
    with torch.profiler.profile() as prof:
        out.sum().backward()
    assert not (ZERO_FILLS - {"aten::fill_"}) & {e.name for e in prof.events()}  # fill_: backward's ones
