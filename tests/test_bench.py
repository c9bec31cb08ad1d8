"""The benchmark harness on a CPU: the registry, rows with every key, the command line, the model cases on tiny
shapes, the roofline arithmetic, the largest-cube search and its refusal without a GPU (timings here mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastseg3d

from bench import largest_cube, run
from bench.kl_distill import _eager as kl_eager
from bench.kl_distill import liger_loss
from bench.models import NETWORKS
from bench.registry import Setup, Unavailable, compiled, load_cases
from fastseg3d.ops import kl_distill_multi
from bench.utils import ROW_KEYS, read_rows, roofline

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "dwconv3d": "ops", "attention": "ops", "attention_block": "ops", "kl_distill": "ops", "channel_kl": "ops",
    "selfreg": "ops", "segformer3d": "model", "mobileutr": "model", "missu": "model", "dsd_unet": "model",
    "selfreg_unet": "model",
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
    assert "fastseg3d x" in proc.stdout
    assert (tmp_path / "dwconv3d.png").stat().st_size > 0


def test_main_ops_suite_writes_valid_json(tmp_path):
    out = tmp_path / "rows.json"
    assert run.main(["ops", "--case", "dwconv3d", "--quick", "--json", str(out), "--out", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    assert {r["suite"] for r in rows} == {"ops"} and {r["dtype"] for r in rows} == {"fp32", "bf16"}
    # on a CPU the default set leaves the compiled providers out
    assert not any("compile" in r["provider"] for r in rows)
    assert len(read_rows(tmp_path / "ops.jsonl")) == len(rows)


def test_main_rejects_a_case_of_the_other_suite():
    with pytest.raises(SystemExit) as exc:
        run.main(["model", "--case", "dwconv3d", "--quick"])
    assert exc.value.code == 2


def test_main_lists_cases(capsys):
    assert run.main(["model", "--list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name, suite in SUITES.items() if suite == "model")
    assert "dwconv3d" not in text and "optional:" in text


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
    # the U-Nets' inference runs no fused op: measured for fastseg3d only
    assert {(r["provider"], r["mode"]) for r in rows} == {
        ("fastseg3d", "train_step"), ("fastseg3d", "infer"), ("plain", "train_step")}
    capsys.readouterr()
    assert run.main(["--report", "--case", "selfreg_unet", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("selfreg_unet") == len(rows)


@pytest.mark.parametrize("name", ["segformer3d", "mobileutr", "missu", "dsd_unet", "selfreg_unet"])
def test_model_case_builds_and_steps(name):
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
    (_, spec), _ = case.shapes(True)
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
        "plain", "plain+torch.compile", "plain+torch.compile-max-autotune", "plain+torch.compile-reduce-overhead"]


def test_cuda_graphs_are_unavailable_on_cpu():
    with pytest.raises(Unavailable):
        compiled(lambda x: x, "plain+torch.compile-reduce-overhead", CPU)


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


def test_liger_provider_matches_the_eager_loss():
    # Liger's KL has torch.nn.KLDivLoss's contract; this checks the (B * voxels, K) view, T and the resampling
    groups = [(torch.randn(1, 3, 8, 8, 8), [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 8, 8, 8)]),
              (torch.randn(1, 3, 2, 2, 2), [torch.randn(1, 3, 4, 4, 4)])]
    loss = liger_loss(torch.nn.KLDivLoss(reduction="batchmean", log_target=True))(groups)
    torch.testing.assert_close(loss, kl_eager(groups))


def test_kl_peers_compute_what_the_fused_loss_computes():
    # an encoder-style group: the teacher below every student, the students at three resolutions
    groups = [(torch.randn(1, 3, 2, 2, 2), [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]),
              (torch.randn(1, 3, 8, 8, 8), [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)])]
    with fastseg3d.backend("torch"):
        fused = sum(kl_distill_multi(students, teacher, 3.0) for teacher, students in groups)
    torch.testing.assert_close(kl_eager(groups), fused)


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


def test_largest_cube_search_stops_at_its_deadline():
    found = largest_cube.search(lambda side: largest_cube.Attempt(True), 16, 4096, deadline=time.monotonic() - 1)
    assert found.tries == 0 and found.side is None and not found.converged and found.stop == "time-limit"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_largest_cube_refuses_without_gpu(capsys):
    assert largest_cube.main(["--model", "segformer3d"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
