"""Test tiers: the CPU tier runs by default; ``interpret`` tests need ``TRITON_INTERPRET=1`` in their own pytest
process (Triton reads it when kernels are decorated, and it breaks compile/opcheck); ``gpu`` tests need CUDA."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from fastseg3d.backends import interpreter_active

INTERPRET = interpreter_active()
_STARTED = time.monotonic()
_SECONDS: dict[str, float] = {}  # a test's setup, call and teardown times so far (the durations log)


def _gpu_rank(item) -> int:
    """The GPU tier's order: bf16 and dtype-free tests (what only a GPU can check) before the fp32 and fp16 cases,
    which the interpreter tier also runs, so that a tier cut by its time box has checked the former."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    # a dtype parameter, or dtypes inside a tuple parameter ((x dtype, residual dtype), say)
    dtypes = {d for v in params.values() for d in (v if isinstance(v, tuple) else (v,)) if isinstance(d, torch.dtype)}
    if dtypes:
        return int(dtypes <= {torch.float32, torch.float16})
    return int(bool(re.search(r"(?<![a-z])(float|fp)(16|32)(?![0-9a-z_])|(?<![a-z])float(16|32)_[0-9]", item.nodeid)))


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest -m interpret)")
    skip_not_interp = pytest.mark.skip(reason="compile/opcheck tests cannot run under TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpret" in item.keywords:
            if not INTERPRET:
                item.add_marker(skip_interp)
        elif INTERPRET:
            item.add_marker(skip_not_interp)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    items.sort(key=lambda item: _gpu_rank(item) if "gpu" in item.keywords else 0)  # stable: else as collected
    # a GPU tier cut by its time box goes on where it stopped: the tests that passed in an earlier run are left out
    path = os.environ.get("FASTSEG3D_SKIP_PASSED")
    if path:
        with open(path) as f:  # a test's last line decides (a teardown error follows its call's "passed")
            last = dict(reversed(line.strip().split(" ", 1)) for line in f if " " in line.strip())
        passed = {nodeid for nodeid, outcome in last.items() if outcome == "passed"}
        done = [item for item in items if item.nodeid in passed]
        if done:
            config.hook.pytest_deselected(items=done)
            items[:] = [item for item in items if item.nodeid not in passed]


def pytest_runtest_logreport(report):
    """With ``FASTSEG3D_FAILURE_LOG`` set (bench/gpu_check.sh sets it), each failure's traceback is appended to that
    file as the test ends: a GPU run cut by its time box prints no summary, and its failures would say nothing.
    With ``FASTSEG3D_RESULTS_LOG`` set, one line ``<outcome> <node id>`` per test as it ends (the file that
    ``FASTSEG3D_SKIP_PASSED`` reads back). With ``FASTSEG3D_DURATIONS_LOG`` set, one line ``<seconds since the
    session began> <worker> <seconds the test took> <node id>`` per test as it ends: where a tier cut by its box
    spent its time (pytest's --durations summary is printed only at the end)."""
    # under pytest-xdist the controller receives every worker's reports: it alone writes
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    failures, results = os.environ.get("FASTSEG3D_FAILURE_LOG"), os.environ.get("FASTSEG3D_RESULTS_LOG")
    durations = os.environ.get("FASTSEG3D_DURATIONS_LOG")
    try:  # the logs are a convenience: an unwritable path must not stop the run
        if failures and report.failed:
            with open(failures, "a") as f:
                f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
        # a test ends at its call, or at a setup that failed or skipped; a teardown error fails a passed test
        ended = report.when == "call" or (report.when == "setup" and not report.passed) or report.failed
        if results and ended:
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            with open(results, "a") as f:
                f.write(f"{outcome} {report.nodeid}\n")
        if durations:
            seconds = _SECONDS.pop(report.nodeid, 0.0) + report.duration
            # a test ends at its teardown, or at the report xdist makes for a worker that crashed during it
            if report.when not in ("setup", "call"):
                worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "-")
                with open(durations, "a") as f:
                    f.write(f"{time.monotonic() - _STARTED:.1f} {worker} {seconds:.1f} {report.nodeid}\n")
            else:
                _SECONDS[report.nodeid] = seconds
    except OSError:
        pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_determinism():
    """A training run under test turns deterministic algorithms on for the process; the tests after it must not
    inherit them (ATen then decomposes its upsampling, for one)."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = state[2], state[3]


@pytest.fixture
def no_tf32():
    """True fp32 matmuls and convs for the test, restored after it. Not monkeypatch: from pytest 9.1 on, its undo
    deletes what it took for an instance attribute, which ``torch.backends.cuda.matmul`` (attributes served by
    ``__getattr__``) refuses, an error at every such test's teardown that leaves TF32 off."""
    state = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


@pytest.fixture
def poison(monkeypatch):
    """Every buffer fastseg3d hands to a kernel starts as NaN, so an unwritten element fails the comparison."""
    from fastseg3d.ops import utils

    real_empty = utils.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(utils, "empty", nan_empty)


