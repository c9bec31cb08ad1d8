"""Test helpers: comparisons with dtype-aware tolerances, and a recorder of the aten ops a computation runs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# what zero-fills a tensor (autograd's materialised gradients among them)
ZERO_FILLS = {"aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::fill_", "aten::zero_"}


class AtenOps(TorchDispatchMode):
    """``with AtenOps() as log: ...`` records the name of every op dispatched in the block in ``log.ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))

# (relative RMS error, max abs error relative to the reference's max abs) per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def assert_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, floor: float = 0.0
):
    """Fail with a readable message unless ``actual`` matches ``expected`` within ``dtype``'s tolerance.

    Both the relative RMS error and the largest elementwise error (relative to the reference's scale) are
    checked; NaN or Inf anywhere in ``actual`` fails. ``floor`` is the smallest reference scale errors are measured
    against, for references that are zero up to rounding (e.g. dq of attention over a single key).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    rms_tol, max_tol = (t * scale for t in TOLERANCES[dtype])
    ref_scale = max(e.abs().max().item(), floor, 1e-12)
    err = (a - e).abs()
    rel_rms = (err.pow(2).mean().sqrt() / max(e.pow(2).mean().sqrt().item(), floor, 1e-12)).item()
    rel_max = err.max().item() / ref_scale
    if rel_rms > rms_tol or rel_max > max_tol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: relative RMS error {rel_rms:.3e} (tol {rms_tol:.1e}), max error {rel_max:.3e} of scale "
            f"(tol {max_tol:.1e}); worst at {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}"
        )
