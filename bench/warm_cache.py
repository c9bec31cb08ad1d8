"""A Triton cache for a GPU session, compiled here without a GPU.

Most of a short GPU session's test tier is Triton compiling, and the network-scale GPU tests compile theirs one
after another in one worker, longer than their box. This module compiles the kernels beforehand, on a machine
without a GPU, into a Triton cache that the device call carries, so the GPU run finds them compiled.

Four plans run on ``meta`` tensors what the GPU session runs: ``gpu_tests``, the GPU test tier itself (``tests -m
gpu``, but the ``torch.compile`` tests, each test as far as it gets on meta tensors: :class:`_GpuTestsOnMeta`);
``targets``, the benchmark target plan of ``bench/gpu_check.sh`` (its ``TARGET_ARGS``); ``largest_cube``, the sides
the fused SegFormer3D's cube search tries; ``tune``, the candidates of ``bench.tune``'s sweeps. Every fused op call
is recorded and replayed through the function that makes the op's launches, with the launches captured (as
``bench.sass`` does), and each distinct launch goes to Triton's own JIT under a stand-in CUDA driver (target sm_90)
with ``warmup=True``: the JIT specialises the arguments and computes the cache key itself, so the keys are the ones
the GPU run computes, given the same Triton wheel, ptxas (Triton's own on both sides: :func:`ptxas`), Python and
fastseg3d source (the kernels' line numbers count); ``--install`` warns where the first three differ. Build with the
GPU image's versions (the venv of bench/README.md's gpu_check section: Triton 3.6, Python 3.12) from the tree the
device call carries::

    /tmp/v212/bin/python -m bench.warm_cache --out .triton-cache.tgz      # then carry [".whl", ".triton-cache.tgz"]
    python3 -m bench.warm_cache --dry-run --plan gpu_tests               # the distinct launches, by kernel
    python3 -m bench.warm_cache --install .triton-cache.tgz --dir DIR    # on the GPU machine (gpu_check does it)
    python3 -m bench.warm_cache --report DIR                              # what the GPU run still compiled itself

Only binaries and metadata are kept (``TRITON_STORE_BINARY_ONLY``). Triton records each file's absolute path in the
cache, so ``--install`` rewrites them for the directory it extracts into. Not covered: the kernels ``torch.compile``
builds (its own copies of the user kernels) and a test's launches after the point where it needs real values.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.utils import first_line

__all__ = ["collect", "compile_launches", "distinct", "install", "launches_of", "ptxas", "ptxas_variable", "report"]

MANIFEST = "fastseg3d-manifest.json"
SM90 = ("cuda", 90, 32)


class _Driver:
    """What Triton's JIT asks of its driver before it compiles: an sm_90 target, device 0, a stream."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*SM90)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