@pytest.fixture(autouse=True)
def _bf16_as_on_gpu(request, monkeypatch):
    """Under the interpreter, bf16 as a GPU computes it. Triton's interpreter holds bf16 values as their uint16 bit
    patterns: ``tl.dot`` on them multiplies the integers, and a cast from fp32 truncates where the GPU rounds to
    nearest even. A GPU's bf16 dot multiplies exactly and accumulates in fp32, which a dot of the operands widened
    to fp32 reproduces up to summation order."""
    if not INTERPRET or "interpret" not in request.keywords:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def to_fp32(handle):
        bits = torch.from_numpy(np.ascontiguousarray(handle.data).view(np.int16))
        return interpreter.TensorHandle(bits.view(torch.bfloat16).float().numpy(), tl.float32)

    real_dot = interpreter.InterpreterBuilder.create_dot
    real_cast = interpreter.InterpreterBuilder.cast_impl

    def dot(self, a, b, d, *args):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a, b = (to_fp32(t) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return real_dot(self, a, b, d, *args)

    def cast(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return real_cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast)
    yield


@pytest.fixture(autouse=True)
def _launches_checked(request, monkeypatch):
    """Under the interpreter, two checks of every kernel access the mask lets through:

    - bounds: it falls inside one of the launch's tensor arguments (the extent of its view): an out-of-bounds read
      whose value is later discarded passes every comparison on CPU and faults, or reads garbage, on a GPU;
    - hazards: the interpreter runs a launch's programs one after another, a GPU at once and in any order, so no
      byte that one program of a launch writes may be written or read by another program of that launch (partial
      sums go to per-program workspaces that a later launch reduces): a race there passes on CPU and breaks on a
      GPU.
    """
    if not INTERPRET or "interpret" not in request.keywords:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    extents: list[tuple[int, int]] = []
    program = [None]
    log: dict[str, list] = {"load": [], "store": []}
    violations: list[str] = []

    real_init = interpreter.GridExecutor._init_args_hst
    real_call = interpreter.GridExecutor.__call__
    real_set_grid_idx = interpreter.InterpreterBuilder.set_grid_idx
    real_load = interpreter.InterpreterBuilder.create_masked_load
    real_store = interpreter.InterpreterBuilder.create_masked_store
    real_rmw = interpreter.InterpreterBuilder.create_atomic_rmw

    def init_args(self, args_dev, kwargs):
        args, kw = real_init(self, args_dev, kwargs)
        extents.clear()
        for t in [*args, *kw.values()]:
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
                extents.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))
        return args, kw

    def set_grid_idx(self, x, y, z):
        program[0] = (x, y, z)
        return real_set_grid_idx(self, x, y, z)

    def check(kind, ptrs, mask):
        """Bounds now; the bytes touched kept (with the program) for the launch's hazard check."""
        addr = np.asarray(ptrs.data)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data).astype(bool), addr.shape)]
        if addr.size == 0:
            return
        size = ptrs.dtype.element_ty.primitive_bitwidth // 8
        lo, hi = int(addr.min()), int(addr.max()) + size
        if not any(start <= lo and hi <= end for start, end in extents):
            name = getattr(getattr(request, "node", None), "name", "?")
            violations.append(f"{name}: {kind} of [{lo:#x}, {hi:#x}) outside every tensor argument")
        touched = addr.ravel() if size == 1 else (addr.reshape(-1, 1) + np.arange(size, dtype=addr.dtype)).ravel()
        log["store" if kind == "store" else "load"].append((touched, program[0]))

    def load(self, ptrs, mask, *args):
        check("load", ptrs, mask)
        return real_load(self, ptrs, mask, *args)

    def store(self, ptrs, value, mask, *args):
        check("store", ptrs, mask)
        return real_store(self, ptrs, value, mask, *args)

    def rmw(self, op, ptrs, value, mask, *args):
        check("atomic", ptrs, mask)
        return real_rmw(self, op, ptrs, value, mask, *args)

    def flat(entries, ids):
        if not entries:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return (np.concatenate([a for a, _ in entries]),
                np.concatenate([np.full(a.shape, ids.setdefault(p, len(ids)), np.int64) for a, p in entries]))

    def call(self, *args, **kwargs):
        log["load"].clear()
        log["store"].clear()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            ids: dict = {}
            stored, by = flat(log["store"], ids)
            loaded, reader = flat(log["load"], ids)
            log["load"].clear()
            log["store"].clear()
            if stored.size:
                order = np.lexsort((by, stored))
                stored, by = stored[order], by[order]
                addresses, first = np.unique(stored, return_index=True)
                lowest, highest = by[first], by[np.r_[first[1:], stored.size] - 1]
                name = getattr(self.fn, "__name__", "?")
                if (lowest != highest).any():
                    violations.append(f"{name}: {int((lowest != highest).sum())} bytes written by two programs")
                at = np.minimum(np.searchsorted(addresses, loaded), addresses.size - 1)
                other = (addresses[at] == loaded) & ((lowest[at] != reader) | (highest[at] != reader))
                if other.any():
                    violations.append(f"{name}: {int(other.sum())} byte reads of what another program writes")

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", init_args)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", set_grid_idx)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", rmw)
    yield
    assert not violations, "\n".join(violations[:5])
