"""Triton kernels of the fused temperature-scaled KL distillation loss (DSD) and its input gradients.

For logits at a common output resolution (D, H, W), each input upsampled trilinearly (``align_corners=False``)
on the fly by an integer factor per axis:

    loss_i = T^2 / (B * D*H*W) * sum_{b, voxel} sum_k p_k (log p_k - log q_ik)
    p = softmax(teacher / T), q_i = softmax(student_i / T) over the K class channels

A program owns BLOCK_V consecutive output voxels (flattened D, H, W; W is contiguous, so loads are coalesced)
of one batch element and all K channels in registers ([BLOCK_K, BLOCK_V]); the softmax runs over axis 0.
Up to four students share one pass over the teacher. An upsampled input (up to 16 classes) is read from a
class-interleaved copy (B, D, H, W, classes), so the corners of its interpolation are vector loads.

Gradients are formed in the same forward pass (Liger-Kernel style) and written to buffers that backward only
scales by the incoming gradient:

    dL/dstudent_i = w_i T / (B N) * (q_i - p)
    dL/dteacher   = T / (B N) * sum_i w_i p (log p - log q_i - KL_i)

An input at the output resolution receives its gradient directly from the forward kernel. For an upsampled
input the forward writes the gradient at the output resolution to a transient buffer (class-interleaved like the
copies, up to 16 classes), and a gather-style kernel applies the transpose of trilinear interpolation: each
low-resolution voxel sums its (2f)^3 contributing output voxels (separably, H and W then D, where the input is
upsampled along D and another axis), so there are no atomics. Per-program loss partial
sums are written to a workspace and reduced in a fixed order: everything is bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.kernels.utils import INTERPRET, bf16_pair_to_fp32, cdiv, f32, next_power_of_2, wrap
from fastseg3d.reference._grad_dtype import saved_grad_dtype

__all__ = ["MAX_CHANNELS", "MAX_STUDENTS", "kl_distill_fwd"]

MAX_STUDENTS = 4  # student slots of one kernel launch
MAX_CHANNELS = 256  # all K logits of a voxel live in registers
_INT32_MAX = 2**31 - 1
_LOG2E = 1.4426950408889634
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _src_index(o, F: tl.constexpr, N):
    """(i0, i1, lambda) of align_corners=False linear interpolation by the integer factor F at output index o."""
    src = (o.to(tl.float32) + 0.5) * (1.0 / F) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), N - 1)
    lam = src - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, N - 1)
    return i0.to(o.dtype), i1.to(o.dtype), lam


# Layouts. Up to 64 channels a tile keeps a voxel's channels in one warp, VEC voxels per thread (see _tile). Triton
# derives the layout from the contiguity of each load's and store's addresses; where it is 1 along both axes (a
# gather, or VEC = 1), versions disagree on the tie: Triton 3.6 lays threads along the channels (16 lanes per
# voxel, every softmax a shuffle tree and every index computed per channel), later ones along the voxels. A
# [BLOCK_K, BLOCK_V] access flattened to 1-D has no tie, and its row-major order puts the voxels along the threads
# on every version. With VEC >= 2 the voxels are contiguous and the tile keeps its 2-D (vector) accesses.


@triton.jit
def _load_tile(ptrs, mask, VEC: tl.constexpr):
    """tl.load of a [BLOCK_K, BLOCK_V] tile of pointers (masked entries read 0; mask None: no mask)."""
    if VEC == 1:
        if mask is None:
            x = tl.reshape(tl.load(tl.reshape(ptrs, [ptrs.numel])), ptrs.shape)
        else:
            flat_mask = tl.reshape(tl.broadcast_to(mask, ptrs.shape), [ptrs.numel])
            x = tl.reshape(tl.load(tl.reshape(ptrs, [ptrs.numel]), mask=flat_mask, other=0.0), ptrs.shape)
    else:
        if mask is None:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
    return x


@triton.jit
def _store_2d(ptrs, val, mask, VEC: tl.constexpr):
    """tl.store of a [BLOCK_K, BLOCK_V] tile."""
    if VEC == 1:
        flat_mask = tl.reshape(tl.broadcast_to(mask, ptrs.shape), [ptrs.numel])
        tl.store(tl.reshape(ptrs, [ptrs.numel]), tl.reshape(val, [ptrs.numel]), mask=flat_mask)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _load_voxels(voxel, N: tl.constexpr):
    """[V, N]: the N consecutive elements from each of the V pointers ``voxel`` ([V, 1]) in 16-byte loads (up to
    four) joined in registers. Loaded as one [V, N] tile, more than 16 bytes per voxel would spread a voxel over
    threads, and handing it to one thread then goes through shared memory."""
    CH: tl.constexpr = 128 // voxel.dtype.element_ty.primitive_bitwidth  # elements per 16-byte vector
    if N <= CH:
        x = tl.load(voxel + tl.arange(0, N)[None, :])
    else:
        c0 = tl.load(voxel + tl.arange(0, CH)[None, :])
        c1 = tl.load(voxel + (CH + tl.arange(0, CH))[None, :])
        if N == 2 * CH:
            x = tl.reshape(tl.permute(tl.join(c0, c1), (0, 2, 1)), (voxel.shape[0], N))
        else:  # 4 chunks: class 4 * (2t + s) + e sits at [v, e, s, t] of the joins
            c2 = tl.load(voxel + (2 * CH + tl.arange(0, CH))[None, :])
            c3 = tl.load(voxel + (3 * CH + tl.arange(0, CH))[None, :])
            x = tl.reshape(tl.permute(tl.join(tl.join(c0, c1), tl.join(c2, c3)), (0, 3, 2, 1)), (voxel.shape[0], N))
    return x


@triton.jit
def _store_voxels(voxel, x, mask):
    """The inverse of :func:`_load_voxels`: x [V, N] to the N consecutive elements at each pointer of ``voxel``
    ([V, 1]) where ``mask`` ([V, 1]), in 16-byte stores."""
    N: tl.constexpr = x.shape[1]
    CH: tl.constexpr = 128 // voxel.dtype.element_ty.primitive_bitwidth  # elements per 16-byte vector
    if N <= CH:
        tl.store(voxel + tl.arange(0, N)[None, :], x, mask=mask)
    elif N == 2 * CH:
        c0, c1 = tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, CH)), (0, 2, 1)))
        tl.store(voxel + tl.arange(0, CH)[None, :], c0, mask=mask)
        tl.store(voxel + (CH + tl.arange(0, CH))[None, :], c1, mask=mask)
    else:
        a, b = tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, 2, CH)), (0, 3, 2, 1)))  # [v, e, s], t = 0, 1
        c0, c1 = tl.split(a)
        c2, c3 = tl.split(b)
        tl.store(voxel + tl.arange(0, CH)[None, :], c0, mask=mask)
        tl.store(voxel + (CH + tl.arange(0, CH))[None, :], c1, mask=mask)
        tl.store(voxel + (2 * CH + tl.arange(0, CH))[None, :], c2, mask=mask)
        tl.store(voxel + (3 * CH + tl.arange(0, CH))[None, :], c3, mask=mask)


@triton.jit
def _corner(base, off, wgt, acc, VEC: tl.constexpr, IL: tl.constexpr):
    """acc + wgt * the corner at voxel offset ``off`` (per voxel) of the class planes at ``base`` (per class; acc
    None: the first corner). The offset is summed per voxel, so each load costs one 64-bit address. IL > 0: the
    input is a class-interleaved copy (voxels of IL classes, ``base`` per batch), and a voxel's classes are up to
    four 16-byte loads from one address, where planes cost a load and an address per class."""
    if IL > 1 and base.dtype.element_ty == tl.bfloat16:
        # class pairs read as int32 (bf16_pair_to_fp32)
        v = _load_voxels((base + off[:, None] * IL).to(tl.pointer_type(tl.int32), bitcast=True), IL // 2)
        even, odd = bf16_pair_to_fp32(v)
        x = tl.trans(tl.reshape(tl.join(even, odd), (off.shape[0], IL))) * wgt[None, :]
    elif IL > 0:
        x = tl.trans(_load_voxels(base + off[:, None] * IL, IL)).to(tl.float32) * wgt[None, :]
    else:
        x = _load_tile(base + off[None, :], None, VEC).to(tl.float32) * wgt[None, :]
    if acc is not None:
        x += acc
    return x


@triton.jit
def _plane_corners(base, plane, wd, rows, cols, acc, FH: tl.constexpr, FW: tl.constexpr, VEC: tl.constexpr,
                   IL: tl.constexpr):
    """acc plus the corners of one depth plane (offset ``plane``, weight ``wd``): rows (offset 0, offset 1,
    weight 0, weight 1) along H and cols likewise along W, the second of each only where that axis is upsampled."""
    acc = _corner(base, plane + rows[0] + cols[0], wd * rows[2] * cols[2], acc, VEC, IL)
    if FW > 1:
        acc = _corner(base, plane + rows[0] + cols[1], wd * rows[2] * cols[3], acc, VEC, IL)
    if FH > 1:
        acc = _corner(base, plane + rows[1] + cols[0], wd * rows[3] * cols[2], acc, VEC, IL)
        if FW > 1:
            acc = _corner(base, plane + rows[1] + cols[1], wd * rows[3] * cols[3], acc, VEC, IL)
    return acc


@triton.jit
def _axis(o, F: tl.constexpr, N):
    """(i0, i1, weight of i0, weight of i1) of the interpolation along one axis (F == 1: o itself, weight 1)."""
    if F == 1:
        one = tl.full(o.shape, 1.0, tl.float32)
        return o, o, one, one - one
    i0, i1, lam = _src_index(o, F, N)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def _load_logits(
    ptr, b, K, offs_k, d, h, w, v, mask, ND, NH, NW,
    FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, VEC: tl.constexpr, IL: tl.constexpr,
):
    """[BLOCK_K, BLOCK_V] fp32 logits of a contiguous (B, K, ND, NH, NW) tensor at output voxels (d, h, w), whose
    flat index is v, upsampled trilinearly by (FD, FH, FW). At the output resolution the flat index addresses the
    voxels directly, so consecutive voxels are seen as contiguous (vector loads), and masked entries read 0.
    Upsampled, the loads take no mask: the indices are clamped to the volume (the interpolation's, and d on an
    axis that is not upsampled, which padded voxels past the last would overrun) and padded classes read the
    last class (IL > 0: the input is a (B, ND, NH, NW, IL) class-interleaved copy, padded classes zero), so masked
    entries hold finite values that the caller discards; a mask would cost a register move per load."""
    nvox = ND * NH * NW
    if FD == 1 and FH == 1 and FW == 1:
        base = ptr + b * K * nvox + offs_k[:, None] * nvox
        return _load_tile(base + v[None, :], mask, VEC).to(tl.float32)
    if IL > 0:
        base = ptr + b * nvox * IL
    else:
        base = ptr + b * K * nvox + tl.minimum(offs_k, K - 1)[:, None] * nvox
    if FD == 1:  # h < NH and w < NW hold for padded voxels too; d does not
        d = tl.minimum(d, ND - 1)
    d0, d1, wd0, wd1 = _axis(d, FD, ND)
    h0, h1, wh0, wh1 = _axis(h, FH, NH)
    w0, w1, ww0, ww1 = _axis(w, FW, NW)
    # The trilinear value as the weighted sum of its corners: per class one multiply-add per corner (a tree of
    # linear interpolations takes two per interpolation); the corner weights and offsets are per voxel.
    rows = (h0 * NW, h1 * NW, wh0, wh1)
    cols = (w0, w1, ww0, ww1)
    acc = _plane_corners(base, d0 * (NH * NW), wd0, rows, cols, None, FH, FW, VEC, IL)
    if FD > 1:
        acc = _plane_corners(base, d1 * (NH * NW), wd1, rows, cols, acc, FH, FW, VEC, IL)
    return acc


@triton.jit
def _softmax_parts(z, kmask, scale2):
    """(u, e, s) of the softmax over axis 0 of raw fp32 [BLOCK_K, BLOCK_V] logits at temperature log2(e) / scale2:
    u = z * scale2 - max in log2 units (one FMA per logit), e = exp2(u), s = sum e (so log2 softmax = u - log2 s
    and softmax = e / s).

    Padded classes get u = -1e30, a finite "minus infinity", the same on the teacher's side and a student's (set
    after scaling, so no temperature takes it to -inf): p = q = 0 there, and log2 p - u is exactly 0, so nothing
    downstream needs another select. Voxels past the volume hold finite values; the caller masks their sums. The
    row maximum contributes exp2(0) = 1, so the sum is never 0."""
    m = tl.max(tl.where(kmask, z, -3.0e38), axis=0) * scale2
    u = tl.where(kmask, z * scale2 - m[None, :], -1.0e30)
    e = tl.exp2(u)
    return u, e, tl.sum(e, axis=0)


@triton.jit
def _student_terms(
    s_ptr, b, K, offs_k, d, h, w, v, mask, kmask, mask_v, SD, SH, SW, scale2, log2p, p,
    FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, VEC: tl.constexpr, IL: tl.constexpr,
):
    """For one student with softmax q = e / s: per-voxel KL(p || q) in bits [BLOCK_V] (0 past the volume), its
    log2 normaliser log2 s [BLOCK_V], dlog = log2 p - u [BLOCK_K, BLOCK_V] (u: the student's log2 softmax before
    that normaliser), e and s. With a = log2 p - log2 q = dlog + log2 s and sum p = 1, KL = sum p dlog + log2 s:
    no per-logit log2 q (the callers scale bits to nats once, where they store)."""
    z = _load_logits(s_ptr, b, K, offs_k, d, h, w, v, mask, SD, SH, SW, FD, FH, FW, VEC, IL)
    u, e, s = _softmax_parts(z, kmask, scale2)
    dlog = log2p - u
    log2s = tl.log2(s)
    kl = tl.where(mask_v, tl.sum(p * dlog, axis=0) + log2s, 0.0)
    return kl, log2s, dlog, e, s


@triton.jit
def _store_tile(ptr, b, K, offs_k, offs_v, nvox, val, mask, VEC: tl.constexpr):
    _store_2d(ptr + b * K * nvox + offs_k[:, None] * nvox + offs_v[None, :], val.to(ptr.dtype.element_ty), mask, VEC)


_VB: tl.constexpr = tl.constexpr(32)  # voxels per block of an output-resolution gradient buffer


@triton.jit
def _blocked_ptrs(ptr, b, K, k, v, nvox):
    """[BLOCK_K, BLOCK_V] pointers to classes k ([BLOCK_K, 1]) of voxels v in an output-resolution gradient
    buffer (B, cdiv(nvox, _VB), K, _VB): a warp's 32 voxels of one class are contiguous (coalesced stores), and
    the classes of a voxel are _VB elements apart, a constant. The voxel's address comes first, then the
    classes' offsets, so a thread reaches all its classes from one address (immediate offsets)."""
    voxel = ptr + ((b * tl.cdiv(nvox, _VB) + v // _VB) * K * _VB + v % _VB)  # one 64-bit add per voxel
    return voxel[None, :] + k * _VB


@triton.jit
def _store_interleaved(ptr, b, offs_v, nvox, val, mask_v, IL: tl.constexpr):
    """Store a [IL, BLOCK_V] tile, one voxel per thread, to a class-interleaved (B, voxels, IL) buffer: a voxel's
    classes are 16-byte stores from one address (all IL of them, padded classes included)."""
    voxel = ptr + (b * nvox + offs_v)[:, None] * IL
    _store_voxels(voxel, tl.trans(val).to(ptr.dtype.element_ty), mask_v[:, None])


@triton.jit
def _store_grad(ptr, b, K, offs_k, offs_v, nvox, val, mask, mask_v, BUFFER: tl.constexpr, VEC: tl.constexpr,
                IL: tl.constexpr):
    """Store a gradient tile: to the input's gradient (NCDHW), or (BUFFER) to the output-resolution buffer of an
    upsampled input, class-interleaved where IL > 0, else blocked."""
    if BUFFER and IL > 0:
        _store_interleaved(ptr, b, offs_v, nvox, val, mask_v, IL)
    elif BUFFER:
        _store_2d(_blocked_ptrs(ptr, b, K, offs_k[:, None], offs_v, nvox), val.to(ptr.dtype.element_ty), mask, VEC)
    else:
        _store_tile(ptr, b, K, offs_k, offs_v, nvox, val, mask, VEC)


@triton.jit
def _kl_fwd_kernel(
    t_ptr, gt_ptr, s0_ptr, gs0_ptr, s1_ptr, gs1_ptr, s2_ptr, gs2_ptr, s3_ptr, gs3_ptr, part_ptr,
    OD, OH, OW, TD, TH, TW,
    S0D, S0H, S0W, S1D, S1H, S1W, S2D, S2H, S2W, S3D, S3H, S3W,
    w0, w1, w2, w3, c0, c1, c2, c3, ct, scale2,
    K: tl.constexpr, NUM_S: tl.constexpr, TFD: tl.constexpr, TFH: tl.constexpr, TFW: tl.constexpr,
    F0D: tl.constexpr, F0H: tl.constexpr, F0W: tl.constexpr, F1D: tl.constexpr, F1H: tl.constexpr,
    F1W: tl.constexpr, F2D: tl.constexpr, F2H: tl.constexpr, F2W: tl.constexpr, F3D: tl.constexpr,
    F3H: tl.constexpr, F3W: tl.constexpr,
    GRAD_T: tl.constexpr, GRAD0: tl.constexpr, GRAD1: tl.constexpr, GRAD2: tl.constexpr, GRAD3: tl.constexpr,
    INT64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, IL: tl.constexpr,
):
    """Loss partial sums (one row of MAX_STUDENTS per program) and, where GRAD_* is set, the input gradients at
    the output resolution (the input's own gradient, or the buffer of an upsampled one), scaled by c* (ct for the
    teacher, whose terms are in bits)."""
    w0, w1, w2, w3, c0 = f32(w0), f32(w1), f32(w2), f32(w3), f32(c0)
    c1, c2, c3, ct, scale2 = f32(c1), f32(c2), f32(c3), f32(ct), f32(scale2)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row = b * tl.num_programs(0) + pid
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    if VEC > 0:
        offs_v = tl.max_contiguous(offs_v, VEC)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        b = b.to(tl.int64)
        row = row.to(tl.int64)
        offs_v = offs_v.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    hw = OH * OW
    nvox = OD * hw
    mask_v = offs_v < nvox
    mask = (offs_k[:, None] < K) & mask_v[None, :]
    d = offs_v // hw
    h = (offs_v % hw) // OW
    w = offs_v % OW

    kmask = offs_k[:, None] < K
    zt = _load_logits(t_ptr, b, K, offs_k, d, h, w, offs_v, mask, TD, TH, TW, TFD, TFH, TFW, VEC, IL)
    ut, et, st = _softmax_parts(zt, kmask, scale2)
    log2p = ut - tl.log2(st)[None, :]
    p = et * tl.fdiv(1.0, st, ieee_rounding=False)[None, :]
    # The teacher's gradient, sum_i w_i p (a_i - KL_i), is p (sum_i w_i dlog_i + sum_i w_i (log2 s_i - KL_i)):
    # one FMA per class and student, the rest per voxel.
    g_dlog = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    g_voxel = tl.zeros([BLOCK_V], dtype=tl.float32)
    if NUM_S > 0:
        kl, log2s, dlog, e, s = _student_terms(s0_ptr, b, K, offs_k, d, h, w, offs_v, mask, kmask, mask_v,
                                               S0D, S0H, S0W, scale2, log2p, p, F0D, F0H, F0W, VEC, IL)
        tl.store(part_ptr + row * 4 + 0, tl.sum(kl, axis=0))
        if GRAD0:  # c (q - p) = e (c / s) - c p
            _store_grad(gs0_ptr, b, K, offs_k, offs_v, nvox, e * tl.fdiv(c0, s, ieee_rounding=False)[None, :] - c0 * p,
                        mask, mask_v, F0D * F0H * F0W > 1, VEC, IL)
        g_dlog += w0 * dlog
        g_voxel += w0 * (log2s - kl)
    if NUM_S > 1:
        kl, log2s, dlog, e, s = _student_terms(s1_ptr, b, K, offs_k, d, h, w, offs_v, mask, kmask, mask_v,
                                               S1D, S1H, S1W, scale2, log2p, p, F1D, F1H, F1W, VEC, IL)
        tl.store(part_ptr + row * 4 + 1, tl.sum(kl, axis=0))
        if GRAD1:
            _store_grad(gs1_ptr, b, K, offs_k, offs_v, nvox, e * tl.fdiv(c1, s, ieee_rounding=False)[None, :] - c1 * p,
                        mask, mask_v, F1D * F1H * F1W > 1, VEC, IL)
        g_dlog += w1 * dlog
        g_voxel += w1 * (log2s - kl)
    if NUM_S > 2:
        kl, log2s, dlog, e, s = _student_terms(s2_ptr, b, K, offs_k, d, h, w, offs_v, mask, kmask, mask_v,
                                               S2D, S2H, S2W, scale2, log2p, p, F2D, F2H, F2W, VEC, IL)
        tl.store(part_ptr + row * 4 + 2, tl.sum(kl, axis=0))
        if GRAD2:
            _store_grad(gs2_ptr, b, K, offs_k, offs_v, nvox, e * tl.fdiv(c2, s, ieee_rounding=False)[None, :] - c2 * p,
                        mask, mask_v, F2D * F2H * F2W > 1, VEC, IL)
        g_dlog += w2 * dlog
        g_voxel += w2 * (log2s - kl)
    if NUM_S > 3:
        kl, log2s, dlog, e, s = _student_terms(s3_ptr, b, K, offs_k, d, h, w, offs_v, mask, kmask, mask_v,
                                               S3D, S3H, S3W, scale2, log2p, p, F3D, F3H, F3W, VEC, IL)
        tl.store(part_ptr + row * 4 + 3, tl.sum(kl, axis=0))
        if GRAD3:
            _store_grad(gs3_ptr, b, K, offs_k, offs_v, nvox, e * tl.fdiv(c3, s, ieee_rounding=False)[None, :] - c3 * p,
                        mask, mask_v, F3D * F3H * F3W > 1, VEC, IL)
        g_dlog += w3 * dlog
        g_voxel += w3 * (log2s - kl)
    if GRAD_T:
        _store_grad(gt_ptr, b, K, offs_k, offs_v, nvox, (ct * p) * (g_dlog + g_voxel[None, :]), mask, mask_v,
                    TFD * TFH * TFW > 1, VEC, IL)


@triton.jit
def _tap_weight(o, j, F: tl.constexpr, N, OUT):
    """Weight of output index o in the interpolation of low-resolution index j (0 outside [0, OUT))."""
    i0, i1, lam = _src_index(o, F, N)
    wgt = tl.where(i0 == j, 1.0 - lam, 0.0) + tl.where(i1 == j, lam, 0.0)
    return tl.where((o >= 0) & (o < OUT), wgt, 0.0)


@triton.jit
def _interp_transpose_kernel(
    g_ptr, out_ptr, OD, OH, OW, ND, NH, NW, coef,
    K: tl.constexpr, GFD: tl.constexpr, GFH: tl.constexpr, GFW: tl.constexpr,
    LD: tl.constexpr, LH: tl.constexpr, LW: tl.constexpr,
    INT64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, IL: tl.constexpr, OUT_IL: tl.constexpr,
):
    """coef times the transpose of trilinear upsampling by (GFD, GFH, GFW) applied to g, a (B, K, OD, OH, OW)
    gradient class-interleaved (B, OD, OH, OW, IL) where IL > 0, else in the blocked layout of ``_blocked_ptrs``,
    written to out (B, K, ND, NH, NW), or class-interleaved (B, ND, NH, NW, IL) with OUT_IL: each low-resolution
    voxel gathers the L = 2f output voxels per axis (1 where f = 1) whose interpolation reads it, weighted by the
    trilinear coefficients. No atomics: the sums run in a fixed order."""
    coef = f32(coef)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    # One voxel per thread with all its classes (flat accesses, VEC = 1): a tap's weight and address are computed
    # once per thread, not once per voxel of a 16-byte vector (the taps' loads are strided by f along W anyway).
    offs_v = tl.max_contiguous(pid * BLOCK_V + tl.arange(0, BLOCK_V), 1)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        b = b.to(tl.int64)
        offs_v = offs_v.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    nhw = NH * NW
    nvox = ND * nhw
    mask_v = offs_v < nvox
    jd = offs_v // nhw
    jh = (offs_v % nhw) // NW
    jw = offs_v % NW
    onvox = OD * OH * OW
    k_read = tl.minimum(offs_k, K - 1)[:, None]  # padded classes read the last one, and are not stored
    acc = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for td in range(LD):
        if GFD == 1:
            od = jd
            wd = tl.full([BLOCK_V], 1.0, tl.float32)
        else:
            od = jd * GFD - (GFD + 1) // 2 + td
            wd = _tap_weight(od, jd, GFD, ND, OD)
        for th in range(LH):
            if GFH == 1:
                oh = jh
                wh = wd
            else:
                oh = jh * GFH - (GFH + 1) // 2 + th
                wh = wd * _tap_weight(oh, jh, GFH, NH, OH)
            # Out-of-range taps have zero weight; clamped, they read inside the volume.
            row = (tl.minimum(tl.maximum(od, 0), OD - 1) * OH + tl.minimum(tl.maximum(oh, 0), OH - 1)) * OW
            for tw in tl.static_range(LW):
                if GFW == 1:
                    ow = jw
                    wgt = wh
                else:
                    ow = jw * GFW - (GFW + 1) // 2 + tw
                    wgt = wh * _tap_weight(ow, jw, GFW, NW, OW)
                # Clamped taps stay inside the volume and padded voxels carry weight 0: no load needs a mask.
                o = row + tl.minimum(tl.maximum(ow, 0), OW - 1)
                if IL > 0:
                    acc = _corner(g_ptr + b * onvox * IL, o, tl.where(mask_v, wgt, 0.0), acc, 1, IL)
                else:
                    g = _load_tile(_blocked_ptrs(g_ptr, b, K, k_read, o, onvox), None, 1).to(tl.float32)
                    acc += g * tl.where(mask_v, wgt, 0.0)[None, :]
    if OUT_IL:
        _store_interleaved(out_ptr, b, offs_v, nvox, acc * coef, mask_v, IL)
    else:
        _store_tile(out_ptr, b, K, offs_k, offs_v, nvox, acc * coef, (offs_k < K)[:, None] & mask_v[None, :], 1)


# --------------------------------------------------------------------------------------------------------
# Launcher. It takes tensors already validated by fastseg3d.ops.kl_distill.


def _block_v(k_pad: int, nvox: int, tile: int = 4096) -> int:
    if INTERPRET:
        tile = 16384
    return max(16, min(next_power_of_2(nvox), tile // k_pad))


def _tile(k_pad: int, nvox: int, per_thread: int, vec: int, wide_tile: int) -> tuple[int, int, int]:
    """(BLOCK_V, VEC, num_warps) of a [BLOCK_K, BLOCK_V] tile of logits (channels x voxels).

    Triton lays the tile out with VEC consecutive voxels per thread (the ``max_contiguous`` hint sets it; with
    VEC = 1 the accesses are flattened, see ``_load_tile``), threads along the voxels first, then warps. Up to 64
    channels the tile is sized so that a voxel's channels stay in one warp, ``per_thread`` of them per thread:
    the softmax reductions need no shared memory and no barrier (sm_90, DSD's 14 classes and three students in
    bf16: 62 -> 25 instructions per logit in the forward). Wider channel counts keep Triton's own layout
    (VEC = 0: 16-byte vectors, channels over warps), as a voxel per thread would read 2-byte rows that far
    apart."""
    if k_pad <= per_thread:
        block_v, warps = vec * 32 * 4, 4
    elif k_pad <= 64:
        block_v, vec, warps = 32 * per_thread // k_pad, 1, 1  # k_pad / per_thread threads per voxel, one warp
    else:
        block_v, vec = _block_v(k_pad, nvox, wide_tile), 0
        warps = 8 if k_pad * block_v >= 4096 else 4
    if INTERPRET:  # the same code paths (VEC) in larger tiles: the interpreter pays per program
        block_v, warps = _block_v(k_pad, nvox), 4
    block_v = min(block_v, next_power_of_2(nvox))
    return block_v, min(vec, block_v), warps


def _fwd_tile(k: int, k_pad: int, nvox: int, n_s: int, same_res: bool) -> tuple[int, int, int]:
    """(BLOCK_V, VEC, num_warps) of the forward (``python -m bench.tune kl_distill`` sweeps it on a GPU)."""
    if same_res:
        # 32 classes per thread while a thread's logits fit in registers: MISSU's 32- and 64-channel pairs
        # 31 -> 26 and 31 -> 28 instructions per logit (32 classes and three students spill; 64 and two students
        # take all 255 registers).
        per_thread = 32 if k_pad >= 32 and min(k, 32) * (1 + n_s) <= 80 else 16
        return _tile(k_pad, nvox, per_thread, 1 if per_thread > 16 else max(2, 16 // k_pad), 4096)
    # an upsampled input's loads are gathers (one voxel per thread; 14 classes, bf16: 159 -> 65 on Triton 3.6)
    return _tile(k_pad, nvox, 16, 1, 4096)


def _transpose_tile(k_pad: int, n_low: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of a transposed interpolation: no reduction over classes, any layout will do."""
    block_v, _, warps = _tile(k_pad, n_low, 16, 1, 4096)
    return block_v, warps


def _factors(shape, size) -> tuple[int, int, int]:
    return tuple(o // n for o, n in zip(size, shape[2:]))


def kl_distill_fwd(
    students: list[torch.Tensor],
    teacher: torch.Tensor,
    size: tuple[int, int, int],
    temperature: float,
    weights: list[float],
    need_students: list[bool],
    need_teacher: bool,
    empty=torch.empty,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
    """Per-student losses (fp32, shape (S,), unweighted) and the weighted input gradients (None where not
    needed) for up to MAX_STUDENTS students. ``empty`` allocates every buffer (tests pass a NaN-filling one)."""
    n_s = len(students)
    assert 1 <= n_s <= MAX_STUDENTS
    bsz, k = teacher.shape[:2]
    od, oh, ow = size
    nvox = od * oh * ow
    k_pad = next_power_of_2(k)

    scale2 = _LOG2E / temperature  # logits in log2 units
    coef = temperature / (bsz * nvox)

    t_f = _factors(teacher.shape, size)
    s_f = [_factors(s.shape, size) for s in students]
    # Up to 16 classes (a thread holds a voxel's classes), upsampled inputs are read through class-interleaved
    # copies (B, D, H, W, k_pad), zero-padded: a corner's classes are up to four 16-byte loads from one address,
    # where the planes cost a 2-byte load and an address per class (DSD's decoder group, bf16, sm_90: about 3,100
    # -> 2,600 instructions per output voxel). The copies are of low-resolution inputs, freed on return.
    il = k_pad if k_pad <= 16 and (t_f != (1, 1, 1) or any(f != (1, 1, 1) for f in s_f)) else 0
    buffer = bsz * nvox * il if il else bsz * k * cdiv(nvox, _VB.value) * _VB.value  # one gradient buffer

    def operand(x, factors):  # what the kernel reads: the input in NCDHW, or its class-interleaved copy
        if not il or factors == (1, 1, 1):
            return x.contiguous()
        x = x.movedim(1, -1)  # already contiguous for a channels-last input with il == k
        if il != k:
            return torch.nn.functional.pad(x, (0, il - k))
        # read in place only from a 4-byte aligned start: bf16 class pairs are read as int32
        aligned = x.is_contiguous() and x.storage_offset() % 2 == 0
        return x if aligned else x.clone(memory_format=torch.contiguous_format)

    t_in = operand(teacher, t_f)
    s_in = [operand(s, f) for s, f in zip(students, s_f)]
    g_t = empty(teacher.shape, dtype=saved_grad_dtype(teacher.dtype), device=teacher.device) if need_teacher else None
    g_s = [empty(s.shape, dtype=saved_grad_dtype(s.dtype), device=s.device) if n else None
           for s, n in zip(students, need_students)]

    # The forward writes each gradient at the output resolution: straight into the gradient of an input at that
    # resolution, else into a buffer that the transpose of the interpolation then reduces, one per upsampled
    # input (recomputing the softmaxes at the (2f)^3 taps of every low-resolution voxel instead evaluates each
    # output voxel 8 times per upsampled input, about 120 instructions per class and tap). The buffers are freed
    # before returning. They hold w (q - p), unscaled by coef so as to stay far from half-precision underflow,
    # in bf16 for bf16 inputs (that rounding takes the gradients' relative RMS error from about 3e-3 to 6e-3,
    # the size of the bf16 gradient's own rounding) and in fp32 otherwise (fp16 could overflow on the teacher's
    # terms at extreme temperatures and weights). With interleaved copies (il > 0) the buffers are interleaved
    # too: the forward stores a voxel's classes as vectors and the transposes load a tap's classes as vectors
    # (bf16, DSD's decoder group: 5.6 -> about 3 instructions per class and tap), else blocked (_blocked_ptrs).
    def out_res(x, g, factors):
        if g is None or factors == (1, 1, 1):
            return g
        shape = (bsz, od, oh, ow, il) if il else (bsz, cdiv(nvox, _VB.value), k, _VB.value)
        return empty(shape, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32, device=x.device)

    int64 = any(t.numel() >= _INT32_MAX for t in (t_in, *s_in)) or buffer >= _INT32_MAX
    o_t = out_res(teacher, g_t, t_f)
    o_s = [out_res(s, g, f) for s, g, f in zip(students, g_s, s_f)]
    # store scales of the forward: the final ones for a gradient it writes directly
    c_t = _LN2.value * (coef if o_t is g_t else 1.0)
    c_s = [w * (coef if o is g else 1.0) for w, o, g in zip(weights, o_s, g_s)]

    pad = MAX_STUDENTS - n_s
    s_ptrs = s_in + [teacher] * pad
    s_sizes = [x for s in students for x in s.shape[2:]] + [1, 1, 1] * pad
    s_facts = [x for f in s_f for x in f] + [1, 1, 1] * pad
    wts = list(weights) + [0.0] * pad
    c_s = c_s + [0.0] * pad
    gs_ptrs = [g if g is not None else teacher for g in o_s] + [teacher] * pad
    grad_flags = list(need_students) + [False] * pad

    same_res = t_f == (1, 1, 1) and all(f == (1, 1, 1) for f in s_f)
    block_v, vec, warps = _fwd_tile(k, k_pad, nvox, n_s, same_res)
    n_prog = cdiv(nvox, block_v)
    partials = empty((bsz * n_prog, MAX_STUDENTS), dtype=torch.float32, device=teacher.device)
    wrap(_kl_fwd_kernel)[(n_prog, bsz)](
        t_in, o_t if o_t is not None else teacher,
        s_ptrs[0], gs_ptrs[0], s_ptrs[1], gs_ptrs[1], s_ptrs[2], gs_ptrs[2], s_ptrs[3], gs_ptrs[3], partials,
        od, oh, ow, *teacher.shape[2:], *s_sizes, *wts, *c_s, c_t, scale2,
        NUM_S=n_s, TFD=t_f[0], TFH=t_f[1], TFW=t_f[2],
        F0D=s_facts[0], F0H=s_facts[1], F0W=s_facts[2], F1D=s_facts[3], F1H=s_facts[4], F1W=s_facts[5],
        F2D=s_facts[6], F2H=s_facts[7], F2W=s_facts[8], F3D=s_facts[9], F3H=s_facts[10], F3W=s_facts[11],
        GRAD_T=need_teacher, GRAD0=grad_flags[0], GRAD1=grad_flags[1], GRAD2=grad_flags[2], GRAD3=grad_flags[3],
        INT64=int64, K=k, BLOCK_K=k_pad, BLOCK_V=block_v, VEC=vec, IL=il, num_warps=warps,
    )
    del t_in, s_in, s_ptrs  # the interleaved copies: not needed by the transposes

    def transpose(src, dst, big, small, factors, scale, out_il):
        n_low = small[0] * small[1] * small[2]
        bv, warps = _transpose_tile(k_pad, n_low)
        wrap(_interp_transpose_kernel)[(cdiv(n_low, bv), bsz)](
            src, dst, *big, *small, scale, K=k, GFD=factors[0], GFH=factors[1], GFW=factors[2],
            LD=1 if factors[0] == 1 else 2 * factors[0], LH=1 if factors[1] == 1 else 2 * factors[1],
            LW=1 if factors[2] == 1 else 2 * factors[2], INT64=int64, BLOCK_K=k_pad, BLOCK_V=bv, IL=il,
            OUT_IL=out_il, num_warps=warps,
        )

    for x, g, o, factors in zip([teacher, *students], [g_t, *g_s], [o_t, *o_s], [t_f, *s_f]):
        if g is None or o is g:
            continue
        nd, nh, nw = x.shape[2:]
        if il and factors[0] > 1 and factors[1] * factors[2] > 1:
            # Separably, H and W first into an fp32 interleaved (B, OD, NH, NW, il), then D: per output voxel the
            # taps of the upsampled axes, 2 each, add over the passes instead of multiplying (2x2x2: 4 + 0.5
            # instead of 8; DSD's decoder group: about 40% fewer transposed-interpolation instructions), for a
            # transient of 1 / (fh fw) of the buffer's voxels.
            hw = empty((bsz, od, nh, nw, il), dtype=torch.float32, device=x.device)
            transpose(o, hw, (od, oh, ow), (od, nh, nw), (1, factors[1], factors[2]), 1.0, True)
            transpose(hw, g, (od, nh, nw), (nd, nh, nw), (factors[0], 1, 1), coef, False)
            del hw
        else:
            transpose(o, g, (od, oh, ow), (nd, nh, nw), factors, coef, False)

    losses = partials[:, :n_s].sum(0) * (_LN2.value * temperature * temperature / (bsz * nvox))  # bits to nats
    return losses, g_s, g_t