class _DevicePointer:
    """A CUDA tensor as the JIT's specialisation reads it: its dtype and an address whose alignment is the view's
    (allocations start 512-byte aligned, so a view's alignment is its storage offset's)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = 2**20 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _network_calls(build, shape, dtype, train: bool, loss=None, input_grad: bool = False) -> list:
    """The fused op calls of a forward (and, when ``train`` or ``input_grad``, backward) of ``build()`` on meta
    tensors of ``shape`` under emulated CUDA autocast to ``dtype``."""
    from bench.sass import _FusedCalls
    from fastseg3d.profile import _autocast_on_meta

    torch.manual_seed(0)
    model = build().to("meta").train(train)
    x = torch.empty(shape, device="meta", requires_grad=input_grad)
    recorder = _FusedCalls()
    with recorder:
        with _autocast_on_meta(dtype):
            y = model(x)
            value = loss(y) if loss else (y if isinstance(y, torch.Tensor) else y[0]).float().square().mean()
        if train or input_grad:
            value.backward()
    return recorder.calls


def _case_calls(name: str, dtype_name: str, shape_patterns: list[str] | None, modes: tuple[str, ...]) -> list:
    """The fused op calls of a benchmark case's ``fastseg3d`` provider on meta tensors: each selected shape's
    forward, and backward where ``modes`` asks for it (model cases: their training step and inference, as
    ``bench.sass.profile_network`` runs them)."""
    import fnmatch

    from bench.models import NETWORKS
    from bench.registry import load_cases
    from bench.run import DTYPES
    from bench.sass import _FusedCalls

    case = load_cases()[name]
    dtype = DTYPES[dtype_name]
    calls = []
    for label, spec in case.shapes(False):
        if shape_patterns and not any(fnmatch.fnmatchcase(label, p) for p in shape_patterns):
            continue
        if case.suite == "model":
            net = NETWORKS[name]
            label_t = torch.zeros(spec["b"], 1, *(spec["side"],) * 3, dtype=torch.long, device="meta")
            shape = (spec["b"], net.in_channels, *(spec["side"],) * 3)
            if "train_step" in modes:
                calls += _network_calls(lambda: net.build(spec["cfg"], False), shape, dtype, True,
                                        loss=lambda y: net.loss(False)(y, label_t))
            if "infer" in modes:
                with torch.no_grad():
                    calls += _network_calls(lambda: net.build(spec["cfg"], False), shape, dtype, False)
            continue
        setup = case.setup(spec, dtype, "fastseg3d", torch.device("meta"))
        recorder = _FusedCalls()
        with recorder:
            if "fwd" in modes:
                with torch.no_grad():
                    setup.forward()
            if ("fwd+bwd" in modes or "bwd" in modes) and setup.grads_of:
                y = setup.forward()
                y.backward(torch.ones_like(y))
        calls += recorder.calls
    return calls


class _CudaAsMeta(TorchFunctionMode):
    """CUDA tensors made meta ones: a device argument naming CUDA names ``meta``, ``.cuda()`` moves to meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to("meta")
        if getattr(func, "__self__", None) is torch.Tensor.is_cuda:  # the property's getter
            return True
        return func(*map(_meta, args), **{k: _meta(v) for k, v in kwargs.items()})


class _MetaValues(TorchDispatchMode):
    """Values read from meta tensors: ``torch.equal`` and ``torch.allclose`` hold, a number is 1 and a flag False
    (a rejection loop ends); only the calls around them matter here. A test that reads too many (a loop on them) is
    stopped."""

    LIMIT = 100_000

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        comparisons = (torch.ops.aten.equal.default, torch.ops.aten.allclose.default)
        if (func is torch.ops.aten._local_scalar_dense.default or func in comparisons) and args[0].is_meta:
            self.reads += 1
            if self.reads > self.LIMIT:
                raise RuntimeError(f"{self.LIMIT} values read from meta tensors: a loop on them")
            if func in comparisons:
                return True
            t = args[0]
            return False if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        return func(*args, **(kwargs or {}))


def _meta(value):
    if isinstance(value, str) and value.startswith("cuda") or isinstance(value, torch.device) and value.type == "cuda":
        return "meta"
    return value


class _GpuTestsOnMeta:
    """A pytest plugin that runs the GPU tier on meta tensors and records each test's fused op calls: CUDA tensors
    are meta ones (:class:`_CudaAsMeta`), CUDA autocast is emulated, comparisons and the CUDA memory calls do
    nothing, values read from meta tensors are stand-ins (:class:`_MetaValues`). A test stops where it needs more
    (a generator on the GPU, a kernel launched outside an op, an assertion on a value); the calls it made until
    then are kept."""

    def __init__(self, launches: list):
        self.launches = launches
        self._available = None

    def pytest_configure(self, config):
        # the conftest skips the GPU tests where CUDA is not available
        self._available = mock.patch.object(torch.cuda, "is_available", lambda: True)
        self._available.start()

    def pytest_unconfigure(self, config):
        self._available.stop()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        from bench.sass import _FusedCalls
        from fastseg3d.profile import _autocast_on_meta

        real_autocast = torch.autocast

        def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type in ("cuda", "meta"):
                return _autocast_on_meta(dtype or torch.float16) if enabled else contextlib.nullcontext()
            return real_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        def nothing(*args, **kwargs):
            return 0

        recorder = _FusedCalls()
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch, "autocast", autocast))
            for name in ("synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                         "empty_cache", "_sleep"):
                stack.enter_context(mock.patch.object(torch.cuda, name, nothing))
            stack.enter_context(mock.patch.object(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30)))
            stack.enter_context(mock.patch.object(torch.testing, "assert_close", nothing))
            stack.enter_context(mock.patch.object(torch, "Generator", _cpu_generator))
            for module in {item.module, sys.modules.get("tests.utils")} - {None}:
                if hasattr(module, "assert_close"):
                    stack.enter_context(mock.patch.object(module, "assert_close", nothing))
            stack.enter_context(_CudaAsMeta())
            stack.enter_context(recorder)
            stack.enter_context(_MetaValues())
            yield
        # before the test's teardown undoes its settings (TF32, determinism), which the launchers read
        self.launches += launches_of(recorder.calls)


