"""Sweep a fused op's launch plans on a GPU: which tiles, warps and pipeline depths its planner should hold.

    python -m bench.tune attention  [--shapes stage1@128^3,stage2@128^3] [--kernels fwd,dq,dkdv]
    python -m bench.tune dwconv3d   [--shapes "2x32x128^3 ncdhw,2x32x128^3 channels_last"]
    python -m bench.tune kl_distill [--shapes "2x14x128^3 dsd 6 pairs deconv heads"] [--kernels fwd,transpose]
                                    [--dtype bf16] [--top 5] [--time-limit 240] [--out FILE.json]

The planners' choices were made from sm_90 cubins alone (registers, spills, instructions per output: ``bench.sass``);
the H200 session measured the results short of their targets (attention's stage-1 forward at 12% of the
exponential bound, dwconv3d's forward at 39% of copy bandwidth, the DSD KL at 23% of the memory roofline). For
each shape (the op's benchmark labels) and kernel, every candidate plan is put in place of the planner's answer
for that kernel only, checked against the current plan's outputs (written over NaN, compared relative to each
output's scale: a plan that computes something else or leaves an output partly unwritten is reported, not ranked)
and timed as a CUDA graph's replay (``triton.testing.do_bench_cudagraph``, the median: the GPU's time
without the host's, with the L2 cache warm, so comparable between plans rather than with the benchmark rows).
Candidates that fail to compile (shared memory, registers) are listed with the reason. Prints the fastest ``--top``
per (shape, kernel) with the current plan's time and rank; ``--out`` writes every result as JSON as it is
measured. The per-op candidates and runs are in ``bench/tune_<op>.py``.
"""

from __future__ import annotations

import time

_START = time.monotonic()  # --time-limit counts from here: the imports take seconds of a time box too

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.utils import device_lost, first_line  # noqa: E402

__all__ = ["OPS", "main", "nan_empty", "poisoned", "report", "try_plan"]

OPS = ("attention", "dwconv3d", "kl_distill")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_time_fn(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype != torch.float32 else 1e-4


def nan_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` filled with NaN (floating dtypes): a plan that leaves part of an output unwritten fails its
    check instead of passing on the previous plan's values left in reused memory."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


def poisoned(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every buffer fastseg3d's ops allocate (``fastseg3d.ops.utils.empty``) filled with NaN first."""
    from unittest import mock

    from fastseg3d.ops import utils as op_utils

    def run():
        with mock.patch.object(op_utils, "empty", nan_empty):
            return fn()
    return run


def matches(got: torch.Tensor, expected: torch.Tensor, tol: float) -> bool:
    """Equal within ``tol`` relative to the expected tensor's own scale (the KL's gradients are about 1e-6, far
    below any fixed absolute tolerance); NaN anywhere fails."""
    got, expected = got.float(), expected.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return torch.allclose(got, expected, rtol=tol, atol=tol * scale)


def try_plan(row: dict, patch: Callable[[], object], fn: Callable[[], object],
             results: Callable[[], list[torch.Tensor]], expected: list[torch.Tensor], tol: float,
             time_fn: Callable[[Callable[[], object]], float], check: Callable[[], object] | None = None,
             sink: Callable[[dict], None] | None = None) -> dict:
    """Under ``patch()`` (a context manager putting the candidate in place of the planner's answer): run ``check``
    (``fn`` with its outputs poisoned; default ``fn``), compare ``results()`` with ``expected``, then time ``fn``;
    fills ``row``'s ``ok``, ``ms`` or ``error`` and hands it to ``sink``. A lost device is raised: every later CUDA
    call would fail too."""
    try:
        with patch():
            (check or fn)()
            row["ok"] = all(matches(a, e, tol) for a, e in zip(results(), expected))
            row["ms"] = time_fn(fn)
    except Exception as err:  # noqa: BLE001  (a plan the compiler or the GPU refuses is a result)
        if device_lost(err):
            raise
        row["error"] = first_line(err)
    if sink is not None:
        sink(row)
    return row


def new_row(op: str, label: str, dtype: torch.dtype, kernel: str, plan: dict, current: bool) -> dict:
    return {"op": op, "shape": label, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "plan": plan,
            "current": current, "ms": None, "ok": None, "error": None}


def _plan_text(plan: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in plan.items())


def report(rows: list[dict], top: int) -> str:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["kernel"]), []).append(r)
    for (op, shape, dtype, kernel), group in groups.items():
        ranked = sorted((r for r in group if r["ms"] is not None and r["ok"]), key=lambda r: r["ms"])
        current = next((r for r in group if r["current"]), None)
        where = (f"current plan {current['ms']:.4f} ms, rank {ranked.index(current) + 1} of {len(ranked)}"
                 if current in ranked else "current plan not timed")
        lines.append(f"{op} {shape} {dtype} {kernel}: {where}")
        for r in ranked[:top]:
            lines.append(f"  {_plan_text(r['plan'])}: {r['ms']:.4f} ms" + ("  (current)" if r["current"] else ""))
        wrong = [r for r in group if r["ok"] is False]
        failed = [r for r in group if r["error"]]
        if wrong:
            lines.append(f"  {len(wrong)} plans computed something else (e.g. {_plan_text(wrong[0]['plan'])})")
        if failed:
            lines.append(f"  {len(failed)} plans failed, e.g. {failed[0]['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=OPS)
    parser.add_argument("--shapes", default=None, help="comma-separated benchmark labels (default: the op's own)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--kernels", default=None, help="comma-separated kernels of the op (default: all)")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=240.0, metavar="SECONDS")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tuner = importlib.import_module(f"bench.tune_{args.op}")
    kernels = args.kernels.split(",") if args.kernels else list(tuner.KERNELS)
    if any(k not in tuner.KERNELS for k in kernels):
        parser.error(f"--kernels: choose from {tuner.KERNELS}")
    labels = args.shapes.split(",") if args.shapes else list(tuner.SHAPES)
    unknown = [label for label in labels if label not in tuner.labels()]
    if unknown:
        parser.error(f"--shapes: unknown {args.op} shapes {unknown}; known: {tuner.labels()}")
    if not torch.cuda.is_available():
        print("bench.tune needs a CUDA device: plans are timed on the GPU they are for", file=sys.stderr)
        return 2
    deadline = _START + args.time_limit
    rows: list[dict] = []

    def sink(row: dict) -> None:  # every row on disk as it is measured: a box that closes keeps what was timed
        rows.append(row)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            partial = args.out.with_name(args.out.name + ".partial")  # a SIGTERM mid-write keeps the last whole file
            partial.write_text(json.dumps(rows, indent=1) + "\n")
            os.replace(partial, args.out)

    def stop(signum, frame):  # timeout(1) sends SIGTERM when the box closes
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        # kernel by kernel over the shapes: a box that closes early has the first kernel (the one the targets are
        # on) at every shape
        for kernel in kernels:
            for label in labels:
                tuner.sweep(label, DTYPES[args.dtype], [kernel], deadline=deadline, sink=sink)
    except KeyboardInterrupt:
        print("bench.tune: stopped; the plans timed so far:", file=sys.stderr)
    print(report(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
