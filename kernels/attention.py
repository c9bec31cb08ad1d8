"""Triton kernels of flash-style non-causal attention for spatial-reduction (PVT/SegFormer) attention.

Layout: q (B, N, H, d), k and v (B, M, H, d), any strides with a unit stride on d (strided views of a Linear
output are read in place); o (B, N, H, d) contiguous; lse (B, H, N) fp32, natural log.

Forward: one program per (query block, batch x head); online softmax in fp32 with exp2; saves only o and lse.
Backward: ``delta = rowsum(o * do)``; dk/dv by key block, each program walking a share of the query blocks
(partial sums over shares land in an fp32 workspace and are reduced in a fixed order); dq by query block.
No atomics: every gradient is bitwise deterministic. No N x M tensor is ever allocated. Row offsets are formed in
64 bits (INT64) where an operand's offsets reach 2^31 (e.g. MISSU's q/k/v, views of its qkv output with a token
stride of 1,536, from 896^3 inputs on): the JIT multiplies 32-bit indices and strides in 32 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.backends import tf32_matmul_allowed
from fastseg3d.kernels import utils
from fastseg3d.kernels.utils import INTERPRET, cdiv, f32, needs_int64, next_power_of_2, wrap

__all__ = ["attention_bwd", "attention_fwd"]

_LOG2E = 1.4426950408889634
STAGES = 3  # Triton's default pipelining depth; python -m bench.tune attention sweeps it on a GPU


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    N, M, H, qk_scale,
    sqb, sqn, sqh, skb, skm, skh, svb, svm, svh, sob, son, soh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    KEY_TAIL: tl.constexpr,  # M is not a multiple of BLOCK_N: key blocks are masked
    INT64: tl.constexpr,
):
    qk_scale = f32(qk_scale)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if INT64:
            offs_n = offs_n.to(tl.int64)
        col_ok = offs_n < M
        if KEY_TAIL:
            k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if KEY_TAIL:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        # The scale goes into the exponent's FMA: qk_scale > 0, so the row maximum of the raw scores times the
        # scale is the maximum of the scaled ones.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # log2 units
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KEY_TAIL:
            v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, N, H,
    sob, son, soh, sdb, sdn, sdh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INT64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    o = tl.load(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N, M, H, qk_scale, scale, ROWS_PER_SPLIT,
    sqb, sqn, sqh, skb, skm, skh, svb, svm, svh, sdb, sdn, sdh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ROW_TAIL: tl.constexpr,  # query blocks are masked (N is not a multiple of BLOCK_M, or see the launcher)
    INT64: tl.constexpr,
):
    """dk, dv of one key block from the query rows [split * ROWS_PER_SPLIT, (split + 1) * ROWS_PER_SPLIT).

    Writes fp32 partials to dk/dv workspaces of shape (splits, B, M, H, d): dk/dv's own layout, per split."""
    qk_scale, scale = f32(qk_scale), f32(scale)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < M
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, N)
    for start in range(row_start, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        if ROW_TAIL:
            row_ok = offs_m < row_end
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            # A padded query row reads lse = +inf, so its p is 0 with no select per score (a select on the rows,
            # or none at all, made ptxas serialise the wgmma pipeline at head dim 64). A padded key row
            # (k = v = 0) only fills a dk/dv row that is never stored.
            lse = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :])
            lse = tl.load(lse_ptr + row_base + offs_m)
            delta = tl.load(delta_ptr + row_base + offs_m)
        lse2 = lse * 1.4426950408889634
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.exp2(s_t - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    out = (((pid_s * (tl.num_programs(1) // H) + b) * M + offs_n[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, dk * scale, mask=col_ok[:, None])
    tl.store(dv_ptr + out, dv, mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    N, M, H, qk_scale, scale,
    sqb, sqn, sqh, skb, skm, skh, svb, svm, svh, sdb, sdn, sdh, sgb, sgn, sgh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    KEY_TAIL: tl.constexpr,  # M is not a multiple of BLOCK_N: key blocks are masked
    INT64: tl.constexpr,
):
    qk_scale, scale = f32(qk_scale), f32(scale)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    row_base = pid_bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if INT64:
            offs_n = offs_n.to(tl.int64)
        col_ok = offs_n < M
        if KEY_TAIL:
            k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * skm + offs_d[None, :])
            v = tl.load(v_base + offs_n[:, None] * svm + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if KEY_TAIL:
            # Padded keys (k = v = 0) would add nothing, but their p = exp2(-lse) overflows where every logit is
            # very negative. Padded query rows need no mask: they are never stored.
            s = tl.where(col_ok[None, :], s, float("-inf"))
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------------
# Launchers (inputs validated by fastseg3d.ops.attention)


def _row_splits(n_row_blocks: int, n_programs: int, device: torch.device) -> int:
    """Into how many parts the dk/dv kernel splits the query rows, given its programs per split."""
    sms = utils.sm_count(device)
    if sms is None:
        return 1
    # Few key blocks (M = N / sr^3 is small) would leave most SMs idle: split the query rows among programs.
    target = 4 * sms
    return max(1, min(n_row_blocks, cdiv(target, n_programs)))


def _precision(dtype: torch.dtype) -> str | None:
    if dtype != torch.float32:
        return None  # half types: the backend's default tensor-core path
    return "tf32" if tf32_matmul_allowed() and not INTERPRET else "ieee"


def _blocks(n_rows: int, n_cols: int, head_dim: int, precision: str | None, kernel: str
            ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("fwd", "dq" or "dkdv"), chosen from sm_90 cubins
    (``python -m bench.sass attention``): the fewest main-loop instructions per score that compile without spills
    or a serialised wgmma pipeline, for head dims 16 to 128, on Triton 3.6 and 3.9. Eight warps on 64 rows split
    each row over two warpgroups (cross-warpgroup reductions: about twice the instructions per score), so 64-row
    tensor-core tiles take four. IEEE fp32 dots run on the FMA units and hold far more registers than tensor-core
    ones, so their tiles are small. TF32 dk/dv tiles hold 64 keys where they fit, the fewest rows a wgmma takes."""
    np2 = next_power_of_2
    if INTERPRET:
        return max(16, min(64, np2(n_rows))), max(16, min(64, np2(n_cols))), 4, STAGES
    if precision == "ieee":
        if kernel == "dkdv":
            block_m, block_n, warps = (32, 32, 8) if head_dim <= 64 else (32, 16, 8)
        else:
            block_m, block_n, warps = 64, 32, 4 if head_dim <= 32 else 8
    elif precision == "tf32":
        if kernel == "dkdv":
            block_m, block_n, warps = {16: (64, 64, 4), 32: (64, 64, 4), 64: (32, 64, 4), 128: (64, 32, 8)}[head_dim]
        else:
            block_m, block_n, warps = 128, 64, 8
    elif kernel == "fwd":
        block_m, block_n, warps = 128, 64, 4 if head_dim <= 64 else 8
    else:
        block_m, block_n, warps = 64, 64, 4
    return max(16, min(block_m, np2(n_rows))), max(16, min(block_n, np2(n_cols))), warps, STAGES


def _qk_scale(scale: float) -> float:
    """The logit scale in log2 units. A scale so small that it underflows fp32 would turn the -inf of masked keys
    into NaN (-inf * 0); the smallest normal float gives the same uniform softmax."""
    return max(scale * _LOG2E, torch.finfo(torch.float32).tiny)


def _qk(q: torch.Tensor) -> tuple[int, int, int]:
    return q.stride(0), q.stride(1), q.stride(2)


def attention_fwd(q, k, v, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    bsz, n, h, d = q.shape
    m = k.shape[1]
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = _blocks(n, m, d, precision, "fwd")
    grid = (cdiv(n, block_m), bsz * h)
    wrap(_attn_fwd_kernel)[grid](
        q, k, v, out, lse, n, m, h, _qk_scale(scale),
        *_qk(q), *_qk(k), *_qk(v), *_qk(out),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, KEY_TAIL=m % block_n != 0,
        INT64=needs_int64(q, k, v, out), num_warps=warps, num_stages=stages,
    )


def attention_bwd(grad, q, k, v, out, lse, scale: float, dq, dk, dv, empty=torch.empty) -> None:
    """Write dq, dk, dv (dk/dv of shape (B, M, H, d)); ``empty`` allocates the workspaces."""
    bsz, n, h, d = q.shape
    m = k.shape[1]
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = _blocks(n, m, d, precision, "dq")
    kv_block_m, kv_block_n, kv_warps, kv_stages = _blocks(n, m, d, precision, "dkdv")

    delta = empty((bsz, h, n), dtype=torch.float32, device=q.device)
    wrap(_attn_bwd_delta_kernel)[(cdiv(n, block_m), bsz * h)](
        out, grad, delta, n, h, *_qk(out), *_qk(grad), HEAD_DIM=d, BLOCK_M=block_m,
        INT64=needs_int64(out, grad),
    )

    n_kblocks = cdiv(m, kv_block_n)
    n_row_blocks = cdiv(n, kv_block_m)
    splits = _row_splits(n_row_blocks, n_kblocks * bsz * h, q.device)
    rows_per_split = cdiv(n_row_blocks, splits) * kv_block_m
    splits = cdiv(n, rows_per_split)
    dk_ws = empty((splits, bsz, m, h, d), dtype=torch.float32, device=q.device)
    dv_ws = empty((splits, bsz, m, h, d), dtype=torch.float32, device=q.device)
    wrap(_attn_bwd_dkdv_kernel)[(n_kblocks, bsz * h, splits)](
        q, k, v, grad, lse, delta, dk_ws, dv_ws,
        n, m, h, _qk_scale(scale), scale, rows_per_split,
        *_qk(q), *_qk(k), *_qk(v), *_qk(grad),
        HEAD_DIM=d, BLOCK_M=kv_block_m, BLOCK_N=kv_block_n, PRECISION=precision,
        # Unmasked loops only up to head dim 32: at 64 ptxas serialised the bf16 wgmma pipeline (Triton 3.9), at
        # 128 they spilled (Triton 3.6).
        ROW_TAIL=n % kv_block_m != 0 or d > 32, INT64=needs_int64(q, k, v, grad),
        num_warps=kv_warps, num_stages=kv_stages,
    )
    # Fixed-order sums over the splits keep dk/dv deterministic: one launch for both, in their dtype
    utils.sum_partials(dk_ws.view(splits, 1, -1), dk.view(-1), dv_ws.view(splits, 1, -1), dv.view(-1))

    wrap(_attn_bwd_dq_kernel)[(cdiv(n, block_m), bsz * h)](
        q, k, v, grad, lse, delta, dq,
        n, m, h, _qk_scale(scale), scale,
        *_qk(q), *_qk(k), *_qk(v), *_qk(grad), *_qk(dq),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, KEY_TAIL=m % block_n != 0,
        INT64=needs_int64(q, k, v, grad, dq), num_warps=warps, num_stages=stages,
    )

