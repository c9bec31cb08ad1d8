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


def assert_backends_agree(net, x, backend: str, floor: float, loss=None, dtype: torch.dtype = torch.float32,
                          autocast: torch.dtype | None = None, scale: float = 10) -> None:
    """A training step of ``net`` under ``backend`` and under the reference backend: the same logits, input gradient
    and every parameter gradient (each measured against ``floor`` times the largest parameter gradient, so that the
    gradients of parameters the loss barely reaches are not judged on their rounding alone). ``loss(output)``
    defaults to the mean square of the logits; ``dtype`` and ``scale`` set the tolerances; ``autocast`` runs the step
    under CPU autocast in that dtype."""
    import contextlib

    import fastseg3d

    loss = loss or (lambda y: y.float().square().mean())
    outs = []
    for name in (backend, "torch"):
        net.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        cast = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with fastseg3d.backend(name):
            with cast:  # the forward and the loss only: backward runs outside autocast, as in training
                y = net(xi)
                value = loss(y)
            value.backward()
        logits = y if isinstance(y, torch.Tensor) else y[0]
        outs.append((logits.detach().float(), xi.grad, [p.grad for p in net.parameters()]))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = outs
    assert_close("logits", y, y_ref, dtype, scale=scale)
    assert_close("dx", dx, dx_ref, dtype, scale=scale)
    floor = floor * max(g.abs().max().item() for g in grads_ref if g is not None)
    checked = 0
    for (name, _), g, g_ref in zip(net.named_parameters(), grads, grads_ref):
        assert (g is None) == (g_ref is None), f"{name}: a gradient on one backend only"
        if g is not None:
            assert_close(name, g, g_ref, dtype, scale=scale, floor=floor)
            checked += 1
    assert checked, "no parameter received a gradient"