def _gpu_tests_plan() -> list:
    """The launches of every GPU test (tests -m gpu) as far as each runs on meta tensors; not the
    ``torch.compile`` tests (Inductor compiles its own copies of the kernels)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launches: list = []
    pytest.main([os.path.join(root, "tests"), "-m", "gpu", "-k", "not compile", "-q", "-p", "no:cacheprovider",
                 "--no-header", "--tb=line", "-rN", "--rootdir", root], plugins=[_GpuTestsOnMeta(launches)])
    print("(on meta tensors: a failed test stopped early, and its launches until then are kept)")
    return launches


def _target_plan() -> list:
    """bench/gpu_check.sh's target plan (its TARGET_ARGS): each case's shapes, dtypes and modes."""
    from bench.registry import load_cases
    from bench.utils import gpu_check_target_args

    calls = []
    for name, args in gpu_check_target_args().items():
        opts = dict(zip(args[::2], args[1::2]))
        case = load_cases()[name]
        modes = tuple(opts.get("--modes", ",".join(case.modes)).split(","))
        shapes = opts["--shapes"].split(",") if "--shapes" in opts else None
        for dtype in opts.get("--dtype", case.dtypes[0]).split(","):
            try:
                calls += _case_calls(name, dtype, shapes, modes)
            except Exception as e:  # a case that cannot run on meta compiles on the GPU instead
                print(f"warm_cache: {name} {dtype} skipped ({first_line(e)[:160]})",
                      file=sys.stderr)
    return launches_of(calls)


def _largest_cube_plan() -> list:
    """bench.largest_cube's search of the fused SegFormer3D (gpu_check's default), batch 1, bf16: the sides it
    doubles through, and one near where the H200's memory predicted its limit (its last tries land near it)."""
    from bench.largest_cube import START_SIDE
    from bench.models import NETWORKS
    from bench.registry import load_cases

    load_cases()
    net = NETWORKS["segformer3d"]
    sides = [START_SIDE * 2**i for i in range(4) if START_SIDE * 2**i <= 512] + [960]
    calls = []
    for side in sides:
        label = torch.zeros(1, 1, side, side, side, dtype=torch.long, device="meta")
        calls += _network_calls(lambda: net.build(net.cfg, False), (1, net.in_channels, side, side, side),
                                torch.bfloat16, True, loss=lambda y: net.loss(False)(y, label))
    return launches_of(calls)


_GENERATOR = torch.Generator


def _cpu_generator(device=None):
    """A generator for meta tensors (their draws take a CPU one): ``torch.Generator(device="cuda")`` stands in."""
    return _GENERATOR()


def _tune_plan() -> list:
    """``python -m bench.tune OP``'s candidates at their default shapes (bf16), for every op it sweeps: each
    candidate's launches are taken where the sweep would time them, with the candidate in place."""
    import importlib

    from bench.sass import SM90_SMS, _captured, _FusedCalls
    from bench.tune import OPS
    from fastseg3d.kernels import utils as kernel_utils

    launches: list = []

    def record(fn):
        recorder = _FusedCalls()
        with recorder:
            fn()
        launches.extend(launches_of(recorder.calls))
        return 1.0

    for op in OPS:
        tuner = importlib.import_module(f"bench.tune_{op}")
        for label in tuner.SHAPES:
            try:
                # the sweeps also call launchers directly: those launches are captured as they are made
                with _CudaAsMeta(), _MetaValues(), mock.patch.object(torch, "Generator", _cpu_generator), \
                        mock.patch.object(kernel_utils, "sm_count", lambda device: SM90_SMS):
                    launches.extend(_captured(lambda: tuner.sweep(label, torch.bfloat16, device=torch.device("meta"),
                                                                  time_fn=record)))
            except Exception as e:
                print(f"warm_cache: tune {op} {label} skipped ({first_line(e)[:160]})",
                      file=sys.stderr)
    return launches


