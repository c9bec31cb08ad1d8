"""Which implementation an op runs: the Triton kernel or the pure-PyTorch reference.

The policy is set by ``FASTSEG3D_BACKEND`` (read once, at import) and can be changed for a block of code
with :func:`backend`:

* ``auto`` (default): the Triton kernel where the op supports the case (a CUDA tensor, a supported dtype,
  shape and configuration), otherwise the reference. The reason for a fallback is logged once (logger
  ``fastseg3d``): a warning for CUDA tensors, INFO for others.
  Tensors on the ``meta`` device take the fused op's shapes, so memory can be accounted at any size.
* ``triton``: always the Triton kernel, also on CPU tensors when ``TRITON_INTERPRET=1``; a case the kernel
  cannot run raises :class:`NotImplementedError` with the reasons, never a silent fallback.
* ``torch``: always the reference; the memory-saving recomputations of :mod:`fastseg3d.nn.recompute` run their
  plain compositions too, so a network under ``torch`` is the plain build the benchmarks compare against.

``FASTSEG3D_CHECK_FINITE=1`` (or :func:`check_finite` for a block) makes every fused kernel call check its
floating-point tensor inputs, forward and backward, and raise ``ValueError`` naming the op and the argument that
holds a NaN or an infinity: a kernel's output from such an input may differ from ATen's, and the first fused op to
meet one says where it came in; the DiceCE loss also checks that its labels are class indices (which it does on
a CPU always). Each check reads the tensor and waits for the GPU: for debugging, not training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad

__all__ = [
    "BACKENDS", "HAS_TRITON", "backend", "check_finite", "checking_finite", "environment_error", "get_backend",
    "interpreter_active", "interpreter_requested", "select", "tf32_matmul_allowed", "transform_reasons",
]

BACKENDS = ("auto", "triton", "torch")

logger = logging.getLogger("fastseg3d")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _from_env() -> str:
    name = os.environ.get("FASTSEG3D_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTSEG3D_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _check_finite_from_env() -> bool:
    value = os.environ.get("FASTSEG3D_CHECK_FINITE", "0").strip().lower()
    if value not in ("0", "1", "", "false", "true"):
        raise ValueError(f"FASTSEG3D_CHECK_FINITE must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _read_env(key: str, read):
    """The variable's value, or None with the error kept: ``import fastseg3d`` (and the CLI's ``--help``) must not
    fail on a bad value; the first use of the setting raises it (see :func:`environment_error`)."""
    try:
        return read()
    except ValueError as err:
        _env_errors[key] = str(err)
        return None


_env_errors: dict[str, str] = {}
_state = {"backend": _read_env("backend", _from_env), "check_finite": _read_env("check_finite", _check_finite_from_env)}
_logged: set[tuple[str, str, int]] = set()


def environment_error() -> str | None:
    """What is wrong with ``FASTSEG3D_BACKEND`` or ``FASTSEG3D_CHECK_FINITE`` as set when fastseg3d was imported (None
    when both are valid)."""
    return next(iter(_env_errors.values()), None)


def _setting(key: str) -> object:
    if _state[key] is None:
        raise ValueError(_env_errors[key])
    return _state[key]


def get_backend() -> str:
    """The backend policy in force: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return _setting("backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run a block of code under another backend policy.

    The policy is the process's, not a thread's (as :func:`check_finite`'s setting): autograd runs a CUDA backward
    on threads of its own, which must see the policy the block set; so while the block runs, other threads'
    fastseg3d calls take it too.

    Example:
        >>> import fastseg3d
        >>> with fastseg3d.backend("torch"):
        ...     pass  # every fastseg3d op runs its pure-PyTorch reference here
    """
    policy = name.strip().lower() if isinstance(name, str) else name  # as FASTSEG3D_BACKEND is read
    if policy not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _state["backend"]
    _state["backend"] = policy
    try:
        yield
    finally:
        _state["backend"] = previous


def checking_finite() -> bool:
    """Whether fused kernel calls check their inputs for NaN and infinity (see :func:`check_finite`)."""
    return _setting("check_finite")


@contextlib.contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Within the block, every fused kernel call (forward and backward) checks its floating-point tensor inputs and
    raises ``ValueError`` naming the op and the argument that holds a NaN or an infinity (the references, plain
    PyTorch, are left to ``torch.autograd.detect_anomaly``). Each check reads the tensor and synchronises with the
    GPU; compiled code and CUDA-graph captures are not checked. With fp16 and a gradient scaler, whose first steps
    overflow by design (the scaler skips them), the gradients' check raises on those steps: check in bf16 or fp32.

    Example:
        >>> import torch, fastseg3d
        >>> with fastseg3d.check_finite():
        ...     pass  # a NaN reaching a fused kernel here raises ValueError
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous = _state["check_finite"]
    _state["check_finite"] = enabled
    try:
        yield
    finally:
        _state["check_finite"] = previous


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter now, read as Triton reads it: 1, true, yes, on or
    y in any case."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def interpreter_active() -> bool:
    """True when fastseg3d's Triton kernels run in the interpreter: once they are imported, as
    ``TRITON_INTERPRET`` was when Triton decorated them (a later change of the variable has no effect on them);
    before, as it is now (what Triton will read)."""
    decorated = getattr(sys.modules.get("fastseg3d.kernels.utils"), "INTERPRET", None)
    return interpreter_requested() if decorated is None else decorated


def tf32_matmul_allowed() -> bool:
    """Whether fp32 matmuls may use TF32, as set by either of PyTorch's APIs.

    Once ``torch.backends.fp32_precision`` or ``torch.backends.cuda.matmul.fp32_precision`` has been set, reading
    the legacy ``allow_tf32`` flag raises; the new attribute reflects both (torch >= 2.9)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def device_reasons(device: torch.device) -> list[str]:
    """Why a Triton kernel cannot launch on ``device`` (empty when it can)."""
    if device.type == "meta":
        return []
    if not HAS_TRITON:
        return ["triton is not installed"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and interpreter_active() and get_backend() == "triton":
        return []
    return [f"device={device.type} (Triton kernels run on cuda; on cpu only with TRITON_INTERPRET=1 and the triton "
            "backend)"]


def transform_reasons() -> list[str]:
    """Why no fused op can run now (empty when one can): their autograd has backward formulas only, so under a
    ``torch.func`` transform (grad, jvp, vmap, ...) or forward-mode AD the references run, whose ATen ops support
    them (PyTorch's custom-op autograd refuses ``torch.func.grad`` and gives a zero tangent under ``jvp``)."""
    if torch.compiler.is_compiling():
        return []
    if torch._C._are_functorch_transforms_active() or getattr(forward_ad, "_current_level", -1) >= 0:
        return ["a torch.func transform or forward-mode AD is active (fused ops have backward formulas only)"]
    return []


def decide(op: str, reasons: list[str], policy: str | None = None) -> tuple[str, str]:
    """The implementation ``op`` takes under ``policy`` given its unsupported ``reasons``, and why: "triton",
    "torch", or "error" (the triton policy on a case the kernel cannot take raises)."""
    policy = policy or get_backend()
    if policy == "torch":
        return "torch", "FASTSEG3D_BACKEND=torch"
    if not reasons:
        return "triton", "fused kernel supports this case"
    if policy == "triton":
        return "error", "NotImplementedError under FASTSEG3D_BACKEND=triton: " + "; ".join(reasons)
    return "torch", "; ".join(reasons)


def select(op: str, reasons: list[str], device: torch.device | None = None) -> bool:
    """True when ``op`` should run its Triton kernel, False for the reference.

    ``reasons`` lists why the kernel cannot take this case (empty when it can). Under the ``triton`` policy a
    non-empty list raises :class:`NotImplementedError`; under ``auto`` the reason is logged once: as a warning when
    ``device`` (the inputs') is a CUDA device, where the user expects the kernel and the fallback costs speed or
    memory, else at INFO (on CPU the reference is the expected path; no ``device``: a fallback by design, e.g. a
    converted layer whose configuration the kernel does not take).
    """
    policy = get_backend()
    choice, why = decide(op, reasons, policy)
    if choice == "error":
        raise NotImplementedError(f"fastseg3d.{op}: the Triton kernel cannot run this case: " + "; ".join(reasons))
    if choice == "torch" and policy == "auto" and not torch.compiler.is_compiling():
        level = logging.WARNING if device is not None and device.type == "cuda" else logging.INFO
        key = (op, why, level)  # a reason first met on CPU is still shown when it recurs on a GPU
        if key not in _logged:
            _logged.add(key)
            logger.log(level, "fastseg3d.%s falls back to the PyTorch reference: %s", op, why)
    return choice == "triton"
