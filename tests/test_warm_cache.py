"""bench.warm_cache: Triton kernels compiled for sm_90 without a GPU, found again in the cache by the key Triton's
JIT computes, after the tarball moves to another directory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from bench import sass, warm_cache
from fastseg3d.ops.utils import LAUNCHES

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _upsample_sum_launches() -> list:
    """The smallest kernel there is: upsample_sum's, fp32 and fp16 (two specialisations)."""
    launches = []
    for dtype in (torch.float32, torch.float16):
        x = torch.empty(2, 8, 4, 4, 4, dtype=dtype, device="meta")
        skip = torch.empty(2, 8, 8, 8, 8, dtype=dtype, device="meta")
        launches += warm_cache.collect(_fused_calls(lambda: _upsample_sum(x, skip)))
    return launches


def _upsample_sum(x, skip):
    import fastseg3d

    return fastseg3d.ops.upsample_sum([x, skip])


def _fused_calls(call) -> list:
    recorder = sass._FusedCalls()
    with recorder:
        call()
    return recorder.calls


def _hit(launch, monkeypatch, cache_dir) -> tuple[bool, str]:
    """Whether Triton's JIT (stand-in driver, a fresh in-memory cache) finds ``launch`` compiled in ``cache_dir``
    under the key it computes, and the kernel's hash."""
    events = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: events.append(kw["cache_hit"]))
    [(_, kernel_hash, _, _)] = warm_cache.compile_launches([launch], str(cache_dir), jobs=1)
    return events == [True], kernel_hash


def test_gpu_tests_plan_records_the_tier_on_meta():
    """The GPU tier run on meta tensors (a process of its own: the plan runs pytest): most tests run through, and
    their launches include every kernel family the network-scale tests make (SegFormer3D, MobileUtr)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSEG3D_", "PYTEST_"))}
    proc = subprocess.run([sys.executable, "-m", "bench.warm_cache", "--plan", "gpu_tests", "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"(\d+) failed, (\d+) passed", proc.stdout)
    assert summary and int(summary[2]) > 3 * int(summary[1]), proc.stdout[-2000:]
    launches = int(re.search(r"launches, (\d+) distinct", proc.stdout)[1])
    kernels = dict(re.findall(r"^  (\w+) x(\d+)$", proc.stdout, re.M))
    assert launches > 500 and sum(map(int, kernels.values())) == launches
    assert {"_dwconv3d_fwd_kernel", "_dwconv3d_bwd_weight_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel",
            "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_upsample_sum_kernel", "_kl_fwd_kernel",
            "_selfreg_inter_kernel", "_stats_kernel"} <= set(kernels), kernels


def test_meta_values_stand_in_and_stop_a_loop():
    x = torch.zeros(3, device="meta")
    with warm_cache._MetaValues():
        assert torch.equal(x, x + 1) and x.sum().item() == 1.0 and not bool((x > 0).any())
        with pytest.raises(RuntimeError, match="a loop on them"):
            while not (x > 0).any():  # a flag never turns True: the reads are counted
                pass
    # CUDA tensors made meta ones
    with warm_cache._CudaAsMeta():
        y = torch.ones(2, device="cuda")
        m = torch.nn.Linear(2, 2).cuda()
        assert y.is_meta and m.weight.is_meta and y.is_cuda and torch.zeros(1).to("cuda:0").is_meta


def test_target_plan_follows_gpu_check(monkeypatch):
    """The target plan runs each case of gpu_check.sh's TARGET_ARGS with its shapes, dtypes and modes."""
    seen = []
    monkeypatch.setattr(warm_cache, "_case_calls", lambda *a: seen.append(a) or [])
    warm_cache.PLANS["targets"]()
    from bench.utils import gpu_check_target_args

    plan = gpu_check_target_args()
    assert {name for name, *_ in seen} == set(plan)
    assert ("segformer3d", "bf16", ["*128^3"], ("train_step",)) in seen
    assert ("attention", "fp32", ["stage1@128^3*", "stage2@128^3*"], ("fwd", "fwd+bwd")) in seen