PLANS = {"gpu_tests": _gpu_tests_plan, "targets": _target_plan, "largest_cube": _largest_cube_plan,
         "tune": _tune_plan}


def launches_of(calls: list) -> list:
    """The Triton launches (kernel, args, kwargs) that ``calls`` (recorded fused op calls) make on an H100 or H200
    (132 SMs: the launchers split work by the SM count). Global state the launchers read (TF32, determinism) is
    read now: replay a test's calls before its settings are undone. A call whose replay fails is reported and
    skipped."""
    from bench.sass import SM90_SMS, _captured
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops.utils import LAUNCHES

    launches = []
    for op, args, kwargs in calls:
        try:
            with mock.patch.object(kernel_utils, "sm_count", lambda device: SM90_SMS):
                launches += _captured(lambda: LAUNCHES[op](*args, **kwargs))
        except Exception as e:
            print(f"warm_cache: {op} not replayed ({first_line(e)[:160]})",
                  file=sys.stderr)
    return launches


def distinct(launches: list) -> list:
    """One launch per specialisation the JIT would compile."""
    from bench.sass import launch_key

    seen: dict = {}
    for fn, a, kw in launches:
        seen.setdefault(launch_key(fn, a, kw), (fn, a, kw))
    return list(seen.values())


def collect(calls: list) -> list:
    """The distinct launches of ``calls``."""
    return distinct(launches_of(calls))


def _sm90_ptxas() -> tuple[str, str]:
    """(environment variable, Triton's own binary) of the ptxas Triton compiles sm_90 code with: ``ptxas`` and
    ``TRITON_PTXAS_PATH`` in Triton 3.6, ``ptxas-blackwell`` and ``TRITON_PTXAS_BLACKWELL_PATH`` in 3.9."""
    import triton

    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        used = os.path.realpath(get_ptxas(90).path)
        for tool in vars(type(knobs.nvidia)).values():
            if getattr(tool, "binary", "").startswith("ptxas") and used in {
                    os.path.realpath(tool.default_path), os.path.realpath(os.environ.get(tool.key, tool.default_path))}:
                return tool.key, tool.default_path
    except (ImportError, AttributeError, RuntimeError):  # a Triton without knobs, or without a ptxas to find
        pass
    return "TRITON_PTXAS_PATH", os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas() -> str:
    """The ptxas both sides compile with: Triton's own. Its version is part of every cache key, and a process
    that has compiled with ``torch.compile`` would otherwise have moved to torch's (Inductor points
    ``TRITON_PTXAS_PATH`` at it where it is unset), so ``gpu_check.sh`` sets :func:`ptxas_variable` to it for the
    whole run."""
    return _sm90_ptxas()[1]


def ptxas_variable() -> str:
    """The environment variable that chooses the ptxas Triton compiles sm_90 code with."""
    return _sm90_ptxas()[0]


def key_facts() -> dict:
    """What every cache key holds besides the kernel: Triton's build, the ptxas version (of the file
    :func:`ptxas_variable` names where set, else Triton's own), the Python version."""
    import triton
    from triton.runtime.cache import triton_key

    path = os.environ.get(ptxas_variable()) or ptxas()
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
        version = version.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as e:
        version = f"unknown ({type(e).__name__})"
    return {"triton": triton.__version__, "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(),
            "ptxas": version, "python": sys.version.split()[0]}


_WORK: list = []
_POOL = None


def _compile_one(i: int) -> tuple[str, str | None, float, str | None]:
    from bench.sass import SM90_SHARED_BYTES
    from triton.runtime import driver

    fn, args, kwargs = _WORK[i]
    previous = driver._active  # the real one, where there is one (a GPU machine)
    driver.set_active(_Driver())
    start = time.perf_counter()
    try:
        stand_ins = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        kernel = fn.run(*stand_ins, grid=(1,), warmup=True, **kwargs)
    except Exception as e:  # a kernel that does not compile for sm_90: reported, the others go on
        lines = [line for line in str(e).splitlines() if line.strip()]
        return fn.fn.__name__, None, time.perf_counter() - start, f"{type(e).__name__}: {lines[-1] if lines else ''}"
    finally:
        driver._active = previous
        # the JIT's in-memory cache was keyed under the stand-in driver's device
        fn.device_caches.clear()
    problem = None
    if kernel.metadata.shared > SM90_SHARED_BYTES:
        problem = f"{kernel.metadata.shared} bytes of shared memory (an H100 block takes {SM90_SHARED_BYTES})"
    return fn.fn.__name__, kernel.hash, time.perf_counter() - start, problem


