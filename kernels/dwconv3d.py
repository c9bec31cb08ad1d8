"""Triton kernels of the fused depthwise 3D convolution (stride 1, any padding and dilation).

    y = act(conv3d(x, w, b, groups=C)) + residual

Every tensor is addressed through its five logical (B, C, D, H, W) strides, so one kernel serves NCDHW,
``channels_last_3d`` and the token layout (B, N, C) viewed as (B, C, D, H, W). A program owns a
[BLOCK_C, BLOCK_H, BLOCK_W] output tile of one (batch, depth) slice; the block shape follows the layout
(wide along C when the channel stride is 1, wide along W otherwise) so loads stay coalesced.

Backward:
* ``dz = dy * act'(z)`` where ``z = conv(x) + b`` is recomputed (nothing but the input is saved);
* ``dx`` is the same forward kernel run on ``dz`` with the taps flipped and the padding mirrored;
* ``dw``/``db``: each program walks a chunk of depth slices for one spatial tile, keeps per-tap partial sums
  in registers and writes them to its own row of an fp32 workspace, which is then summed in a fixed order.
  There are no atomics, so the weight gradient is bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.backends import interpreter_active

__all__ = ["ACT_IDS", "dwconv3d_bwd_weight", "dwconv3d_fwd"]

ACT_IDS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

_INT32_MAX = 2**31 - 1


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, in fp32."""
    if ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 4:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, b, od, c3, h3, w3, offs_c, C, D_in, H_in, W_in,
    sxb, sxc, sxd, sxh, sxw, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """sum over taps of w[c, tap] * x[b, c, od - pad + kd*dil, ...] for one output tile, in fp32."""
    KVOL: tl.constexpr = KD * KH * KW
    x_base = x_ptr + b * sxb + c3 * sxc
    mask_c = c3 < C
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
    for kd in range(KD):
        # A [1, 1, 1] tensor, not a scalar: the interpreter mis-types `tensor & scalar_bool` masks.
        idp = od - pad_d + kd * dil_d + tl.zeros([1, 1, 1], dtype=tl.int32)
        d_ok = (idp >= 0) & (idp < D_in)
        for kh in tl.static_range(KH):
            ih = h3 - pad_h + kh * dil_h
            dh_ok = mask_c & d_ok & (ih >= 0) & (ih < H_in)
            for kw in tl.static_range(KW):
                iw = w3 - pad_w + kw * dil_w
                m = dh_ok & (iw >= 0) & (iw < W_in)
                xv = tl.load(x_base + idp * sxd + ih * sxh + iw * sxw, mask=m, other=0.0).to(tl.float32)
                tap = (kd * KH + kh) * KW + kw
                if FLIP:
                    tap = KVOL - 1 - tap
                wv = tl.load(w_ptr + offs_c * KVOL + tap, mask=offs_c < C, other=0.0).to(tl.float32)
                acc += xv * wv[:, None, None]
    return acc


