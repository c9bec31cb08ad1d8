"""Helpers shared by the kernel files: the launchers' grid arithmetic in plain Python, bf16 channel pairs, and the
fixed-order sums of per-program partials that make parameter gradients deterministic.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call from Python goes through Triton's
JIT wrapper (about 2 us on a CI core), and a launcher makes up to 15 of them per launch, where the GPU spends about
10 us on SegFormer3D's stage-1 depthwise conv at 128^3. ``cdiv`` and ``next_power_of_2`` here take well under a
microsecond.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

import torch
from torch._library.triton import is_wrap_triton_enabled

from fastseg3d.backends import interpreter_requested

__all__ = ["INTERPRET", "bf16_pair_to_fp32", "cdiv", "max_offset", "needs_int64", "next_power_of_2", "sm_count",
           "sum_partials", "wrap"]


_INT32_MAX = 2**31 - 1
# Whether the kernels run in Triton's interpreter, as Triton read it when it decorated them (this import); the
# launchers read it on every launch, where the environment would cost a microsecond a lookup
INTERPRET = interpreter_requested()
_WRAPPABLE = (triton.runtime.jit.JITFunction, triton.runtime.autotuner.Autotuner)  # what wrap_triton takes
_WRAP_TRITON = torch.library.wrap_triton


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel addresses in ``t``, from its sizes and strides (views included)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor | None, limit: int = _INT32_MAX) -> bool:
    """Whether a kernel must form its offsets into ``tensors`` in 64 bits: Triton multiplies 32-bit indices and
    strides (an integer argument below 2^31 is an i32) in 32 bits, which wraps silently beyond ``limit``."""
    for t in tensors:
        if t is None or _storage_below(t, limit):
            continue
        if max_offset(t) >= limit:
            return True
    return False


def _storage_below(t: torch.Tensor, limit: int) -> bool:
    """Whether ``t``'s storage holds at most ``limit`` elements, so that no offset into it reaches ``limit``: one
    call where the exact bound walks the sizes and strides in Python (four tensors: 1.2 us against 4.2 us on a CI
    core; an attention forward and backward checks 15)."""
    try:
        return t.untyped_storage().nbytes() <= limit * t.element_size()
    except (NotImplementedError, RuntimeError):  # a tensor without a storage to ask (sparse, some subclasses)
        return False


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of ``device``'s GPU, which launchers split work to fill; None under the interpreter
    and off CUDA (``bench.sass`` stands in an H100's count to configure launches on ``meta`` tensors)."""
    if device.type != "cuda" or INTERPRET:
        return None
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, for a launch: the kernel itself where fastseg3d's eager ops turned
    wrapping off, without wrap_triton's checks (about 3 us a launch on a CI core, 270 launches in a SegFormer3D
    step), and in an interpreter whose kernels wrap_triton does not take (Triton 3.6's InterpretedFunction); the
    traceable wrapper where a ``triton_op`` is traced."""
    if not is_wrap_triton_enabled():
        return kernel
    if INTERPRET and not isinstance(kernel, _WRAPPABLE) and torch.library.wrap_triton is _WRAP_TRITON:
        return kernel  # nothing traces under the interpreter; a stand-in (bench.sass capturing launches) gets it
    return torch.library.wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def f32(x):
    """A float argument as fp32. Eager launches type a Python float fp32, but torch.compile's Inductor passes the
    float arguments of user kernels as fp64 (torch >= 2.11), which would turn the fp32 math around them fp64 (and
    loop-carried fp32 values into type errors). ``full`` rather than ``.to``: an int argument equal to 1 arrives as
    a constant, which has no ``.to``."""
    return tl.full([], x, tl.float32)


@triton.jit
def bf16_pair_to_fp32(v):
    """(even, odd): the fp32 values of the two bf16 halves of int32 ``v`` (low half first, as in memory). The low
    half's fp32 is a shift and the high half's a mask, where splitting a vector of bf16 costs a byte permute and a
    shift for every odd element."""
    return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _sum_columns(src_ptr, out_ptr, P, K, C, col0, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 INT64: tl.constexpr):
    # columns n = k * C + c of a (P, K, C) fp32 source, summed over P in a fixed order, written to out[c * K + k]
    kc = K * C
    if INT64:  # the columns too: attention's dk partials have K * C = B * M * H * d
        kc = tl.full([], K, tl.int64) * C
    n = col0 + tl.arange(0, BLOCK_N)
    n_ok = n < kc
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & n_ok[None, :]
        if INT64:
            p = p.to(tl.int64)
        acc += tl.load(src_ptr + p[:, None] * kc + n[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + (n % C) * K + n // C, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_partials_kernel(a_ptr, out_a_ptr, KA, b_ptr, out_b_ptr, KB, P, C, BLOCKS_A,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    if pid < BLOCKS_A:
        _sum_columns(a_ptr, out_a_ptr, P, KA, C, pid * BLOCK_N, BLOCK_P, BLOCK_N, INT64)
    else:
        _sum_columns(b_ptr, out_b_ptr, P, KB, C, (pid - BLOCKS_A) * BLOCK_N, BLOCK_P, BLOCK_N, INT64)


def sum_partials(a: torch.Tensor, out_a: torch.Tensor, b: torch.Tensor | None = None,
                 out_b: torch.Tensor | None = None) -> None:
    """One launch: ``out_a`` (C, K) contiguous, in its own dtype, = ``a.sum(0).transpose`` for fp32 partials ``a``
    (P, K, C) contiguous, summed over P in a fixed order (deterministic); likewise ``out_b`` from ``b`` (P, K', C),
    with the same P and C, when given (a weight's and a bias's gradient)."""
    p, ka, c = a.shape
    kb = b.shape[1] if b is not None else 0
    # the interpreter costs per program: wide tiles there
    block_n = min(next_power_of_2(max(ka, kb) * c), 8192 if INTERPRET else 256)
    block_p = min(next_power_of_2(p), max(1, 2048 // block_n))
    blocks_a = cdiv(ka * c, block_n)
    wrap(_sum_partials_kernel)[(blocks_a + cdiv(kb * c, block_n),)](
        a, out_a, ka, b if b is not None else a, out_b if out_b is not None else out_a, kb, p, c, blocks_a,
        BLOCK_P=block_p, BLOCK_N=block_n, INT64=(p + block_p) * max(ka, kb) * c > _INT32_MAX, num_warps=4,
    )
