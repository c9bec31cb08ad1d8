"""``python -m bench.tune attention``: the attention kernels' tiles, the table ``kernels/attention.py::_blocks``
should hold.

On the H200 session the fused forward at SegFormer3D's stage 1 (N 32,768, M 512, d 32, bf16) ran at 12% of the
exponential bound against 29% for cuDNN's SDPA, with tiles chosen from sm_90 cubins alone. Every candidate
(BLOCK_M, BLOCK_N, num_warps, num_stages) is put in place of ``_blocks``'s answer for one kernel only. ``fwd``
times the forward; ``dq`` and ``dkdv`` time the whole backward (delta, dk/dv, their sum, dq) with only that
kernel's tile changed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from unittest import mock

import torch

from bench.tune import default_time_fn, nan_empty, new_row, tolerance, try_plan

__all__ = ["KERNELS", "SHAPES", "candidates", "labels", "sweep"]

KERNELS = ("fwd", "dq", "dkdv")
SHAPES = ("stage1@128^3", "stage2@128^3")


def candidates(kernel: str, head_dim: int, precision: str | None) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) to try: tensor-core tiles of 32 to 128 rows and keys for half
    types and TF32, smaller ones for IEEE fp32 dots (FMA units); 4 or 8 warps; 2 to 4 pipeline stages."""
    sizes = (16, 32, 64) if precision == "ieee" else (32, 64, 128)
    out = []
    # deeper pipelines pay where a program walks many key (fwd, dq) or query (dkdv) blocks
    for bm, bn, warps, stages in itertools.product(sizes, sizes, (4, 8), (2, 3, 4) if kernel == "fwd" else (2, 3)):
        if warps == 8 and bm * bn < 64 * 64:  # too little work for two warpgroups
            continue
        if head_dim >= 128 and bm * bn > 64 * 128:  # the accumulators alone would exceed the register file
            continue
        out.append((bm, bn, warps, stages))
    return out


def labels() -> list[str]:
    """The shapes it knows: the attention benchmark's labels."""
    from bench.attention import _grids

    return [g[0] for g in (*_grids(False), *_grids(True))]


def _inputs(label: str, dtype: torch.dtype, device: torch.device):
    from bench.attention import _grids

    for name, grid, channels, heads, sr in (*_grids(False), *_grids(True)):
        if name == label:
            n = grid[0] * grid[1] * grid[2]
            m = n // sr**3
            d = channels // heads
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(2, n, heads, d, generator=g, device=device, dtype=dtype)
            kv = torch.randn(2, m, 2, heads, d, generator=g, device=device, dtype=dtype)
            return q, kv[:, :, 0], kv[:, :, 1]
    raise ValueError(f"unknown attention shape {label!r}")


def sweep(label: str, dtype: torch.dtype, kernels=KERNELS, device: torch.device | None = None,
          time_fn: Callable[[Callable[[], object]], float] | None = None, deadline: float | None = None,
          sink: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (kernel, candidate): ``ms`` (None where it failed, with ``error``), ``current`` (the table's own
    choice) and ``ok`` (its outputs, written over NaN, matched the table's within the dtype's tolerance)."""
    from fastseg3d.kernels import attention as kern

    device = device or torch.device("cuda")
    time_fn = time_fn or default_time_fn

    q, k, v = _inputs(label, dtype, device)
    bsz, n, h, d = q.shape
    m = k.shape[1]
    scale = d**-0.5
    out = torch.empty_like(q)
    lse = torch.empty(bsz, h, n, dtype=torch.float32, device=device)
    grad = torch.randn_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    table = kern._blocks
    tol = tolerance(dtype)

    def run(kernel: str) -> Callable[[], None]:
        if kernel == "fwd":
            return lambda: kern.attention_fwd(q, k, v, scale, out, lse)
        return lambda: kern.attention_bwd(grad, q, k, v, out, lse, scale, dq, dk, dv)

    def check(kernel: str) -> Callable[[], None]:
        def poisoned():
            if kernel == "fwd":
                for t in (out, lse):
                    t.fill_(float("nan"))
                return kern.attention_fwd(q, k, v, scale, out, lse)
            for t in (dq, dk, dv):
                t.fill_(float("nan"))
            return kern.attention_bwd(grad, q, k, v, out, lse, scale, dq, dk, dv, empty=nan_empty)
        return poisoned

    def results(kernel: str) -> list[torch.Tensor]:
        return [out.clone(), lse.clone()] if kernel == "fwd" else [dq.clone(), dk.clone(), dv.clone()]

    rows = []
    for kernel in kernels:
        # the backward reads out and lse: the table's, not those of the forward sweep's last candidate
        kern.attention_fwd(q, k, v, scale, out, lse)
        fn = run(kernel)
        fn()
        expected = results(kernel)
        precision = kern._precision(dtype)
        current = tuple(table(n, m, d, precision, kernel))
        pool = candidates(kernel, d, precision)
        # the table's own tile first: a sweep cut by its time limit still has it to compare with
        for cand in [current] + [c for c in pool if c != current]:
            if deadline is not None and time.monotonic() > deadline:
                return rows
            plan = dict(zip(("BLOCK_M", "BLOCK_N", "warps", "stages"), cand))

            def patched(n_rows, n_cols, head_dim, prec, which, cand=cand, kernel=kernel):
                return cand if which == kernel else table(n_rows, n_cols, head_dim, prec, which)

            rows.append(try_plan(new_row("attention", label, dtype, kernel, plan, cand == current),
                                 lambda patched=patched: mock.patch.object(kern, "_blocks", patched), fn,
                                 lambda kernel=kernel: results(kernel), expected, tol, time_fn, check(kernel), sink))
    return rows
