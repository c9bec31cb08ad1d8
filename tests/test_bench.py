"""The benchmark harness on a CPU: the registry, rows with every key, the command line, the model cases on tiny
shapes, the roofline arithmetic, the largest-cube search and its refusal without a GPU (timings here mean nothing)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastseg3d

from bench import largest_cube, run
from bench.kl_distill import _eager as kl_eager
from bench.kl_distill import liger_loss
from bench.models import NETWORKS
from bench.registry import Setup, Unavailable, compiled, load_cases
from fastseg3d.ops import kl_distill_multi
from bench.utils import ROW_KEYS, exp_pct, format_table, gpu_check_target_args, read_rows, roofline

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "dwconv3d": "ops", "attention": "ops", "attention_block": "ops", "kl_distill": "ops", "channel_kl": "ops",
    "selfreg": "ops", "dice_ce": "ops", "group_norm_act": "ops", "upsample_sum": "ops", "layer_norm": "ops",
    "segformer3d": "model", "mobileutr": "model", "mobileutrl": "model", "missu": "model", "dsd_unet": "model",
    "selfreg_unet": "model", "unetr": "model", "mednext": "model",
}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny 3-D convs on a shared 2-core machine: one thread avoids OpenMP contention stalls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_lists_every_case_in_its_suite():
    cases = load_cases()
    assert {name: case.suite for name, case in cases.items()} == SUITES
    for case in cases.values():
        for _, spec in case.shapes(False) + case.shapes(True):
            providers = case.providers(spec)
            assert providers[0] == "fastseg3d" and len(set(providers)) == len(providers)
            assert set(case.optional(spec)) <= set(providers)


def test_bench_quick_writes_rows_table_and_plot(tmp_path):
    cmd = [sys.executable, "-m", "bench.run", "--case", "dwconv3d", "--quick", "--dtype", "fp32", "--modes",
           "fwd,fwd+bwd", "--providers", "fastseg3d,torch (*", "--out", str(tmp_path), "--plot"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "ops.jsonl")
    assert {r["provider"] for r in rows} == {"fastseg3d", "torch (aten-native)", "torch (cudnn-channels-last)"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(tuple(r) == ROW_KEYS and r["median_ms"] > 0 for r in rows)
    assert {r["provider"] for r in rows if r["shape"] == "1x4x8^3 ncdhw k5"} == {"fastseg3d", "torch (aten-native)"}
    # the eager conv peers say which ATen convolution actually ran
    assert all(r["backend"] for r in rows if r["provider"].startswith("torch ("))
    assert "fastseg3d x" in proc.stdout
    assert (tmp_path / "dwconv3d.png").stat().st_size > 0


def test_main_ops_suite_writes_valid_json_and_csv(tmp_path):
    import csv

    out, table = tmp_path / "rows.json", tmp_path / "csv" / "rows.csv"
    assert run.main(["ops", "--case", "dwconv3d", "--quick", "--json", str(out), "--csv", str(table), "--out",
                     str(tmp_path)]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    with open(table, newline="") as f:
        read = list(csv.DictReader(f))
    assert [tuple(r) for r in read] == [ROW_KEYS] * len(rows)
    assert [(r["provider"], float(r["median_ms"])) for r in read] == [(r["provider"], r["median_ms"]) for r in rows]
    assert {r["suite"] for r in rows} == {"ops"} and {r["dtype"] for r in rows} == {"fp32", "bf16"}
    # on a CPU the default set leaves the compiled providers out
    assert not any("compile" in r["provider"] for r in rows)
    assert len(read_rows(tmp_path / "ops.jsonl")) == len(rows)


# the providers of each case that run on a CPU without torch.compile: fastseg3d (its reference fallback there) and
# the eager peers (SDPA's efficient and cuDNN backends need CUDA)
_EAGER_QUICK_RUNS = {
    "attention": ("fp32", ("fastseg3d", "sdpa-flash", "sdpa-math")),
    "attention_block": ("fp32", ("fastseg3d", "torch-sdpa", "torch")),
    "dice_ce": ("fp32", ("fastseg3d", "torch")),
    "group_norm_act": ("fp32", ("fastseg3d", "torch")),
    "layer_norm": ("fp32", ("fastseg3d", "torch")),
    "segformer3d": ("bf16", ("fastseg3d", "plain")),  # a model case under autocast
}


@pytest.mark.parametrize("name", sorted(_EAGER_QUICK_RUNS))
def test_quick_run_writes_a_row_per_provider_and_mode(name, tmp_path, capsys, monkeypatch):
    """Each case through bench.run on its tiny shapes, on the CPU (also in a GPU tier: on a GPU SDPA's flash
    backend refuses fp32): a row for every shape, requested provider and mode, with a finite positive median (a
    provider or mode that fails writes no row, only a "skipped" line)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dtype, providers = _EAGER_QUICK_RUNS[name]
    case = load_cases()[name]
    out = tmp_path / "rows.json"
    assert run.main(["--case", name, "--quick", "--dtype", dtype, "--providers", ",".join(providers),
                     "--out", str(tmp_path), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped (" not in err and "out of memory" not in err, err
    rows = json.loads(out.read_text())
    expected = {(label, p, m) for label, _ in case.shapes(True) for p in providers for m in case.modes}
    assert len(rows) == len(expected) and {(r["shape"], r["provider"], r["mode"]) for r in rows} == expected
    assert all(tuple(r) == ROW_KEYS and r["dtype"] == dtype for r in rows)
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in rows)
    assert read_rows(tmp_path / f"{case.suite}.jsonl") == rows


def test_main_rejects_a_case_of_the_other_suite():
    with pytest.raises(SystemExit) as exc:
        run.main(["model", "--case", "dwconv3d", "--quick"])
    assert exc.value.code == 2


def test_main_lists_cases(capsys):
    assert run.main(["model", "--list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name, suite in SUITES.items() if suite == "model")
    assert "dwconv3d" not in text and "optional:" in text
    # per group of shapes: torch.compile is optional on volumes (the conv stays an extern call), default on tokens
    assert run.main(["--case", "dwconv3d", "--list"]) == 0
    groups = capsys.readouterr().out.split("    shapes:")[1:]
    volume = next(g for g in groups if "ncdhw" in g)
    tokens = next(g for g in groups if "tokens" in g)
    assert "optional: torch.compile," in volume and "default:  fastseg3d, torch, torch.compile\n" in tokens
    # --quick lists the tiny labels that --shapes then matches
    assert run.main(["--case", "dwconv3d", "--list", "--quick"]) == 0
    quick = capsys.readouterr().out
    assert "128^3" not in quick and quick.count("shapes:") >= 2


def test_paths_that_cannot_take_the_rows_fail_before_measuring(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("")
    for argv in (["--out", str(taken)], ["--out", str(tmp_path / "rows"), "--json", str(tmp_path)],
                 ["--out", str(tmp_path / "rows"), "--csv", str(tmp_path)]):
        with pytest.raises(SystemExit) as info:
            run.main(["--case", "channel_kl", "--quick", *argv])
        assert info.value.code == 2
        assert "is a f" in capsys.readouterr().err
    assert not (tmp_path / "rows").exists()


def test_time_limit_stops_before_measuring(tmp_path, capsys):
    assert run.main(["--case", "channel_kl", "--quick", "--time-limit", "1e-9", "--out", str(tmp_path)]) == 0
    assert "time limit" in capsys.readouterr().err
    assert not (tmp_path / "ops.jsonl").exists()


def test_model_suite_rows_and_report(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["model", "--case", "selfreg_unet", "--quick", "--dtype", "fp32", "--out", str(tmp_path)]
    assert run.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert all(tuple(r) == ROW_KEYS and r["suite"] == "model" for r in rows)
    # the U-Nets' inference runs fused norm-activation kernels: measured against the plain chains
    assert {(r["provider"], r["mode"]) for r in rows} == {
        ("fastseg3d", "train_step"), ("fastseg3d", "infer"), ("plain", "train_step"), ("plain", "infer")}
    capsys.readouterr()
    assert run.main(["--report", "--case", "selfreg_unet", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("selfreg_unet") == len(rows)
    # a folder without the case's rows says so (a typo in --out would otherwise print an empty table)
    assert run.main(["--report", "--case", "selfreg_unet", "--out", str(tmp_path / "elsewhere")]) == 1
    assert "no rows of selfreg_unet" in capsys.readouterr().err


def test_a_case_named_twice_is_measured_once(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--case", "upsample_sum", "--case", "upsample_sum", "--quick", "--modes", "fwd", "--dtype", "fp32",
            "--providers", "fastseg3d", "--out", str(tmp_path), "--json", str(out)]
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len({(r["shape"], r["provider"]) for r in rows}) > 0
    assert len((tmp_path / "ops.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("name", ["segformer3d", "mobileutr", "mobileutrl", "missu", "dsd_unet", "selfreg_unet",
                                  "unetr", "mednext"])
def test_model_case_builds_and_steps(name):
    if name in ("unetr", "mednext"):  # MONAI's networks (UNETR's ViT blocks need einops too)
        pytest.importorskip("monai.networks.nets")
        if name == "unetr":
            pytest.importorskip("einops")
    case = load_cases()[name]
    (_, spec), = case.shapes(True)
    for provider in ("fastseg3d", "plain"):
        setup = case.setup(spec, torch.float32, provider, CPU)
        setup.runners["train_step"]()
        assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in setup.grads_of)
        if "infer" in setup.runners:
            logits = setup.runners["infer"]()
            assert logits.shape == (spec["b"], NETWORKS[name].out_channels, *(spec["side"],) * 3)


def test_provider_selection():
    case = load_cases()["kl_distill"]
    (_, spec), *_ = case.shapes(True)
    assert run.select_providers(case, spec, None, CPU) == ["fastseg3d", "torch"]
    assert run.select_providers(case, spec, ["default"], CPU) == ["fastseg3d", "torch", "torch.compile"]
    assert run.select_providers(case, spec, ["*max-autotune"], CPU) == ["torch.compile-max-autotune"]
    assert run.select_providers(case, spec, ["all"], CPU) == case.providers(spec)
    model = load_cases()["missu"]
    (_, mspec), = model.shapes(True)
    # the eager baseline before any compile, and the compiled peer of the model targets next
    assert model.providers(mspec)[:3] == ["fastseg3d", "plain", "plain+torch.compile"]
    assert case.dtypes[0] == "bf16"  # the headline dtype first, so a time box reaches it
    assert run.select_providers(model, mspec, ["plain*"], CPU) == [
        "plain", "plain+torch.compile", "plain+cuda-graph", "plain+torch.compile-max-autotune",
        "plain+torch.compile-reduce-overhead"]


def test_cuda_graphs_are_unavailable_on_cpu():
    from bench.models import graphed

    with pytest.raises(Unavailable):
        compiled(lambda x: x, "plain+torch.compile-reduce-overhead", CPU)
    with pytest.raises(Unavailable):
        graphed(lambda: None, [], CPU)
    model = load_cases()["segformer3d"]
    (_, spec), = model.shapes(True)
    for provider in ("fastseg3d+cuda-graph", "plain+cuda-graph"):
        assert provider in run.select_providers(model, spec, None, CPU)
        with pytest.raises(Unavailable):
            model.setup(spec, torch.float32, provider, CPU)
    selfreg = load_cases()["selfreg_unet"]  # its loss draws on the host every step: never captured
    (_, spec), = selfreg.shapes(True)
    assert not any("cuda-graph" in p for p in selfreg.providers(spec)) and "plain" in selfreg.providers(spec)


def test_graphed_warms_up_on_a_side_stream_and_captures_fresh_gradients(monkeypatch):
    """bench.models.graphed's protocol, with CUDA's stream and graph objects stood in for: three warm-up steps on a
    side stream, gradients cleared, one step captured, and the graph's replay returned."""
    import contextlib

    from bench.models import graphed

    events = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def on(stream):
        events.append("side stream")
        yield

    @contextlib.contextmanager
    def on_device(device):
        events.append(f"on {device}")
        yield

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"  # a DataLoader's pin-memory thread must not spoil it
        # a stream of the device's own (torch's default capture stream lives on the first capture's device)
        assert isinstance(stream, Stream)
        events.append("capture")
        yield
        events.append("captured")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    w = torch.ones(3, requires_grad=True)

    def step():
        events.append(("step", w.grad is None))
        (2 * w).sum().backward()

    replay = graphed(step, [w], torch.device("cuda"))
    assert events == ["wait", "side stream", ("step", True), ("step", False), ("step", False), "wait", "on cuda",
                      "capture", ("step", True), "captured"]
    replay()
    assert events[-1] == "replay"


def test_graph_capture_repeats_the_eager_calls_loss_seed_decisions(monkeypatch):
    """In a capture the fused losses cannot read their incoming gradient back: the capture repeats what the eager
    warm-up calls decided (1: the saved gradient as it is; else scaled), in order."""
    from types import SimpleNamespace

    from bench.run import _eager_loss_seeds
    from fastseg3d.ops import utils as op_utils

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    saved = torch.full((3,), 0.5)
    with _eager_loss_seeds(), torch.no_grad():  # as in a backward
        for _ in range(2):  # warm-up steps, each with a loss seeded by 1 and one by 3
            assert op_utils.scaled_grads(SimpleNamespace(), torch.tensor(1.0), [saved], [saved.dtype])[0] is saved
            assert torch.equal(op_utils.scaled_grads(SimpleNamespace(), torch.tensor(3.0), [saved], [saved.dtype])[0],
                               torch.full((3,), 1.5))
        capturing[0] = True  # the values are not read here: 5.0 stands for a scalar the capture cannot see
        assert op_utils.scaled_grads(SimpleNamespace(), torch.tensor(5.0), [saved], [saved.dtype])[0] is saved
        assert torch.equal(op_utils.scaled_grads(SimpleNamespace(), torch.tensor(3.0), [saved], [saved.dtype])[0],
                           torch.full((3,), 1.5))
    assert op_utils.unit_grad.__module__ == "fastseg3d.ops.utils"


@pytest.mark.parametrize("capture_ended", [False, True])
def test_graphed_failed_capture_restores_the_stream_and_the_allocator(monkeypatch, capture_ended):
    """A step that breaks its capture (a host read-back, say): capture_end raises before it restores the current
    stream or ends the allocator's routing into the graph's pool; graphed undoes both, releases the pool and names
    the step's error. Where capture_end got past the routing (instantiation failed), the graph names its pool and
    releases it itself: graphed leaves it (a second release aborts in the graph's destructor)."""
    import contextlib

    from bench.models import graphed

    current, ended = ["default"], []

    class Stream:
        device_index = 0

        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def pool(self):  # as ATen's
            if not capture_ended:
                raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
            return (0, 7)

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None, capture_error_mode="global"):
        assert pool == (0, 7)
        current[0] = "capture stream"
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, "default"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda device, pool: ended.append(("end", device, pool)),
                        raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda device, pool: ended.append(("release", device, pool)),
                        raising=False)
    calls = [0]

    def step():
        calls[0] += 1
        if calls[0] == 4:  # the captured run
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="capture failed: RuntimeError: CUDA error: operation not permitted"):
        graphed(step, [], torch.device("cuda"))
    assert current == ["default"]
    assert ended == ([] if capture_ended else [("end", 0, (0, 7)), ("release", 0, (0, 7))])


def test_a_lost_device_ends_the_case_process(monkeypatch, tmp_path, capsys):
    """After a sticky CUDA error (an illegal address in some provider's kernel) every later call fails alike: the
    run stops there with status 1, keeping the rows measured before, rather than logging every later provider as
    skipped (or failing again in its clean-up)."""
    from bench import utils

    assert utils.device_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert utils.device_lost(RuntimeError("Triton Error [CUDA]: device-side assert triggered"))
    assert not utils.device_lost(RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    assert not utils.device_lost(torch.OutOfMemoryError("CUDA out of memory"))
    case = load_cases()["channel_kl"]
    (_, spec), *_ = case.shapes(True)
    providers = run.select_providers(case, spec, None, CPU)
    assert len(providers) >= 2
    real_setup = case.setup

    def setup(spec, dtype, provider, device):
        if provider == providers[1]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_setup(spec, dtype, provider, device)

    monkeypatch.setattr(case, "setup", setup)
    assert run.main(["--case", "channel_kl", "--quick", "--dtype", "fp32", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "context is lost at channel_kl" in err and "illegal memory access" in err and "skipped (" not in err
    rows = read_rows(tmp_path / "ops.jsonl")
    assert rows and {r["provider"] for r in rows} == {providers[0]}


def test_largest_cube_search_ends_where_the_device_is_lost():
    from bench import utils

    def attempt(side):
        if side > 128:
            raise utils.DeviceLost(f"{side}^3: AcceleratorError: CUDA error: an illegal memory access")
        return largest_cube.Attempt(True, "", 1.0, 2.0)

    found = largest_cube.search(attempt, 16, 512)
    assert found.side == 128 and not found.converged and found.stop.startswith("device lost at 256^3")


def test_host_ms_times_issuing_a_call(monkeypatch):
    from bench.utils import format_table, host_ms

    assert host_ms(lambda: None, CPU) is None
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    leaf = torch.zeros(1, requires_grad=True)
    leaf.grad = torch.ones(1)
    cleared = []
    ms = host_ms(lambda: cleared.append(leaf.grad is None) or time.sleep(0.002), torch.device("cuda"), [leaf])
    assert ms >= 2.0 and cleared == [True] * 3 and len(synced) == 4  # from an idle GPU each time, then wait once
    row = {"case": "c", "shape": "s", "dtype": "bf16", "mode": "fwd", "provider": "fastseg3d", "median_ms": 3.0,
           "p20_ms": 2.9, "p80_ms": 3.1, "host_ms": 0.125, "peak_mem_mb": None, "roofline_pct": None}
    table = format_table([row]).splitlines()
    assert "host ms" in table[0] and "0.1250" in table[1]


def test_host_profile_reports_a_training_step(tmp_path):
    from bench import host_profile

    out = tmp_path / "profile.txt"
    assert host_profile.main(["segformer3d", "--side", "64", "--batch", "1", "--steps", "1", "--top", "5",
                              "--dtype", "fp32", "--out", str(out)]) == 0
    text = out.read_text()
    head = text.splitlines()[0]
    assert head.startswith("segformer3d fastseg3d 1x64^3 float32 on cpu:") and "host ms per step" in head
    assert "--- by own time" in text and "--- by with callees" in text and "train_step" in text


def test_attention_tile_sweep_ranks_checked_candidates(monkeypatch):
    """bench.tune attention puts each candidate in place of the tile table for one kernel only, discards a tile
    whose outputs differ from the table's, records compile failures, and ranks the rest by time."""
    from bench import tune, tune_attention
    from fastseg3d.kernels import attention as kern

    seen = []

    def fake_fwd(q, k, v, scale, out, lse):
        tile = kern._blocks(q.shape[1], k.shape[1], q.shape[3], None, "fwd")
        seen.append(tile)
        if tile[:3] == (32, 32, 4) and tile[3] == 4:
            raise RuntimeError("out of resource: shared memory, Required: 300000")
        out.fill_(2.0 if tile[:2] == (128, 128) else 1.0)  # one tile "computes something else"
        lse.fill_(0.5)

    monkeypatch.setattr(kern, "attention_fwd", fake_fwd)
    monkeypatch.setattr(kern, "_precision", lambda dtype: None)

    def time_fn(fn):
        fn()
        bm, bn, warps, stages = seen[-1]
        return 1.0 / (bm * bn) + 1e-6 * bn + 0.001 * stages + 0.0001 * warps

    rows = tune_attention.sweep("tiny", torch.float32, ("fwd",), torch.device("cpu"), time_fn)
    assert len(rows) == len(tune_attention.candidates("fwd", 16, None)) + 1  # the table's (64, 16) tile too
    assert all(r["kernel"] == "fwd" for r in rows) and sum(r["current"] for r in rows) == 1
    bad = [r for r in rows if r["ok"] is False]
    failed = [r for r in rows if r["error"]]
    assert bad and all((r["plan"]["BLOCK_M"], r["plan"]["BLOCK_N"]) == (128, 128) for r in bad)
    assert len(failed) == 1 and "out of resource" in failed[0]["error"] and failed[0]["ms"] is None
    text = tune.report(rows, 3).splitlines()
    assert text[0].startswith("attention tiny float32 fwd: current plan")
    assert text[1].strip().startswith("BLOCK_M 128 BLOCK_N 64 warps 4 stages 2:")  # the fastest that matched
    assert any("computed something else" in line for line in text) and any("1 plans failed" in line for line in text)


def test_attention_sweep_times_the_table_tile_first_even_when_it_is_a_candidate(monkeypatch):
    """A sweep cut by its time limit after one plan still has the table's own to compare with: it runs first, once,
    also where the candidate pool holds it further down."""
    from bench import tune_attention
    from fastseg3d.kernels import attention as kern

    table = kern._blocks(64, 8, 16, None, "fwd")  # "tiny": 4^3 tokens, sr 2, head dim 16
    others = [(32, 32, 4, 2), (128, 32, 4, 3)]
    assert table not in others
    monkeypatch.setattr(tune_attention, "candidates", lambda kernel, head_dim, precision: [others[0], table,
                                                                                          others[1]])
    monkeypatch.setattr(kern, "_precision", lambda dtype: None)

    def fake_fwd(q, k, v, scale, out, lse):
        out.fill_(1.0)
        lse.fill_(0.5)

    monkeypatch.setattr(kern, "attention_fwd", fake_fwd)
    rows = tune_attention.sweep("tiny", torch.float32, ("fwd",), torch.device("cpu"), lambda fn: 1.0)
    assert [r["current"] for r in rows] == [True, False, False]
    assert [tuple(r["plan"].values()) for r in rows] == [table, *others]
    clock = iter([0.0, 2.0])  # one plan before the deadline
    monkeypatch.setattr(tune_attention, "time", type("T", (), {"monotonic": staticmethod(lambda: next(clock))}))
    rows = tune_attention.sweep("tiny", torch.float32, ("fwd",), torch.device("cpu"), lambda fn: 1.0, deadline=1.0)
    assert len(rows) == 1 and rows[0]["current"]


def test_tune_cli_refuses_what_it_cannot_time(capsys, monkeypatch):
    """No GPU: exit status 2 and why; an unknown kernel or shape: a usage error, before any CUDA work."""
    from bench import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main(["kl_distill"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.main(["dwconv3d", "--kernels", "dkdv"])
    with pytest.raises(SystemExit):
        tune.main(["dwconv3d", "--shapes", "2x32x128^3 nchw"])
    assert "unknown dwconv3d shapes" in capsys.readouterr().err


def test_tune_check_is_relative_and_sees_unwritten_outputs():
    """A plan's outputs are compared relative to each expected tensor's scale (the KL's gradients are ~1e-6, which a
    fixed tolerance would never fail) and written over NaN first: an output the plan leaves partly unwritten fails
    even where memory reuse would hand it the previous plan's values."""
    from bench import tune

    expected = [torch.full((8,), 1e-6)]
    row = tune.new_row("op", "s", torch.float32, "k", {}, False)
    got: list[torch.Tensor] = []

    def half_written(empty):
        t = empty((8,), dtype=torch.float32)
        t[:4] = 1e-6
        got[:] = [t]

    def no_patch():
        return contextlib.nullcontext()

    ok = tune.try_plan(dict(row), no_patch, lambda: got.__setitem__(slice(None), [torch.full((8,), 1.5e-6)]),
                       lambda: got, expected, 2e-2, lambda fn: 1.0)
    assert ok["ok"] is False  # 50% off, far below any absolute tolerance
    reused = lambda *a, **k: torch.full((8,), 1e-6)  # noqa: E731  (what reused memory may hold)
    unwritten = tune.try_plan(dict(row), no_patch, lambda: half_written(reused), lambda: got, expected, 2e-2,
                              lambda fn: 1.0, check=lambda: half_written(tune.nan_empty))
    assert unwritten["ok"] is False and unwritten["ms"] == 1.0
    seen = []
    good = tune.try_plan(dict(row), no_patch, lambda: half_written(reused), lambda: [torch.full((8,), 1e-6)],
                         expected, 2e-2, lambda fn: 1.0, sink=seen.append)
    assert good["ok"] is True and seen == [good]


def test_peers_are_compared_with_their_fused_counterpart(tmp_path):
    """A captured or compiled plain model is compared with the same variant of the fused one where that was
    measured (the table's ratio columns and the plots), else with eager fastseg3d; fused variants are no peers."""
    from bench.utils import counterpart, format_table, plot_rows

    names = {"fastseg3d", "fastseg3d+cuda-graph", "plain", "plain+cuda-graph", "plain+torch.compile"}
    assert counterpart("plain+cuda-graph", names) == "fastseg3d+cuda-graph"
    assert counterpart("plain+torch.compile", names) == "fastseg3d" and counterpart("plain", names) == "fastseg3d"
    assert counterpart("fastseg3d+cuda-graph", names) is None and counterpart("sdpa-flash", names) == "fastseg3d"
    times = {"fastseg3d": 80.0, "fastseg3d+cuda-graph": 10.0, "plain": 240.0, "plain+cuda-graph": 200.0,
             "plain+torch.compile": 160.0}
    rows = [{"suite": "model", "case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step",
             "provider": p, "median_ms": t, "p20_ms": t, "p80_ms": t, "host_ms": None, "graph_ms": None,
             "peak_mem_mb": None if "graph" in p else t, "roofline_pct": None, "roofline_bound": None,
             "bandwidth_pct": None, "device": "GPU", "torch": "2", "triton": "3"} for p, t in times.items()]
    # the last columns: the peer's time and peak memory over its counterpart's (no memory for a graph's replay)
    ratios = {line.split()[4]: line.split()[-2:] for line in format_table(rows).splitlines()[1:]}
    assert ratios == {"fastseg3d": ["-", "-"], "fastseg3d+cuda-graph": ["-", "-"], "plain": ["3.00", "3.00"],
                      "plain+cuda-graph": ["-", "20.00"], "plain+torch.compile": ["2.00", "2.00"]}, ratios
    plot_rows(rows, tmp_path / "segformer3d.png")
    assert (tmp_path / "segformer3d.png").stat().st_size > 0


def test_error_summary_keeps_the_cause_at_the_end_of_a_message():
    from bench.utils import error_summary

    class InductorError(RuntimeError):
        pass

    err = InductorError("SubprocException: An exception occurred in a subprocess:\n\nTraceback (most recent call "
                        "last):\n  File \"x.py\", line 3\nAssertionError: Loop-carried variable m_i has initial "
                        "type fp32 but is re-assigned to fp64\n\nThe above exception was the direct cause of the "
                        "following exception:\n\ntriton.compiler.errors.CompilationError: at 12:8:\n"
                        "    m_i = tl.maximum(m_i, s)\n        ^")
    assert error_summary(err) == (
        "InductorError: SubprocException: An exception occurred in a subprocess: [... AssertionError: Loop-carried "
        "variable m_i has initial type fp32 but is re-assigned to fp64 | triton.compiler.errors.CompilationError: "
        "at 12:8:]")
    assert error_summary(ValueError("bad shape")) == "ValueError: bad shape"


def test_graph_ms_times_the_captured_call(monkeypatch, capsys):
    """An op row's graph_ms: the call captured in a CUDA graph and its replay timed (the GPU's time without the
    host's); a call that cannot be captured loses the column only, a lost device still ends the run."""
    from bench import models, utils
    from bench.utils import format_table

    replays = []
    monkeypatch.setattr(models, "graphed", lambda fn, params, device: lambda: replays.append(1))
    monkeypatch.setattr(utils, "time_ms", lambda fn, device, rep=100, grad_to_none=None: (fn() or 0.25, 0.3, 0.2))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    setup = SimpleNamespace(grads_of=[torch.zeros(1, requires_grad=True)])
    assert run._graph_ms(lambda: None, setup, torch.device("cuda"), "case") == 0.25 and replays == [1]

    def refuse(fn, params, device):
        raise RuntimeError("CUDA graph capture failed: operation not permitted when stream is capturing")
    monkeypatch.setattr(models, "graphed", refuse)
    assert run._graph_ms(lambda: None, setup, torch.device("cuda"), "attention x") is None
    assert "attention x: no graph time (RuntimeError: CUDA graph capture failed" in capsys.readouterr().err

    def lost(fn, params, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(models, "graphed", lost)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run._graph_ms(lambda: None, setup, torch.device("cuda"), "case")

    row = {"case": "c", "shape": "s", "dtype": "bf16", "mode": "fwd", "provider": "fastseg3d", "median_ms": 3.0,
           "p20_ms": 2.9, "p80_ms": 3.1, "host_ms": 0.125, "graph_ms": 0.0625, "peak_mem_mb": None,
           "roofline_pct": None}
    table = format_table([row]).splitlines()
    assert "graph ms" in table[0] and "0.0625" in table[1]


class _Ceilings:
    copy_gbs = 1000.0  # 1 ms per GB
    exp_per_s = 1e12  # 1 ms per 1e9 exps

    def tflops(self, dtype, fma=False):
        return 100.0 if fma else 500.0


def test_roofline_takes_the_binding_ceiling():
    setup = Setup(None, [], {"fwd": 10**9}, min_flops={"fwd": 1e12}, min_exps={"fwd": 3e9})
    pct, bound = roofline(setup, "fwd", torch.bfloat16, _Ceilings(), median_ms=6.0)  # 1, 2 and 3 ms
    assert bound == "exp" and pct == pytest.approx(50.0)
    fma = Setup(None, [], {"fwd": 10**9}, min_flops={"fwd": 1e12}, flops_on="fma")  # 1 ms memory, 10 ms FMA
    assert roofline(fma, "fwd", torch.bfloat16, _Ceilings(), median_ms=20.0) == (pytest.approx(50.0), "fma")
    assert roofline(setup, "bwd", torch.bfloat16, _Ceilings(), 1.0) == (None, None)
    assert roofline(setup, "fwd", torch.bfloat16, None, 1.0) == (None, None)


def test_exp_pct_is_kept_where_another_ceiling_binds(tmp_path):
    """exp_pct: the exponential term alone (minimum exponentials / the exp rate / the median) beside the binding
    ceiling's roofline_pct; None for a mode without exponentials or an unknown rate. A run fills it per row, and
    the table shows it, "-" for rows written before the key."""
    setup = Setup(None, [], {"fwd": 4 * 10**9}, min_flops={"fwd": 1e12}, min_exps={"fwd": 1e9})  # 4, 2 and 1 ms
    assert roofline(setup, "fwd", torch.bfloat16, _Ceilings(), median_ms=8.0) == (pytest.approx(50.0), "memory")
    assert exp_pct(setup, "fwd", _Ceilings(), median_ms=8.0) == pytest.approx(12.5)
    assert exp_pct(setup, "bwd", _Ceilings(), 8.0) is None
    assert exp_pct(Setup(None, [], {"fwd": 10**9}), "fwd", _Ceilings(), 8.0) is None

    class NoExpRate(_Ceilings):
        exp_per_s = None

    assert exp_pct(setup, "fwd", NoExpRate(), 8.0) is None and exp_pct(setup, "fwd", None, 8.0) is None

    rows: list[dict] = []
    for name in ("attention", "layer_norm"):
        run.run_case(load_cases()[name], ["fp32"], ["fwd"], ["fastseg3d"], True, CPU, {}, _Ceilings(),
                     tmp_path / "ops.jsonl", rows=rows)
    attention = [r for r in rows if r["case"] == "attention"]
    assert attention and all(r["exp_pct"] == pytest.approx(100 * 2 * 64 * 8 / 1e12 / (r["median_ms"] * 1e-3))
                             for r in attention)  # tiny: batch 2, N64, M8, one head
    assert all(r["exp_pct"] is None for r in rows if r["case"] == "layer_norm")
    assert read_rows(tmp_path / "ops.jsonl") == rows

    row = {"case": "attention", "shape": "s", "dtype": "bf16", "mode": "fwd", "provider": "fastseg3d",
           "median_ms": 8.0, "p20_ms": 7.9, "p80_ms": 8.1, "peak_mem_mb": None, "roofline_pct": 50.0,
           "roofline_bound": "memory", "bandwidth_pct": 50.0}
    table = format_table([{**row, "exp_pct": 12.5}, {**row, "shape": "older"}]).splitlines()
    assert "exp%" in table[0] and table[1].split()[-2:] == ["50.0", "12.5"] and table[2].split()[-2:] == ["50.0", "-"]


def test_liger_provider_matches_the_eager_loss():
    # Liger's KL has torch.nn.KLDivLoss's contract; this checks the (B * voxels, K) view, T and the resampling
    groups = [(torch.randn(1, 3, 8, 8, 8), [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 8, 8, 8)]),
              (torch.randn(1, 3, 2, 2, 2), [torch.randn(1, 3, 4, 4, 4)])]
    loss = liger_loss(torch.nn.KLDivLoss(reduction="batchmean", log_target=True))(groups, (8, 8, 8))
    torch.testing.assert_close(loss, kl_eager(groups, (8, 8, 8)))


@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_kl_distill_dsd_cases_are_the_heads_dsd_unet_makes(mode):
    # the issue's DSD case: B = 2, 14 classes, 128^3, six pairs, as dsd_unet's heads of either mode (run on meta)
    from bench.kl_distill import DSD_GROUPS
    from fastseg3d.networks import dsd_unet

    case = load_cases()["kl_distill"]
    for quick in (False, True):
        specs = [spec for label, spec in case.shapes(quick) if label.endswith(f"dsd 6 pairs {mode} heads")]
        assert len(specs) == 1 and specs[0]["groups"] == DSD_GROUPS[mode]
        assert sum(len(students) for _, students in specs[0]["groups"]) == 6
        assert quick or (specs[0]["b"], specs[0]["k"], specs[0]["s"]) == (2, 14, 128)
    with torch.device("meta"):
        net = dsd_unet(3, 1, 14, head_mode=mode)
    out = net(torch.empty(2, 1, 128, 128, 128, device="meta"))
    factors = [(128 // heads[-1].shape[-1], tuple(128 // h.shape[-1] for h in heads[:-1]))
               for heads in (out.decoder, out.encoder)]
    assert factors == DSD_GROUPS[mode]
    assert all(h.shape[:2] == (2, 14) and len(set(h.shape[2:])) == 1 for h in (*out.decoder, *out.encoder))


def test_kl_distill_quick_cases_run():
    # every quick shape is valid for the fused loss and its eager peer (the 1/16 head keeps a voxel), and both
    # compute one loss from the same logits
    case = load_cases()["kl_distill"]
    for _, spec in case.shapes(True):
        losses = []
        for provider in ("fastseg3d", "torch"):
            torch.manual_seed(0)
            losses.append(case.setup(spec, torch.float32, provider, CPU).forward())
        assert torch.isfinite(losses[0])
        torch.testing.assert_close(losses[0], losses[1])


def test_kl_peers_compute_what_the_fused_loss_computes():
    # an encoder-style group: the teacher below every student, the students at three resolutions
    groups = [(torch.randn(1, 3, 2, 2, 2), [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]),
              (torch.randn(1, 3, 8, 8, 8), [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)])]
    with fastseg3d.backend("torch"):
        fused = sum(kl_distill_multi(students, teacher, 3.0, size=(8, 8, 8)) for teacher, students in groups)
    torch.testing.assert_close(kl_eager(groups, (8, 8, 8)), fused)


@pytest.mark.parametrize("limit", [0, 20, 48, 100, 511, 512, 2000])
def test_largest_cube_search(limit):
    tried = []

    def attempt(side):
        tried.append(side)
        ok = side <= limit
        return largest_cube.Attempt(ok, "" if ok else "out of memory", 1.0 if ok else None, 2.0 if ok else None)

    found = largest_cube.search(attempt, 16, 512)
    expected = min(limit, 512) // 16 * 16
    assert found.side == (expected or None) and found.converged
    assert all(s % 16 == 0 and s <= 512 for s in tried) and found.tries == len(tried)
    if limit >= 512:
        assert found.failed_side is None and found.stop == "max-side"
    else:
        assert found.failed_side == expected + 16 and found.stop == "out of memory"


@pytest.mark.parametrize("capacity", [3_000.0, 60_000.0, 143_000.0])
def test_largest_cube_search_jumps_to_the_side_memory_predicts(capacity):
    """Peak memory linear in the voxels (a constant plus bytes per voxel, as a network's activations): with the
    device's capacity known, the search tries the predicted side and its neighbour, not a bisection's dozen."""
    tried = []

    def attempt(side):
        tried.append(side)
        peak = 900.0 + 2.1e-4 * side**3
        ok = peak <= capacity
        return largest_cube.Attempt(ok, "" if ok else "out of memory", peak if ok else None, 1.0 if ok else None)

    found = largest_cube.search(attempt, 32, 4096, capacity_mb=capacity)
    expected = max(s for s in range(32, 4097, 32) if 900.0 + 2.1e-4 * s**3 <= capacity)
    assert found.side == expected and found.failed_side == expected + 32 and found.converged
    plain = largest_cube.search(attempt, 32, 4096)
    assert found.tries <= min(5, plain.tries), (tried, found.tries, plain.tries)


@pytest.mark.parametrize("capacity,expected", [(136_582.0, [64, 256, 960, 992]), (1_000.0, [64, 96, 128, 160])])
def test_largest_cube_search_predicts_from_one_side(capacity, expected):
    """One trained side predicts in proportion to its voxels (short of the limit, as its peak holds a fixed part):
    with the fused SegFormer3D's peaks on the H200 (19.6 GB at 512^3), 64^3, then the four-fold cap's 256^3, then
    the side two peaks predict and its neighbour: two tries at large sides where doubling from 64 took four. Near
    the limit, one step up at a time."""
    tried = []

    def attempt(side):
        peak = 500.0 + 1.46e-4 * side**3
        tried.append(side)
        ok = peak <= capacity
        return largest_cube.Attempt(ok, "" if ok else "out of memory", peak if ok else None, 1.0 if ok else None)

    found = largest_cube.search(attempt, 32, 1280, capacity_mb=capacity)
    assert tried == expected and found.side == expected[-2] and found.converged


def test_largest_cube_search_stops_at_its_deadline():
    found = largest_cube.search(lambda side: largest_cube.Attempt(True), 16, 4096, deadline=time.monotonic() - 1)
    assert found.tries == 0 and found.side is None and not found.converged and found.stop == "time-limit"


def test_largest_cube_search_keeps_what_it_found_when_terminated():
    """SIGTERM (a time box closing) during a try ends the search with the largest side found so far, where an
    `except Exception` in the try would have recorded it as a failure of that side."""
    def attempt(side):
        if side > 128:
            raise largest_cube.Terminated
        return largest_cube.Attempt(True, "", 1.0, 2.0)

    found = largest_cube.search(attempt, 16, 512)
    assert found.side == 128 and found.failed_side is None and not found.converged and found.stop == "terminated"
    assert issubclass(largest_cube.Terminated, BaseException) and not issubclass(largest_cube.Terminated, Exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_largest_cube_refuses_without_gpu(capsys):
    assert largest_cube.main(["--model", "segformer3d"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def _run_sample_tier(tmp_path, source: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """pytest on ``source`` (one test file) in ``tmp_path`` with the project's conftest, as the controller of a
    GPU tier (not an xdist worker), ``env`` added to the environment."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(source)
    full_env = {**os.environ, **env}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(tmp_path)],
                          cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)


def test_no_tf32_fixture_restores_without_a_teardown_error(tmp_path):
    """The GPU tests' ``no_tf32`` fixture turns TF32 off for one test and back after it, with no error at teardown
    (pytest's monkeypatch, from 9.1 on, fails to undo ``torch.backends.cuda.matmul``'s attributes)."""
    source = ("import torch\n\ntorch.backends.cuda.matmul.allow_tf32 = True\n"
              "torch.backends.cudnn.allow_tf32 = True\n\n\n"
              "def test_off(no_tf32):\n"
              "    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32\n\n\n"
              "def test_back():\n"
              "    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32\n")
    proc = _run_sample_tier(tmp_path, source, {})
    assert proc.returncode == 0 and "2 passed" in proc.stdout and "error" not in proc.stdout, proc.stdout[-2000:]


def test_failures_are_logged_as_they_happen(tmp_path):
    """gpu_check.sh's test tier may be cut by its box before pytest prints a summary: with FASTSEG3D_FAILURE_LOG,
    the project's conftest appends each failure's traceback to that file when the test ends."""
    log = tmp_path / "failures.log"
    proc = _run_sample_tier(
        tmp_path, "def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 + 1 == 3, 'arithmetic'\n",
        {"FASTSEG3D_FAILURE_LOG": str(log)}, "-q")
    assert proc.returncode == 1, proc.stdout[-2000:]
    text = log.read_text()
    assert text.startswith("=== test_sample.py::test_fails (call)") and "AssertionError: arithmetic" in text
    assert "test_passes" not in text


def test_cut_tier_resumes_where_it_stopped(tmp_path):
    """FASTSEG3D_RESULTS_LOG records each test's outcome as it ends; a later run given that file as
    FASTSEG3D_SKIP_PASSED leaves out what passed (a teardown error after a passed call counts as not passed) and
    runs the rest, so a GPU tier cut by its box can be finished by a second call."""
    source = ("import pytest\n\n\n@pytest.fixture\ndef broken_teardown():\n    yield\n"
              "    raise RuntimeError('teardown')\n\n\n"
              "def test_passes():\n    pass\n\n\ndef test_fails():\n    assert False\n\n\n"
              "def test_skips():\n    pytest.skip('no')\n\n\ndef test_teardown_errs(broken_teardown):\n    pass\n")
    log = tmp_path / "results.txt"
    first = _run_sample_tier(tmp_path, source, {"FASTSEG3D_RESULTS_LOG": str(log)}, "-q", "-rA")
    assert first.returncode == 1, first.stdout[-2000:]
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted(["passed test_sample.py::test_passes", "failed test_sample.py::test_fails",
                                    "skipped test_sample.py::test_skips", "passed test_sample.py::test_teardown_errs",
                                    "error test_sample.py::test_teardown_errs"])
    resume = tmp_path / "earlier.txt"
    resume.write_text(log.read_text())
    log.unlink()
    second = _run_sample_tier(tmp_path, source, {"FASTSEG3D_RESULTS_LOG": str(log),
                                                 "FASTSEG3D_SKIP_PASSED": str(resume)}, "-q", "-rA")
    assert "1 deselected" in second.stdout, second.stdout[-2000:]
    assert "test_passes" not in log.read_text()
    assert {line.split()[1] for line in log.read_text().splitlines()} == {
        "test_sample.py::test_fails", "test_sample.py::test_skips", "test_sample.py::test_teardown_errs"}


def test_tier_durations_and_gpu_order(tmp_path):
    """FASTSEG3D_DURATIONS_LOG gets a line per test as it ends (setup, call and teardown together); the GPU tier
    runs its bf16 and dtype-free tests before the fp32/fp16 cases the interpreter tier also checks (here skipped:
    the order is the collection's)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    source = ("import time\nimport pytest\nimport torch\n\n\n@pytest.fixture\ndef slow_setup():\n"
              "    time.sleep(0.3)\n\n\n@pytest.mark.gpu\n"
              "@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])\n"
              "def test_gpu_case(dtype):\n    pass\n\n\n@pytest.mark.gpu\ndef test_gpu_memory():\n    pass\n\n\n"
              "@pytest.mark.gpu\n@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])\n"
              "def test_gpu_dtype(dtype):\n    pass\n\n\n@pytest.mark.gpu\n"
              "@pytest.mark.parametrize('dtypes', [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)])\n"
              "def test_gpu_pair(dtypes):\n    pass\n\n\ndef test_cpu(slow_setup):\n    time.sleep(0.3)\n")
    log = tmp_path / "durations.txt"
    proc = _run_sample_tier(tmp_path, source, {"FASTSEG3D_DURATIONS_LOG": str(log)}, "-v")
    assert proc.returncode == 0, proc.stdout[-2000:]
    order = [line.split()[0].split("::")[1] for line in proc.stdout.splitlines() if "::" in line]
    # a bf16 case inside a tuple of dtypes too (its id names float32 as well)
    assert order == ["test_gpu_case[bfloat16]", "test_gpu_memory", "test_gpu_dtype[dtype1]", "test_gpu_pair[dtypes0]",
                     "test_cpu", "test_gpu_case[float32]", "test_gpu_case[float16]", "test_gpu_dtype[dtype0]",
                     "test_gpu_pair[dtypes1]"], order
    rows = [line.split(" ", 3) for line in log.read_text().splitlines()]
    assert [r[3] for r in rows] == [f"test_sample.py::{name}" for name in order]
    ended, took = {r[3]: float(r[0]) for r in rows}, {r[3]: float(r[2]) for r in rows}
    assert took["test_sample.py::test_cpu"] >= 0.6  # its fixture's setup counted with its call
    assert ended["test_sample.py::test_gpu_case[float16]"] >= ended["test_sample.py::test_cpu"] >= 0.6
    assert all(r[1] == "-" for r in rows)


def test_gpu_check_target_plan_selects_shapes_of_every_case():
    """Each case's target arguments select something (a pattern that matched nothing would make bench.run exit
    with an error and lose the case's box on the GPU)."""
    plan = gpu_check_target_args()
    assert set(plan) == set(SUITES)
    for case, args in plan.items():
        parser = run.argparse.ArgumentParser()
        parser.add_argument("--dtype")
        parser.add_argument("--modes", default=",".join(run.MODES + run.MODEL_MODES))
        parser.add_argument("--shapes")
        parser.add_argument("--providers")
        ns = parser.parse_args(args)
        shapes = ns.shapes.split(",") if ns.shapes else None
        providers = ns.providers.split(",") if ns.providers else None
        run._check_selection(parser, [load_cases()[case]], ns.modes.split(","), providers, shapes, quick=False)
        labels = [label for label, _ in load_cases()[case].shapes(False) if run._shape_selected(label, shapes)]
        assert labels, case


def test_gpu_check_target_plan_measures_every_target():
    """The rows the target plan would write on a GPU (its shapes, dtypes, modes and providers) leave no target of
    bench/targets.py unmeasured, but the largest cube's (a search of its own)."""
    from bench import targets

    rows = []
    for name, args in gpu_check_target_args().items():
        case = load_cases()[name]
        opts = dict(zip(args[::2], args[1::2]))
        modes = opts.get("--modes", ",".join(case.modes)).split(",")
        shapes = opts["--shapes"].split(",") if "--shapes" in opts else None
        providers = opts["--providers"].split(",") if "--providers" in opts else None
        for label, spec in case.shapes(False):
            if not run._shape_selected(label, shapes):
                continue
            for provider in run.select_providers(case, spec, providers, torch.device("cuda")):
                rows += [{"case": name, "shape": label, "dtype": dtype, "mode": mode, "provider": provider,
                          "median_ms": 1.0, "peak_mem_mb": 1.0, "bandwidth_pct": 1.0,
                          "graph_ms": 1.0 if case.suite == "ops" and mode != "bwd" else None}
                         for dtype in opts["--dtype"].split(",") for mode in modes if mode in case.modes]
    missing = [t.what for t, value, _ in targets.check(rows) if value is None and "largest" not in t.what]
    assert not missing, missing


@pytest.mark.parametrize("args,message", [
    (["--modes", "bwd"], "no selected case has the mode"),
    (["--modes", "fwd,backward"], "unknown mode"),
    (["--providers", "nosuch"], "matches no provider"),
    (["--providers", "'torch'"], "matches no provider"),
    (["--shapes", "2x14x256^3*"], "matches no shape"),
])
def test_selection_that_measures_nothing_is_an_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--case", "channel_kl", "--quick", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_shapes_filter(tmp_path):
    rows_path = tmp_path / "rows.json"
    assert run.main(["--case", "dwconv3d", "--quick", "--dtype", "fp32", "--modes", "fwd", "--providers", "fastseg3d",
                     "--shapes", "*tokens*", "--out", str(tmp_path), "--json", str(rows_path)]) == 0
    rows = json.loads(rows_path.read_text())
    assert rows and all("tokens" in r["shape"] for r in rows)


def test_targets_report_met_short_and_missing():
    from bench import targets

    shape = "2x4x128^3"
    rows = [{"case": "segformer3d", "shape": shape, "dtype": "bf16", "mode": "train_step", "provider": p,
             "median_ms": ms, "peak_mem_mb": mb} for p, ms, mb in
            [("fastseg3d", 10.0, 50.0), ("plain", 25.0, 75.0), ("plain+torch.compile", 12.0, 90.0),
             ("fastseg3d+torch.compile", 5.0, 45.0)]]
    results = {t.what: (value, verdict) for t, value, verdict in targets.check(rows)}
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (2.5, "met")
    value, verdict = results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain compiled"]
    assert value == pytest.approx(1.2) and verdict == "short by 20%"
    assert results["SegFormer3D train step 128^3 B=2 bf16: plain peak / ours (<= 60% of plain)"][1] == "short by 10%"
    assert results["SegFormer3D train step 128^3 B=2 bf16, compiled: speed-up over plain compiled"] == (2.4, "met")
    assert results["SegFormer3D train step 128^3 B=2 bf16, CUDA graph: speed-up over plain eager"] == (
        None, "not measured")
    assert not any("CUDA graph: plain peak" in what for what in results)  # replays report no peak memory
    assert results["SegFormer3D largest trainable cube at batch 1: voxels over plain"] == (None, "not measured")
    assert "short by 20%" in targets.format_report(targets.check(rows))


@pytest.mark.parametrize("ours,plain,verdict", [
    ((512, None, False), (736, 768, True), "not measured (search cut: at least 0.34x)"),
    ((1024, None, False), (736, 768, True), "met"),  # a lower bound that already meets it
    ((960, 992, True), (736, 768, True), "met"),
    ((800, 832, True), (736, 768, True), "short by 36%"),
    ((960, 992, True), (640, None, False), "not measured (search cut: at most 3.38x)"),
    ((800, 832, True), (736, None, False), "short by at least 36%"),  # an upper bound below it
    ((1280, None, True), (736, 768, True), "met"),  # max-side: at least that
    ((512, None, False), (640, None, False), "not measured (searches cut)"),
    # a bisection cut after a failure brackets the side: 512 trained, 1024 failed, so 512..992
    ((512, 1024, False), (736, 768, True), "not measured (search cut: between 0.34 and 2.45x)"),
    ((512, 608, False), (736, 768, True), "short by at least 76%"),
])
def test_cube_target_of_a_cut_search_is_a_bound(ours, plain, verdict):
    """A largest-cube search cut by its time box found a side that trains and maybe one that fails: the ratio is a
    bracket, and a verdict it does not settle says so instead of "short" or "met"."""
    from bench import targets

    rows = [{"case": "largest_cube", "shape": "segformer3d", "dtype": "bf16", "mode": None, "provider": p,
             "voxels": side ** 3, "failed_side": failed, "converged": converged, "stride": 32,
             "stop": "max-side" if side == 1280 else "out of memory" if converged else "time-limit"}
            for p, (side, failed, converged) in (("fastseg3d", ours), ("plain", plain))]
    results = {t.what: v for t, _, v in targets.check(rows)}
    assert results["SegFormer3D largest trainable cube at batch 1: voxels over plain"] == verdict


def test_op_targets_have_replayed_twins():
    """Each op speed or bandwidth target is also judged on the rows' CUDA-graph replay time (graph_ms), where the
    host's Python no longer counts; the bandwidth share scales by median / replay time."""
    from bench import targets

    shape = "stage1@128^3 N32768 M512 H1 d32"
    rows = [{"case": "attention", "shape": shape, "dtype": "bf16", "mode": "fwd", "provider": p, "median_ms": ms,
             "graph_ms": g} for p, ms, g in [("fastseg3d", 0.06, 0.02), ("sdpa-cudnn", 0.03, 0.025),
                                             ("sdpa-flash", 0.04, None)]]
    rows.append({"case": "dwconv3d", "shape": "2x32x128^3 ncdhw", "dtype": "bf16", "mode": "fwd",
                 "provider": "fastseg3d", "median_ms": 0.3, "graph_ms": 0.2, "bandwidth_pct": 40.0})
    results = {t.what: value for t, value, _ in targets.check(rows)}
    assert results["attention bf16 fwd stage1@128^3: speed-up over the best SDPA backend"] == pytest.approx(0.5)
    assert results["attention bf16 fwd stage1@128^3: speed-up over the best SDPA backend, replayed"] == (
        pytest.approx(1.25))
    assert results["dwconv3d bf16 fwd 2x32x128^3 NCDHW: % of copy bandwidth, replayed"] == pytest.approx(60.0)
    assert not any("peak" in what and what.endswith(", replayed") for what in results)


@pytest.mark.parametrize("name,args,ops", [
    ("segformer3d", [],
     ("attention", "attention (bwd)", "dwconv3d", "add_layer_norm (bwd)", "group_norm_act_backward")),
    ("dsd_unet", ["--side", "16"], ("kl_distill", "kl_distill (bwd)", "group_norm_act (bwd)")),  # a dispatched op
])
def test_host_times_every_fused_op_of_a_step(name, args, ops):
    """bench.host (in a process of its own: it needs the interpreter's launch path): every fused op of the step,
    forward and backward, with a positive host time per call, and the Triton launches each makes, which add up to
    the step's (none outside the ops it times)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it sets the variable itself
    out = subprocess.run([sys.executable, "-m", "bench.host", name, "--steps", "1", *args], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for op in ops:
        row = next(line for line in lines if line[:48].strip() == f"fastseg3d::{op}")
        calls, per_call = float(row.split()[-8]), float(row.split()[-4])
        assert calls >= 1 and per_call > 0
    rows = [line for line in lines if line.startswith("fastseg3d::")]
    assert len(rows) == len(lines) - 2  # nothing launched outside the timed ops
    total = int(lines[-2].split()[1])
    assert lines[-2].startswith(f"{name}: ") and total > 20  # Triton launches a step
    assert sum(float(row.split()[-2]) for row in rows) == total
    assert lines[-1].startswith(f"{name} at 1x") and "fused ops' host time" in lines[-1]


def test_tuners_reach_the_launches():
    """What bench.tune patches is what the launchers read: dwconv3d's walk constants reach its launch (STAGES and the
    grid's depth runs), the kl_distill tile functions reach the forward's and the transposes' launches (captured on
    meta tensors, none run)."""
    from unittest import mock

    from bench.sass import _captured
    from fastseg3d.kernels import dwconv3d as dw
    from fastseg3d.kernels import kl_distill as kl
    from fastseg3d.kernels import utils as kernel_utils

    x = torch.empty(2, 32, 64, 64, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(32, 1, 3, 3, 3, dtype=torch.bfloat16, device="meta")

    def conv(grids):
        return _captured(lambda: dw.dwconv3d_fwd(x, dw.taps_major(w), None, None, torch.empty_like(x), (1, 1, 1),
                                                 (1, 1, 1), 0), grids)

    with mock.patch.object(kernel_utils, "sm_count", lambda device: 132), mock.patch.object(dw, "INTERPRET", False):
        grids = []
        (_, _, table), = conv(grids)
        with mock.patch.object(dw, "WALK_STAGES", 3), mock.patch.object(dw, "PROGRAMS_PER_SM", 1):
            (_, _, tuned), = conv(grids)
    assert table["STAGES"] == 1 and tuned["STAGES"] == 3
    assert grids[1][1] < grids[0][1]  # fewer, longer depth runs for fewer programs per SM

    teacher = torch.empty(2, 14, 32, 32, 32, dtype=torch.bfloat16, device="meta")
    students = [torch.empty(2, 14, 16, 16, 16, dtype=torch.bfloat16, device="meta")]
    with mock.patch.object(kl, "_fwd_tile", lambda *a: (64, 1, 2)), \
            mock.patch.object(kl, "_transpose_tile", lambda *a: (32, 1)):
        launches = _captured(lambda: kl.kl_distill_fwd(students, teacher, (32, 32, 32), 3.0, [1.0], [True], True))
    by_kernel = {fn.fn.__name__: kw for fn, _, kw in launches}
    assert (by_kernel["_kl_fwd_kernel"]["BLOCK_V"], by_kernel["_kl_fwd_kernel"]["num_warps"]) == (64, 2)
    assert (by_kernel["_interp_transpose_kernel"]["BLOCK_V"], by_kernel["_interp_transpose_kernel"]["num_warps"]) == (
        32, 1)


@pytest.mark.interpret
@pytest.mark.parametrize("op,label,kernels,pool", [
    ("dwconv3d", "1x4x8^3 ncdhw", ("fwd",), [(3, 4)]),
    ("dwconv3d", "1x4x8^3 channels_last", ("fwd",), [(2, 16)]),
    ("dwconv3d", "1x4x8^3 ncdhw", ("fwd",), [(2, 4), (1, 8)]),  # the planner's own (1, 8) first, not second
    ("kl_distill", "1x3x16^3 pair s/2", ("fwd", "transpose"), None),
])
def test_interpret_tune_sweep_runs_candidates(op, label, kernels, pool, monkeypatch):
    """The dwconv3d and kl_distill sweeps end to end through the real kernels: the planner's own plan timed first,
    each candidate's outputs (written over NaN) equal to it. The interpreter ignores dwconv3d's pipelining depth and
    grid size (test_tuners_reach_the_launches checks that they reach its launches; sm_90 compiles, that the depth
    pipelines); for kl_distill the candidates are real tiles."""
    import importlib

    tuner = importlib.import_module(f"bench.tune_{op}")
    if op == "kl_distill":
        monkeypatch.setattr(tuner, "candidates", lambda kernel, k_pad, same_res: [(256, 1, 8)] if kernel == "fwd"
                            else [(256, 8)])
    else:
        monkeypatch.setattr(tuner, "candidates", lambda: pool)
    timed = []

    def time_fn(fn):
        fn()
        timed.append(1)
        return float(len(timed))

    rows = tuner.sweep(label, torch.float32, kernels, torch.device("cpu"), time_fn)
    assert [r["kernel"] for r in rows] == [k for k in kernels for _ in range(2)]
    assert all(r["ok"] and r["error"] is None for r in rows), rows
    assert [r["current"] for r in rows] == [True, False] * len(kernels)
    if op == "dwconv3d":
        assert [tuple(r["plan"].values()) for r in rows][1:] == [c for c in pool if c != (1, 8)]


def test_256_cube_attention_target_compares_the_peak_with_one_score_matrix():
    """The sub-block trains at 256^3 (N 262,144, M 4,096, one head, batch 2) within one fp32 copy of the scores,
    8 GiB: the value is that matrix over the fused step's peak."""
    from bench import targets

    what = "attention sub-block bf16 fwd+bwd stage1@256^3: one fp32 N x M score matrix / our peak"
    for peak, value, verdict in ((4096.0, 2.0, "met"), (16384.0, 0.5, "short by 50%")):
        rows = [{"case": "attention_block", "shape": "stage1@256^3 N262144 M4096 H1 d32", "dtype": "bf16",
                 "mode": "fwd+bwd", "provider": "fastseg3d", "median_ms": 9.0, "peak_mem_mb": peak}]
        results = {t.what: (v, verdict) for t, v, verdict in targets.check(rows)}
        assert results[what] == (pytest.approx(value), verdict)


def test_attention_stage1_minimum_work_matches_the_spec():
    """SegFormer3D's stage 1 at 128^3 (N 32,768, M 512, C 32, one head), per sample in bf16: q, k, v and the output
    4.26 MB, 2.15 GFLOP of matrix products and 16.8 M exponentials forward (performance.md's roofline of it); the
    benchmark runs batch 2, and backward recomputes the probabilities."""
    case = load_cases()["attention"]
    spec = dict(case.shapes(False))["stage1@128^3 N32768 M512 H1 d32"]
    setup = case.setup(spec, torch.bfloat16, "fastseg3d", CPU)
    assert setup.min_bytes["fwd"] / 2 == pytest.approx(4.26e6, rel=2e-3)
    assert setup.min_flops["fwd"] / 2 == pytest.approx(2.147e9, rel=1e-3)
    assert setup.min_exps["fwd"] / 2 == 32768 * 512
    assert setup.min_exps["fwd+bwd"] == 2 * setup.min_exps["fwd"] and setup.min_flops["fwd+bwd"] == 3.5 * (
        setup.min_flops["fwd"])


def test_environment_names_versions_and_a_dirty_tree(monkeypatch):
    """Rows carry the library's version and one commit string: FASTSEG3D_COMMIT where set (gpu_check sets it once
    for a run), else the checkout's commit, +dirty where tracked files outside bench/results changed (the
    benchmarks append to the committed rows there); "unknown" without git, the bare hash if only status fails."""
    import fastseg3d
    from bench import utils

    answers = {}

    def fake_git(cmd, *args, **kwargs):
        if cmd[0] != "git":
            raise AssertionError(cmd)
        what = answers[cmd[3]]
        if isinstance(what, BaseException):
            raise what
        assert cmd[3] != "status" or ":(exclude)bench/results" in cmd
        return SimpleNamespace(stdout=what, returncode=0)

    monkeypatch.setattr(utils.subprocess, "run", fake_git)
    monkeypatch.delenv("FASTSEG3D_COMMIT", raising=False)
    for rev, status, expected in (("abc1234\n", "", "abc1234"), ("abc1234\n", " M kernels/utils.py\n", "abc1234+dirty"),
                                  ("abc1234\n", subprocess.CalledProcessError(1, "git"), "abc1234"),
                                  (OSError("no git"), "", "unknown")):
        answers.update({"rev-parse": rev, "status": status})
        env = utils.environment(CPU)
        assert env["commit"] == expected and env["fastseg3d"] == fastseg3d.__version__
    assert set(env) <= set(ROW_KEYS)
    monkeypatch.setenv("FASTSEG3D_COMMIT", "def5678")
    assert utils.environment(CPU)["commit"] == "def5678"


def _stand_in_gpu(monkeypatch, total_gib=100):
    """largest_cube.main's GPU stood in for: the allocator's peak since its last reset, in bytes."""
    class Props:
        total_memory = total_gib * 2**30

    allocator = {"peak": 0}
    load_cases()
    net = largest_cube.NETWORKS["segformer3d"]  # its stride, without building the full network on the CPU
    monkeypatch.setattr(net, "build", lambda cfg, plain: torch.nn.Linear(1, 1))
    monkeypatch.setattr(net, "stride", lambda model: 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: allocator.update(peak=0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    monkeypatch.setattr(largest_cube.utils, "environment", lambda device: {"device": "Stand-in GPU", "commit": "x"})
    monkeypatch.setattr(largest_cube, "build", lambda net, cfg, plain, device: torch.nn.Linear(1, 1))
    monkeypatch.setattr(largest_cube, "inputs", lambda net, b, side, device: (side, None))
    monkeypatch.setattr(largest_cube.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM handling
    return allocator


def test_largest_cube_main_writes_a_row_per_search(tmp_path, monkeypatch, capsys):
    """``python -m bench.largest_cube`` end to end with the GPU stood in for: a step whose peak grows with the
    voxels and that runs out of memory past a side per provider; the rows (one per model and provider) land in
    ``largest_cube.jsonl`` and the JSON file, and the table names each stop."""
    allocator = _stand_in_gpu(monkeypatch)
    limit = {"plain": 256, "fastseg3d": 384}

    def runners(net, model, plain, provider, x, label, dtype, device):
        def step():
            if x > limit[provider]:
                raise torch.OutOfMemoryError("CUDA out of memory")
            allocator["peak"] = 1e-3 * x**3 * 2**20
        return {"train_step": step}

    monkeypatch.setattr(largest_cube, "runners", runners)
    out = tmp_path / "rows.json"
    status = largest_cube.main(["--model", "segformer3d", "--max-side", "512", "--time-limit", "60",
                                "--out", str(tmp_path), "--json", str(out)])
    assert status == 0
    rows = json.loads(out.read_text())
    assert [(r["provider"], r["side"], r["stop"]) for r in rows] == [("plain", 256, "out of memory"),
                                                                      ("fastseg3d", 384, "out of memory")]
    assert all(r["converged"] and r["voxels"] == r["side"] ** 3 for r in rows)
    on_disk = [json.loads(line) for line in (tmp_path / "largest_cube.jsonl").read_text().splitlines()]
    assert [r["side"] for r in on_disk] == [256, 384]
    table = largest_cube.format_table(rows)
    assert "plain" in table and "384" in table and "out of memory" in table and "(unfinished)" not in table


def test_attention_block_sdpa_peer_names_the_backend_sdpa_picks():
    """The torch-sdpa peer's rows say which SDPA backend its automatic dispatch takes (its name does not)."""
    case = load_cases()["attention_block"]
    (_, spec), = case.shapes(True)
    setup = case.setup(spec, torch.float32, "torch-sdpa", CPU)
    assert setup.backend in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"), setup.backend
    assert case.setup(spec, torch.float32, "fastseg3d", CPU).backend is None


def test_compiled_peers_under_another_name_get_a_fresh_dynamo_cache(tmp_path, monkeypatch):
    """flex compiles FlexAttention in its setup: Dynamo is reset before each of its setups too, so its 8-recompile
    limit is never reached across shapes and dtypes (past it, Dynamo would run flex eagerly under the flex name)."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    assert run.main(["--case", "attention", "--quick", "--dtype", "fp32,bf16", "--modes", "fwd", "--providers",
                     "flex,fastseg3d", "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    # fastseg3d, flex per dtype: before each flex, and before the setup after one (no compiled graph's memory in
    # the next peak): fp32 flex, bf16 fastseg3d, bf16 flex
    assert len(resets) == 3, resets


def test_exp_ceiling_from_the_sm_count_and_the_maximum_clock(monkeypatch):
    """16 exponentials a clock per SM x SMs x the maximum SM clock: from torch's device properties, or from
    nvidia-smi where a torch build's properties lack the clock (an H200: 132 SMs at 1,980 MHz, 4.18 T/s)."""
    from bench import utils

    cuda = torch.device("cuda", 0)
    props = SimpleNamespace(multi_processor_count=132, clock_rate=1_980_000)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert utils.exp_per_s(cuda) == pytest.approx(16 * 132 * 1.98e9)
    props.clock_rate = 0
    monkeypatch.setattr(utils.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="1980\n"))
    assert utils.exp_per_s(cuda) == pytest.approx(4.18176e12)
    monkeypatch.setattr(utils.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=""))
    assert utils.exp_per_s(cuda) is None and utils.exp_per_s(CPU) is None


def _clock(monkeypatch, module, durations_ms):
    """A stand-in for ``module``'s ``time.perf_counter``: each call of the returned ``fn`` advances it by the next
    of ``durations_ms``; returns (fn, calls) where calls records, per call, whether the leaf's .grad was None."""
    now = [0.0]
    left = list(durations_ms)
    calls = []
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: now[0], monotonic=time.monotonic))

    def fn(leaf=None):
        calls.append(leaf is None or leaf.grad is None)
        now[0] += left.pop(0) * 1e-3
    return fn, calls


def test_cpu_timing_is_the_median_of_five_timed_calls_after_an_untimed_one(monkeypatch):
    """On a CPU ``time_ms`` calls once untimed (the warm-up: a first call's compile or allocation), then times five
    calls, each from cleared gradients: (median, second and fourth of the five sorted samples)."""
    from bench import utils

    leaf = torch.zeros(1, requires_grad=True)
    step, calls = _clock(monkeypatch, utils, [1000.0, 5.0, 1.0, 3.0, 9.0, 2.0])

    def fn():
        step(leaf)
        leaf.grad = torch.ones(1)

    assert utils.time_ms(fn, CPU, grad_to_none=[leaf]) == pytest.approx((3.0, 2.0, 5.0))
    assert len(calls) == 6 and calls[1:] == [True] * 5


def test_cuda_timing_asks_do_bench_for_the_median_p20_and_p80(monkeypatch):
    """On CUDA ``time_ms`` is ``triton.testing.do_bench``'s (median, p20, p80), whatever order it asks them in."""
    testing = pytest.importorskip("triton.testing")
    from bench import utils

    seen = {}

    def do_bench(fn, warmup, rep, grad_to_none, quantiles):
        seen.update(warmup=warmup, rep=rep, grad_to_none=grad_to_none)
        return [100.0 * q for q in quantiles]  # samples spread evenly over 0..100 ms

    monkeypatch.setattr(testing, "do_bench", do_bench)
    leaf = torch.zeros(1, requires_grad=True)
    assert utils.time_ms(lambda: None, torch.device("cuda"), [leaf], warmup=7, rep=300) == pytest.approx(
        (50.0, 20.0, 80.0))
    assert seen == {"warmup": 7, "rep": 300, "grad_to_none": [leaf]}


def test_host_ms_is_the_median_issue_time(monkeypatch):
    from bench import utils

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    step, _ = _clock(monkeypatch, utils, [3.0, 1.0, 2.0])
    assert utils.host_ms(step, torch.device("cuda")) == pytest.approx(2.0)


def test_peak_memory_is_the_calls_own_peak_in_mib(monkeypatch):
    """``peak_memory_mb``: the allocator's peak reset before the call (an earlier, larger peak must not count), the
    timing runs' gradients cleared first, the peak in MiB (2**20 bytes)."""
    from bench import utils

    mib = 2**20
    allocator = {"current": 100 * mib, "peak": 5000 * mib}  # the timing runs' peak is still recorded

    def reset(device=None):
        allocator["peak"] = allocator["current"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    leaf = torch.zeros(1, requires_grad=True)
    leaf.grad = torch.ones(1)
    seen = []

    def fn():
        seen.append(leaf.grad is None)
        allocator["peak"] = max(allocator["peak"], allocator["current"] + 30 * mib)

    assert utils.peak_memory_mb(fn, torch.device("cuda"), grad_to_none=[leaf]) == 130.0 and seen == [True]


def test_measured_ceilings_count_read_and_write_bytes_and_two_flops_per_multiply_add(monkeypatch):
    """The copy moves each byte twice (read and write) and the rate is in GB/s (1e9); an n x n matmul does 2 n^3
    FLOPs, in TFLOP/s (1e12)."""
    from bench import utils

    buffer = SimpleNamespace(copy_=lambda src: None)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: buffer)
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: buffer)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: buffer)
    monkeypatch.setattr(utils, "time_ms", lambda fn, device, **k: (0.5, 0.4, 0.6))
    cuda = torch.device("cuda")
    assert utils.copy_bandwidth_gbs(cuda, nbytes=10**9) == pytest.approx(2 * 10**9 / 0.5e-3 / 1e9)  # 4,000 GB/s
    assert utils.matmul_tflops(cuda, torch.float32) == pytest.approx(2 * 4096**3 / 0.5e-3 / 1e12)
    assert utils.matmul_tflops(cuda, torch.bfloat16) == pytest.approx(2 * 8192**3 / 0.5e-3 / 1e12)


def test_bandwidth_pct_is_the_memory_term_alone_in_gb():
    """bytes / (copy GB/s x 1e9) over the median, also where another ceiling binds."""
    from bench.utils import bandwidth_pct

    setup = Setup(None, [], {"fwd": 10**9}, min_flops={"fwd": 1e12})  # 1 ms memory, 2 ms matrix
    assert bandwidth_pct(setup, "fwd", _Ceilings(), median_ms=4.0) == pytest.approx(25.0)
    assert bandwidth_pct(setup, "bwd", _Ceilings(), 4.0) is None and bandwidth_pct(setup, "fwd", None, 4.0) is None


def test_fma_ceiling_is_the_fp32_rate_only_without_tf32(monkeypatch):
    """With TF32 on, the fp32 matmul runs on the tensor cores: it is no FMA-pipe rate, and an "fma" case gets no
    such ceiling (rather than a tensor-core rate posing as one); with TF32 off, the fp32 rate whatever the dtype."""
    from bench import utils

    rates = {torch.float32: 60.0, torch.bfloat16: 900.0}
    monkeypatch.setattr(utils, "matmul_tflops", lambda device, dtype: rates[dtype])
    ceilings = utils.Ceilings(CPU)  # no copy or exp rate off CUDA; the matmul rates stood in for
    monkeypatch.setattr(utils, "tf32_matmul_allowed", lambda: True)
    assert ceilings.tflops(torch.bfloat16, fma=True) is None and ceilings.tflops(torch.bfloat16) == 900.0
    monkeypatch.setattr(utils, "tf32_matmul_allowed", lambda: False)
    assert ceilings.tflops(torch.bfloat16, fma=True) == 60.0


def _table_rows(rows):
    """{(dtype, provider): (median, speed-up, mem x)} of format_table's lines (shape and case one token each)."""
    out = {}
    for line in format_table(rows).splitlines()[1:]:
        cols = line.split()
        out[(cols[2], cols[4])] = (float(cols[5]), *cols[-2:]) if cols[4].startswith("plain") else (float(cols[5]),)
    return out


def test_table_groups_by_dtype_and_compares_each_peer_with_its_counterpart():
    """One line per (case, shape, dtype, mode, provider), the newest row of a rerun; a peer's time and peak memory
    over its counterpart's (plain+torch.compile against fastseg3d+torch.compile where that was measured)."""
    base = {"suite": "model", "case": "segformer3d", "shape": "2x4x128^3", "mode": "train_step", "p20_ms": 1.0,
            "p80_ms": 1.0, "roofline_pct": None}
    rows = [{**base, "dtype": d, "provider": p, "median_ms": ms, "peak_mem_mb": mb} for d, p, ms, mb in (
        ("bf16", "fastseg3d", 10.0, 100.0), ("bf16", "fastseg3d+torch.compile", 5.0, 75.0),
        ("bf16", "plain", 30.0, 300.0), ("bf16", "plain+torch.compile", 15.0, 150.0),
        ("fp32", "fastseg3d", 20.0, 200.0), ("fp32", "plain", 30.0, 300.0),
        ("fp32", "plain", 50.0, 400.0))]  # a rerun of fp32 plain: the newer row stands
    assert _table_rows(rows) == {
        ("bf16", "fastseg3d"): (10.0,), ("bf16", "fastseg3d+torch.compile"): (5.0,),
        ("bf16", "plain"): (30.0, "3.00", "3.00"), ("bf16", "plain+torch.compile"): (15.0, "3.00", "2.00"),
        ("fp32", "fastseg3d"): (20.0,), ("fp32", "plain"): (50.0, "2.50", "2.00")}
    assert all(line.split()[3] == "train_step" for line in format_table(rows).splitlines()[1:])


def test_plot_ratios_are_peer_over_the_counterpart_measured_at_each_shape(tmp_path, monkeypatch):
    """The plot's ratio panels: a peer's time and peak memory over its counterpart's at the same label, the
    counterpart chosen among the providers measured there (plain+cuda-graph against fastseg3d+cuda-graph where that
    ran, else eager fastseg3d); 0 where there is nothing to compare."""
    import matplotlib.axes

    from bench.utils import plot_rows

    bars = []
    original = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        bars.append((self, kwargs.get("label"), list(height)))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    measured = {"a": {"fastseg3d": (40.0, 100.0), "fastseg3d+cuda-graph": (10.0, None), "plain": (120.0, 300.0),
                      "plain+cuda-graph": (200.0, None)},
                "b": {"fastseg3d": (60.0, 50.0), "plain": (90.0, 100.0), "plain+cuda-graph": (120.0, None)}}
    rows = [{"case": "segformer3d", "shape": shape, "dtype": "bf16", "mode": "train_step", "provider": p,
             "median_ms": ms, "peak_mem_mb": mb, "roofline_pct": None, "device": "GPU", "torch": "2", "triton": "3"}
            for shape, by_provider in measured.items() for p, (ms, mb) in by_provider.items()]
    plot_rows(rows, tmp_path / "segformer3d.png")
    panels = {}
    for ax, label, heights in bars:
        panels.setdefault(ax.get_ylabel(), {})[label] = heights
    assert panels["peer time / fastseg3d counterpart's"] == {"plain": [3.0, 1.5], "plain+cuda-graph": [20.0, 2.0]}
    assert panels["peer peak memory / fastseg3d counterpart's"] == {"plain": [3.0, 2.0],
                                                                      "plain+cuda-graph": [0.0, 0.0]}


def test_rows_keep_the_keys_the_report_and_the_targets_read(tmp_path):
    """A row written and read back keeps what the table and bench.targets read: its replay time (the targets'
    "replayed" twins) and the backend a peer ran."""
    from bench import targets
    from bench.utils import write_rows

    row = {"suite": "ops", "case": "dwconv3d", "shape": "2x32x128^3 ncdhw", "dtype": "bf16", "mode": "fwd",
           "provider": "fastseg3d", "median_ms": 0.3, "graph_ms": 0.2, "host_ms": 0.01, "bandwidth_pct": 40.0,
           "exp_pct": None, "peak_mem_mb": 10.0, "roofline_pct": 40.0, "roofline_bound": "memory",
           "backend": "triton"}
    write_rows([row], tmp_path / "ops.jsonl")
    (back,) = read_rows(tmp_path / "ops.jsonl")
    assert {k: back[k] for k in row} == row and tuple(back) == ROW_KEYS
    results = {t.what: value for t, value, _ in targets.check([back])}
    assert results["dwconv3d bf16 fwd 2x32x128^3 NCDHW: % of copy bandwidth, replayed"] == pytest.approx(60.0)


def _fake_case(suite, providers, modes, setup):
    from bench.registry import Case

    return Case(name=f"fake_{suite}", shapes=lambda quick: [("s", {})], providers=lambda spec: list(providers),
                setup=setup, modes=modes, suite=suite)


def test_run_case_rows_on_a_gpu(monkeypatch, tmp_path):
    """``run_case`` on a CUDA device, the measurements stood in for: model steps get 1,000 ms of repetitions (ops
    100 ms); op rows get a CUDA-graph replay time except bwd rows; a +cuda-graph replay has no peak of its own; each
    row carries its dtype, mode and provider."""
    from bench import utils
    from bench.registry import MODEL_MODES, MODES

    reps, graphed = [], []
    monkeypatch.setattr(utils, "time_ms", lambda fn, device, grad_to_none=None, rep=100: reps.append(rep) or (
        1.0, 0.9, 1.1))
    monkeypatch.setattr(utils, "peak_memory_mb", lambda fn, device, grad_to_none=None: 5.0)
    monkeypatch.setattr(utils, "host_ms", lambda fn, device, grad_to_none=None: 0.1)
    monkeypatch.setattr(run, "_graph_ms", lambda fn, setup, device, what: graphed.append(what) or 0.5)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cuda = torch.device("cuda")

    def op_setup(spec, dtype, provider, device):
        x = torch.randn(4, requires_grad=True)
        return Setup(lambda: x * 2, [x], {})

    ops = _fake_case("ops", ("fastseg3d", "torch"), MODES, op_setup)
    rows = run.run_case(ops, ["fp32", "bf16"], list(MODES), None, True, cuda, {}, None, tmp_path / "ops.jsonl")
    assert [(r["dtype"], r["provider"], r["mode"]) for r in rows] == [
        (d, p, m) for d in ("fp32", "bf16") for p in ("fastseg3d", "torch") for m in MODES]
    assert {(r["mode"], r["graph_ms"]) for r in rows} == {("fwd", 0.5), ("fwd+bwd", 0.5), ("bwd", None)}
    assert len(graphed) == 8 and reps == [100] * len(rows) and all(r["peak_mem_mb"] == 5.0 for r in rows)

    def model_setup(spec, dtype, provider, device):
        return Setup(None, [], {}, runners={"train_step": lambda: None, "infer": lambda: None})

    reps.clear()
    model = _fake_case("model", ("fastseg3d", "plain", "fastseg3d+cuda-graph"), MODEL_MODES, model_setup)
    rows = run.run_case(model, ["bf16"], list(MODEL_MODES), None, True, cuda, {}, None, tmp_path / "model.jsonl")
    assert reps == [1000] * len(rows) == [1000] * 6
    assert {(r["provider"], r["peak_mem_mb"], r["graph_ms"]) for r in rows} == {
        ("fastseg3d", 5.0, None), ("plain", 5.0, None), ("fastseg3d+cuda-graph", None, None)}
    assert read_rows(tmp_path / "model.jsonl") == rows


def test_closures_backpropagate_a_loss_with_one_and_time_fwd_without_a_graph():
    """A scalar output (a loss) is backpropagated with 1, as loss.backward() does (the fused losses' backward
    takes a shortcut there); fwd runs under no_grad."""
    x = torch.randn(3, 4, requires_grad=True)
    setup = Setup(lambda: (3.0 * x).sum(), [x], {})
    assert not run._closure(setup, "fwd")().requires_grad
    for mode in ("bwd", "fwd+bwd"):
        x.grad = None
        run._closure(setup, mode)()
        torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_report_prints_only_the_selected_cases_rows(tmp_path, capsys):
    from bench.utils import write_rows

    rows = [{"suite": "ops", "case": case, "shape": "s", "dtype": "fp32", "mode": "fwd", "provider": "fastseg3d",
             "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0} for case in ("selfreg", "channel_kl")]
    write_rows(rows, tmp_path / "ops.jsonl")
    assert run.main(["--report", "--case", "selfreg", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["selfreg"]


def test_targets_judge_a_value_at_the_need_as_met_on_the_newest_rows():
    """Met means >= need, for a value and for the lower end of a bound; a rerun's newer row replaces the older; the
    cube ratio is read in bf16 where both dtypes were searched."""
    from bench import targets

    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step"}
    rows = [{**train, "provider": p, "median_ms": ms} for p, ms in (
        ("fastseg3d", 10.0), ("plain", 15.0), ("plain", 20.0), ("plain+torch.compile", 15.0))]
    cube = {"case": "largest_cube", "shape": "segformer3d", "mode": None, "stride": 32, "failed_side": None}
    rows += [{**cube, "dtype": "bf16", "provider": "fastseg3d", "voxels": 2000, "converged": False,
              "stop": "time-limit"},  # cut: at least 2000 voxels
             {**cube, "dtype": "bf16", "provider": "plain", "voxels": 1000, "converged": True, "stop": "out of memory"},
             {**cube, "dtype": "fp32", "provider": "fastseg3d", "voxels": 1000, "converged": True,
              "stop": "out of memory"},
             {**cube, "dtype": "fp32", "provider": "plain", "voxels": 1000, "converged": True, "stop": "out of memory"}]
    results = {t.what: (value, verdict) for t, value, verdict in targets.check(rows)}
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (2.0, "met")
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain compiled"] == (1.5, "met")
    value, verdict = results["SegFormer3D largest trainable cube at batch 1: voxels over plain"]
    assert (value.lo, value.hi, verdict) == (2.0, float("inf"), "met")


def test_targets_load_the_newest_commits_rows_and_the_cube_searches(tmp_path):
    """A results folder holds several runs: the targets read the rows of the newest row's commit, the largest-cube
    searches among them (their network under "model")."""
    from bench import targets

    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step"}
    lines = [{**train, "provider": p, "median_ms": ms, "commit": c, "date": d} for p, ms, c, d in (
        ("fastseg3d", 10.0, "old", "2024-01-01T00:00:00Z"), ("plain", 100.0, "old", "2024-01-01T00:00:00Z"),
        ("fastseg3d", 10.0, "new", "2025-01-01T00:00:00Z"), ("plain", 25.0, "new", "2025-01-01T00:00:00Z"))]
    (tmp_path / "model.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cubes = [{"suite": "model", "case": "largest_cube", "model": "segformer3d", "provider": p, "dtype": "bf16",
              "voxels": v, "converged": True, "stop": "out of memory", "failed_side": None, "stride": 32,
              "commit": "new", "date": "2025-01-02T00:00:00Z"} for p, v in (("plain", 1000), ("fastseg3d", 2500))]
    (tmp_path / "largest_cube.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cubes))
    results = {t.what: (value, verdict) for t, value, verdict in targets.check(targets.load_rows(tmp_path))}
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (2.5, "met")
    assert results["SegFormer3D largest trainable cube at batch 1: voxels over plain"] == (2.5, "met")


def test_largest_cube_rows_carry_the_found_sides_own_peak_in_mib(tmp_path, monkeypatch):
    """Each try's peak is its own (the allocator's peak reset before it: a failed larger try, which filled the
    memory, must not count for the side found after it), in MiB; a cuBLAS allocation failure is out of memory."""
    allocator = _stand_in_gpu(monkeypatch)
    limit = {"plain": 256, "fastseg3d": 384}

    def runners(net, model, plain, provider, x, label, dtype, device):
        def step():
            if x > limit[provider]:
                allocator["peak"] = max(allocator["peak"], 99 * 2**30)  # filled the memory, then failed
                if provider == "plain":
                    raise torch.OutOfMemoryError("CUDA out of memory")
                raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
            allocator["peak"] = max(allocator["peak"], int(1e-3 * x**3 * 2**20))  # 1e-3 MiB a voxel
        return {"train_step": step}

    monkeypatch.setattr(largest_cube, "runners", runners)
    out = tmp_path / "rows.json"
    assert largest_cube.main(["--model", "segformer3d", "--max-side", "512", "--time-limit", "60",
                              "--out", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["provider"], r["side"], r["stop"]) for r in rows] == [("plain", 256, "out of memory"),
                                                                      ("fastseg3d", 384, "out of memory")]
    for r in rows:
        assert r["peak_mem_mb"] == pytest.approx(1e-3 * r["side"] ** 3, rel=1e-6), r


def _recording_search(monkeypatch, argument: str) -> list:
    """Stand in for largest_cube.search: every search finds 64 (96 out of memory); the list gets each call's
    ``argument``."""
    seen = []

    def search(attempt, stride, max_side, deadline=None, capacity_mb=None):
        seen.append({"deadline": deadline, "capacity_mb": capacity_mb}[argument])
        return largest_cube.Search(side=64, failed_side=96, stop="out of memory", converged=True, tries=2,
                                   peak_mem_mb=1.0, step_ms=1.0)

    monkeypatch.setattr(largest_cube, "search", search)
    return seen


def test_largest_cube_searches_share_what_is_left_of_the_time_limit(tmp_path, monkeypatch):
    """Each search gets an equal share of what is left when it starts: with the clock standing still, the first of
    two gets half of --time-limit and the last all that is left."""
    _stand_in_gpu(monkeypatch)
    monkeypatch.setattr(largest_cube, "time", SimpleNamespace(monotonic=lambda: 1000.0, perf_counter=time.perf_counter))
    deadlines = _recording_search(monkeypatch, "deadline")
    assert largest_cube.main(["--model", "segformer3d", "--time-limit", "60", "--out", str(tmp_path),
                              "--json", str(tmp_path / "rows.json")]) == 0
    assert deadlines == [1030.0, 1060.0]


class _Recorder(torch.nn.Module):
    """A 1x1 conv to BraTS's 3 classes that records, per call, its training flag, the backend policy and grad mode."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 3, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, fastseg3d.get_backend(), torch.is_grad_enabled()))
        return self.conv(x)


def test_model_runners_train_and_infer_in_their_modes_and_variant():
    """``infer`` is an eval forward without grad, ``train_step`` a training one, whichever ran before; the plain
    variant runs both under the torch backend, the fused one under the caller's policy."""
    from bench.models import NETWORKS, runners

    load_cases()
    net = NETWORKS["segformer3d"]
    x, label = torch.randn(1, 4, 4, 4, 4), torch.randint(0, 3, (1, 1, 4, 4, 4))
    for plain, policy in ((True, "torch"), (False, fastseg3d.get_backend())):
        model = _Recorder()
        steps = runners(net, model, plain, "plain" if plain else "fastseg3d", x, label, torch.float32, CPU)
        steps["infer"]()
        steps["train_step"]()
        steps["infer"]()
        assert model.seen == [(False, policy, False), (True, policy, True), (False, policy, False)], plain


def test_model_cases_build_the_plain_network_for_every_plain_provider(monkeypatch):
    from bench import models

    built = []
    real = models.build
    monkeypatch.setattr(models, "build", lambda net, cfg, plain, device: built.append(plain) or real(net, cfg, plain,
                                                                                                     device))
    case = load_cases()["segformer3d"]
    (_, spec), = case.shapes(True)
    for provider in ("plain", "plain+torch.compile", "fastseg3d", "fastseg3d+torch.compile"):
        case.setup(spec, torch.float32, provider, CPU)  # compiled lazily: nothing compiles here
    assert built == [True, True, False, False]


def test_host_times_are_per_step_whatever_the_number_of_steps():
    """bench.host's calls, Triton launches and their total are per training step: one step and two steps of the
    same network give the same counts (in a process of its own, with the interpreter's launch path)."""
    code = ("import json\nfrom bench.host import host_times\n"
            "runs = [host_times('selfreg_unet', 8, steps=n, warmup=w) for n, w in ((1, 1), (2, 0))]\n"
            "print(json.dumps([[{k: [v[0], v[2]] for k, v in r['by_op'].items()}, r['launches']] for r in runs]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    (one, launches_one), (two, launches_two) = json.loads(out.stdout.splitlines()[-1])
    assert one == two and launches_one == launches_two > 0
    assert sum(launches for _, launches in one.values()) == launches_one


def test_report_and_targets_leave_out_damaged_lines_and_rows(tmp_path, capsys):
    """A line cut short (a full disk), a line that is not an object, and rows with no usable label or time (None,
    0, a string, a key missing) are left out with a warning naming them: they used to end the report, its plots
    and every target verdict with a traceback."""
    from bench import targets

    train = {"suite": "model", "case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step",
             "p20_ms": 1.0, "p80_ms": 1.0, "commit": "c", "date": "2026-01-01T00:00:00Z"}
    good = [{**train, "provider": "fastseg3d", "median_ms": 10.0}, {**train, "provider": "plain", "median_ms": 30.0}]
    odd = [{**train, "provider": "plain+torch.compile", "median_ms": None},
           {**train, "provider": "plain+torch.compile", "median_ms": 0},
           {**train, "provider": "plain+torch.compile", "median_ms": "fast"},
           {k: v for k, v in {**train, "provider": "fastseg3d+cuda-graph", "median_ms": 2.0}.items() if k != "shape"}]
    text = "".join(json.dumps(r) + "\n" for r in good + odd) + "[1, 2]\n" + json.dumps(good[0])[:40] + "\n"
    (tmp_path / "model.jsonl").write_text(text)
    assert run.main(["--report", "--plot", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert [line.split()[4] for line in captured.out.splitlines()[1:]] == ["fastseg3d", "plain"]
    assert "model.jsonl:7: not a JSON object" in captured.err and "model.jsonl:8: not a JSON object" in captured.err
    assert captured.err.count("left out: no usable median_ms") == 3 and "no usable shape" in captured.err
    assert (tmp_path / "segformer3d.png").exists()
    results = {t.what: (value, verdict) for t, value, verdict in targets.check(targets.load_rows(tmp_path))}
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (3.0, "met")
    # the last plain+torch.compile row (a string) is not a measurement
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain compiled"] == (None, "not measured")


def test_targets_leave_out_rows_whose_labels_or_cube_numbers_are_unusable(tmp_path, capsys):
    """A list or dict as a label could not be a lookup key, and a cube row's voxels as a string failed the float
    conversion: either ended the targets report (every verdict) with a traceback."""
    from bench import targets

    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step", "commit": "c",
             "date": "2026-01-01"}
    rows = [{**train, "provider": "fastseg3d", "median_ms": 10.0}, {**train, "provider": "plain", "median_ms": 20.0},
            {**train, "shape": ["2x4x128^3"], "provider": "plain", "median_ms": 5.0},
            {**train, "provider": {"name": "plain"}, "median_ms": 5.0}]
    (tmp_path / "model.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cube = {"suite": "model", "case": "largest_cube", "model": "segformer3d", "dtype": "bf16", "converged": True,
            "stop": "out of memory", "failed_side": None, "stride": 32, "commit": "c", "date": "2026-01-01"}
    (tmp_path / "largest_cube.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {**cube, "provider": "plain", "voxels": "n/a"}, {**cube, "provider": "fastseg3d", "voxels": 1000})))
    assert targets.main(["--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "3 rows left out" in captured.err
    assert re.search(r"SegFormer3D train step 128\^3 B=2 bf16: speed-up over plain eager .* 2\.00x +met", captured.out)
    assert re.search(r"largest trainable cube .* not measured", captured.out)


def test_targets_say_which_commits_rows_they_read(tmp_path, capsys):
    from bench import targets

    rows = [{"case": "segformer3d", "provider": "fastseg3d", "median_ms": 1.0, "commit": c, "date": d}
            for c, d in (("old", "2025-01-01"), ("old", "2025-01-02"), ("new", "2026-01-01"))]
    (tmp_path / "model.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(targets.load_rows(tmp_path)) == 1
    assert "targets on the 1 rows of commit new (the newest row's); 2 rows of other commits set aside" in (
        capsys.readouterr().err)


# --- the third mutation round: verdicts, units and searches no test pinned ---------------------------------------

def _target_results(rows):
    from bench import targets

    return {t.what: (value, verdict) for t, value, verdict in targets.check(rows)}


def test_targets_take_a_zero_time_or_peak_for_no_measurement():
    """A zero time or peak (a foreign or damaged row) is no measurement: it must not read as a 100% shortfall, nor
    end every verdict with a division by zero where it is ours."""
    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step"}
    rows = [{**train, "provider": p, "median_ms": ms, "peak_mem_mb": mb} for p, ms, mb in (
        ("fastseg3d", 10.0, 50.0), ("plain", 0.0, 0.0), ("fastseg3d+torch.compile", 0.0, 10.0),
        ("plain+torch.compile", 15.0, 90.0))]
    results = _target_results(rows)
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (None, "not measured")
    assert results["SegFormer3D train step 128^3 B=2 bf16: plain peak / ours (<= 60% of plain)"] == (
        None, "not measured")
    assert results["SegFormer3D train step 128^3 B=2 bf16, compiled: speed-up over plain compiled"] == (
        None, "not measured")


@pytest.mark.parametrize("fastest", ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"])
def test_attention_target_peer_is_the_fastest_of_all_four_sdpa_backends(fastest):
    """Whichever SDPA backend is fastest at a shape is the peer of "the best SDPA backend": leaving one out would
    overstate the speed-up wherever that one wins."""
    shape = "stage2@128^3 N4096 M512 H2 d32"
    times = {p: 0.02 if p == fastest else 0.05 for p in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")}
    rows = [{"case": "attention", "shape": shape, "dtype": "bf16", "mode": "fwd+bwd", "provider": p, "median_ms": ms}
            for p, ms in {"fastseg3d": 0.04, **times}.items()]
    value, verdict = _target_results(rows)["attention bf16 fwd+bwd stage2@128^3: speed-up over the best SDPA backend"]
    assert value == pytest.approx(0.5) and verdict == "short by 50%"


def test_fp32_attention_target_compares_with_sdpa_efficient_alone():
    """The fp32 target is stated against SDPA's memory-efficient backend, not the fastest backend measured."""
    rows = [{"case": "attention", "shape": "stage1@128^3 N32768 M512 H1 d32", "dtype": "fp32", "mode": "fwd",
             "provider": p, "median_ms": ms} for p, ms in (("fastseg3d", 1.0), ("sdpa-efficient", 2.0),
                                                           ("sdpa-math", 0.5), ("sdpa-flash", 0.5))]
    assert _target_results(rows)["attention fp32 fwd stage1@128^3: speed-up over SDPA efficient"] == (2.0, "met")


def test_kl_distill_memory_target_needs_a_quarter_of_eager_peak():
    """"<= 25% of eager" is eager's peak / ours >= 4: 3.5 falls short, 4 meets it."""
    what = "kl_distill bf16 fwd+bwd dsd 6 pairs deconv heads: eager peak / ours (<= 25% of eager)"
    for eager, verdict in ((350.0, "short by 12%"), (400.0, "met")):
        rows = [{"case": "kl_distill", "shape": "2x14x128^3 dsd 6 pairs deconv heads", "dtype": "bf16",
                 "mode": "fwd+bwd", "provider": p, "median_ms": 1.0, "peak_mem_mb": mb}
                for p, mb in (("fastseg3d", 100.0), ("torch", eager))]
        assert _target_results(rows)[what][1] == verdict


def test_cube_search_that_reached_its_max_side_is_a_lower_bound():
    """A search that trained at --max-side never found where the network stops fitting: its voxels are only a lower
    bound, so a ratio under the need is not a shortfall but a search to extend."""
    rows = [{"case": "largest_cube", "shape": "segformer3d", "dtype": "bf16", "mode": None, "provider": p,
             "voxels": side ** 3, "failed_side": failed, "converged": True, "stride": 32, "stop": stop}
            for p, side, failed, stop in (("fastseg3d", 800, None, "max-side"), ("plain", 736, 768, "out of memory"))]
    value, verdict = _target_results(rows)["SegFormer3D largest trainable cube at batch 1: voxels over plain"]
    assert (value.lo, value.hi) == (pytest.approx(800**3 / 736**3), math.inf)
    assert verdict == "not measured (search cut: at least 1.28x)"


def test_targets_pick_the_newest_commit_by_date_not_by_file_order(tmp_path):
    """largest_cube.jsonl is read last: an older commit's search there must not set aside the newer timing rows."""
    from bench import targets

    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step", "commit": "new",
             "date": "2026-01-01T00:00:00Z"}
    (tmp_path / "model.jsonl").write_text("".join(json.dumps({**train, "provider": p, "median_ms": ms}) + "\n"
                                                  for p, ms in (("fastseg3d", 10.0), ("plain", 25.0))))
    cube = {"case": "largest_cube", "model": "segformer3d", "dtype": "bf16", "provider": "plain", "voxels": 1000,
            "converged": True, "stop": "out of memory", "failed_side": None, "stride": 32, "commit": "old",
            "date": "2025-01-01T00:00:00Z"}
    (tmp_path / "largest_cube.jsonl").write_text(json.dumps(cube) + "\n")
    results = _target_results(targets.load_rows(tmp_path))
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (2.5, "met")


def test_targets_leave_out_a_cut_cube_row_whose_failed_side_is_no_number(tmp_path, capsys):
    """A cut search's failed side bounds the ratio (failed - stride): one that is not a number used to end every
    verdict with a TypeError."""
    from bench import targets

    cube = {"case": "largest_cube", "model": "segformer3d", "dtype": "bf16", "stride": 32, "commit": "c",
            "date": "2026-01-01"}
    rows = [{**cube, "provider": "fastseg3d", "voxels": 512**3, "converged": False, "stop": "time-limit",
             "failed_side": "n/a"},
            {**cube, "provider": "plain", "voxels": 256**3, "converged": True, "stop": "out of memory",
             "failed_side": 288}]
    (tmp_path / "largest_cube.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _target_results(targets.load_rows(tmp_path))
    assert results["SegFormer3D largest trainable cube at batch 1: voxels over plain"] == (None, "not measured")
    assert "1 rows left out" in capsys.readouterr().err


@pytest.mark.parametrize("device,warned", [("NVIDIA H100 80GB HBM3", False), ("NVIDIA H200", False),
                                           ("NVIDIA A100-SXM4-80GB", True)])
def test_targets_warn_on_rows_from_a_device_they_are_not_stated_for(tmp_path, capsys, device, warned):
    """The targets hold on an H100 or an H200: rows from either are judged without the warning, others get it."""
    from bench import targets

    row = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step",
           "provider": "fastseg3d", "median_ms": 1.0, "device": device, "commit": "c", "date": "2026-01-01"}
    (tmp_path / "model.jsonl").write_text(json.dumps(row) + "\n")
    assert targets.main(["--out", str(tmp_path)]) == 0
    assert ("the targets are stated for an H100/H200" in capsys.readouterr().err) == warned


def test_non_finite_or_boolean_numbers_are_no_measurement(tmp_path):
    """JSON holds Infinity, NaN and booleans: none is a time (an infinite peer time would read as an infinite
    speed-up, ``true`` as 1 ms)."""
    from bench import targets
    from bench.utils import number

    assert [number(v) for v in (True, False, math.inf, -math.inf, math.nan, "1", None)] == [None] * 7
    assert number(2) == 2 and number(0.5) == 0.5
    train = {"case": "segformer3d", "shape": "2x4x128^3", "dtype": "bf16", "mode": "train_step", "commit": "c",
             "date": "2026-01-01"}
    rows = [{**train, "provider": p, "median_ms": ms} for p, ms in (
        ("fastseg3d", 10.0), ("plain", math.inf), ("plain+torch.compile", True))]
    (tmp_path / "model.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _target_results(targets.load_rows(tmp_path))
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain eager"] == (None, "not measured")
    assert results["SegFormer3D train step 128^3 B=2 bf16: speed-up over plain compiled"] == (None, "not measured")


def test_report_rows_need_usable_quantiles_too(capsys):
    """The table prints p20 and p80 as numbers: a row without them is left out (named), not a TypeError."""
    from bench.utils import timing_rows

    base = {"case": "dice_ce", "shape": "s", "dtype": "fp32", "mode": "fwd", "provider": "fastseg3d",
            "median_ms": 1.0}
    rows = [{**base, "p20_ms": None, "p80_ms": 1.2}, {**base, "p20_ms": 0.9, "p80_ms": 0}]
    assert timing_rows(rows, "ops.jsonl") == []
    err = capsys.readouterr().err
    assert "no usable p20_ms" in err and "no usable p80_ms" in err


def test_host_ms_is_the_median_not_the_mean(monkeypatch):
    """One slow issue (a garbage collection) must not move the host time: the median of 9, 1 and 2 ms is 2."""
    from bench import utils

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    step, _ = _clock(monkeypatch, utils, [9.0, 1.0, 2.0])
    assert utils.host_ms(step, torch.device("cuda")) == pytest.approx(2.0)


@pytest.mark.parametrize("provider,mode,device", [
    ("torch.compile", "default", "cpu"),
    ("plain+torch.compile-max-autotune", "max-autotune-no-cudagraphs", "cpu"),
    ("fastseg3d+torch.compile-reduce-overhead", "reduce-overhead", "cuda"),
])
def test_compiled_providers_get_their_documented_mode_and_static_shapes(monkeypatch, provider, mode, device):
    """max-autotune without CUDA graphs (the graphs are the reduce-overhead variant's), and one static graph per
    shape, as a fixed-size training run compiles."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    compiled(lambda x: x, provider, torch.device(device))
    assert seen == {"mode": mode, "dynamic": False}


def test_register_refuses_an_unknown_suite():
    """A case in no suite would never run under `bench.run ops|model`: registering it is an error."""
    from bench.registry import CASES, Case, register

    before = dict(CASES)
    with pytest.raises(ValueError, match="suite must be one of"):
        register(Case(name="fake_train", shapes=lambda quick: [], providers=lambda spec: [], setup=None,
                      suite="train"))
    assert CASES == before


def test_default_out_keeps_cpu_smoke_runs_out_of_the_results():
    """A CPU run's rows go to the temporary folder, a GPU's to bench/results/<device slug>."""
    import tempfile

    from bench import utils

    assert run.default_out("cpu-x86_64", CPU) == Path(tempfile.gettempdir()) / "fastseg3d-bench" / "cpu-x86-64"
    assert run.default_out("NVIDIA H100 80GB HBM3", torch.device("cuda")) == utils.RESULTS / "nvidia-h100-80gb-hbm3"


def test_reduce_overhead_rows_are_replayed_steps_without_a_peak_or_a_graph_time(monkeypatch, tmp_path):
    """A reduce-overhead provider replays CUDA graphs: each call marks a new graph step with its gradients cleared,
    its peak is the pool's (no row of its own), and it is not captured again for a graph time."""
    from bench import utils
    from bench.registry import MODES

    monkeypatch.setattr(utils, "time_ms", lambda fn, device, grad_to_none=None, rep=100: (fn(), (1.0, 0.9, 1.1))[1])
    monkeypatch.setattr(utils, "peak_memory_mb", lambda fn, device, grad_to_none=None: 5.0)
    monkeypatch.setattr(utils, "host_ms", lambda fn, device, grad_to_none=None: 0.1)
    monkeypatch.setattr(run, "_graph_ms", lambda fn, setup, device, what: 0.5)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    x = torch.randn(4, requires_grad=True)

    def setup(spec, dtype, provider, device):
        return Setup(lambda: x * 2, [x], {})

    case = _fake_case("ops", ("fastseg3d", "torch.compile-reduce-overhead"), MODES, setup)
    rows = run.run_case(case, ["fp32"], ["fwd"], ["all"], True, torch.device("cuda"), {}, None,
                        tmp_path / "ops.jsonl")
    assert {(r["provider"], r["peak_mem_mb"], r["graph_ms"]) for r in rows} == {
        ("fastseg3d", 5.0, 0.5), ("torch.compile-reduce-overhead", None, None)}
    assert marks == [True]  # the replayed provider's timed call only


def test_largest_cube_search_refuses_a_max_side_below_the_stride():
    with pytest.raises(ValueError, match="below the stride"):
        largest_cube.search(lambda side: largest_cube.Attempt(True), 32, 16)


@pytest.mark.parametrize("stride,first", [(16, 64), (48, 96), (40, 80), (128, 128)])
def test_largest_cube_search_starts_at_the_first_multiple_of_the_stride_from_64(stride, first):
    """The doubling starts at the smallest multiple of the stride that is at least 64, never below it."""
    tried = []

    def attempt(side):
        tried.append(side)
        return largest_cube.Attempt(side <= 200, "out of memory", 1.0, 1.0)

    largest_cube.search(attempt, stride, 1024)
    assert tried[0] == first


def test_largest_cube_search_survives_a_peak_that_does_not_grow():
    """Two sides with the same peak (a fixed workspace dominating, or a rounding allocator) give no slope to
    extrapolate: the search falls back to doubling and bisection instead of dividing by zero."""
    tried = []

    def attempt(side):
        tried.append(side)
        ok = side <= 200
        return largest_cube.Attempt(ok, "" if ok else "out of memory", 100.0 if ok else None, 1.0)

    found = largest_cube.search(attempt, 32, 1024, capacity_mb=1000.0)
    assert found.side == 192 and found.failed_side == 224 and found.converged
    assert tried == [64, 128, 256, 192, 224]


def test_largest_cube_search_tries_the_neighbour_when_the_prediction_is_the_side_found():
    """Peaks that grow faster than the voxels (workspaces): the one-side prediction overshoots, the two-side one then
    lands on the largest side that trained, and its neighbour decides, not a bisection midpoint (a try fewer)."""
    tried = []

    def attempt(side):
        tried.append(side)
        peak = 1e-6 * float(side) ** 4.5
        ok = peak <= 10_000.0
        return largest_cube.Attempt(ok, "" if ok else "out of memory", peak if ok else None, 1.0)

    found = largest_cube.search(attempt, 16, 1024, capacity_mb=10_000.0)
    assert tried == [64, 256, 160, 176] and found.side == 160 and found.converged


def test_largest_cube_predicts_from_95_percent_of_the_device_memory(tmp_path, monkeypatch):
    """The CUDA context and the allocator's fragmentation take their share: the search aims at 95% of the device's
    memory (plain SegFormer3D's largest side peaked at 94% of an H200's)."""
    _stand_in_gpu(monkeypatch, total_gib=100)
    capacities = _recording_search(monkeypatch, "capacity_mb")
    assert largest_cube.main(["--model", "segformer3d", "--providers", "plain", "--out", str(tmp_path),
                              "--json", str(tmp_path / "rows.json")]) == 0
    assert capacities == [pytest.approx(0.95 * 100 * 1024)]


def test_largest_cube_runs_no_search_after_sigterm(tmp_path, monkeypatch):
    """SIGTERM (a time box closing) ends the run: the interrupted search's row is written and the searches left are
    not started."""
    _stand_in_gpu(monkeypatch)

    def runners(net, model, plain, provider, x, label, dtype, device):
        def step():
            if x > 128:
                raise largest_cube.Terminated
        return {"train_step": step}

    monkeypatch.setattr(largest_cube, "runners", runners)
    out = tmp_path / "rows.json"
    assert largest_cube.main(["--model", "segformer3d", "--out", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["provider"], r["side"], r["stop"]) for r in rows] == [("plain", 128, "terminated")]


def test_tune_tolerance_follows_the_dtype():
    """Half-precision plans differ from the table's by their rounding (passes), fp32 ones by far less (0.1% fails)."""
    from bench import tune

    expected = torch.linspace(1.0, 2.0, 64)
    assert tune.matches(expected * (1 + 5e-3), expected, tune.tolerance(torch.bfloat16))
    assert tune.matches(expected * (1 + 5e-3), expected, tune.tolerance(torch.float16))
    assert not tune.matches(expected * (1 + 1e-3), expected, tune.tolerance(torch.float32))


def test_tune_check_scale_is_the_largest_magnitude():
    """The check's scale is the largest |value|: negative outputs (gradients) are compared as positive ones."""
    from bench import tune

    expected = torch.tensor([-1e-6, -1e-9])
    assert tune.matches(torch.tensor([-1e-6, 0.0]), expected, 2e-2)  # 1e-9 off, well within 2% of 1e-6
    assert not tune.matches(torch.tensor([-1.5e-6, -1e-9]), expected, 2e-2)
    assert tune.matches(torch.empty(0), torch.empty(0), 2e-2)  # an empty output has nothing to differ


def test_tune_poisoned_fills_every_op_buffer_with_nan():
    """A plan's check runs with fastseg3d's buffers (ops.utils.empty) NaN-filled, integer ones left as they are."""
    from bench import tune
    from fastseg3d.ops import utils as op_utils

    def fn():
        return [op_utils.empty((4,), dtype=dtype, device=CPU) for dtype in (torch.float32, torch.bfloat16, torch.int32)]

    floats, halves, ints = tune.poisoned(fn)()
    assert floats.isnan().all() and halves.isnan().all() and ints.dtype == torch.int32
    assert op_utils.empty is not tune.nan_empty  # restored


def test_tune_try_plan_raises_a_lost_device_and_records_a_failed_plan():
    """A lost GPU context ends the sweep (every later plan would fail alike); a plan that fails to compile is a
    result, handed to the sink (the JSON on disk) like a timed one."""
    from bench import tune

    row = tune.new_row("op", "s", torch.bfloat16, "k", {}, False)
    expected = [torch.ones(2)]

    def failing(message):
        def patch():
            raise RuntimeError(message)
        return patch

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tune.try_plan(dict(row), failing("CUDA error: an illegal memory access was encountered"), lambda: None,
                      lambda: expected, expected, 2e-2, lambda fn: 1.0)
    sunk = []
    failed = tune.try_plan(dict(row), failing("out of resource: shared memory, Required: 300000"), lambda: None,
                           lambda: expected, expected, 2e-2, lambda fn: 1.0, sink=sunk.append)
    assert sunk == [failed] and failed["ms"] is None and failed["ok"] is None
    assert failed["error"] == "RuntimeError: out of resource: shared memory, Required: 300000"


def test_tune_report_ranks_matched_plans_and_counts_the_rest():
    """Only plans that matched are ranked, fastest first, with the current plan's 1-based rank; plans that computed
    something else and plans that failed are counted apart (a failed plan is not a wrong one)."""
    from bench import tune

    def row(kernel, p, ms, ok, current=False, error=None):
        r = tune.new_row("op", "s", torch.float32, kernel, {"p": p}, current)
        r.update(ms=ms, ok=ok, error=error)
        return r

    rows = [row("k", 1, 3.0, True), row("k", 2, 1.0, True), row("k", 3, 2.0, True, current=True),
            row("k", 4, 0.5, False), row("k", 5, None, None, error="RuntimeError: out of resource"),
            row("k2", 1, None, None, current=True, error="RuntimeError: out of resource")]
    assert tune.report(rows, 2).splitlines() == [
        "op s float32 k: current plan 2.0000 ms, rank 2 of 3",
        "  p 2: 1.0000 ms",
        "  p 3: 2.0000 ms  (current)",
        "  1 plans computed something else (e.g. p 4)",
        "  1 plans failed, e.g. RuntimeError: out of resource",
        "op s float32 k2: current plan not timed",
        "  1 plans failed, e.g. RuntimeError: out of resource"]


@pytest.fixture
def _sigterm_restored():
    """bench.tune.main installs its own SIGTERM handler: the test's process gets its own back."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_tune_cli_sweeps_kernel_by_kernel_and_writes_json(tmp_path, monkeypatch, capsys, _sigterm_restored):
    """The first kernel at every shape before the next (a box that closes early has the targets' kernel), in the
    asked dtype, against a deadline counted from the import; every row is on disk (no partial file) as it is
    measured."""
    from bench import tune, tune_dwconv3d

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "tune" / "dwconv3d.json"
    calls = []

    def sweep(label, dtype, kernels, deadline=None, sink=None):
        calls.append((kernels, label, dtype, deadline))
        r = tune.new_row("dwconv3d", label, dtype, kernels[0], {"n": len(calls)}, len(calls) == 1)
        r.update(ms=float(len(calls)), ok=True)
        sink(r)
        assert len(json.loads(out.read_text())) == len(calls)  # on disk before the next is measured
        return [r]

    monkeypatch.setattr(tune_dwconv3d, "sweep", sweep)
    assert tune.main(["dwconv3d", "--dtype", "fp16", "--time-limit", "60", "--out", str(out)]) == 0
    labels = list(tune_dwconv3d.SHAPES)
    assert [(kernels, label) for kernels, label, _, _ in calls] == [([k], label) for k in tune_dwconv3d.KERNELS
                                                                     for label in labels]
    assert all(dtype == torch.float16 and deadline == tune._START + 60 for *_, dtype, deadline in calls)
    rows = json.loads(out.read_text())
    assert [r["plan"]["n"] for r in rows] == [1, 2, 3, 4] and {r["dtype"] for r in rows} == {"float16"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["dwconv3d.json"]
    assert f"dwconv3d {labels[0]} float16 fwd: current plan 1.0000 ms, rank 1 of 1" in capsys.readouterr().out


def test_tune_cli_sigterm_keeps_what_was_timed(tmp_path, monkeypatch, capsys, _sigterm_restored):
    """timeout(1)'s SIGTERM stops the sweep: the plans timed so far are reported and stay in the JSON, exit 0."""
    import signal

    from bench import tune, tune_kl_distill

    def unhandled(signum, frame):
        raise AssertionError("bench.tune left SIGTERM to its default (the process would die without a report)")

    signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "kl.json"

    def sweep(label, dtype, kernels, deadline=None, sink=None):
        r = tune.new_row("kl_distill", label, dtype, kernels[0], {}, True)
        r.update(ms=1.0, ok=True)
        sink(r)
        os.kill(os.getpid(), signal.SIGTERM)  # the box closes during the next measurement
        time.sleep(1)
        raise AssertionError("not stopped")

    monkeypatch.setattr(tune_kl_distill, "sweep", sweep)
    assert tune.main(["kl_distill", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "stopped; the plans timed so far" in captured.err
    assert "current plan 1.0000 ms, rank 1 of 1" in captured.out and len(json.loads(out.read_text())) == 1


def _sweep_on_meta(op: str, label: str, **kwargs) -> list[dict]:
    """bench.tune's sweep of ``op`` on meta tensors, its launches captured and none run (as bench.warm_cache's tune
    plan does it): the candidates' order, rows and checks without a GPU."""
    import importlib
    from unittest import mock

    from bench.sass import SM90_SMS, _captured
    from bench.warm_cache import _cpu_generator, _MetaValues
    from fastseg3d.kernels import utils as kernel_utils

    tuner = importlib.import_module(f"bench.tune_{op}")
    rows = []
    with _MetaValues(), mock.patch.object(torch, "Generator", _cpu_generator), \
            mock.patch.object(kernel_utils, "sm_count", lambda device: SM90_SMS):
        _captured(lambda: rows.extend(tuner.sweep(label, torch.bfloat16, device=torch.device("meta"), **kwargs)))
    return rows


@pytest.mark.parametrize("op,label,kernel", [("attention", "stage1@128^3", "fwd"),
                                             ("dwconv3d", "2x32x128^3 ncdhw", "fwd"),
                                             ("kl_distill", "2x14x128^3 dsd 6 pairs interp heads", "fwd")])
def test_tune_sweeps_stop_at_the_deadline(op, label, kernel, monkeypatch):
    """A candidate started before --time-limit's deadline is timed, none after it (the box would kill it)."""
    import importlib

    clock = [0.0]
    tuner = importlib.import_module(f"bench.tune_{op}")
    monkeypatch.setattr(tuner, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def time_fn(fn):
        fn()
        clock[0] += 10.0
        return 1.0

    rows = _sweep_on_meta(op, label, kernels=(kernel,), time_fn=time_fn, deadline=15.0)
    assert len(rows) == 2, rows
    assert len(_sweep_on_meta(op, label, kernels=(kernel,), time_fn=time_fn, deadline=clock[0] + 1e6)) > 2


def test_dwconv3d_sweep_checks_each_candidate_on_poisoned_buffers(monkeypatch):
    """Each candidate's check runs with the op's buffers NaN-filled (one that leaves an output partly unwritten
    fails), its timing runs without."""
    from bench import tune, tune_dwconv3d

    poisoned = [0]

    def counting_nan_empty(*args, **kwargs):
        poisoned[0] += 1
        return tune.nan_empty.__wrapped__(*args, **kwargs)

    counting_nan_empty.__wrapped__ = tune.nan_empty
    monkeypatch.setattr(tune, "nan_empty", counting_nan_empty)
    per_candidate = []

    def try_plan(*args, **kwargs):
        before = poisoned[0]
        row = tune.try_plan(*args, **kwargs)
        per_candidate.append(poisoned[0] - before)
        return row

    monkeypatch.setattr(tune_dwconv3d, "try_plan", try_plan)
    rows = _sweep_on_meta("dwconv3d", "2x32x128^3 ncdhw", kernels=("fwd",), time_fn=lambda fn: fn() or 1.0)
    assert len(rows) == len(per_candidate) == len(tune_dwconv3d.candidates())
    assert all(n > 0 for n in per_candidate), per_candidate


def test_kl_distill_tile_candidates():
    """DSD's 14 classes (padded to 16) are swept, BLOCK_V = VEC x 32 x warps, two voxels a thread only where every
    input is at full resolution (an upsampled input's loads are gathers); wider class counts keep the table's."""
    from bench.tune_kl_distill import candidates

    same_res, upsampled = candidates("fwd", 16, True), candidates("fwd", 16, False)
    assert same_res and upsampled and candidates("fwd", 32, True) == []
    assert all(block_v == vec * 32 * warps for block_v, vec, warps in same_res + upsampled)
    assert {vec for _, vec, _ in same_res} == {1, 2} and {vec for _, vec, _ in upsampled} == {1}


def test_kl_distill_sweep_without_transposes_times_the_table_once(monkeypatch):
    """At the deconv heads (every input at full resolution) there is no transposed interpolation to sweep: the
    forward's rows only; the table's plan is timed first and not again as a candidate."""
    from bench import tune_kl_distill
    from fastseg3d.kernels import kl_distill as kern

    monkeypatch.setattr(kern, "_fwd_tile", lambda *args: (128, 2, 2))  # one of the candidates
    rows = _sweep_on_meta("kl_distill", "2x14x128^3 dsd 6 pairs deconv heads", time_fn=lambda fn: fn() or 1.0)
    assert {r["kernel"] for r in rows} == {"fwd"}
    plans = [tuple(r["plan"].values()) for r in rows]
    assert plans[0] == (128, 2, 2) and rows[0]["current"] and len(set(plans)) == len(plans)
    assert len(rows) == len(tune_kl_distill.candidates("fwd", 16, True))


def test_attention_tile_candidates_fit_the_registers():
    """Head dimension 128: no tile over 64 x 128 (the accumulators alone would spill); eight warps only on tiles
    of at least 64 x 64; the forward tries four pipeline stages, the backward's kernels up to three."""
    from bench.tune_attention import candidates

    wide, narrow = candidates("fwd", 128, None), candidates("fwd", 64, None)
    assert wide and all(bm * bn <= 64 * 128 for bm, bn, _, _ in wide)
    assert (128, 128, 8, 2) in narrow and all(bm * bn >= 64 * 64 for bm, bn, w, _ in narrow if w == 8)
    assert {s for *_, s in narrow} == {2, 3, 4} and {s for *_, s in candidates("dq", 64, None)} == {2, 3}


def test_attention_backward_sweep_checks_against_the_table_s_forward(monkeypatch):
    """The backward's sweep reads the table's forward outputs (not those the forward sweep's last candidate left:
    NaN where it failed), changes only the swept kernel's tile, and checks with its scratch buffers and the
    forward's out and lse written over NaN."""
    from bench import tune_attention
    from fastseg3d.kernels import attention as kern

    monkeypatch.setattr(kern, "_precision", lambda dtype: None)
    table = kern._blocks
    last_fwd = tune_attention.candidates("fwd", 16, None)[-1]
    lse_unwritten, scratch_half_written = (64, 64, 4, 3), (32, 32, 4, 2)
    dkdv_tiles = []

    def fake_fwd(q, k, v, scale, out, lse):
        tile = kern._blocks(q.shape[1], k.shape[1], q.shape[3], None, "fwd")
        if tile == last_fwd:
            raise RuntimeError("out of resource: shared memory")  # after its check wrote NaN over out and lse
        out.fill_(1.0)
        if tile != lse_unwritten:
            lse.fill_(0.5)

    def fake_bwd(grad, q, k, v, out, lse, scale, dq, dk, dv, empty=lambda *a, **kw: torch.ones(*a, **kw)):
        n, m, d = q.shape[1], k.shape[1], q.shape[3]
        tile = kern._blocks(n, m, d, None, "dq")
        dkdv_tiles.append(kern._blocks(n, m, d, None, "dkdv"))
        scratch = empty(dq.shape, dtype=dq.dtype, device=dq.device)  # reused memory would hold the table's values
        scratch.view(-1)[:scratch.numel() // (2 if tile == scratch_half_written else 1)] = 1.0
        dq.copy_(scratch * (out + lse.mean()))
        dk.fill_(1.0)
        dv.fill_(1.0)

    monkeypatch.setattr(kern, "attention_fwd", fake_fwd)
    monkeypatch.setattr(kern, "attention_bwd", fake_bwd)
    rows = tune_attention.sweep("tiny", torch.float32, ("fwd", "dq"), CPU, lambda fn: fn() or 1.0)
    fwd = {tuple(r["plan"].values()): r for r in rows if r["kernel"] == "fwd"}
    dq = {tuple(r["plan"].values()): r for r in rows if r["kernel"] == "dq"}
    assert fwd[lse_unwritten]["ok"] is False and "out of resource" in fwd[last_fwd]["error"]
    assert [tile for tile, r in dq.items() if not r["ok"]] == [scratch_half_written]
    assert set(dkdv_tiles) == {table(64, 8, 16, None, "dkdv")}