def test_compiled_kernels_are_found_by_the_jit_key_after_install(tmp_path, monkeypatch):
    """Compiled through the JIT with the stand-in driver (two processes), packed, installed elsewhere: Triton
    finds each kernel there by the key of the launch's specialisation (binaries and metadata only), and the report
    tells a kernel compiled later from the carried ones."""
    launches = _upsample_sum_launches()
    assert len(launches) == 2
    build = tmp_path / "build"
    compiled = warm_cache.compile_launches(launches, str(build), jobs=2)
    assert os.environ.get("TRITON_STORE_BINARY_ONLY") != "1"  # restored
    assert len({h for _, h, _, _ in compiled}) == 2 and not any(p for *_, p in compiled)
    for entry in build.iterdir():
        suffixes = {p.suffix for p in entry.iterdir()}
        assert {".json", ".cubin"} <= suffixes and not suffixes & {".ttir", ".ttgir", ".llir", ".ptx"}, suffixes
    tarball = tmp_path / "cache.tgz"
    warm_cache._pack(str(build), str(tarball))
    import shutil

    shutil.rmtree(build)  # the recorded paths point nowhere now: install must rewrite them
    target = tmp_path / "elsewhere" / "cache"
    assert warm_cache.install(str(tarball), str(target)) == 2
    for launch, (_, expected, _, _) in zip(launches, compiled):
        hit, got = _hit(launch, monkeypatch, target)
        assert hit and got == expected
    assert warm_cache.report(str(target)) == {"carried": 2, "compiled": {}, "inductor": {}}
    # a kernel compiled in the run, beside the carried ones
    # (another shape of the same dtypes would be the same specialisation: a bf16 one is not)
    x = torch.empty(1, 4, 3, 3, 3, dtype=torch.bfloat16, device="meta")
    skip = torch.empty(1, 4, 9, 9, 9, dtype=torch.bfloat16, device="meta")
    other = warm_cache.collect(_fused_calls(lambda: _upsample_sum(x, skip)))
    hit, _ = _hit(other[0], monkeypatch, target)
    assert not hit
    # and one of torch.compile's, its IR naming Inductor's copy of the source
    inductor = target / "INDUCTOR"
    inductor.mkdir()
    (inductor / "_upsample_sum_kernel.json").write_text("{}")
    (inductor / "_upsample_sum_kernel.source").write_text('#loc = loc("/tmp/torchinductor_root/ab/cd.py":12:0)\n')
    assert warm_cache.report(str(target)) == {"carried": 2, "compiled": {"_upsample_sum_kernel": 1},
                                              "inductor": {"_upsample_sum_kernel": 1}}
    # installed again (a second call on a warm machine): the kernels compiled here keep their paths
    groups = {p: p.read_text() for p in target.glob("*/__grp__*") if p.parent.name not in _entries(target)}
    assert groups
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert warm_cache.install(str(tarball), "cache") == 2  # a relative directory
    assert {p: p.read_text() for p in groups} == groups
    for launch in launches:
        assert _hit(launch, monkeypatch, target)[0]


def _entries(cache_dir) -> set:
    return set(json.loads((cache_dir / warm_cache.MANIFEST).read_text())["entries"])


