"""Triton kernels of SelfReg-UNet's two feature regularisers.

Semantic consistency (``inter_fd``): both maps are average-pooled to the per-axis smaller size by integer
factors, channels ``student_channels[j]`` and ``teacher_channels[j]`` are paired, and

    loss = mean_{b, j, voxel} (pool(s)[b, cs_j] - pool(t)[b, ct_j])^2        (teacher detached)

A program owns BLOCK_V pooled voxels of one (batch, student channel) and walks the k pairs, so every student
channel's gradient (2 (ps - pt) / (B k N) / pool volume, broadcast back over the pooling cell; zero for channels
no pair selects; summed over repeated indices) is written exactly once, in the forward pass, with no atomics. The
teacher arrives already pooled to the student's resolution: the multi-student form pools it once into a pyramid
(``avg_pool``), each level from the nearest finer level that it divides.

Intra-feature distillation (``intra_fd``): pass 1 reduces per-(b, c) sums and sums of squares (per-program
partials, fixed-order sums); channels are ranked by ``mean_b(sum / max(||f_bc||, 1e-12)) / N`` (``torch.sort``);
pass 2 pairs the top and bottom halves, ``loss = mean (f_top - f_bottom)^2``, and writes both halves' gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.kernels.utils import INTERPRET, cdiv, f32, next_power_of_2, wrap
from fastseg3d.reference._grad_dtype import saved_grad_dtype

__all__ = ["avg_pool", "channel_stats", "selfreg_inter_fwd", "selfreg_intra_fwd"]

_INT32_MAX = 2**31 - 1


def _block(n: int) -> int:
    return max(16, min(next_power_of_2(n), 4096 if INTERPRET else 1024))


def _warps(block: int) -> int:
    return 8 if block >= 1024 else 4


def _int64(*tensors: torch.Tensor) -> bool:
    return any(t.numel() >= _INT32_MAX for t in tensors)


@triton.jit
def _pooled_row(
    base_ptr, d, h, w, mask, XH, XW, FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
):
    """fp32 average over the (FD, FH, FW) cell of pooled voxels (d, h, w) of one channel of a (XD, XH, XW) map."""
    acc = tl.zeros(d.shape, dtype=tl.float32)
    # one address per pooled voxel; the cell's elements are offsets from it (planes and rows uniform, W immediate);
    # FD stays a loop, so a 4x4x4 cell does not hold 64 loads per output in registers at once
    cell = base_ptr + ((d * FD * XH + h * FH) * XW + w * FW)
    for i in range(FD):
        for j in tl.static_range(FH):
            row = cell + (i * XH + j) * XW
            for k in tl.static_range(FW):
                acc += tl.load(row + k, mask=mask, other=0.0).to(tl.float32)
    return acc * (1.0 / (FD * FH * FW))


@triton.jit
def _avg_pool_kernel(
    x_ptr, y_ptr, OD, OH, OW, XD, XH, XW,
    FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, INT64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """y[bc] = avg_pool3d(x[bc], kernel = stride = (FD, FH, FW)) in fp32; grid (voxel blocks, B*C)."""
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    if INT64:
        bc = bc.to(tl.int64)
        offs = offs.to(tl.int64)
    ohw = OH * OW
    nvox = OD * ohw
    mask = offs < nvox
    d = offs // ohw
    h = (offs % ohw) // OW
    w = offs % OW
    v = _pooled_row(x_ptr + bc * (XD * XH * XW), d, h, w, mask, XH, XW, FD, FH, FW)
    tl.store(y_ptr + bc * nvox + offs, v, mask=mask)


@triton.jit
def _selfreg_inter_kernel(
    s_ptr, gs_ptr, t_ptr, idx_s_ptr, idx_t_ptr, part_ptr,
    CS, CT, NPAIRS, OD, OH, OW, SD, SH, SW, coef,
    FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, NEED_GRAD: tl.constexpr, INT64: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid (pooled-voxel blocks, student channels, batch). The teacher ``t`` is at the pooled size (OD, OH, OW)."""
    coef = f32(coef)
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    row = (b * CS + c) * tl.num_programs(0) + pid
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    if INT64:
        b = b.to(tl.int64)
        offs = offs.to(tl.int64)
    ohw = OH * OW
    nvox = OD * ohw
    mask = offs < nvox
    d = offs // ohw
    h = (offs % ohw) // OW
    w = offs % OW
    s_base = s_ptr + (b * CS + c) * (SD * SH * SW)

    # How many pairs select this student channel (scalar loop over the k indices).
    n_match = tl.zeros([BLOCK_V], dtype=tl.int32)
    for j in range(NPAIRS):
        n_match += (tl.load(idx_s_ptr + j) == c).to(tl.int32)
    selected = tl.max(n_match, axis=0) > 0
    diff = tl.zeros([BLOCK_V], dtype=tl.float32)
    sq = tl.zeros([BLOCK_V], dtype=tl.float32)
    if selected:
        ps = _pooled_row(s_base, d, h, w, mask, SH, SW, FD, FH, FW)
        for j in range(NPAIRS):
            if tl.load(idx_s_ptr + j) == c:
                ct = tl.load(idx_t_ptr + j)
                if INT64:
                    ct = ct.to(tl.int64)
                pt = tl.load(t_ptr + (b * CT + ct) * nvox + offs, mask=mask, other=0.0).to(tl.float32)
                e = tl.where(mask, ps - pt, 0.0)
                diff += e
                sq += e * e
    tl.store(part_ptr + row, tl.sum(sq, axis=0))
    if NEED_GRAD:
        g = (diff * (coef / (FD * FH * FW))).to(gs_ptr.dtype.element_ty)
        # each pooled voxel's gradient to its cell, addressed as _pooled_row reads it
        cell = gs_ptr + (b * CS + c) * (SD * SH * SW) + ((d * FD * SH + h * FH) * SW + w * FW)
        for i in range(FD):
            for j2 in tl.static_range(FH):
                row_ptr = cell + (i * SH + j2) * SW
                for k in tl.static_range(FW):
                    tl.store(row_ptr + k, g, mask=mask)


