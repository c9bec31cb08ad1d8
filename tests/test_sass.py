"""What ``bench.sass`` computes, pinned without a GPU and mostly without compiling.

``_specialisation`` must give each launch the signature, constants and divisibility hints Triton's JIT gives it: a
wrong one is a cache key the GPU session never asks for (``bench.warm_cache``) and code the H100 never runs.
``launch_key`` must tell apart exactly the launches the JIT compiles apart. ``_stats`` reads registers, spills and
the main loop from ``cuobjdump`` text, checked here on a small hand-written listing in cuobjdump's format.
``profile_network`` is checked against an independent replay of the same recorded calls (calls, modes, largest
grid, warps), with the compiler stubbed, and its H100 limits at their exact boundaries.
"""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from bench import sass  # noqa: E402


@triton.jit(do_not_specialize=["fixed", "fixed16"], do_not_specialize_on_alignment=["loose", "loose_ptr"])
def _probe_kernel(BLOCK: tl.constexpr, x_ptr, y_ptr, z_ptr, loose_ptr, n, one, zero, wide, neg, odd, fixed, fixed16,
                  loose, scale, flag, maybe):
    pass


@triton.jit
def _loop_kernel(x_ptr, y_ptr, n, steps, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(steps):
        acc += tl.load(x_ptr + i * n + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc * scale, mask=offs < n)


def _probe_args():
    """One runtime argument of each kind the JIT treats apart (a constexpr first, so that parameter indices and
    runtime-argument indices differ)."""
    bf16 = torch.empty(64, dtype=torch.bfloat16, device="meta")
    fp32 = torch.empty(64, dtype=torch.float32, device="meta")
    # x: offset 0; y: 4 bf16 elements = 8 bytes; z: 4 fp32 elements = 16 bytes (aligned in bytes, not in elements)
    return (bf16, bf16[4:], fp32[4:], fp32, 48, 1, 0, 2**31, -2**31, 24, 1, 32, 32, 0.5, True, None)


_EXPECTED = {  # name: (signature, constant or "-", divisibility hint)
    "BLOCK": ("constexpr", 64, False), "x_ptr": ("*bf16", "-", True), "y_ptr": ("*bf16", "-", False),
    "z_ptr": ("*fp32", "-", True), "loose_ptr": ("*fp32", "-", False), "n": ("i32", "-", True),
    "one": ("constexpr", 1, False), "zero": ("i32", "-", True), "wide": ("i64", "-", True),
    "neg": ("i32", "-", True), "odd": ("i32", "-", False), "fixed": ("i32", "-", False),
    "fixed16": ("i32", "-", False), "loose": ("i32", "-", False), "scale": ("fp64", "-", False),
    "flag": ("u1", "-", False), "maybe": ("constexpr", None, False)}


def test_specialisation_is_the_jit_s():
    """Integers equal to 1 become constants unless ``do_not_specialize``; pointers 16-byte aligned (in bytes) and
    integers that are multiples of 16 (0 included) get the divisibility hint, unless not specialised or not on
    alignment; i32 from -2**31 to 2**31 - 1; floats as the caller types them; a bool is u1, None a constant."""
    signature, constexprs, attrs = sass._specialisation(_probe_kernel, _probe_args(), {"BLOCK": 64}, "fp64")
    names = [p.name for p in _probe_kernel.params]
    got = {name: (signature[name], constexprs.get((i,), "-"), (i,) in attrs) for i, name in enumerate(names)}
    assert got == _EXPECTED
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())
    assert sass._specialisation(_probe_kernel, _probe_args(), {"BLOCK": 64})[0]["scale"] == "fp32"


