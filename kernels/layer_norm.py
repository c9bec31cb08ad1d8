"""Triton kernels of LayerNorm over the last axis, ``y = (x - mean) * rstd * w + b``, with the output written in a
requested dtype.

Under autocast ``F.layer_norm`` runs in fp32 and returns fp32, which the Linear after it casts to bf16: an fp32
write and a bf16 copy per element forward, and in backward an fp32 copy of the bf16 gradient before the norm's own
backward. Here the forward writes the Linear's bf16 input directly and the backward reads the bf16 gradient as it
is. Rows are the flattened leading axes (tokens); a program owns a [BLOCK_M, BLOCK_C] tile, the whole row of C
values (C up to ``MAX_C``).

Forward: one pass per tile (statistics in fp32, the mean taken about the row's first value and subtracted before
squaring), writing y and the per-row mean and rstd (fp32). Backward: ``dx = rstd * (w dy - mean(w dy) - xhat
mean(w dy xhat))`` per row; a program walks its share of the row tiles and sums ``dy xhat`` and ``dy`` per channel
in registers, written as one partial per program and summed in a fixed order by one more launch (deterministic, no
atomics).

With a residual (a pre-norm transformer's ``s = x + branch; y = norm(s)``) the forward adds it in the same pass and
writes the sum ``s`` as well (rounded to its dtype before the statistics, as the plain add's output is), and the
backward adds the gradient ``s`` receives from later layers to the norm's input gradient and writes the total in
both inputs' dtypes: the add, the accumulation of the two gradients and the branch's cast are not separate
kernels, and neither the sum nor the accumulated gradient is read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.kernels import utils
from fastseg3d.kernels.utils import cdiv, f32, next_power_of_2, wrap

__all__ = ["MAX_C", "layer_norm_bwd", "layer_norm_fwd"]

MAX_C = 4096
_INT32_MAX = 2**31 - 1
_TILE = 2048  # elements a program holds: 16 a thread at 4 warps


def _block(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, warps)."""
    block_c = next_power_of_2(c)
    return max(1, _TILE // block_c), block_c, 4 if block_c <= _TILE else 8


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, M, C, sx, sr, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    COL_TAIL: tl.constexpr,  # C < BLOCK_C: the tile's last columns are masked
    INT64: tl.constexpr,
):
    eps = f32(eps)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    r = rows
    if INT64:
        r = rows.to(tl.int64)
    x = tl.load(x_ptr + r[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # the mean about the row's first value: exact for a constant row (sum / C is a few ulps off, which rstd =
    # 1/sqrt(eps) would multiply into its output, where ATen's gives exactly 0). Loaded again (from L1): taking it
    # out of the tile costs one more cross-thread reduction a row
    first = tl.load(x_ptr + r * sx, mask=rows < M, other=0.0).to(tl.float32)
    if HAS_RES:
        total = x + tl.load(r_ptr + r[:, None] * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = total.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + r[:, None] * C + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
        first = first + tl.load(r_ptr + r * sr, mask=rows < M, other=0.0).to(tl.float32)
        first = first.to(s_ptr.dtype.element_ty).to(tl.float32)
    d = x - first[:, None]  # 0 on rows past M (x and first read 0 there)
    if COL_TAIL:
        d = tl.where(c_ok[None, :], d, 0.0)
    mean = first + tl.sum(d, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, ds_ptr, mean_ptr, rstd_ptr, dx_ptr, dr_ptr, dw_ptr, db_ptr, M, C, sx, tiles_per_program,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, HAS_DS: tl.constexpr, NEED_DR: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for t in range(tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < M
        mask = r_ok[:, None] & c_ok[None, :]
        r = rows
        if INT64:
            r = rows.to(tl.int64)
        x = tl.load(x_ptr + r[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dw += dy * xhat
        db += dy
        if NEED_DX:
            wdy = w[None, :] * dy
            c1 = tl.sum(wdy * xhat, axis=1) / C
            c2 = tl.sum(wdy, axis=1) / C
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(ds_ptr + r[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + r[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DR:
                tl.store(dr_ptr + r[:, None] * C + cols[None, :], dx.to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * C + cols, tl.sum(dw, axis=0), mask=c_ok)
    tl.store(db_ptr + pid * C + cols, tl.sum(db, axis=0), mask=c_ok)


def _int64(*tensors: torch.Tensor) -> bool:
    """Whether an offset can pass int32: the largest of (M, C) row views (their rows may be strided) and of
    contiguous tensors of any rank."""
    def last(t):
        return (t.shape[0] - 1) * t.stride(0) + t.shape[1] if t.dim() == 2 else t.numel()

    return max(last(t) for t in tensors) > _INT32_MAX


def layer_norm_fwd(x2d: torch.Tensor, weight, bias, eps: float, y: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, residual2d: torch.Tensor | None = None, s: torch.Tensor | None = None) -> None:
    """Writes y (M, C contiguous), mean and rstd (M,) for x2d (M, C) with a unit stride along C; with residual2d
    (M, C, unit stride along C) normalises ``s = x2d + residual2d`` and writes it to s (M, C contiguous)."""
    m, c = x2d.shape
    block_m, block_c, warps = _block(c)
    res = residual2d is not None
    wrap(_layer_norm_fwd_kernel)[(cdiv(m, block_m),)](
        x2d, residual2d if res else x2d, weight if weight is not None else mean,
        bias if bias is not None else mean, y, s if res else y, mean, rstd,
        m, c, x2d.stride(0), residual2d.stride(0) if res else 0, eps,
        HAS_RES=res, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c,
        COL_TAIL=c != block_c, INT64=_int64(x2d, y, *((residual2d, s) if res else ())), num_warps=warps,
    )


def layer_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight, mean, rstd, dx: torch.Tensor | None,
                   empty=torch.empty, ds: torch.Tensor | None = None, dr: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes dx (M, C contiguous, when given) and returns (dweight, dbias) as fp32 (C,), for dy2d (M, C
    contiguous) and x2d (M, C) with a unit stride along C. ``ds`` (M, C contiguous) is added to the input gradient,
    which goes to ``dr`` (M, C contiguous) as well; without dx it goes to dr alone."""
    if dx is None:
        dx, dr = dr, None
    m, c = x2d.shape
    block_m, block_c, warps = _block(c)
    n_tiles = cdiv(m, block_m)
    sms = utils.sm_count(x2d.device)
    programs = min(n_tiles, 4 * sms if sms is not None else 3)
    per = cdiv(n_tiles, programs)
    programs = cdiv(n_tiles, per)
    dw = empty((programs, c), dtype=torch.float32, device=x2d.device)
    db = empty((programs, c), dtype=torch.float32, device=x2d.device)
    wrap(_layer_norm_bwd_kernel)[(programs,)](
        x2d, weight if weight is not None else mean, dy2d, ds if ds is not None else dy2d, mean, rstd,
        dx if dx is not None else dy2d, dr if dr is not None else dy2d, dw, db, m, c, x2d.stride(0), per,
        HAS_W=weight is not None, NEED_DX=dx is not None, HAS_DS=ds is not None, NEED_DR=dr is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, INT64=_int64(x2d, dy2d), num_warps=warps,
    )
    dweight = empty((c,), dtype=torch.float32, device=x2d.device)
    dbias = empty((c,), dtype=torch.float32, device=x2d.device)
    utils.sum_partials(dw.view(programs, 1, c), dweight, db.view(programs, 1, c), dbias)
    return dweight, dbias
