"""``python -m bench.tune kl_distill``: the fused KL's tiles, ``kernels/kl_distill.py``'s ``_fwd_tile`` and
``_transpose_tile``.

On the H200 session DSD's six full-resolution pairs (14 classes, bf16) moved 23% of the memory roofline: the
forward holds a voxel's classes of the teacher and three students per thread, two voxels each (238 registers on
sm_90, two programs of four warps per SM), which leaves few loads in flight. Candidates: the forward's voxels per
thread (VEC; 1 for upsampled inputs, whose loads are gathers) and warps, BLOCK_V = VEC x 32 x warps (up to 16
classes, a voxel's classes in one thread); the transposed interpolation's BLOCK_V and warps (interpolated heads
only). Both kernels are timed as the op's launches for every group of the shape, the losses and all input
gradients (which its forward computes), without autograd: a backward captured in a CUDA graph would add a pass
over every gradient (outside capture the op hands them back as they are).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from unittest import mock

import torch

from bench.tune import default_time_fn, new_row, poisoned, tolerance, try_plan

__all__ = ["KERNELS", "SHAPES", "candidates", "labels", "sweep"]

KERNELS = ("fwd", "transpose")
SHAPES = ("2x14x128^3 dsd 6 pairs deconv heads", "2x14x128^3 dsd 6 pairs interp heads")


def candidates(kernel: str, k_pad: int, same_res: bool) -> list[tuple[int, ...]]:
    """fwd: (BLOCK_V, VEC, num_warps); transpose: (BLOCK_V, num_warps)."""
    if kernel == "transpose":
        return list(itertools.product((128, 256, 512), (4, 8)))
    if k_pad > 16:
        return []  # wider class counts keep the table's layout (classes over threads and warps)
    # four voxels a thread hold 256 logits of DSD's four inputs: 255 registers and 248 bytes spilled on sm_90
    return [(vec * 32 * warps, vec, warps) for vec in ((1, 2) if same_res else (1,)) for warps in (2, 4, 8)]


def labels() -> list[str]:
    """The shapes it knows: the kl_distill benchmark's labels."""
    from bench.kl_distill import _shapes

    return [name for name, _ in (*_shapes(False), *_shapes(True))]


def _inputs(label: str, dtype: torch.dtype, device: torch.device):
    from bench.kl_distill import _shapes

    for name, spec in (*_shapes(False), *_shapes(True)):
        if name == label:
            b, k, s = spec["b"], spec["k"], spec["s"]
            g = torch.Generator(device=device).manual_seed(0)

            def logits(f):
                return torch.randn(b, k, s // f, s // f, s // f, generator=g, device=device).to(dtype)

            groups = [(logits(tf), [logits(f) for f in sfs]) for tf, sfs in spec["groups"]]
            return groups, (s, s, s)
    raise ValueError(f"unknown kl_distill shape {label!r}")


def sweep(label: str, dtype: torch.dtype, kernels=KERNELS, device: torch.device | None = None,
          time_fn: Callable[[Callable[[], object]], float] | None = None, deadline: float | None = None,
          sink: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (kernel, candidate), as :func:`bench.tune.try_plan` fills them (checked with every buffer the op
    allocates filled with NaN first)."""
    from fastseg3d.kernels import kl_distill as kern
    from fastseg3d.ops.kl_distill import _kl_distill_launch

    device = device or torch.device("cuda")
    time_fn = time_fn or default_time_fn
    groups, size = _inputs(label, dtype, device)
    out: list[torch.Tensor] = []

    def fn():
        results = []
        for teacher, students in groups:
            total, per, grads, g_t = _kl_distill_launch(students, teacher, 3.0, size, [1.0] * len(students),
                                                        [True] * (len(students) + 1))
            results += [per, *grads, g_t]
        out[:] = results

    check = poisoned(fn)

    # the plans the tables give, and the cases they see, recorded on the table's own run
    seen: dict[str, set] = {"fwd": set(), "transpose": set()}
    fwd_table, transpose_table = kern._fwd_tile, kern._transpose_tile

    def record_fwd(k, k_pad, nvox, n_s, same_res):
        plan = fwd_table(k, k_pad, nvox, n_s, same_res)
        seen["fwd"].add((plan, k_pad, same_res))
        return plan

    def record_transpose(k_pad, n_low):
        plan = transpose_table(k_pad, n_low)
        seen["transpose"].add((plan, k_pad, True))
        return plan

    tol = tolerance(dtype)
    rows = []
    with mock.patch.object(kern, "_fwd_tile", record_fwd), \
            mock.patch.object(kern, "_transpose_tile", record_transpose):
        check()
    expected = [t.clone() for t in out]
    for kernel in kernels:
        if not seen[kernel]:
            continue  # e.g. no transposed interpolation where every input is at full resolution
        # every launch of the kernel takes the candidate: the groups of a shape share their class count
        currents = sorted({plan for plan, _, _ in seen[kernel]})
        k_pad = max(k for _, k, _ in seen[kernel])
        same_res = all(same for _, _, same in seen[kernel])
        names = ("BLOCK_V", "VEC", "warps") if kernel == "fwd" else ("BLOCK_V", "warps")
        target = "_fwd_tile" if kernel == "fwd" else "_transpose_tile"
        # the table's own run first (its launches may differ in plan, e.g. by size)
        table_plan = dict(zip(names, currents[0])) if len(currents) == 1 else {"table": currents}
        pool = [(None, table_plan)] + [(c, dict(zip(names, c))) for c in candidates(kernel, k_pad, same_res)
                                       if [c] != currents]
        for cand, plan in pool:
            if deadline is not None and time.monotonic() > deadline:
                return rows

            def patch(cand=cand, target=target):
                if cand is None:
                    return contextlib.nullcontext()
                return mock.patch.object(kern, target, lambda *args, cand=cand: cand)

            rows.append(try_plan(new_row("kl_distill", label, dtype, kernel, plan, cand is None), patch, fn,
                                 lambda: [t.clone() for t in out], expected, tol, time_fn, check, sink))
    return rows