def test_specialisation_matches_triton_s_own():
    """The same, against the specialisation Triton's JIT computes (its native ``specialize_impl``, as the JIT's
    binder calls it, pointers as ``bench.warm_cache`` stands them in): skipped on a Triton without it."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        pytest.skip("no native_specialize_impl in this Triton")
    from bench.warm_cache import _DevicePointer

    args = _probe_args()
    signature, constexprs, attrs = sass._specialisation(_probe_kernel, args, {"BLOCK": 64})
    runtime = [(i, p) for i, p in enumerate(_probe_kernel.params) if not p.is_constexpr]
    for (i, p), v in zip(runtime, args):
        arg = _DevicePointer(v) if isinstance(v, torch.Tensor) else v
        kind, extra = native_specialize_impl(CUDABackend, arg, False, not p.do_not_specialize,
                                             not p.do_not_specialize_on_alignment)
        assert signature[p.name] == kind, p.name
        if kind == "constexpr":
            assert constexprs[(i,)] == extra and type(constexprs[(i,)]) is type(extra), p.name
        assert ((i,) in attrs) == (extra == "D"), p.name


def _launch(x_offset=0, n=48, block=64, **kw):
    x = torch.empty(256, dtype=torch.bfloat16, device="meta")[x_offset:]
    y = torch.empty(256, dtype=torch.float32, device="meta")
    return _loop_kernel, (x, y, n, 3, 0.5), {"BLOCK": block, "num_warps": 4, "num_stages": 3, **kw}


def test_launch_key_splits_what_the_jit_compiles_apart_only():
    """Two launches get one key exactly when the JIT compiles them into one kernel: alignment, the ==1 and
    multiple-of-16 rules, constexpr values by type (True, 1 and 1.0; also inside tuples), warps and stages
    tell launches apart; integers that specialise alike do not."""
    key = sass.launch_key
    assert key(*_launch()) == key(*_launch())
    assert key(*_launch(n=17)) == key(*_launch(n=33))  # i32, no hint: one kernel
    assert key(*_launch(x_offset=8)) == key(*_launch())  # 16 bytes in: still aligned
    different = [_launch(x_offset=4), _launch(n=1), _launch(n=17), _launch(block=True), _launch(block=1.0),
                 _launch(block=(1, 2)), _launch(num_warps=8), _launch(num_stages=2)]
    keys = [key(*launch) for launch in [_launch(block=1), _launch(block=(True, 2))] + different]
    assert len(set(keys)) == len(keys) and key(*_launch()) not in keys


def _listing(start: int, instructions: list[str]) -> str:
    """``instructions`` as ``cuobjdump -sass`` prints them, 16 bytes apart from ``start``."""
    lines = ["\tcode for sm_90a", "\t\tFunction : _k"]
    for n, ins in enumerate(instructions):
        lines.append(f"        /*{start + 16 * n:04x}*/                   {ins} ;    /* 0x000000000000794d */")
        lines.append("                                                    /* 0x000fea0003800000 */")
    return "\n".join(lines) + "\n"


def _fake_compiled(monkeypatch, instructions, start=0xFFA0, usage="REG:40 STACK:8 SHARED:0 LOCAL:8"):
    texts = {"-res-usage": f" Function _k:\n  {usage}\n", "-sass": _listing(start, instructions)}
    monkeypatch.setattr(sass, "_cuobjdump", lambda cubin, flag: texts[flag])
    return types.SimpleNamespace(asm={"cubin": b""})


def test_stats_read_the_widest_loop_and_the_narrowest_loading_one(monkeypatch):
    """Registers and spills from ``-res-usage``; the main loop is the widest backward branch (its branch counted),
    also where addresses pass 0xffff; barriers are ``BAR.*`` (not DEPBAR's waits); wgmma serialised when every
    HGMMA has its own wait; per output divides the loop by the outputs a thread holds; per load is the narrowest
    loop's, global loads only; the final self-branch is no loop."""
    def at(n):
        return f"0x{0xFFA0 + 16 * n:x}"

    code = ["S2R R0, SR_TID.X", "LDC R1, c[0x0][0x28]", "LDS R2, [R0]",  # 2: outer loop
            "@!P0 LDG.E R3, desc[UR4][R4.64]",  # 3: inner loop
            "FADD R5, R5, R3", "LDG.E R6, desc[UR4][R8.64]", "LDC R7, c[0x0][0x220]", f"@P0 BRA {at(3)}",
            "BAR.RED.POPC.DEFER_BLOCKING R9, 0x0, P1", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", f"@P1 BRA {at(2)}", "EXIT", f"BRA {at(13)}", "NOP"]
    stats = sass._stats(_fake_compiled(monkeypatch, code), 4.0)
    assert stats == {"registers": 40, "spill_bytes": 8, "loop_instructions": 10, "loop_barriers": 1,
                     "wgmma_serialised": True, "per_output": 2.5, "inner_per_load": 2.5}
    # a second HGMMA without its own wait: the pipeline is not serialised; another unit name
    code[6] = "HGMMA.64x64x16.F32.BF16 R40, gdesc[UR8], R40"
    assert not sass._stats(_fake_compiled(monkeypatch, code), 2.0, "score")["wgmma_serialised"]
    assert sass._stats(_fake_compiled(monkeypatch, code), 2.0, "score")["per_score"] == 5.0
    # no loop at all: nothing counted, whatever the trailing self-branch
    flat = ["S2R R0, SR_TID.X", "LDG.E R3, desc[UR4][R4.64]", "STG.E desc[UR4][R4.64], R3", "EXIT", "BRA 0x40"]
    stats = sass._stats(_fake_compiled(monkeypatch, flat, start=0), 1.0)
    assert stats["loop_instructions"] == 0 and stats["per_output"] == 0 and "inner_per_load" not in stats


def test_compile_like_jit_targets_sm90_with_the_launch_s_options():
    """One real compile: sm_90, the launch's warps and stages, the aligned pointer and the multiple of 16 marked
    divisible, a float typed as asked."""
    x = torch.empty(4096, dtype=torch.bfloat16, device="meta")
    y = torch.empty(4096, device="meta")
    compiled = sass._compile_like_jit(_loop_kernel, (x[8:], y, 4096, 7, 0.5),
                                      {"BLOCK": 256, "num_warps": 2, "num_stages": 2}, "fp64")
    assert compiled.metadata.target.arch == 90 and compiled.metadata.target.backend == "cuda"
    assert (compiled.metadata.num_warps, compiled.metadata.num_stages) == (2, 2)
    func = next(line for line in compiled.asm["ttir"].splitlines() if "tt.func" in line)
    assert func.count("tt.divisibility = 16") == 3 and "%steps: i32 loc" in func and "%scale: f64" in func
    assert len(compiled.asm["cubin"]) > 0


def test_torch_compile_copy_is_a_cached_module_of_its_own():
    """The copy ``torch.compile`` would build: a new function from a generated module, made once per kernel."""
    copy = sass.torch_compile_copy(_loop_kernel)
    assert copy is not _loop_kernel and copy is sass.torch_compile_copy(_loop_kernel)
    assert copy.fn.__module__.startswith("torch_compile_copy_") and copy.fn.__name__ == "_loop_kernel"
    assert [p.name for p in copy.params] == [p.name for p in _loop_kernel.params]


def _replayed(name):
    """Independently of ``profile_network``: per launch key, (calls, modes, largest grid, warps, config) of the
    network's training step and inference, replayed at 132 SMs."""
    from unittest import mock

    from bench.models import NETWORKS
    from bench.registry import load_cases
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops.utils import LAUNCHES
    from fastseg3d.profile import _autocast_on_meta

    load_cases()
    net = NETWORKS[name]
    side = net.sides[0]
    torch.manual_seed(0)
    model = net.build(net.cfg, False).to("meta")
    x = torch.empty(net.batch, net.in_channels, side, side, side, device="meta")
    label = torch.zeros(net.batch, 1, side, side, side, dtype=torch.long, device="meta")
    seen = {}
    for mode in ("train_step", "infer"):
        recorder = sass._FusedCalls()
        with recorder, _autocast_on_meta(torch.bfloat16), torch.set_grad_enabled(mode == "train_step"):
            model.train(mode == "train_step")
            y = model(x)
            if mode == "train_step":
                net.loss(False)(y, label).backward()
        for op, args, kwargs in recorder.calls:
            grids = []
            with mock.patch.object(kernel_utils, "sm_count", lambda device: 132):
                launches = sass._captured(lambda: LAUNCHES[op](*args, **kwargs), grids)
            for (fn, a, kw), grid in zip(launches, grids):
                kw = {"num_warps": 4, **kw}
                calls, modes, largest, warps, config = seen.get(sass.launch_key(fn, a, kw), (0, set(), (1, 1, 1),
                                                                                             None, None))
                grid = (*grid, 1, 1)[:3]
                seen[sass.launch_key(fn, a, kw)] = (
                    calls + 1, modes | {mode}, tuple(map(max, largest, grid)), kw["num_warps"],
                    {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")})
    return seen


def test_profile_network_against_a_replay(monkeypatch):
    """dsd_unet's training step and inference: a row per launch key with its calls, modes, largest grid and
    warps as an independent replay finds them; each compiled from its ``torch.compile`` copy with fp64 floats;
    and what an H100 refuses (shared memory, registers x threads, grid axes), exact at each limit, on which the
    CLI exits 1."""
    compiled = []

    def fake_compile(fn, args, kwargs, float_type="fp32"):
        compiled.append((fn, float_type))
        return types.SimpleNamespace(asm={"cubin": b""}, metadata=types.SimpleNamespace(shared=1000))

    monkeypatch.setattr(sass, "_compile_like_jit", fake_compile)
    monkeypatch.setattr(sass, "_cuobjdump", lambda cubin, flag: "  REG:40 STACK:0 SHARED:0\n")
    monkeypatch.setattr(sass, "SM90_SHARED_BYTES", 1000)  # at the limit: launches
    monkeypatch.setattr(sass, "SM90_REGISTERS", 40 * 32 * 4)  # 40 registers a thread: at most 4 warps
    replay = _replayed("dsd_unet")
    widest = max(grid[0] for _, _, grid, _, _ in replay.values())
    monkeypatch.setattr(sass, "GRID_LIMITS", (widest, 65535, 65535))  # at the limit: launches
    rows = sass.profile_network("dsd_unet")
    assert len(rows) == len(replay) == len(compiled)
    assert all(fn.fn.__module__.startswith("torch_compile_copy_") and t == "fp64" for fn, t in compiled)
    got = sorted((r["kernel"], r["calls"], tuple(r["modes"]), r["grid"], r["warps"], repr(r["config"])) for r in rows)
    want = sorted((fn.fn.__name__, c, tuple(sorted(m)), g, w, repr(cfg))
                  for (fn, *_), (c, m, g, w, cfg) in replay.items())
    assert got == want
    assert any(len(r["modes"]) == 2 for r in rows) and any(r["calls"] > 1 for r in rows)
    for r in rows:
        threads = 32 * r["warps"]
        assert r["problems"] == ([f"40 registers x {threads} threads (at most 5120)"] if r["warps"] > 4 else []), r

    monkeypatch.setattr(sass, "SM90_SHARED_BYTES", 999)
    monkeypatch.setattr(sass, "SM90_REGISTERS", 40 * 32 - 1)
    monkeypatch.setattr(sass, "GRID_LIMITS", (widest - 1, 65535, 65535))
    for r in sass.profile_network("dsd_unet", modes=("infer",)):
        want = ["1000 bytes of shared memory (at most 999)", f"40 registers x {32 * r['warps']} threads (at most 1279)"]
        if r["grid"][0] == widest:
            want.append(f"grid axis 0: {widest} programs (at most {widest - 1})")
        assert r["problems"] == want, r
    # the CLI prints them and fails
    with pytest.raises(SystemExit) as exc:
        sass.main(["network", "dsd_unet"])
    assert exc.value.code == 1


def test_launches_cli_takes_a_network_name(capsys):
    """``python -m bench.sass launches NAME`` prints each fused op's calls and launches, then the total."""
    sass.main(["launches", "dsd_unet"])
    out = capsys.readouterr().out.splitlines()
    counts = sass.launch_counts("dsd_unet")
    assert out[-1] == (f"{counts['total']} launches: {counts['aten']} ATen ops, {counts['fused']} by "
                       f"{len(counts['by_op'])} fused ops")
    assert len(out) == len(counts["by_op"]) + 1 and counts["total"] == counts["aten"] + counts["fused"] > 0


def test_launch_counts_count_each_kernel_once():
    """A fused op's call counts as its launches (its Triton launches and the ATen ops its launcher runs), never also
    as an ATen op; every other ATen op that writes memory counts once."""
    from unittest import mock

    from bench.models import NETWORKS
    from bench.registry import load_cases
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops.utils import LAUNCHES
    from fastseg3d.profile import _autocast_on_meta, _Writes

    counts = sass.launch_counts("dsd_unet")
    load_cases()
    net = NETWORKS["dsd_unet"]
    side = net.sides[0]
    torch.manual_seed(0)
    model = net.build(net.cfg, False).to("meta").train()
    x = torch.empty(net.batch, net.in_channels, side, side, side, device="meta")
    label = torch.zeros(net.batch, 1, side, side, side, dtype=torch.long, device="meta")
    writes, recorder = _Writes(), sass._FusedCalls()
    with writes, recorder, _autocast_on_meta(torch.bfloat16):
        net.loss(False)(model(x), label).backward()
    fused_calls = sum(c for name, (c, _) in writes.by_op.items() if name.startswith("fastseg3d::"))
    assert fused_calls > 0 and counts["aten"] == sum(c for _, (c, _) in writes.by_op.items()) - fused_calls
    by_op: dict = {}
    for op, args, kwargs in recorder.calls:
        inner = _Writes()
        with mock.patch.object(kernel_utils, "sm_count", lambda device: 132), inner:
            n = len(sass._captured(lambda: LAUNCHES[op](*args, **kwargs)))
        calls, launches = by_op.get(op, (0, 0))
        by_op[op] = [calls + 1, launches + n + sum(c for c, _ in inner.by_op.values())]
    assert counts["by_op"] == by_op and counts["fused"] == sum(n for _, n in by_op.values())
