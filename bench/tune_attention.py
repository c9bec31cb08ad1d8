"""Sweep the attention kernels' tiles on a GPU: the table ``kernels/attention.py::_blocks`` should hold.

    python -m bench.tune_attention [--shapes stage1@128^3,stage2@128^3] [--dtype bf16] [--kernels fwd,dq,dkdv]
                                   [--top 5] [--time-limit 240] [--out FILE.json]

On the H200 session the fused forward at SegFormer3D's stage 1 (N 32,768, M 512, d 32, bf16) ran at 12% of the
exponential bound against 29% for cuDNN's SDPA, with tiles chosen from sm_90 cubins alone. For each shape (the
``attention`` benchmark case's labels) and kernel, every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) is
put in place of ``_blocks``'s answer for that kernel only, checked against the current table's output (a tile that
computes something else is reported, not ranked) and timed as a CUDA graph's replay
(``triton.testing.do_bench_cudagraph``, the median: the GPU's time without the host's, with the L2 cache warm, so
comparable between tiles rather than with the benchmark rows). ``fwd`` times the forward; ``dq`` and
``dkdv`` time the whole backward (delta, dk/dv, their sum, dq) with only that kernel's tile changed. Candidates
that fail to compile (shared memory, registers) are listed with the reason. Prints the fastest ``--top`` per
(shape, kernel) with the current table's time and rank; ``--out`` writes every result as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from bench.utils import device_lost, first_line

__all__ = ["candidates", "main", "sweep"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("fwd", "dq", "dkdv")


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
          time_fn: Callable[[Callable[[], object]], float] | None = None, deadline: float | None = None) -> list[dict]:
    """One row per (kernel, candidate): ``ms`` (None where it failed, with ``error``), ``current`` (the table's own
    choice) and ``ok`` (its outputs matched the table's within the dtype's tolerance)."""
    from fastseg3d.kernels import attention as kern

    device = device or torch.device("cuda")
    if time_fn is None:
        import triton.testing

        def time_fn(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")

    q, k, v = _inputs(label, dtype, device)
    bsz, n, h, d = q.shape
    m = k.shape[1]
    scale = d**-0.5
    out = torch.empty_like(q)
    lse = torch.empty(bsz, h, n, dtype=torch.float32, device=device)
    grad = torch.randn_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    table = kern._blocks
    tol = 2e-2 if dtype != torch.float32 else 1e-4

    def run(kernel: str) -> Callable[[], None]:
        if kernel == "fwd":
            return lambda: kern.attention_fwd(q, k, v, scale, out, lse)
        return lambda: kern.attention_bwd(grad, q, k, v, out, lse, scale, dq, dk, dv)

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
        for cand in ([] if current in pool else [current]) + pool:  # the table's own tile is always timed
            if deadline is not None and time.monotonic() > deadline:
                return rows
            row = {"shape": label, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel,
                   "block_m": cand[0], "block_n": cand[1], "warps": cand[2], "stages": cand[3],
                   "current": cand == current, "ms": None, "ok": None, "error": None}

            def patched(n_rows, n_cols, head_dim, prec, which, cand=cand, kernel=kernel):
                return cand if which == kernel else table(n_rows, n_cols, head_dim, prec, which)

            try:
                with mock.patch.object(kern, "_blocks", patched):
                    fn()
                    got = results(kernel)
                    row["ok"] = all(torch.allclose(a.float(), e.float(), rtol=tol, atol=tol)
                                    for a, e in zip(got, expected))
                    row["ms"] = time_fn(fn)
            except Exception as err:  # noqa: BLE001  (a tile the compiler or the GPU refuses is a result)
                if device_lost(err):
                    raise
                row["error"] = first_line(err)
            rows.append(row)
    return rows


def report(rows: list[dict], top: int) -> str:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
    for (shape, dtype, kernel), group in groups.items():
        ranked = sorted((r for r in group if r["ms"] is not None and r["ok"]), key=lambda r: r["ms"])
        current = next((r for r in group if r["current"]), None)
        where = (f"current table {current['ms']:.4f} ms, rank {ranked.index(current) + 1} of {len(ranked)}"
                 if current in ranked else "current table not timed")
        lines.append(f"{shape} {dtype} {kernel}: {where}")
        for r in ranked[:top]:
            lines.append(f"  BLOCK_M {r['block_m']:>3} BLOCK_N {r['block_n']:>3} warps {r['warps']} "
                         f"stages {r['stages']}: {r['ms']:.4f} ms" + ("  (current)" if r["current"] else ""))
        wrong = [r for r in group if r["ok"] is False]
        failed = [r for r in group if r["error"]]
        if wrong:
            lines.append(f"  {len(wrong)} tiles computed something else (e.g. {wrong[0]['block_m']}x"
                         f"{wrong[0]['block_n']}, {wrong[0]['warps']} warps, {wrong[0]['stages']} stages)")
        if failed:
            lines.append(f"  {len(failed)} tiles failed, e.g. {failed[0]['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="stage1@128^3,stage2@128^3")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=240.0, metavar="SECONDS")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    if any(k not in KERNELS for k in kernels):
        parser.error(f"--kernels: choose from {KERNELS}")
    if not torch.cuda.is_available():
        print("tune_attention needs a CUDA device: tiles are timed on the GPU they are for", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_limit
    rows = []
    for label in args.shapes.split(","):
        rows += sweep(label, DTYPES[args.dtype], kernels, deadline=deadline)
        if args.out is not None:  # after each shape, so a box that closes keeps what was timed
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(report(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