def compile_launches(launches: list, cache_dir: str, jobs: int = 0) -> list[tuple[str, str | None, float, str | None]]:
    """Compiles each launch through Triton's JIT for sm_90 into ``cache_dir`` (binaries and metadata only), in
    ``jobs`` processes (default: one per core); returns (kernel, cache hash or None, seconds, problem or None) per
    launch: a problem is a compile error or what an H100 would refuse to launch (shared memory)."""
    global _POOL
    variable = ptxas_variable()
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_STORE_BINARY_ONLY", variable)}
    # absolute: Triton records its files' paths as it is given the directory, and --install rewrites absolute ones
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(cache_dir)
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    os.environ[variable] = saved[variable] or ptxas()
    _WORK[:] = launches
    jobs = jobs or os.cpu_count() or 1
    try:
        if jobs == 1:
            return [_compile_one(i) for i in range(len(launches))]
        with multiprocessing.get_context("fork").Pool(jobs) as _POOL:
            return _POOL.map(_compile_one, range(len(launches)), chunksize=1)
    finally:
        _POOL = None
        _WORK.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _entry_hash(path: str) -> str | None:
    """The compile hash a cache entry (a kernel's directory) records in its metadata."""
    for name in os.listdir(path):
        if name.endswith(".json") and not name.startswith("__grp__"):
            with open(os.path.join(path, name)) as f:
                return json.load(f).get("hash")
    return None


def _pack(cache_dir: str, out: str, keep: set[str] | None = None) -> None:
    """Packs the cache's entries (one directory per kernel, named from its key; only those whose compile hash is in
    ``keep`` where given: a directory built into again keeps the kernels of older sources, which no run asks for)."""
    entries = sorted(e.name for e in os.scandir(cache_dir)
                     if e.is_dir() and (keep is None or _entry_hash(e.path) in keep))
    manifest = {"entries": entries, "root": os.path.abspath(cache_dir), **key_facts()}
    with tarfile.open(out, "w:gz") as tar:
        for name in entries:
            tar.add(os.path.join(cache_dir, name), arcname=name)
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def install(tarball: str, cache_dir: str) -> int:
    """Extracts a carried cache into ``cache_dir`` with the file paths Triton recorded rewritten for it (only the
    carried ones: kernels an earlier call compiled here keep theirs); returns the number of kernels. Warns where
    this machine's Triton, ptxas or Python would give other keys."""
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache_dir, filter="data")
    with open(os.path.join(cache_dir, MANIFEST)) as f:
        manifest = json.load(f)
    root = manifest["root"].rstrip(os.sep) + os.sep
    for name in manifest["entries"]:
        entry = os.path.join(cache_dir, name)
        for file in os.listdir(entry):
            if file.startswith("__grp__"):
                path = os.path.join(entry, file)
                with open(path) as f:
                    group = json.load(f)
                group["child_paths"] = {c: os.path.join(cache_dir, p[len(root):]) if p.startswith(root) else p
                                        for c, p in group["child_paths"].items()}
                with open(path, "w") as f:
                    json.dump(group, f)
    here = key_facts()
    differ = [f"{k} {manifest.get(k)} there, {v} here" for k, v in here.items() if manifest.get(k) != v]
    if differ:
        print("WARNING: the carried Triton cache was built with other versions, its keys will not match: "
              + "; ".join(differ), file=sys.stderr)
    return len(manifest["entries"])