@triton.jit
def _channel_stats_kernel(
    x_ptr, sum_ptr, sq_ptr, NVOX, INT64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per-program partial sum and sum of squares of one (b, c) map; grid (voxel blocks, B*C)."""
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    row = bc * tl.num_programs(0) + pid
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    if INT64:
        bc = bc.to(tl.int64)
        offs = offs.to(tl.int64)
    x = tl.load(x_ptr + bc * NVOX + offs, mask=offs < NVOX, other=0.0).to(tl.float32)
    tl.store(sum_ptr + row, tl.sum(x, axis=0))
    tl.store(sq_ptr + row, tl.sum(x * x, axis=0))


@triton.jit
def _selfreg_intra_kernel(
    x_ptr, g_ptr, order_ptr, part_ptr, C, HALF, NVOX, coef,
    NEED_GRAD: tl.constexpr, INT64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (voxel blocks, HALF, batch): pair channel order[j] (top half) with order[HALF + j] (bottom half)."""
    coef = f32(coef)
    pid = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2)
    row = (b * HALF + j) * tl.num_programs(0) + pid
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    c_top = tl.load(order_ptr + j)
    c_bot = tl.load(order_ptr + HALF + j)
    if INT64:
        b = b.to(tl.int64)
        offs = offs.to(tl.int64)
    else:
        c_top = c_top.to(tl.int32)
        c_bot = c_bot.to(tl.int32)
    mask = offs < NVOX
    top = x_ptr + (b * C + c_top) * NVOX + offs
    bot = x_ptr + (b * C + c_bot) * NVOX + offs
    e = tl.load(top, mask=mask, other=0.0).to(tl.float32) - tl.load(bot, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + row, tl.sum(e * e, axis=0))
    if NEED_GRAD:
        g = e * coef
        tl.store(g_ptr + (b * C + c_top) * NVOX + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptr + (b * C + c_bot) * NVOX + offs, (-g).to(g_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers. They take tensors already validated by fastseg3d.ops.selfreg.


def avg_pool(x: torch.Tensor, size: tuple[int, int, int], empty=torch.empty) -> torch.Tensor:
    """fp32 average pooling of a contiguous (B, C, D, H, W) map to ``size`` (integer factors per axis)."""
    x = x.contiguous()
    bsz, c = x.shape[:2]
    factors = [n // o for n, o in zip(x.shape[2:], size)]
    nvox = size[0] * size[1] * size[2]
    out = empty((bsz, c, *size), dtype=torch.float32, device=x.device)
    block = _block(nvox)
    wrap(_avg_pool_kernel)[(cdiv(nvox, block), bsz * c)](
        x, out, *size, *x.shape[2:], FD=factors[0], FH=factors[1], FW=factors[2], INT64=_int64(x, out),
        BLOCK_V=block, num_warps=_warps(block),
    )
    return out


def selfreg_inter_fwd(
    student: torch.Tensor,
    teacher_pooled: torch.Tensor,
    student_channels: torch.Tensor,
    teacher_channels: torch.Tensor,
    need_grad: bool,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 0-dim loss, dL/dstudent or None). ``teacher_pooled`` is already at the pooled size, which divides the
    student's size per axis."""
    student = student.contiguous()
    teacher_pooled = teacher_pooled.contiguous()
    bsz, cs = student.shape[:2]
    ct = teacher_pooled.shape[1]
    size = tuple(teacher_pooled.shape[2:])
    factors = [n // o for n, o in zip(student.shape[2:], size)]
    nvox = size[0] * size[1] * size[2]
    npairs = student_channels.numel()
    block = _block(nvox)
    n_blocks = cdiv(nvox, block)
    partials = empty((bsz * cs * n_blocks,), dtype=torch.float32, device=student.device)
    grad = empty(student.shape, dtype=saved_grad_dtype(student.dtype), device=student.device) if need_grad else None
    denom = bsz * npairs * nvox
    wrap(_selfreg_inter_kernel)[(n_blocks, cs, bsz)](
        student, grad if grad is not None else student, teacher_pooled, student_channels, teacher_channels,
        partials, cs, ct, npairs, *size, *student.shape[2:], 2.0 / denom,
        FD=factors[0], FH=factors[1], FW=factors[2], NEED_GRAD=need_grad, INT64=_int64(student, teacher_pooled),
        BLOCK_V=block, num_warps=_warps(block),
    )
    return partials.sum() / denom, grad


def channel_stats(x: torch.Tensor, empty=torch.empty) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, sum of squares) over the voxels of each (b, c) map of a contiguous (B, C, D, H, W) tensor, fp32 (B, C)."""
    bsz, c = x.shape[:2]
    nvox = x.shape[2] * x.shape[3] * x.shape[4]
    block = _block(nvox)
    n_blocks = cdiv(nvox, block)
    sums = empty((bsz, c, n_blocks), dtype=torch.float32, device=x.device)
    sqs = empty((bsz, c, n_blocks), dtype=torch.float32, device=x.device)
    wrap(_channel_stats_kernel)[(n_blocks, bsz * c)](
        x, sums, sqs, nvox, INT64=_int64(x), BLOCK_V=block, num_warps=_warps(block),
    )
    return sums.sum(-1), sqs.sum(-1)


def selfreg_intra_fwd(
    x: torch.Tensor, need_grad: bool, empty=torch.empty
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 0-dim loss, dL/dx or None) of SelfReg's intra-feature term; C is even."""
    x = x.contiguous()
    bsz, c = x.shape[:2]
    nvox = x.shape[2] * x.shape[3] * x.shape[4]
    sums, sqs = channel_stats(x, empty)
    score = (sums / sqs.sqrt().clamp_min(1e-12)).mean(0) / nvox
    order = torch.sort(score, descending=True, stable=True).indices
    half = c // 2
    block = _block(nvox)
    n_blocks = cdiv(nvox, block)
    partials = empty((bsz * half * n_blocks,), dtype=torch.float32, device=x.device)
    grad = empty(x.shape, dtype=saved_grad_dtype(x.dtype), device=x.device) if need_grad else None
    denom = bsz * half * nvox
    wrap(_selfreg_intra_kernel)[(n_blocks, half, bsz)](
        x, grad if grad is not None else x, order, partials, c, half, nvox, 2.0 / denom,
        NEED_GRAD=need_grad, INT64=_int64(x), BLOCK_V=block, num_warps=_warps(block),
    )
    return partials.sum() / denom, grad
