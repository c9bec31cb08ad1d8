"""Static profile of fastseg3d's Triton kernels as an H100 runs them, on a machine without a GPU.

Each launcher is called on ``meta`` tensors of a benchmark shape with its kernel launches captured; each kernel
is then compiled for sm_90 with the specialisation Triton's JIT would give those arguments (integers equal to 1
become constants, multiples of 16 and pointers get the divisibility hint), and the cubin's registers, spills
and instructions are read with the ``cuobjdump`` bundled in the Triton wheel. For dwconv3d, instructions per
output (per voxel for the weight gradient) count the main loop's body: an issue-rate estimate, not a timing.

    python -m bench.sass dwconv3d                      # 3x3x3 and 1x3x3 at (2, 32, 128^3), bf16, with bias
    python -m bench.sass dwconv3d --kernel 1 3 3 --dtype float32 --activation gelu
    python -m bench.sass attention --dtype float32     # SegFormer3D stage 1 at 128^3, head dims 16 to 128
    python -m bench.sass kl_distill                    # DSD's KL, 14 classes: full-resolution, then upsampled heads
    python -m bench.sass selfreg                       # SelfReg's pooling and inter term, 2x2x2 cells
    python -m bench.sass network segformer3d           # every launch of a benchmark network's training step and
                                                       # inference, and what an H100 would refuse
    python -m bench.sass launches segformer3d          # how many kernels its bf16 training step launches
                                                       # (--plain: the plain variant's)
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import tempfile
from unittest import mock

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["launch_key", "profile_attention", "profile_dwconv3d", "profile_kl_distill", "profile_network",
           "profile_selfreg"]

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32"}


def _specialisation(fn, args, kwargs, float_type: str = "fp32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of a launch, as Triton's JIT specialises it; Python floats typed
    ``float_type`` (Inductor types them fp64 in the user kernels of a compiled model, torch >= 2.11)."""
    signature, constexprs, attrs = {}, {}, {}
    runtime = [p for p in fn.params if not p.is_constexpr]
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = kwargs[p.name]
            continue
        v = args[runtime.index(p)]
        # the JIT gives no divisibility hint to an argument it may not specialise, nor on alignment
        hint = not (p.do_not_specialize or getattr(p, "do_not_specialize_on_alignment", False))
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TYPES[v.dtype]
            if hint and v.storage_offset() * v.element_size() % 16 == 0:  # storages start 16-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = float_type
        elif isinstance(v, bool):  # before the ints: True == 1, but the JIT types a bool u1 and never specialises it
            signature[p.name] = "u1"
        elif v is None:
            signature[p.name], constexprs[(i,)] = "constexpr", None
        elif v == 1 and not p.do_not_specialize:
            signature[p.name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if hint and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _compile_like_jit(fn, args, kwargs, float_type: str = "fp32"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialisation(fn, args, kwargs, float_type)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_COPIES: dict = {}
_COPY_DIR: list = []  # one folder a process, removed when it exits


def torch_compile_copy(fn):
    """``fn`` as ``torch.compile`` rebuilds it when a ``triton_op`` is compiled: Inductor writes the kernel's source
    and the ``@triton.jit`` functions it calls into a module of their own, under its usual imports (``triton``,
    ``tl``, ``libdevice``, ...), with only the bare names that come from triton re-imported (another module global
    is not), and compiles that module in a worker process. A name the copy lacks fails there, not in eager runs."""
    if fn not in _COPIES:
        import importlib.util

        from torch._inductor.codegen.triton import TritonKernel
        from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

        source = TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n"
        source += user_defined_triton_kernel_transitive_closure_source_code(fn)
        name = f"torch_compile_copy_{len(_COPIES)}_{fn.fn.__name__}"
        # JITFunction reads its source back from the file (inspect), so the file outlives the call
        if not _COPY_DIR:
            _COPY_DIR.append(tempfile.mkdtemp(prefix="fastseg3d-sass-"))
            atexit.register(shutil.rmtree, _COPY_DIR[0], True)
        path = os.path.join(_COPY_DIR[0], f"{name}.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _COPIES[fn] = getattr(module, fn.fn.__name__)
    return _COPIES[fn]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _stats(compiled, outputs_per_thread: float | None = None, unit: str = "output") -> dict:
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
    code = []
    for line in _cuobjdump(compiled.asm["cubin"], "-sass").splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loop = (0, -1)  # the widest backward branch is the main loop
    for addr, ins in code:
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr and addr - int(m.group(1), 16) > loop[1] - loop[0]:
            loop = (int(m.group(1), 16), addr)
    body = [ins for addr, ins in code if loop[0] <= addr <= loop[1]]
    # block barriers (BAR.SYNC, BAR.RED, ...), not the scoreboard waits DEPBAR and WARPGROUP.DEPBAR nor MEMBAR
    barriers = sum(1 for ins in body if re.search(r"(?<![A-Z])BAR\.", ins))
    # ptxas serialises the wgmma pipeline (info C7515) when it cannot keep a wgmma's accumulators untouched:
    # every HGMMA then waits for itself.
    wgmma = sum(1 for _, ins in code if "HGMMA" in ins)
    serialised = wgmma > 0 and sum(1 for _, ins in code if "WARPGROUP.DEPBAR" in ins) >= wgmma
    stats = {"registers": regs, "spill_bytes": stack, "loop_instructions": len(body), "loop_barriers": barriers,
             "wgmma_serialised": serialised}
    if outputs_per_thread:
        stats[f"per_{unit}"] = round(len(body) / outputs_per_thread, 1)
    # the narrowest loop that loads from global memory, and its instructions per load
    inner = None
    for addr, ins in code:
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            span = [i for a, i in code if int(m.group(1), 16) <= a <= addr]
            loads = sum(1 for i in span if "LDG" in i)
            if loads and (inner is None or len(span) < inner[0]):
                inner = (len(span), loads)
    if inner:
        stats["inner_per_load"] = round(inner[0] / inner[1], 1)
    return stats


def _captured(call, grids: list | None = None) -> list:
    """(kernel, args, kwargs) of every launch ``call()`` makes, none of them run; each launch's grid is appended to
    ``grids`` where given."""
    launches = []

    def launch(fn, grid):
        def run(*a, **kw):
            launches.append((fn, a, kw))
            if grids is not None:
                grids.append(grid)
        return run

    def capture(fn):
        return type("_Capture", (), {"__getitem__": lambda self, grid: launch(fn, grid)})()

    # wrapping on, so that every launch reaches wrap_triton, also one made inside an eager op's body
    with set_wrap_triton_enabled(True), mock.patch.object(torch.library, "wrap_triton", capture):
        call()
    return launches


def profile_dwconv3d(shape=(2, 32, 128, 128, 128), kernel=(3, 3, 3), dtype=torch.bfloat16,
                     channels_last: bool = False, which: str = "fwd", activation: str | None = None) -> dict:
    """Registers, spill bytes and main-loop instructions per output of one dwconv3d kernel on sm_90, with bias
    (and ``activation``) as the benchmark runs it.

    ``which``: "fwd" (the forward kernel, also the dx pass), "dz" (the forward kernel writing the gradient at the
    pre-activation, ``dy * act'(conv + bias)``, in the backward of a fused activation) or "bwd_weight".
    """
    from fastseg3d.kernels import dwconv3d as k

    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    pad = tuple(s // 2 for s in kernel)

    def call():
        if which in ("fwd", "dz"):
            w = torch.empty((c, 1, *kernel), dtype=dtype, device="meta")
            k.dwconv3d_fwd(x, k.taps_major(w), w.new_empty(c), None, torch.empty_like(x), pad, (1, 1, 1),
                           k.ACT_IDS[activation], grad=torch.empty_like(x) if which == "dz" else None)
        else:
            k.dwconv3d_bwd_weight(x, torch.empty_like(x), kernel, pad, (1, 1, 1), True)

    launches = _captured(call)
    fn, args, kwargs = launches[0]
    tile = kwargs["BLOCK_C"] * kwargs["BLOCK_H"] * kwargs["BLOCK_W"]
    # the forward's W-lane walk is unrolled KD times (its accumulators rotate without moves): a loop pass is KD slices
    lane_walk = which != "bwd_weight" and kwargs["LANES"] and kwargs["BLOCK_C"] == 1 and kwargs["ROLL"]
    unroll = kwargs["KD"] if lane_walk else 1
    # a weight gradient split by rows of in-plane taps: per output and depth tap, every chunk's loop
    chunks = -(-kwargs["KH"] // kwargs["KH_PER"]) if which == "bwd_weight" else 1
    return {"which": which, "layout": "channels_last" if channels_last else "ncdhw", "kernel": kernel,
            "activation": activation,
            "block": (kwargs["BLOCK_C"], kwargs["BLOCK_H"], kwargs["BLOCK_W"]), "lanes": kwargs.get("LANES", 0),
            "rows": kwargs.get("ROWS", 1),
            **_stats(_compile_like_jit(fn, args, kwargs), unroll * tile / (32 * kwargs["num_warps"] * chunks))}


def profile_attention(n: int = 32768, m: int = 512, heads: int = 1, head_dim: int = 32,
                      dtype=torch.bfloat16, allow_tf32: bool = False) -> list[dict]:
    """Registers, spill bytes, main-loop instructions (and per score of the tile) and barriers of the attention
    kernels (forward, delta, dk/dv, dq) as ``attention_fwd`` and ``attention_bwd`` launch them for
    q (2, n, heads, head_dim) and k, v (2, m, ...)."""
    from fastseg3d.kernels import attention as a

    q = torch.empty(2, n, heads, head_dim, dtype=dtype, device="meta")
    kv = torch.empty(2, m, 2, heads, head_dim, dtype=dtype, device="meta")
    k, v = kv[:, :, 0], kv[:, :, 1]
    lse = torch.empty(2, heads, n, device="meta")
    scale = head_dim**-0.5

    def call():
        a.attention_fwd(q, k, v, scale, torch.empty_like(q), lse)
        a.attention_bwd(q, q, k, v, q, lse, scale, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32  # the launchers read it to pick the fp32 dot precision
    try:
        launches = _captured(call)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    rows = []
    for fn, args, kw in launches:
        if fn.fn.__module__ != a.__name__:  # the shared sum of dk/dv's partials
            continue
        kw = {"num_warps": 4, **kw}
        # per score: main-loop thread-instructions per element of the block's score tile
        scores = kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * kw["num_warps"]) if "BLOCK_N" in kw else None
        rows.append({"kernel": fn.fn.__name__, "head_dim": head_dim, "block": (kw["BLOCK_M"], kw.get("BLOCK_N")),
                     "warps": kw["num_warps"], **_stats(_compile_like_jit(fn, args, kw), scores, "score")})
    return rows


def profile_kl_distill(teacher_shape=(2, 14, 128, 128, 128), student_shapes=((2, 14, 128, 128, 128),) * 3,
                       size=(128, 128, 128), dtype=torch.bfloat16) -> list[dict]:
    """Registers, spill bytes and main-loop barriers of the fused KL kernels (the forward, then a transposed
    interpolation per input at a lower resolution than ``size``) for one teacher and up to four students, all with
    gradients; for the forward, instructions per logit read; for a transposed interpolation, its inner loop's
    instructions per class and tap."""
    from fastseg3d.kernels import kl_distill as k

    teacher = torch.empty(teacher_shape, dtype=dtype, device="meta")
    students = [torch.empty(s, dtype=dtype, device="meta") for s in student_shapes]
    launches = _captured(lambda: k.kl_distill_fwd(students, teacher, tuple(size), 3.0, [1.0] * len(students),
                                                   [True] * len(students), True))
    rows = []
    for fn, args, kw in launches:
        compiled = _compile_like_jit(fn, args, kw)
        row = {"kernel": fn.fn.__name__, "block_v": kw["BLOCK_V"], "warps": kw["num_warps"], **_stats(compiled)}
        code = _cuobjdump(compiled.asm["cubin"], "-sass")
        n = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", code, re.M))
        row["barriers"] = code.count("BAR.SYNC")  # the whole kernel's: reductions, and layout conversions
        if fn.fn.__name__ == "_kl_fwd_kernel":
            # the forward has no loop: every instruction, per logit of every input the thread holds
            logits = kw["BLOCK_V"] * kw["K"] / (32 * kw["num_warps"]) * (1 + len(students))
            row["per_element"] = round(n / logits, 1)
        elif "inner_per_load" in row:
            # the transposed interpolation loads a tap's classes in 16-byte vectors from a class-interleaved buffer
            # (IL > 0), else one class per load
            il, buffer = kw["IL"], args[0]
            loads_per_tap = max(1, il * buffer.element_size() // 16) if il else kw["K"]
            row["per_class_tap"] = round(row.pop("inner_per_load") * loads_per_tap / kw["K"], 1)
        else:  # taps unrolled, no loop: the whole kernel per class and tap
            row["per_class_tap"] = round(n / (kw["LD"] * kw["LH"] * kw["LW"] * kw["K"]), 1)
        rows.append(row)
    return rows


def profile_selfreg(student_shape=(2, 32, 128, 128, 128), size=(64, 64, 64), dtype=torch.bfloat16) -> list[dict]:
    """Registers, spill bytes and instructions per pooled voxel of SelfReg's pooling kernel (the teacher's pyramid)
    and of its inter term with the student's gradient (the student pooled to the teacher's level ``size``): the
    whole kernel, which has no loop over a cell of up to 2 per axis, per pooled voxel the thread holds."""
    from fastseg3d.kernels import selfreg as k

    x = torch.empty(student_shape, dtype=dtype, device="meta")
    teacher = torch.empty((student_shape[0], 16, *size), dtype=torch.float32, device="meta")
    pairs = torch.arange(16, device="meta")

    def call():
        k.avg_pool(x, size)
        k.selfreg_inter_fwd(x, teacher, pairs, pairs, True)

    rows = []
    for fn, args, kw in _captured(call):
        compiled = _compile_like_jit(fn, args, kw)
        code = _cuobjdump(compiled.asm["cubin"], "-sass")
        n = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", code, re.M))
        per_thread = kw["BLOCK_V"] / (32 * kw["num_warps"])
        rows.append({"kernel": fn.fn.__name__, "cell": (kw["FD"], kw["FH"], kw["FW"]), "block_v": kw["BLOCK_V"],
                     **_stats(compiled), "per_pooled_voxel": round(n / per_thread, 1)})
    return rows


# An H100's (and H200's) limits per block: shared memory a kernel may opt into, registers, grid dimensions
SM90_SMS = 132
SM90_SHARED_BYTES = 232448
SM90_REGISTERS = 65536
GRID_LIMITS = (2**31 - 1, 65535, 65535)


class _FusedCalls(TorchDispatchMode):
    """Records each call of a ``fastseg3d::`` op that makes Triton launches: (name, args, kwargs)."""

    def __init__(self):
        super().__init__()
        from fastseg3d.ops.utils import LAUNCHES

        self.launching = LAUNCHES
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastseg3d" and func._schema.name in self.launching:
            self.calls.append((func._schema.name, args, kwargs))
        return func(*args, **kwargs)


def _hashable(value):
    """A key for a constexpr value that tells True from 1 and 1 from 1.0, as the JIT does."""
    if isinstance(value, (list, tuple)):
        return tuple(map(_hashable, value))
    return type(value).__name__, value


def launch_key(fn, args, kwargs) -> tuple:
    """Equal for two launches that Triton's JIT would compile into one kernel: the kernel, its specialisation and
    launch options."""
    signature, constexprs, attrs = _specialisation(fn, args, kwargs)
    return (fn, tuple(signature.items()), tuple((k, _hashable(v)) for k, v in constexprs.items()), tuple(attrs),
            kwargs.get("num_warps"), kwargs.get("num_stages"))


def profile_network(name: str, side: int | None = None, batch: int | None = None, dtype=torch.bfloat16,
                    modes=("train_step", "infer")) -> list[dict]:
    """Every distinct Triton launch of the benchmark's network ``name`` (its ``bench.models`` description:
    configuration, loss, batch and first side unless given), compiled for sm_90: its registers, spill bytes,
    shared memory and largest grid, and ``problems``, what an H100 would refuse (shared memory or registers per
    block, grid dimensions; empty when it launches).

    The network runs on ``meta`` tensors (``train_step``: forward, the benchmark's loss and backward, under
    emulated autocast to ``dtype``; ``infer``: an eval forward under ``no_grad``), every fused op call is recorded,
    and each is replayed through the function that makes the op's launches (``fastseg3d.ops.utils.LAUNCHES``)
    with its launches captured, so the kernels, shapes and tile configurations are those the GPU would get.
    Launches that Triton's JIT would specialise alike are compiled once, as a compiled model gets them: from the copy
    ``torch.compile`` makes of each (``torch_compile_copy``), float arguments typed fp64 as Inductor types them.
    The code is the eager kernels' (the op tests compile those as the JIT types them)."""
    from bench.models import NETWORKS
    from bench.registry import load_cases
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops.utils import LAUNCHES
    from fastseg3d.profile import _autocast_on_meta

    load_cases()
    net = NETWORKS[name]
    side = side or net.sides[0]
    batch = batch or net.batch
    torch.manual_seed(0)
    model = net.build(net.cfg, False).to("meta")
    x = torch.empty(batch, net.in_channels, side, side, side, device="meta")
    label = torch.zeros(batch, 1, side, side, side, dtype=torch.long, device="meta")
    calls = []
    for mode in modes:
        recorder = _FusedCalls()
        if mode == "train_step":
            model.train()
            with recorder, _autocast_on_meta(dtype):
                net.loss(False)(model(x), label).backward()
        else:
            model.eval()
            with recorder, _autocast_on_meta(dtype), torch.no_grad():
                model(x)
        calls += [(mode, *call) for call in recorder.calls]

    distinct: dict = {}
    for mode, op, args, kwargs in calls:
        grids: list = []
        # launchers split work to fill the GPU's SMs: an H100's (and H200's) 132
        with mock.patch.object(kernel_utils, "sm_count", lambda device: SM90_SMS):
            launches = _captured(lambda: LAUNCHES[op](*args, **kwargs), grids)
        for (fn, a, kw), grid in zip(launches, grids):
            kw = {"num_warps": 4, **kw}
            entry = distinct.setdefault(launch_key(fn, a, kw), {"launch": (fn, a, kw), "ops": set(), "modes": set(),
                                                                "calls": 0, "grid": (0, 0, 0)})
            entry["ops"].add(op.split("::")[-1])
            entry["modes"].add(mode)
            entry["calls"] += 1
            grid = tuple(grid) + (1,) * (3 - len(grid))  # the launchers pass tuples
            entry["grid"] = tuple(max(g, h) for g, h in zip(entry["grid"], grid))

    rows = []
    for entry in distinct.values():
        fn, a, kw = entry["launch"]
        # as a compiled model gets it: the copy torch.compile makes of the kernel (the names it lacks would fail to
        # compile), its float arguments fp64 (the kernels take them to fp32 themselves)
        compiled = _compile_like_jit(torch_compile_copy(fn), a, kw, float_type="fp64")
        usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
        regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
        shared = compiled.metadata.shared
        problems = []
        if shared > SM90_SHARED_BYTES:
            problems.append(f"{shared} bytes of shared memory (at most {SM90_SHARED_BYTES})")
        if regs * 32 * kw["num_warps"] > SM90_REGISTERS:
            problems.append(f"{regs} registers x {32 * kw['num_warps']} threads (at most {SM90_REGISTERS})")
        for axis, (g, limit) in enumerate(zip(entry["grid"], GRID_LIMITS)):
            if g > limit:
                problems.append(f"grid axis {axis}: {g} programs (at most {limit})")
        config = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
        rows.append({"kernel": fn.fn.__name__, "ops": sorted(entry["ops"]), "modes": sorted(entry["modes"]),
                     "calls": entry["calls"], "config": config, "warps": kw["num_warps"], "registers": regs,
                     "spill_bytes": stack, "shared_bytes": shared, "grid": entry["grid"], "problems": problems})
    return rows


def launch_counts(name: str, side: int | None = None, batch: int | None = None, dtype=torch.bfloat16,
                  plain: bool = False) -> dict:
    """The kernels a training step (forward, the benchmark's loss, backward) of the benchmark network ``name``
    launches on a GPU, counted on ``meta`` tensors: each ATen op that writes memory (as
    :func:`fastseg3d.profile.write_traffic` counts them; about one kernel each), and for each fused op call its
    Triton launches and the ATen ops its launcher runs around them (workspace sums, casts). Eager PyTorch issues
    each at a few microseconds of host time, so this bounds a launch-bound step from below.

    ``plain``: the benchmark's plain variant (the network from plain layers, every op's reference, the plain loss).

    Returns ``{"total": n, "aten": n, "fused": n, "by_op": {op: [calls, launches]}}`` (fused ops only in
    ``by_op``)."""
    from bench.models import NETWORKS, variant_context
    from bench.registry import load_cases
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops.utils import LAUNCHES
    from fastseg3d.profile import _autocast_on_meta, _Writes

    load_cases()
    net = NETWORKS[name]
    side = side or net.sides[0]
    batch = batch or net.batch
    torch.manual_seed(0)
    model = net.build(net.cfg, plain).to("meta").train()
    x = torch.empty(batch, net.in_channels, side, side, side, device="meta")
    label = torch.zeros(batch, 1, side, side, side, dtype=torch.long, device="meta")
    writes, recorder = _Writes(), _FusedCalls()
    with writes, recorder, _autocast_on_meta(dtype), variant_context(plain):
        net.loss(plain)(model(x), label).backward()
    by_op: dict[str, list[int]] = {}
    for op, args, kwargs in recorder.calls:
        inner = _Writes()
        with mock.patch.object(kernel_utils, "sm_count", lambda device: SM90_SMS), inner:
            triton_launches = _captured(lambda: LAUNCHES[op](*args, **kwargs))
        entry = by_op.setdefault(op, [0, 0])
        entry[0] += 1
        entry[1] += len(triton_launches) + sum(c for c, _ in inner.by_op.values())
    aten = sum(c for name_, (c, _) in writes.by_op.items() if not name_.startswith("fastseg3d::"))
    fused = sum(launches for _, launches in by_op.values())
    return {"total": aten + fused, "aten": aten, "fused": fused, "by_op": by_op}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=["dwconv3d", "attention", "kl_distill", "selfreg", "network", "launches"])
    parser.add_argument("name", nargs="?", help="network, launches: a model case (segformer3d, mobileutr, "
                                                "mobileutrl, missu, dsd_unet, selfreg_unet)")
    parser.add_argument("--side", type=int, help="network: cubic input side (default: the benchmark's first)")
    parser.add_argument("--batch", type=int, help="network: batch (default: the benchmark's)")
    parser.add_argument("--shape", type=int, nargs=5, default=[2, 32, 128, 128, 128], help="dwconv3d input")
    parser.add_argument("--kernel", type=int, nargs=3, action="append", help="dwconv3d kernel (repeatable)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--activation", choices=["relu", "gelu", "gelu_tanh", "silu"],
                        help="dwconv3d forward and dz pass")
    parser.add_argument("--tf32", action="store_true", help="attention: fp32 dots in TF32")
    parser.add_argument("--plain", action="store_true", help="launches: the benchmark's plain variant")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.name and args.op not in ("network", "launches"):
        parser.error(f"{args.op} takes no name")
    if args.op == "launches":
        if not args.name:
            parser.error("launches needs a model case name")
        counts = launch_counts(args.name, args.side, args.batch, dtype, args.plain)
        for op, (calls, launches) in sorted(counts["by_op"].items(), key=lambda kv: -kv[1][1]):
            print(f"{op:48s} {calls:5d} calls {launches:6d} launches")
        print(f"{counts['total']} launches: {counts['aten']} ATen ops, {counts['fused']} by {len(counts['by_op'])} "
              f"fused ops")
        return
    if args.op == "network":
        if not args.name:
            parser.error("network needs a model case name")
        rows = profile_network(args.name, args.side, args.batch, dtype)
        for row in rows:
            print(row)
        refused = [row for row in rows if row["problems"]]
        print(f"{len(rows)} distinct launches, {sum(r['calls'] for r in rows)} calls, "
              f"{sum(1 for r in rows if r['spill_bytes'])} spilling, {len(refused)} an H100 would refuse")
        if refused:
            raise SystemExit(1)
        return
    if args.op == "kl_distill":
        # DSD's heads at full resolution, then at 1/2, 1/4 and 1/8 of a full-resolution teacher (forward and the
        # transposed interpolations of the heads' gradients)
        low = ((2, 14, 32, 32, 32), (2, 14, 16, 16, 16), (2, 14, 8, 8, 8))
        for students, teacher, size in ((((2, 14, 128, 128, 128),) * 3, (2, 14, 128, 128, 128), (128, 128, 128)),
                                        (low, (2, 14, 64, 64, 64), (64, 64, 64))):
            for row in profile_kl_distill(teacher, students, size, dtype):
                print(row)
        return
    if args.op == "selfreg":
        for row in profile_selfreg(dtype=dtype):
            print(row)
        return
    if args.op == "attention":
        for head_dim in (16, 32, 64, 128):
            for row in profile_attention(head_dim=head_dim, dtype=dtype, allow_tf32=args.tf32):
                print(row)
        return
    for kernel in args.kernel or [(3, 3, 3), (1, 3, 3)]:
        for which in ("fwd", "dz", "bwd_weight") if args.activation else ("fwd", "bwd_weight"):
            for cl in (False, True):
                print(profile_dwconv3d(tuple(args.shape), tuple(kernel), dtype, cl, which, args.activation))


if __name__ == "__main__":
    main()