def report(cache_dir: str) -> dict:
    """What a run compiled itself beside the carried kernels: ``{"carried": n, "compiled": {kernel: count},
    "inductor": {kernel: count}}``, the latter the kernels ``torch.compile`` built (its copies of fastseg3d's
    kernels carry the same names), told apart by the source file their IR names (kept where the run stores more
    than binaries)."""
    out = {"carried": 0, "compiled": {}, "inductor": {}}
    if not os.path.isdir(cache_dir):
        return out
    path = os.path.join(cache_dir, MANIFEST)
    carried = set()
    if os.path.exists(path):
        with open(path) as f:
            carried = set(json.load(f)["entries"])
    out["carried"] = len(carried)
    for entry in os.scandir(cache_dir):
        if not entry.is_dir() or entry.name in carried:
            continue
        files = os.listdir(entry.path)
        for name in [n[:-5] for n in files if n.endswith(".json") and not n.startswith("__grp__")]:
            kind = "compiled"
            if f"{name}.source" in files:
                with open(os.path.join(entry.path, f"{name}.source")) as f:
                    if "torchinductor" in f.readline():
                        kind = "inductor"
            out[kind][name] = out[kind].get(name, 0) + 1
    out["compiled"] = dict(sorted(out["compiled"].items()))
    out["inductor"] = dict(sorted(out["inductor"].items()))
    return out


def _terminate(*_) -> None:
    """A time box's SIGTERM: the compile workers end with the build (they would go on beside the tests), and so
    does a pytest run in progress (which would take the exit for a failed test)."""
    pool = _POOL
    if pool is not None:
        for worker in list(getattr(pool, "_pool", [])):
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)
    os._exit(124)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="build: the tarball to write (e.g. .triton-cache.tgz)")
    parser.add_argument("--plan", nargs="+", choices=sorted(PLANS), default=sorted(PLANS))
    parser.add_argument("--cache-dir", help="build: compile into this directory (on a GPU machine: its "
                                             "TRITON_CACHE_DIR), else into a temporary one")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="count the distinct launches, compile nothing")
    parser.add_argument("--install", metavar="TARBALL", help="extract a carried cache into --dir")
    parser.add_argument("--dir", help="--install: the cache directory (TRITON_CACHE_DIR)")
    parser.add_argument("--report", metavar="DIR", help="what a run compiled beside the carried kernels")
    args = parser.parse_args(argv)
    # a time box's SIGTERM ends the pool with its workers (which would otherwise go on compiling beside the tests)
    signal.signal(signal.SIGTERM, _terminate)
    if args.install:
        if not args.dir:
            parser.error("--install needs --dir")
        print(f"Triton cache: {install(args.install, args.dir)} kernels carried into {args.dir}")
        return
    if args.report:
        r = report(args.report)
        print(f"Triton cache: {r['carried']} kernels carried, {sum(r['compiled'].values())} compiled in this run"
              f" (and {sum(r['inductor'].values())} by torch.compile)"
              + "".join(f"\n  {n} x{c}" for n, c in r["compiled"].items()))
        return
    if not (args.out or args.cache_dir or args.dry_run):
        parser.error("give --out or --cache-dir (build), --dry-run, --install or --report")
    start = time.perf_counter()
    every = [launch for plan in args.plan for launch in PLANS[plan]()]
    launches = distinct(every)
    print(f"{len(every)} launches, {len(launches)} distinct ({time.perf_counter() - start:.0f} s)")
    if args.dry_run:
        counts: dict[str, int] = {}
        for fn, _, _ in launches:
            counts[fn.fn.__name__] = counts.get(fn.fn.__name__, 0) + 1
        print("".join(f"  {name} x{n}\n" for name, n in sorted(counts.items())), end="")
        return
    with tempfile.TemporaryDirectory(prefix="fastseg3d-triton-cache-") as tmp:
        cache_dir = os.path.abspath(args.cache_dir or tmp)
        compiled = compile_launches(launches, cache_dir, args.jobs)
        if args.out:
            _pack(cache_dir, args.out, {h for _, h, _, _ in compiled if h})
    slowest = sorted(compiled, key=lambda c: -c[2])[:5]
    print(f"compiled in {time.perf_counter() - start:.0f} s"
          + (f"; {args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB" if args.out else f" into {cache_dir}")
          + "; slowest: " + ", ".join(f"{n} {s:.0f} s" for n, _, s, _ in slowest))
    problems = [(n, p) for n, _, _, p in compiled if p]
    for name, problem in problems:
        print(f"PROBLEM {name}: {problem}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