@triton.jit
def _dwconv3d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, r_ptr, g_ptr, y_ptr,
    C, D_in, H_in, W_in, D_out, H_out, W_out,
    sxb, sxc, sxd, sxh, sxw,
    srb, src, srd, srh, srw,
    sgb, sgc, sgd, sgh, sgw,
    syb, syc, syd, syh, syw,
    pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, GRAD_ACT: tl.constexpr,
    INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """y = act(conv + bias) + residual, or with GRAD_ACT: y = g * act'(conv + bias)."""
    pid = tl.program_id(0)
    od = tl.program_id(1)
    b = tl.program_id(2)
    n_h = tl.cdiv(H_out, BLOCK_H)
    n_w = tl.cdiv(W_out, BLOCK_W)
    pid_c = pid // (n_h * n_w)
    pid_hw = pid % (n_h * n_w)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = (pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    if INT64:
        od = od.to(tl.int64)
        b = b.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
        offs_w = offs_w.to(tl.int64)
    c3 = offs_c[:, None, None]
    h3 = offs_h[None, :, None]
    w3 = offs_w[None, None, :]
    out_mask = (c3 < C) & (h3 < H_out) & (w3 < W_out)

    z = _conv_tile(
        x_ptr, w_ptr, b, od, c3, h3, w3, offs_c, C, D_in, H_in, W_in,
        sxb, sxc, sxd, sxh, sxw, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
        KD, KH, KW, FLIP, BLOCK_C, BLOCK_H, BLOCK_W,
    )
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None, None]
    if GRAD_ACT:
        g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + w3 * sgw, mask=out_mask, other=0.0)
        out = g.to(tl.float32) * _act_grad(z, ACT)
    else:
        out = _act(z, ACT)
        if HAS_RES:
            r = tl.load(r_ptr + b * srb + c3 * src + od * srd + h3 * srh + w3 * srw, mask=out_mask, other=0.0)
            out += r.to(tl.float32)
    tl.store(y_ptr + b * syb + c3 * syc + od * syd + h3 * syh + w3 * syw, out.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dwconv3d_bwd_weight_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, dz_ptr, dwp_ptr, dbp_ptr,
    C, D_in, H_in, W_in, D_out, H_out, W_out, D_CHUNK,
    sxb, sxc, sxd, sxh, sxw,
    sgb, sgc, sgd, sgh, sgw,
    szb, szc, szd, szh, szw,
    pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KD_PER: tl.constexpr, TAPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMPUTE_DZ: tl.constexpr,
    INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per-program partial dw (over KD_PER depth taps starting at kd0) and db over a chunk of depth slices.

    ``g`` is the incoming gradient. With COMPUTE_DZ the kernel recomputes z, forms dz = g * act'(z) and also
    stores dz (for the dx pass); otherwise g already is dz.
    """
    KVOL: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_bd = tl.program_id(2)
    n_h = tl.cdiv(H_out, BLOCK_H)
    n_w = tl.cdiv(W_out, BLOCK_W)
    n_dchunks = tl.cdiv(D_out, D_CHUNK)
    pid_c = pid // (n_h * n_w)
    pid_hw = pid % (n_h * n_w)
    b = pid_bd // n_dchunks
    d_start = (pid_bd % n_dchunks) * D_CHUNK
    d_end = tl.minimum(d_start + D_CHUNK, D_out)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = (pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    if INT64:
        b = b.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
        offs_w = offs_w.to(tl.int64)
    c3 = offs_c[:, None, None]
    h3 = offs_h[None, :, None]
    w3 = offs_w[None, None, :]
    mask_c = c3 < C
    out_mask = mask_c & (h3 < H_out) & (w3 < W_out)
    x_base = x_ptr + b * sxb + c3 * sxc
    tap_ids = tl.arange(0, TAPS)
    kd0 = pid_t * KD_PER

    acc_w = tl.zeros([BLOCK_C, TAPS], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for od_i in range(d_start, d_end):
        od = od_i
        if INT64:
            od = tl.cast(od_i, tl.int64)
        g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + w3 * sgw, mask=out_mask, other=0.0)
        g = g.to(tl.float32)
        if COMPUTE_DZ:
            z = _conv_tile(
                x_ptr, w_ptr, b, od, c3, h3, w3, offs_c, C, D_in, H_in, W_in,
                sxb, sxc, sxd, sxh, sxw, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
                KD, KH, KW, False, BLOCK_C, BLOCK_H, BLOCK_W,
            )
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None, None]
            dz = (g * _act_grad(z, ACT)).to(dz_ptr.dtype.element_ty)
            tl.store(dz_ptr + b * szb + c3 * szc + od * szd + h3 * szh + w3 * szw, dz, mask=out_mask)
            g = dz.to(tl.float32)
        acc_b += tl.sum(tl.sum(g, axis=2), axis=1)
        for kdi in tl.static_range(KD_PER):
            idp = od - pad_d + (kd0 + kdi) * dil_d + tl.zeros([1, 1, 1], dtype=tl.int32)
            d_ok = (idp >= 0) & (idp < D_in)
            for kh in tl.static_range(KH):
                ih = h3 - pad_h + kh * dil_h
                dh_ok = out_mask & d_ok & (ih >= 0) & (ih < H_in)
                for kw in tl.static_range(KW):
                    iw = w3 - pad_w + kw * dil_w
                    m = dh_ok & (iw >= 0) & (iw < W_in)
                    xv = tl.load(x_base + idp * sxd + ih * sxh + iw * sxw, mask=m, other=0.0).to(tl.float32)
                    contrib = tl.sum(tl.sum(g * xv, axis=2), axis=1)
                    i = (kdi * KH + kh) * KW + kw
                    acc_w = tl.where(tap_ids[None, :] == i, acc_w + contrib[:, None], acc_w)

    row = pid_bd * (n_h * n_w) + pid_hw
    taps = kd0 * KH * KW + tap_ids
    dw_mask = (offs_c[:, None] < C) & (tap_ids[None, :] < KD_PER * KH * KW)
    tl.store(dwp_ptr + row * KVOL * C + taps[None, :] * C + offs_c[:, None], acc_w, mask=dw_mask)
    if HAS_BIAS:
        if pid_t == 0:
            tl.store(dbp_ptr + row * C + offs_c, acc_b, mask=offs_c < C)


# --------------------------------------------------------------------------------------------------------
# Launchers. They take tensors already validated by fastseg3d.ops.dwconv3d and write into given outputs.


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _needs_int64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and _max_offset(t) >= _INT32_MAX for t in tensors)


def _blocks(x: torch.Tensor, h_out: int, w_out: int, tile: int) -> tuple[int, int, int]:
    """Tile shape: channel-major when the channel stride is 1 (coalesced along C), else width-major."""
    c = x.shape[1]
    np2 = triton.next_power_of_2
    if x.stride(1) == 1 and c > 1:
        block_c = min(np2(c), 64)
        rest = max(1, tile // block_c)
        block_w = min(np2(w_out), rest)
        block_h = min(np2(h_out), max(1, rest // block_w))
    else:
        block_c = 1
        block_w = min(np2(w_out), 128)
        block_h = min(np2(h_out), max(1, tile // block_w))
    return block_c, block_h, block_w


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0, 0)


def dwconv3d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    act: int,
    flip: bool = False,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the forward kernel into ``out``; with ``grad`` it writes ``grad * act'(conv(x) + bias)``."""
    _, c, d_in, h_in, w_in = x.shape
    bsz, _, d_out, h_out, w_out = out.shape
    kd, kh, kw = weight.shape[2:]
    tile = 4096 if interpreter_active() else 1024
    block_c, block_h, block_w = _blocks(x, h_out, w_out, tile)
    grid = (triton.cdiv(c, block_c) * triton.cdiv(h_out, block_h) * triton.cdiv(w_out, block_w), d_out, bsz)
    torch.library.wrap_triton(_dwconv3d_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, residual if residual is not None else x,
        grad if grad is not None else x, out,
        c, d_in, h_in, w_in, d_out, h_out, w_out,
        *x.stride(), *_strides(residual), *_strides(grad), *out.stride(),
        *padding, *dilation,
        KD=kd, KH=kh, KW=kw, FLIP=flip, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        ACT=act, GRAD_ACT=grad is not None, INT64=_needs_int64(x, out, residual, grad),
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=8 if block_c * block_h * block_w >= 2048 else 4,
    )
    return out


def dwconv3d_bwd_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad: torch.Tensor,
    dz: torch.Tensor | None,
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    act: int,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias gradients (fp32, shapes (C, KD*KH*KW) and (C,)).

    With ``dz`` given and an activation, ``dz`` receives ``grad * act'(z)`` as a by-product. ``empty`` allocates
    the workspaces (tests pass a NaN-filling allocator).
    """
    bsz, c, d_in, h_in, w_in = x.shape
    _, _, d_out, h_out, w_out = grad.shape
    kd, kh, kw = weight.shape[2:]
    kvol = kd * kh * kw
    compute_dz = dz is not None
    # Keep all taps of small kernels in one program (so dz can be formed in the same pass); split larger ones
    # by depth tap to bound the register accumulator.
    kd_per = kd if kvol <= 32 else 1
    n_tap_chunks = kd // kd_per
    interp = interpreter_active()
    tile = 4096 if interp else 1024
    block_c, block_h, block_w = _blocks(x, h_out, w_out, tile)
    n_hw = triton.cdiv(h_out, block_h) * triton.cdiv(w_out, block_w)
    n_c = triton.cdiv(c, block_c)
    if interp or x.device.type != "cuda":
        n_dchunks = 1
    else:
        target = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
        n_dchunks = max(1, min(d_out, triton.cdiv(target, n_hw * n_c * n_tap_chunks * bsz)))
    d_chunk = triton.cdiv(d_out, n_dchunks)
    n_dchunks = triton.cdiv(d_out, d_chunk)
    rows = bsz * n_dchunks * n_hw
    dwp = empty((rows, kvol, c), dtype=torch.float32, device=x.device)
    dbp = empty((rows, c), dtype=torch.float32, device=x.device) if bias is not None else None
    grid = (n_c * n_hw, n_tap_chunks, bsz * n_dchunks)
    torch.library.wrap_triton(_dwconv3d_bwd_weight_kernel)[grid](
        x, weight, bias if bias is not None else weight, grad, dz if compute_dz else grad, dwp,
        dbp if dbp is not None else dwp,
        c, d_in, h_in, w_in, d_out, h_out, w_out, d_chunk,
        *x.stride(), *grad.stride(), *_strides(dz),
        *padding, *dilation,
        KD=kd, KH=kh, KW=kw, KD_PER=kd_per, TAPS=triton.next_power_of_2(kd_per * kh * kw),
        HAS_BIAS=bias is not None, ACT=act, COMPUTE_DZ=compute_dz, INT64=_needs_int64(x, grad, dz),
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=8 if block_c * block_h * block_w >= 2048 else 4,
    )
    # Fixed-order reductions over the workspace rows: deterministic for a given shape and device.
    return dwp.sum(0).t(), (dbp.sum(0) if dbp is not None else None)
