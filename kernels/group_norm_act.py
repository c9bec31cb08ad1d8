"""Triton kernels of GroupNorm with a fused activation: ``y = act((x - mean_g) * rstd_g * w_c + b_c)``, or with the
activation first (``PRE``: MobileUtr's GELU -> InstanceNorm), ``y = (a - mean_g) * rstd_g * w_c + b_c`` with
``a = act(x)`` recomputed wherever x is read (never written).

Every tensor is addressed through its (B, C, S) strides, S the flattened spatial extent, so one set of kernels
serves NCDHW and ``channels_last_3d``. A program owns a [BLOCK_S, BLOCK_C] tile of one batch element: a few
channels and a long run of voxels on NCDHW, up to 64 consecutive channels of a short run of voxels on
channels-last, so loads stay coalesced in both (on channels-last a group's channels are only a few of every
voxel's C values).

Forward, three launches:

1. statistics: program (split, channel block, b) walks its share of the voxels tile by tile with a Welford
   update in every register lane (a sum of squares would cancel for a feature whose mean is large against its
   spread), merges the lanes once at the end, and writes each channel's mean and sum of squared deviations to a
   (B, SPLIT, C) workspace.
2. finalize: one program per (b, group) merges its channels' and splits' partials (Chan's formula) in a fixed
   order into the group's mean and rstd (fp32, (B, G), as ``native_group_norm`` returns them). With statistics
   over the batch (BatchNorm: one group per channel), one program per group merges every batch element's partials
   into (1, G).
3. apply: ``z = x * scale_c + shift_c`` (scale = rstd w, shift = b - mean scale, GroupNorm's CUDA form), ``y =
   act(z)`` in the output's dtype (the dtype the conv after the norm reads: bf16 under autocast), with no fp32
   copy of the input or of the normalised tensor written.

The apply and backward kernels read a batch element's statistics at ``b * GB``: GB = G, or 0 where the statistics
span the batch. A training BatchNorm's running statistics take a fourth launch, one program per 1024 channels
(``native_batch_norm``'s update, from the merged statistics).

Backward, given ``dy``, three launches:

1. reduce: program (split, channel block, b) recomputes z, ``dz = dy * act'(z)`` (``dz = dy`` with ``PRE``), and
   sums per channel ``dz`` and ``dz * xhat`` over its share of the voxels into (B, SPLIT, C) workspaces (no
   atomics);
2. finalize: the workspaces summed in a fixed order into dweight and dbias (C,) and the two per-group terms of dx,
   ``c1 = sum_c w_c sum dz / M`` and ``c2 = sum_c w_c sum dz xhat / M`` over the group's M values (the whole
   batch's with statistics over the batch): one launch where ATen reductions took a dozen;
3. dx: ``rstd * (w_c dz - c1_g - xhat c2_g)`` (times ``act'(x)`` with ``PRE``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.kernels import utils
from fastseg3d.kernels.dwconv3d import ACT_IDS as _DWCONV_ACT_IDS
from fastseg3d.kernels.dwconv3d import _act, _act_grad  # the activations the dwconv3d kernels fuse
from fastseg3d.kernels.utils import INTERPRET, cdiv, f32, next_power_of_2, wrap

__all__ = ["ACT_IDS", "group_norm_act_apply", "group_norm_act_bwd", "group_norm_act_running_stats",
           "group_norm_act_stats"]

ACT_IDS = {**_DWCONV_ACT_IDS, "leaky_relu": 5}  # and LeakyReLU, whose slope is a runtime argument
_INT32_MAX = 2**31 - 1
_MAX_SPLIT = 512  # splits of a channel's voxels, each a program per channel block and batch element
_MAX_BLOCK_C = 64
_WARPS = 8  # for the 2048-element tiles: 8 values a thread (the statistics' two fp32 accumulators spill at 4 warps)


def _tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C): wide along the unit-stride axis. Under the interpreter, which costs per program, small
    tiles on small tensors (tests cross tiles, splits and channel blocks) and about four tiles a channel block on
    larger ones (the networks' tests)."""
    c = x.shape[1]
    if not INTERPRET:
        block_c = min(next_power_of_2(c), _MAX_BLOCK_C if _channels_last(x) else 4)
        return 2048 // block_c, block_c
    block_c = min(next_power_of_2(c), 16 if _channels_last(x) or c > 8 else 2)
    s = x.shape[2] * x.shape[3] * x.shape[4]
    return max(64 // block_c, min(next_power_of_2(cdiv(s, 4)), 4096)), block_c


def _split(x: torch.Tensor, n_tiles: int, programs_per_split: int) -> tuple[int, int]:
    """(SPLIT, tiles per split): enough programs to keep HBM busy (eight of 4 warps per SM; under the interpreter a
    dozen, so that tests cross splits and tiles within one)."""
    sms = utils.sm_count(x.device)
    wanted = 8 * sms if sms is not None else 12
    split = min(n_tiles, _MAX_SPLIT, max(1, cdiv(wanted, programs_per_split)))
    per = cdiv(n_tiles, split)
    return cdiv(n_tiles, per), per


def _channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.stride(1) == 1


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, voxel) strides of a 5-D tensor contiguous in its layout, from its shape: a size-1 axis of a
    contiguous tensor may carry any stride."""
    c, s = x.shape[1], x.shape[2] * x.shape[3] * x.shape[4]
    return (c * s, 1, c) if _channels_last(x) else (c * s, s, 1)


def _int64(x: torch.Tensor) -> bool:
    return x.numel() >= _INT32_MAX


@triton.jit
def _offsets(b, ch, offs_s, sb, sc, ss, INT64: tl.constexpr):
    if INT64:
        b, ch, offs_s = b.to(tl.int64), ch.to(tl.int64), offs_s.to(tl.int64)
    return b * sb + ch[None, :] * sc + offs_s[:, None] * ss


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT == 5:
        y = tl.where(z > 0.0, z, z * slope)  # NaN stays NaN
    else:
        y = _act(z, ACT)
    return y


@triton.jit
def _activate_grad(z, slope, ACT: tl.constexpr):
    if ACT == 5:
        g = tl.where(z > 0.0, 1.0, slope)  # leaky_relu_backward's choice at 0
    else:
        g = _act_grad(z, ACT)
    return g


@triton.jit
def _stats_kernel(
    x_ptr, mean_ptr, m2_ptr, C, S, SPLIT, tiles_per_split, sb, sc, ss, slope,
    ACT: tl.constexpr, PRE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    slope = f32(slope)
    pid_s = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_ok = ch < C
    s_first = pid_s * tiles_per_split * BLOCK_S
    rows = tl.arange(0, BLOCK_S)
    # Welford's update in every register lane, no reduction in the loop. Only the volume's last tile can be partial,
    # so a lane that takes tile t has taken the t before it: one reciprocal per tile serves all lanes.
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for t in range(tiles_per_split):
        offs_s = s_first + t * BLOCK_S + rows
        mask = (offs_s < S)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + _offsets(b, ch, offs_s, sb, sc, ss, INT64), mask=mask, other=0.0).to(tl.float32)
        if PRE:
            v = _activate(v, slope, ACT)
        delta = v - mean
        mean += tl.where(mask, delta * (1.0 / (t + 1.0)), 0.0)
        m2 += tl.where(mask, delta * (v - mean), 0.0)
    # merge the lanes (Chan's formula): each row was inside the volume in its first `cnt` tiles. The mean in delta
    # form, about the first lane's (inside the volume in every split): a constant channel's lanes all hold its value
    # exactly, and so does the merged mean (a count-weighted sum / count is a few ulps off, which rstd = 1/sqrt(eps)
    # would multiply into a constant group's output)
    cnt = tl.minimum(tl.maximum(tl.cdiv(S - s_first - rows, BLOCK_S), 0), tiles_per_split).to(tl.float32)
    n = tl.sum(cnt, axis=0)
    first = tl.sum(tl.where(rows[:, None] == 0, mean, 0.0), axis=0)
    ch_mean = first + tl.sum(tl.where(cnt[:, None] > 0.0, cnt[:, None] * (mean - first[None, :]), 0.0), axis=0) / n
    d = mean - ch_mean[None, :]
    out = (b * SPLIT + pid_s) * C + ch
    tl.store(mean_ptr + out, ch_mean, mask=c_ok)
    tl.store(m2_ptr + out, tl.sum(m2 + cnt[:, None] * d * d, axis=0), mask=c_ok)


@triton.jit
def _finalize_kernel(
    mean_ptr, m2_ptr, out_mean_ptr, out_rstd_ptr, C, S, G, CG, SPLIT, SPLIT_B, chunk, eps,
    BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    # SPLIT partial rows per program, SPLIT_B of them per batch element (SPLIT = B * SPLIT_B over the batch)
    eps = f32(eps)
    pid = tl.program_id(0)  # b * G + g
    b = pid // G
    g = pid % G
    # two passes over the group's (split, channel) partials: the mean weighted by the counts, then the deviations.
    # The mean in delta form about the first partial's (as the stats kernel's lane merge: exact for a constant group)
    first = tl.load(mean_ptr + (b * SPLIT) * C + g * CG)
    total = tl.zeros([], dtype=tl.float32)
    weighted = tl.zeros([], dtype=tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        cnt = tl.minimum(tl.maximum(S - (p % SPLIT_B) * chunk, 0), chunk).to(tl.float32)  # voxels of each split
        rows = (b * SPLIT + p)[:, None] * C + g * CG
        for c0 in range(0, CG, BLOCK_CG):
            c = c0 + tl.arange(0, BLOCK_CG)
            mask = (p < SPLIT)[:, None] & (c < CG)[None, :]
            n = tl.where(mask, cnt[:, None], 0.0)
            total += tl.sum(tl.sum(n, axis=1), axis=0)
            m = tl.load(mean_ptr + rows + c[None, :], mask=mask, other=0.0)
            weighted += tl.sum(tl.sum(tl.where(mask, n * (m - first), 0.0), axis=1), axis=0)
    mean = first + weighted / total
    m2 = tl.zeros([], dtype=tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        cnt = tl.minimum(tl.maximum(S - (p % SPLIT_B) * chunk, 0), chunk).to(tl.float32)
        rows = (b * SPLIT + p)[:, None] * C + g * CG
        for c0 in range(0, CG, BLOCK_CG):
            c = c0 + tl.arange(0, BLOCK_CG)
            mask = (p < SPLIT)[:, None] & (c < CG)[None, :]
            d = tl.load(mean_ptr + rows + c[None, :], mask=mask, other=0.0) - mean
            q = tl.load(m2_ptr + rows + c[None, :], mask=mask, other=0.0)
            m2 += tl.sum(tl.sum(tl.where(mask, q + cnt[:, None] * d * d, 0.0), axis=1), axis=0)
    tl.store(out_mean_ptr + pid, mean)
    tl.store(out_rstd_ptr + pid, 1.0 / tl.sqrt_rn(m2 / total + eps))


@triton.jit
def _lerp(start, end, weight):
    """ATen's lerp (the form it picks by the weight's size), in fp32."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _running_stats_kernel(rm_ptr, rv_ptr, mean_ptr, rstd_ptr, C, eps, momentum, unbias, BLOCK: tl.constexpr):
    # native_batch_norm's update: running = lerp(running, batch statistic, momentum), with the unbiased variance
    # recovered from rstd, each statistic rounded to the running buffer's dtype before the lerp as there
    eps, momentum, unbias = f32(eps), f32(momentum), f32(unbias)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=ok, other=1.0)
    # NaN statistics stay NaN, as ATen's update leaves them (a GPU's plain max would drop them)
    var = tl.maximum(1.0 / (rstd * rstd) - eps, 0.0, propagate_nan=tl.PropagateNan.ALL) * unbias
    rm = tl.load(rm_ptr + c, mask=ok, other=0.0)
    rv = tl.load(rv_ptr + c, mask=ok, other=0.0)
    mean = mean.to(rm_ptr.dtype.element_ty).to(tl.float32)
    var = var.to(rv_ptr.dtype.element_ty).to(tl.float32)
    tl.store(rm_ptr + c, _lerp(rm.to(tl.float32), mean, momentum).to(rm_ptr.dtype.element_ty), mask=ok)
    tl.store(rv_ptr + c, _lerp(rv.to(tl.float32), var, momentum).to(rv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _affine(w_ptr, bias_ptr, mean_ptr, rstd_ptr, b, ch, c_ok, GB, CG, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per channel: (mean, rstd, w, scale = rstd w, shift = bias - mean scale), fp32 vectors."""
    grp = b * GB + ch // CG
    mean = tl.load(mean_ptr + grp, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=c_ok, other=0.0)
    w = tl.load(w_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) if HAS_W else tl.full(ch.shape, 1.0, tl.float32)
    shift = tl.load(bias_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) if HAS_B else tl.zeros(ch.shape, tl.float32)
    scale = rstd * w
    return mean, rstd, w, scale, shift - mean * scale


@triton.jit
def _apply_kernel(
    x_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, y_ptr, C, S, GB, CG, sb, sc, ss, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    slope = f32(slope)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_ok = ch < C
    _, _, _, scale, shift = _affine(w_ptr, bias_ptr, mean_ptr, rstd_ptr, b, ch, c_ok, GB, CG, HAS_W, HAS_B)
    mask = (offs_s < S)[:, None] & c_ok[None, :]
    offs = _offsets(b, ch, offs_s, sb, sc, ss, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRE:
        y = _activate(x, slope, ACT) * scale[None, :] + shift[None, :]
    else:
        y = _activate(x * scale[None, :] + shift[None, :], slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(x_ptr, dy_ptr, offs, mask, mean, rstd, scale, shift, slope, ACT: tl.constexpr, PRE: tl.constexpr):
    """(dz, xhat, x) of one tile: the gradient and the value of the norm's output before its activation, z as the
    forward computed it (``dz = dy`` with ``PRE``: the activation is on the norm's input), and the input."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRE:
        xhat = (_activate(x, slope, ACT) - mean[None, :]) * rstd[None, :]
    else:
        if ACT != 0:
            dz = dz * _activate_grad(x * scale[None, :] + shift[None, :], slope, ACT)
        xhat = (x - mean[None, :]) * rstd[None, :]
    return dz, xhat, x


@triton.jit
def _bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, sdz_ptr, sdzx_ptr, C, S, GB, CG, SPLIT, tiles_per_split,
    sb, sc, ss, slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    slope = f32(slope)
    pid_s = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_ok = ch < C
    mean, rstd, _, scale, shift = _affine(w_ptr, bias_ptr, mean_ptr, rstd_ptr, b, ch, c_ok, GB, CG, HAS_W, HAS_B)
    # elementwise sums in registers, one reduction at the end (a reduction per tile would synchronise the program)
    sdz = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sdzx = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for t in range(tiles_per_split):
        offs_s = (pid_s * tiles_per_split + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_s < S)[:, None] & c_ok[None, :]
        dz, xhat, _input = _dz(x_ptr, dy_ptr, _offsets(b, ch, offs_s, sb, sc, ss, INT64), mask, mean, rstd, scale,
                          shift, slope, ACT, PRE)
        dz = tl.where(mask, dz, 0.0)
        sdz += dz
        sdzx += dz * xhat
    out = (b * SPLIT + pid_s) * C + ch
    tl.store(sdz_ptr + out, tl.sum(sdz, axis=0), mask=c_ok)
    tl.store(sdzx_ptr + out, tl.sum(sdzx, axis=0), mask=c_ok)


@triton.jit
def _bwd_finalize_kernel(
    sdz_ptr, sdzx_ptr, w_ptr, c1_ptr, c2_ptr, dw_ptr, db_ptr, B, C, G, CG, SPLIT, NB, N_A, count,
    HAS_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P2: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    # The (batch, split, channel) partials of the reduce kernel, summed in one launch (in place of a dozen small
    # ATen reductions). Programs below N_A: dx's per-(statistics row, group) coefficients c1 = sum(w dz) / count,
    # c2 = sum(w dz xhat) / count, for BLOCK_G groups of the row, over the row's NB batch elements. The others: the
    # parameter gradients (sums over the batch and the splits) of BLOCK_C2 channels. Fixed order: deterministic.
    count = f32(count)
    pid = tl.program_id(0)
    if pid < N_A:
        n_gb = tl.cdiv(G, BLOCK_G)
        n = pid // n_gb
        g = (pid % n_gb) * BLOCK_G + tl.arange(0, BLOCK_G)
        p_ar = tl.arange(0, BLOCK_P)
        a1 = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_K], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, CG, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ch = g[:, None] * CG + k[None, :]
            c_ok = (g < G)[:, None] & (k < CG)[None, :]
            if HAS_W:
                w = tl.load(w_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
            else:
                w = tl.where(c_ok, 1.0, 0.0)
            for b in range(n * NB, n * NB + NB):
                for p0 in range(0, SPLIT, BLOCK_P):
                    p = p0 + p_ar
                    mask = (p < SPLIT)[:, None, None] & c_ok[None, :, :]
                    offs = (b * SPLIT + p)[:, None, None] * C + ch[None, :, :]
                    a1 += tl.load(sdz_ptr + offs, mask=mask, other=0.0) * w[None, :, :]
                    a2 += tl.load(sdzx_ptr + offs, mask=mask, other=0.0) * w[None, :, :]
        out = n * G + g
        tl.store(c1_ptr + out, tl.sum(tl.sum(a1, axis=2), axis=0) / count, mask=g < G)
        tl.store(c2_ptr + out, tl.sum(tl.sum(a2, axis=2), axis=0) / count, mask=g < G)
    else:
        ch2 = (pid - N_A) * BLOCK_C2 + tl.arange(0, BLOCK_C2)
        p_ar2 = tl.arange(0, BLOCK_P2)
        d1 = tl.zeros([BLOCK_P2, BLOCK_C2], dtype=tl.float32)
        d2 = tl.zeros([BLOCK_P2, BLOCK_C2], dtype=tl.float32)
        for b2 in range(0, B):
            for q0 in range(0, SPLIT, BLOCK_P2):
                q = q0 + p_ar2
                mask2 = (q < SPLIT)[:, None] & (ch2 < C)[None, :]
                offs2 = (b2 * SPLIT + q)[:, None] * C + ch2[None, :]
                d1 += tl.load(sdz_ptr + offs2, mask=mask2, other=0.0)
                d2 += tl.load(sdzx_ptr + offs2, mask=mask2, other=0.0)
        tl.store(db_ptr + ch2, tl.sum(d1, axis=0), mask=ch2 < C)
        tl.store(dw_ptr + ch2, tl.sum(d2, axis=0), mask=ch2 < C)


@triton.jit
def _bwd_dx_kernel(
    x_ptr, dy_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, dx_ptr, C, S, GB, CG, sb, sc, ss, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    slope = f32(slope)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_ok = ch < C
    mean, rstd, w, scale, shift = _affine(w_ptr, bias_ptr, mean_ptr, rstd_ptr, b, ch, c_ok, GB, CG, HAS_W, HAS_B)
    grp = b * GB + ch // CG
    c1 = tl.load(c1_ptr + grp, mask=c_ok, other=0.0)
    c2 = tl.load(c2_ptr + grp, mask=c_ok, other=0.0)
    mask = (offs_s < S)[:, None] & c_ok[None, :]
    offs = _offsets(b, ch, offs_s, sb, sc, ss, INT64)
    dz, xhat, x = _dz(x_ptr, dy_ptr, offs, mask, mean, rstd, scale, shift, slope, ACT, PRE)
    dx = rstd[None, :] * (w[None, :] * dz - c1[None, :] - xhat * c2[None, :])
    if PRE:
        dx = dx * _activate_grad(x, slope, ACT)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid_s(x: torch.Tensor, block_s: int, block_c: int) -> tuple[int, int, int, int]:
    """(C, S, voxel tiles, channel blocks)."""
    c = x.shape[1]
    s = x.shape[2] * x.shape[3] * x.shape[4]
    return c, s, cdiv(s, block_s), cdiv(c, block_c)


def group_norm_act_stats(x: torch.Tensor, groups: int, eps: float, act_id: int = 0, slope: float = 0.0,
                         pre: bool = False, batch: bool = False, empty=torch.empty
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of each (batch, group), fp32 (B, G), for x (B, C, D, H, W) contiguous in either layout (of
    ``act(x)`` with ``pre``); with ``batch``, of each group over the whole batch, (1, G)."""
    block_s, block_c = _tile(x)
    c, s, n_tiles, n_cb = _grid_s(x, block_s, block_c)
    bsz = x.shape[0]
    split, per = _split(x, n_tiles, n_cb * bsz)
    means = empty((bsz, split, c), dtype=torch.float32, device=x.device)
    m2s = empty((bsz, split, c), dtype=torch.float32, device=x.device)
    wrap(_stats_kernel)[(split, n_cb, bsz)](
        x, means, m2s, c, s, split, per, *_strides(x), slope, ACT=act_id if pre else 0, PRE=pre and act_id != 0,
        BLOCK_S=block_s, BLOCK_C=block_c, INT64=_int64(x), num_warps=_WARPS,
    )
    n_stats, rows = (1, bsz * split) if batch else (bsz, split)
    mean = empty((n_stats, groups), dtype=torch.float32, device=x.device)
    rstd = empty((n_stats, groups), dtype=torch.float32, device=x.device)
    cg = c // groups
    wrap(_finalize_kernel)[(n_stats * groups,)](
        means, m2s, mean, rstd, c, s, groups, cg, rows, split, per * block_s, eps,
        BLOCK_P=min(next_power_of_2(rows), 64), BLOCK_CG=min(next_power_of_2(cg), 32), num_warps=4,
    )
    return mean, rstd


def group_norm_act_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor, eps: float, momentum: float, count: int) -> None:
    """A training BatchNorm's running statistics (contiguous (C,) buffers, any floating dtype) updated in place
    from the batch statistics (C,) of :func:`group_norm_act_stats` with ``batch``, over ``count`` values a channel,
    in one launch (ATen's BatchNorm does it in its statistics kernel; unfused it is six small ops)."""
    c = running_mean.numel()
    block = min(next_power_of_2(c), 1024)
    wrap(_running_stats_kernel)[(cdiv(c, block),)](
        running_mean, running_var, mean, rstd, c, eps, momentum, count / (count - 1), BLOCK=block, num_warps=8,
    )


def _batch_stride(x: torch.Tensor, mean: torch.Tensor) -> int:
    """Where a batch element's statistics start: 0 when one set (1, G) spans the batch."""
    return mean.shape[1] if mean.shape[0] == x.shape[0] else 0


def group_norm_act_apply(x, weight, bias, mean, rstd, act_id: int, slope: float, out: torch.Tensor,
                         pre: bool = False) -> torch.Tensor:
    """Writes ``act((x - mean) * rstd * weight + bias)`` (``(act(x) - mean) * rstd * weight + bias`` with ``pre``)
    into ``out`` (x's shape and strides) and returns it; ``slope`` is LeakyReLU's negative slope. The statistics
    are (B, G), or (1, G) over the whole batch."""
    block_s, block_c = _tile(x)
    c, s, n_tiles, n_cb = _grid_s(x, block_s, block_c)
    groups = mean.shape[1]
    wrap(_apply_kernel)[(n_tiles, n_cb, x.shape[0])](
        x, weight if weight is not None else mean, bias if bias is not None else mean, mean, rstd, out,
        c, s, _batch_stride(x, mean), c // groups, *_strides(x), slope,
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=act_id, PRE=pre and act_id != 0,
        BLOCK_S=block_s, BLOCK_C=block_c, INT64=_int64(x), num_warps=_WARPS,
    )
    return out


def group_norm_act_bwd(dy, x, weight, bias, mean, rstd, act_id: int, slope: float, need_dx: bool, pre: bool = False,
                       empty=torch.empty) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype and strides or None, dweight and dbias as fp32 (C,)) for ``dy`` of x's shape and strides
    (dweight and dbias are formed whether or not the norm is affine: dx needs the same sums); the statistics (B, G),
    or (1, G) over the whole batch."""
    block_s, block_c = _tile(x)
    c, s, n_tiles, n_cb = _grid_s(x, block_s, block_c)
    bsz, groups = x.shape[0], mean.shape[1]
    gb = _batch_stride(x, mean)
    split, per = _split(x, n_tiles, n_cb * bsz)
    sdz = empty((bsz, split, c), dtype=torch.float32, device=x.device)
    sdzx = empty((bsz, split, c), dtype=torch.float32, device=x.device)
    w_arg = weight if weight is not None else mean
    b_arg = bias if bias is not None else mean
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=act_id, PRE=pre and act_id != 0,
                 BLOCK_S=block_s, BLOCK_C=block_c, INT64=_int64(x), num_warps=_WARPS)
    wrap(_bwd_reduce_kernel)[(split, n_cb, bsz)](
        x, dy, w_arg, b_arg, mean, rstd, sdz, sdzx, c, s, gb, c // groups, split, per, *_strides(x), slope,
        **flags,
    )
    n_stats, cg = mean.shape[0], c // groups
    c1 = empty((n_stats, groups), dtype=torch.float32, device=x.device)
    c2 = empty((n_stats, groups), dtype=torch.float32, device=x.device)
    dweight = empty((c,), dtype=torch.float32, device=x.device)
    dbias = empty((c,), dtype=torch.float32, device=x.device)
    block_k = min(next_power_of_2(cg), 1024)
    block_g = min(next_power_of_2(groups), max(1, 256 // block_k))
    block_c2 = min(next_power_of_2(c), 64)
    n_a = n_stats * cdiv(groups, block_g) if need_dx else 0  # without dx, the parameter gradients alone
    wrap(_bwd_finalize_kernel)[(n_a + cdiv(c, block_c2),)](
        sdz, sdzx, w_arg, c1, c2, dweight, dbias, bsz, c, groups, cg, split, bsz // n_stats, n_a,
        float(cg * s * (bsz // n_stats)), HAS_W=weight is not None,
        # tiles of a fixed size whatever the splits, 8 warps (4 put 8 bytes on the stack on sm_90 for some)
        BLOCK_P=max(1, 2048 // (block_g * block_k)), BLOCK_G=block_g, BLOCK_K=block_k,
        BLOCK_P2=2048 // block_c2, BLOCK_C2=block_c2, num_warps=8,
    )
    if not need_dx:
        return None, dweight, dbias
    layout = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    dx = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)
    wrap(_bwd_dx_kernel)[(n_tiles, n_cb, bsz)](
        x, dy, w_arg, b_arg, mean, rstd, c1, c2, dx, c, s, gb, c // groups, *_strides(x), slope, **flags,
    )
    return dx, dweight, dbias


