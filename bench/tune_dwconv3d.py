"""``python -m bench.tune dwconv3d``: the forward kernel's rolling depth walk, ``kernels/dwconv3d.py``'s
``WALK_STAGES`` and ``PROGRAMS_PER_SM``.

On the H200 session the bf16 forward at (2, 32, 128^3) moved 39% (NCDHW) and 27% (channels-last) of copy bandwidth
with no load in flight beyond the slice a program works on: at 12 to 16 warps per SM that leaves the loads' latency
exposed. Every candidate pipelining depth of the walk's slice loads (1: none; 2, 3: staged through shared memory)
and grid size (programs per SM, from which the walk's runs are cut) is put in place of the module's constants.
``fwd`` times the op's forward; ``fwd+bwd`` the forward and ``torch.autograd.grad`` of x, weight and bias (the
input gradient is the same kernel on the flipped weight; the weight gradient has a kernel of its own, not swept).
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

KERNELS = ("fwd", "fwd+bwd")
SHAPES = ("2x32x128^3 ncdhw", "2x32x128^3 channels_last")


def candidates() -> list[tuple[int, int]]:
    """(WALK_STAGES, PROGRAMS_PER_SM) to try."""
    return list(itertools.product((1, 2, 3), (4, 8, 16)))


def labels() -> list[str]:
    """The shapes it knows: the dwconv3d benchmark's labels."""
    from bench.dwconv3d import _shapes

    return [name for name, _ in (*_shapes(False), *_shapes(True))]


def _inputs(label: str, dtype: torch.dtype, device: torch.device):
    from bench.dwconv3d import _shapes

    for name, spec in (*_shapes(False), *_shapes(True)):
        if name == label:
            b, c, s, k = spec["b"], spec["c"], spec["s"], spec["k"]
            g = torch.Generator(device=device).manual_seed(0)
            w = (torch.randn(c, 1, k, k, k, generator=g, device=device) / k**1.5).to(dtype).requires_grad_()
            bias = torch.randn(c, generator=g, device=device).to(dtype).requires_grad_()
            if spec["layout"] == "tokens":
                x = torch.randn(b, s**3, c, generator=g, device=device).to(dtype).requires_grad_()
                return x, w, bias, (s, s, s)
            fmt = torch.channels_last_3d if spec["layout"] == "channels_last" else torch.contiguous_format
            x = torch.randn(b, c, s, s, s, generator=g, device=device).to(dtype)
            return x.contiguous(memory_format=fmt).requires_grad_(), w, bias, None
    raise ValueError(f"unknown dwconv3d shape {label!r}")


def sweep(label: str, dtype: torch.dtype, kernels=KERNELS, device: torch.device | None = None,
          time_fn: Callable[[Callable[[], object]], float] | None = None, deadline: float | None = None,
          sink: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (kernel, candidate), as :func:`bench.tune.try_plan` fills them (checked with every buffer the op
    allocates filled with NaN first)."""
    import fastseg3d
    from fastseg3d.kernels import dwconv3d as kern

    device = device or torch.device("cuda")
    time_fn = time_fn or default_time_fn
    x, w, bias, spatial = _inputs(label, dtype, device)
    out: list[torch.Tensor] = []

    def forward():
        if spatial is not None:
            return fastseg3d.ops.dwconv3d_tokens(x, spatial, w, bias)
        return fastseg3d.ops.dwconv3d(x, w, bias)

    grad = torch.randn_like(forward())

    def run(kernel: str) -> Callable[[], None]:
        def fwd():
            with torch.no_grad():
                out[:] = [forward()]

        def fwd_bwd():
            y = forward()
            out[:] = [y, *torch.autograd.grad(y, (x, w, bias), grad)]
        return fwd if kernel == "fwd" else fwd_bwd

    current = (kern.WALK_STAGES, kern.PROGRAMS_PER_SM)
    tol = tolerance(dtype)
    rows = []
    with fastseg3d.backend("triton"):
        for kernel in kernels:
            fn = run(kernel)
            poisoned(fn)()  # the planner's own outputs, also written over NaN
            expected = [t.clone() for t in out]
            pool = candidates()
            # the planner's own plan first: a sweep cut by its time limit still has it to compare with
            for cand in [current] + [c for c in pool if c != current]:
                if deadline is not None and time.monotonic() > deadline:
                    return rows

                def patch(cand=cand):
                    stack = contextlib.ExitStack()
                    stack.enter_context(mock.patch.object(kern, "WALK_STAGES", cand[0]))
                    stack.enter_context(mock.patch.object(kern, "PROGRAMS_PER_SM", cand[1]))
                    return stack

                plan = {"WALK_STAGES": cand[0], "PROGRAMS_PER_SM": cand[1]}
                rows.append(try_plan(new_row("dwconv3d", label, dtype, kernel, plan, cand == current), patch, fn,
                                     lambda: [t.clone() for t in out], expected, tol, time_fn, poisoned(fn), sink))
    return rows