def test_keys_of_stand_ins_match_those_of_real_tensors(tmp_path):
    """The JIT specialises a stand-in pointer as it does a tensor with the same dtype and storage offset: the
    same kernel hash for an aligned and a misaligned (fp16, one element in) first argument."""
    from triton.runtime import driver

    (fn, args, kwargs), _ = _upsample_sum_launches()
    i = next(k for k, a in enumerate(args) if isinstance(a, torch.Tensor))
    hashes = {}
    for offset in (0, 1):
        base = torch.empty(args[i].numel() + 8, dtype=args[i].dtype, device="meta")
        meta_args = list(args)
        meta_args[i] = base[offset:offset + args[i].numel()]
        [(_, hashes["stand-in", offset], _, _)] = warm_cache.compile_launches([(fn, meta_args, kwargs)],
                                                                              str(tmp_path), jobs=1)
        real = [torch.empty(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in meta_args]
        real[i] = torch.empty(base.shape, dtype=base.dtype)[offset:offset + args[i].numel()]
        previous = driver._active
        driver.set_active(warm_cache._Driver())
        try:
            os.environ["TRITON_CACHE_DIR"] = str(tmp_path)
            hashes["tensor", offset] = fn.run(*real, grid=(1,), warmup=True, **kwargs).hash
        finally:
            os.environ.pop("TRITON_CACHE_DIR")
            driver._active = previous
            fn.device_caches.clear()
    assert hashes["stand-in", 0] == hashes["tensor", 0] != hashes["tensor", 1] == hashes["stand-in", 1], hashes


def test_install_warns_where_the_keys_would_differ(tmp_path, capsys):
    build = tmp_path / "build"
    build.mkdir()
    tarball = tmp_path / "cache.tgz"
    warm_cache._pack(str(build), str(tarball))
    assert warm_cache.install(str(tarball), str(tmp_path / "a")) == 0
    assert "WARNING" not in capsys.readouterr().err
    manifest = tmp_path / "a" / warm_cache.MANIFEST
    facts = json.loads(manifest.read_text())
    facts["ptxas"] = "Build cuda_13.0"
    manifest.write_text(json.dumps(facts))
    import tarfile

    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(manifest, arcname=warm_cache.MANIFEST)
    warm_cache.install(str(tarball), str(tmp_path / "b"))
    err = capsys.readouterr().err
    assert "its keys will not match: ptxas Build cuda_13.0 there" in err, err


def test_sigterm_ends_the_plan_at_once():
    """A time box's SIGTERM ends the build at once, also in the middle of the GPU tests' pytest run (pytest would
    take a SystemExit for a failed test and go on)."""
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSEG3D_", "PYTEST_"))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.warm_cache", "--plan", "gpu_tests", "--dry-run"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the tests have started
        if line.startswith((".", "F")):
            break
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 124
    assert time.monotonic() - start < 10


def test_compile_leaves_the_driver_as_it_was(tmp_path):
    from triton.runtime import driver

    before = driver._active
    warm_cache.compile_launches(_upsample_sum_launches()[:1], str(tmp_path), jobs=1)
    assert driver._active is before


def test_cli_report_and_errors(tmp_path, capsys):
    (tmp_path / warm_cache.MANIFEST).write_text(json.dumps({"entries": ["a"], "root": "/x"}))
    warm_cache.main(["--report", str(tmp_path)])
    assert "1 kernels carried, 0 compiled in this run" in capsys.readouterr().out
    warm_cache.main(["--report", str(tmp_path / "missing")])
    assert "0 kernels carried, 0 compiled in this run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        warm_cache.main(["--install", "x.tgz"])  # no --dir
    assert "--install needs --dir" in capsys.readouterr().err
    assert set(LAUNCHES)  # the ops the plans replay register their launchers


def test_a_launch_that_does_not_compile_is_reported(tmp_path):
    """A kernel that fails to compile for sm_90 is named with its error, and the others are still compiled."""
    good = _upsample_sum_launches()[0]
    fn, args, kwargs = good
    bad = (fn, args, {**kwargs, "BLOCK_V": 3})  # tl.arange needs a power of two
    results = warm_cache.compile_launches([bad, good], str(tmp_path), jobs=1)
    (name, kernel_hash, _, problem), (_, good_hash, _, good_problem) = results
    assert name == "_upsample_sum_kernel" and kernel_hash is None and problem, results
    assert good_hash and good_problem is None


def test_tune_plan_takes_every_candidate_of_the_sweeps():
    """bench.tune's sweeps, run on meta tensors: each candidate's launches with the candidate in place (dwconv3d's
    walk depths 1 to 3), for every op the sweeps cover."""
    launches = warm_cache.distinct(warm_cache.PLANS["tune"]())
    names = {fn.fn.__name__ for fn, _, _ in launches}
    assert {"_dwconv3d_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
            "_kl_fwd_kernel", "_interp_transpose_kernel"} <= names, names
    stages = {kw["STAGES"] for fn, _, kw in launches if fn.fn.__name__ == "_dwconv3d_fwd_kernel"}
    assert stages == {1, 2, 3}
    blocks = {(kw["BLOCK_M"], kw["BLOCK_N"]) for fn, _, kw in launches if fn.fn.__name__ == "_attn_fwd_kernel"}
    assert len(blocks) > 3, blocks


def test_cli_builds_a_tarball(tmp_path, monkeypatch, capsys):
    """``--plan ... --out``: the plan's launches compiled and packed; the tarball installs. Built into a directory
    that holds a kernel of an older source (an incremental build), the tarball leaves that one out."""
    monkeypatch.setitem(warm_cache.PLANS, "tune", _upsample_sum_launches)
    build = tmp_path / "build"
    stale = build / "STALEENTRY"
    stale.mkdir(parents=True)
    (stale / "_upsample_sum_kernel.json").write_text('{"hash": "0123"}')
    (stale / "_upsample_sum_kernel.cubin").write_bytes(b"")
    tarball = tmp_path / "cache.tgz"
    warm_cache.main(["--plan", "tune", "--cache-dir", str(build), "--out", str(tarball), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "2 launches, 2 distinct" in out and "compiled in" in out and "PROBLEM" not in out, out
    assert warm_cache.install(str(tarball), str(tmp_path / "cache")) == 2
    assert not (tmp_path / "cache" / "STALEENTRY").exists() and len(list(build.iterdir())) == 3


def test_compiled_kernels_target_sm90(tmp_path):
    """The stand-in driver compiles for the H100/H200's sm_90: a cache built for another arch is never looked up."""
    warm_cache.compile_launches(_upsample_sum_launches()[:1], str(tmp_path), jobs=1)
    [metadata] = [p for p in tmp_path.glob("*/*.json") if not p.name.startswith("__grp__")]
    assert json.loads(metadata.read_text())["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}


def test_stand_in_pointer_alignment_is_in_bytes():
    """A view's alignment (part of the JIT's key) is its storage offset in bytes: fp32 four elements in is 16-byte
    aligned as on the GPU, one fp16 element in is not."""
    fp32 = torch.empty(64, device="meta")
    fp16 = torch.empty(64, dtype=torch.float16, device="meta")
    assert warm_cache._DevicePointer(fp32).data_ptr() % 16 == 0
    assert warm_cache._DevicePointer(fp32[4:]).data_ptr() % 16 == 0
    assert warm_cache._DevicePointer(fp32[2:]).data_ptr() % 16 == 8
    assert warm_cache._DevicePointer(fp16[1:]).data_ptr() % 16 == 2


def test_case_calls_select_shapes_and_modes():
    """The target plan's --shapes patterns pick the labels they match (not the others), and each mode adds its
    calls: fwd the forward, fwd+bwd (or bwd) the forward and its backward."""
    residual = warm_cache._case_calls("layer_norm", "bf16", ["*residual"], ("fwd",))
    assert [op for op, *_ in residual] == ["fastseg3d::add_layer_norm"] * 2
    assert {tuple(args[0].shape) for _, args, _ in residual} == {(2, 32768, 32), (2, 512, 160)}
    assert len(warm_cache._case_calls("layer_norm", "bf16", None, ("fwd",))) == 4  # no pattern: every label
    one = ["2x512x160"]
    assert [op for op, *_ in warm_cache._case_calls("layer_norm", "fp32", one, ("fwd+bwd",))] == [
        "fastseg3d::layer_norm", "fastseg3d::layer_norm_backward"]
    assert [op for op, *_ in warm_cache._case_calls("layer_norm", "fp32", one, ("bwd",))] == [
        "fastseg3d::layer_norm", "fastseg3d::layer_norm_backward"]


def test_gpu_tests_plugin_emulates_cuda_autocast_as_fp16(monkeypatch):
    """A GPU test's torch.autocast("cuda") without a dtype runs in fp16 on the GPU: its launches are recorded in
    fp16 (another dtype would compile kernels the GPU run never asks for)."""
    import sys
    import types

    import fastseg3d

    plugin = warm_cache._GpuTestsOnMeta([])
    wrapper = plugin.pytest_runtest_call(types.SimpleNamespace(module=sys.modules[__name__]))
    next(wrapper)  # the test's body runs here
    try:
        x = torch.randn(1, 4, 8, 8, 8, device="cuda")
        w = torch.randn(4, 1, 3, 3, 3, device="cuda")
        with torch.autocast("cuda"):
            y = fastseg3d.ops.dwconv3d(x, w, None)
        assert y.is_meta and y.dtype == torch.float16
    finally:
        with pytest.raises(StopIteration):
            wrapper.send(None)
    [(fn, args, _)] = plugin.launches
    assert fn.fn.__name__ == "_dwconv3d_fwd_kernel" and args[0].dtype == torch.float16


def test_largest_cube_plan_takes_every_side_of_the_search(monkeypatch):
    """The cube search's sides: doubling from START_SIDE up to 512, and 960 near the H200's predicted limit; each a
    bf16 training step of batch 1."""
    from bench.largest_cube import START_SIDE

    seen = []
    monkeypatch.setattr(warm_cache, "_network_calls", lambda build, shape, dtype, train, loss=None: seen.append(
        (shape, dtype, train)) or [])
    assert warm_cache.PLANS["largest_cube"]() == []
    *doubling, near_limit = [shape[2] for shape, _, _ in seen]
    assert doubling == [START_SIDE * 2**i for i in range(len(doubling))] and doubling[-1] <= 512 < 2 * doubling[-1]
    assert near_limit == 960, seen
    assert all(shape[0] == 1 and shape[2:] == (shape[2],) * 3 for shape, _, _ in seen)
    assert all(dtype == torch.bfloat16 and train for _, dtype, train in seen)


def test_replayed_launches_are_those_of_132_sms():
    """Calls recorded on meta tensors (no SM count there) are replayed as an H100 or H200 launches them: the
    launchers split the work by 132 SMs, which changes the arguments the JIT specialises on."""
    from unittest import mock

    import fastseg3d
    from fastseg3d.kernels import utils as kernel_utils

    x = torch.empty(2, 32, 64, 64, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(32, 1, 3, 3, 3, dtype=torch.bfloat16, device="meta")
    calls = _fused_calls(lambda: fastseg3d.ops.dwconv3d(x, w, None))
    [(fn, args, kwargs)] = warm_cache.launches_of(calls)
    (op, call_args, call_kwargs), = calls
    for sms, same in ((sass.SM90_SMS, True), (None, False)):
        with mock.patch.object(kernel_utils, "sm_count", lambda device: sms):
            [(_, a, kw)] = sass._captured(lambda: LAUNCHES[op](*call_args, **call_kwargs))
        assert (sass.launch_key(fn, args, kwargs) == sass.launch_key(fn, a, kw)) == same


def test_key_facts_read_the_ptxas_the_run_sets(tmp_path, monkeypatch):
    """gpu_check.sh sets the ptxas variable for the whole run (TRITON_PTXAS_PATH in Triton 3.6): the manifest
    records that ptxas's version (the last line of --version), which --install compares with the GPU machine's."""
    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\necho 'ptxas: NVIDIA (R) Ptx optimizing assembler'\n"
                    "echo 'Cuda compilation tools, release 99.9, V99.9.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv(warm_cache.ptxas_variable(), str(fake))
    assert warm_cache.key_facts()["ptxas"] == "Cuda compilation tools, release 99.9, V99.9.1"


def test_compile_workers_see_the_run_s_ptxas_and_binaries_only(tmp_path, monkeypatch):
    """The compile workers see gpu_check.sh's ptxas variable where it is set (its version is in every key),
    Triton's own ptxas where not, the cache directory and binaries only; the environment is restored after."""
    seen = []
    var = warm_cache.ptxas_variable()
    names = (var, "TRITON_CACHE_DIR", "TRITON_STORE_BINARY_ONLY")

    def compile_one(i):
        seen.append({k: os.environ.get(k) for k in names})
        return "k", None, 0.0, None

    monkeypatch.setattr(warm_cache, "_compile_one", compile_one)
    monkeypatch.delenv("TRITON_STORE_BINARY_ONLY", raising=False)
    monkeypatch.setenv(var, "/opt/the-run-s/ptxas")
    warm_cache.compile_launches([None], str(tmp_path), jobs=1)
    monkeypatch.delenv(var)
    warm_cache.compile_launches([None], str(tmp_path), jobs=1)
    assert seen == [{var: p, "TRITON_CACHE_DIR": str(tmp_path), "TRITON_STORE_BINARY_ONLY": "1"}
                    for p in ("/opt/the-run-s/ptxas", warm_cache.ptxas())]
    assert var not in os.environ and "TRITON_STORE_BINARY_ONLY" not in os.environ


def test_ptxas_is_the_one_triton_compiles_sm90_with():
    """The pinned ptxas and its variable are those Triton's sm_90 compile reads (Triton 3.6: ptxas and
    TRITON_PTXAS_PATH; 3.9: ptxas-blackwell and TRITON_PTXAS_BLACKWELL_PATH), so the manifest's version is the
    key's."""
    from triton.backends.nvidia.compiler import get_ptxas

    var, path = warm_cache.ptxas_variable(), warm_cache.ptxas()
    assert os.path.basename(path) in ("ptxas", "ptxas-blackwell")
    assert var == f"TRITON_{os.path.basename(path).upper().replace('-', '_')}_PATH"
    if var not in os.environ:
        assert os.path.realpath(get_ptxas(90).path) == os.path.realpath(path)


def test_compile_reports_shared_memory_an_h100_refuses(tmp_path, monkeypatch):
    """A kernel that compiles but needs more shared memory than an H100 block takes is a problem (the GPU would
    refuse the launch), named with its size; exactly the limit is not. The limit is set about the kernel's own
    size, read from the cache's metadata (upsample_sum's kernel takes none on Triton 3.6, some on 3.9)."""
    launch = _upsample_sum_launches()[:1]
    [(name, kernel_hash, _, problem)] = warm_cache.compile_launches(launch, str(tmp_path), jobs=1)
    assert name == "_upsample_sum_kernel" and kernel_hash and problem is None
    metadata = [json.loads(p.read_text()) for p in tmp_path.rglob("_upsample_sum_kernel.json")]
    [shared] = {m["shared"] for m in metadata}
    monkeypatch.setattr(sass, "SM90_SHARED_BYTES", shared)
    assert warm_cache.compile_launches(launch, str(tmp_path), jobs=1)[0][3] is None
    monkeypatch.setattr(sass, "SM90_SHARED_BYTES", shared - 1)
    [(_, again, _, problem)] = warm_cache.compile_launches(launch, str(tmp_path), jobs=1)
    assert again == kernel_hash
    assert problem == f"{shared} bytes of shared memory (an H100 block takes {shared - 1})", problem


def test_cli_build_needs_an_output_and_fails_on_a_problem(tmp_path, monkeypatch, capsys):
    """A build without --out, --cache-dir or --dry-run is a usage error before any plan runs; a build whose launch
    does not compile prints it as a PROBLEM and exits 1 (gpu_check must not carry a cache that lacks it)."""
    planned = []
    monkeypatch.setitem(warm_cache.PLANS, "tune", lambda: planned.append(1) or [])
    with pytest.raises(SystemExit) as exit_info:
        warm_cache.main(["--plan", "tune"])
    assert exit_info.value.code == 2 and not planned
    assert "give --out or --cache-dir" in capsys.readouterr().err
    fn, args, kwargs = _upsample_sum_launches()[0]
    monkeypatch.setitem(warm_cache.PLANS, "tune", lambda: [(fn, args, {**kwargs, "BLOCK_V": 3})])
    with pytest.raises(SystemExit) as exit_info:
        warm_cache.main(["--plan", "tune", "--cache-dir", str(tmp_path), "--jobs", "1"])
    assert exit_info.value.code == 1
    assert "PROBLEM _upsample_sum_kernel:" in capsys.readouterr().out


def test_tune_plan_sweeps_every_shape_in_bf16_on_meta(monkeypatch):
    """The tune plan runs each op's sweep at every one of its default shapes, in bf16 (bench.tune's default dtype)
    on meta tensors: a shape or dtype left out compiles on the GPU inside the sweep's time box."""
    import importlib

    from bench.tune import OPS

    seen = []
    for op in OPS:
        tuner = importlib.import_module(f"bench.tune_{op}")
        monkeypatch.setattr(tuner, "sweep", lambda label, dtype, device=None, time_fn=None, op=op: seen.append(
            (op, label, dtype, device.type)) or [])
    warm_cache.PLANS["tune"]()
    expected = [(op, label, torch.bfloat16, "meta") for op in OPS
                for label in importlib.import_module(f"bench.tune_{op}").SHAPES]
    assert seen == expected


def test_a_relative_cache_dir_installs_with_absolute_paths(tmp_path, monkeypatch):
    """compile_launches called with a relative directory (as a caller other than the CLI may): the paths Triton
    records are absolute, so --install rewrites them for the directory it extracts into."""
    monkeypatch.chdir(tmp_path)
    warm_cache.compile_launches(_upsample_sum_launches()[:1], "rel", jobs=1)
    warm_cache._pack("rel", "cache.tgz")
    target = tmp_path / "elsewhere"
    warm_cache.install("cache.tgz", str(target))
    groups = [json.loads(f.read_text()) for f in target.glob("*/__grp__*")]
    paths = [p for g in groups for c, p in g["child_paths"].items() if not c.endswith(".source")]
    assert paths and all(os.path.isabs(p) and p.startswith(str(target)) and os.path.exists(p) for p in paths)
