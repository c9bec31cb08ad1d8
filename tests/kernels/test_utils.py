"""fastseg3d.kernels.utils: the launchers' plain-Python arithmetic agrees with Triton's constexpr functions."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    from fastseg3d.kernels.utils import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in (2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 40))
    assert cdiv(2**40 + 1, 2**20) == triton.cdiv(2**40 + 1, 2**20)


def test_no_kernel_accumulates_with_atomics():
    # Every fused gradient is deterministic, with or without torch.use_deterministic_algorithms, because no kernel
    # accumulates with atomics: partial sums go to workspaces that are summed in a fixed order (the GPU tier checks
    # repeated runs bitwise; the interpreter runs programs one after another, so it cannot). A kernel that needs
    # atomics must bring a deterministic path for torch.are_deterministic_algorithms_enabled() with it.
    import ast
    import pathlib

    # this checkout's sources (an editable install elsewhere would point fastseg3d.kernels at another tree)
    paths = sorted((pathlib.Path(__file__).resolve().parents[2] / "kernels").glob("*.py"))
    assert {"attention.py", "dwconv3d.py", "kl_distill.py", "selfreg.py"} <= {p.name for p in paths}
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                    else node.name if isinstance(node, ast.alias) else "")
            if "atomic" in name:
                found.append(f"{path.name}:{node.lineno} {name}")
    assert not found, found


@pytest.mark.interpret
@pytest.mark.parametrize("shape_a,shape_b", [((5, 3, 7), (5, 1, 7)), ((3, 1, 300), None), ((1, 27, 2), (1, 1, 2)),
                                             ((4, 27, 20), (4, 1, 20))], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("tiles", ["interpreter", "gpu"])
def test_sum_partials_sums_in_a_fixed_order_into_the_transposed_outputs(shape_a, shape_b, out_dtype, int64, tiles,
                                                                        monkeypatch):
    """Per-program partials (P, K, C) summed over P into a (C, K) output in its dtype, and a second source in the
    same launch (a weight's and a bias's gradient); outputs poisoned with NaN first. The GPU's column tiles are
    narrower than the interpreter's: more than one a source, the second source's starting after the first's."""
    import sys

    from fastseg3d.kernels.utils import sum_partials

    utils = sys.modules["fastseg3d.kernels.utils"]
    if int64:
        monkeypatch.setattr(utils, "_INT32_MAX", 4)
    if tiles == "gpu":  # the GPU's plan; the launch still as the interpreter's (torch 2.11's wrap_triton refuses it)
        monkeypatch.setattr(utils, "INTERPRET", False)
        monkeypatch.setattr(utils, "wrap", lambda kernel: kernel)

    a = torch.randn(shape_a)
    out_a = torch.full((shape_a[2], shape_a[1]), float("nan"), dtype=out_dtype)
    b = torch.randn(shape_b) if shape_b else None
    out_b = torch.full((shape_b[2], shape_b[1]), float("nan")) if shape_b else None
    sum_partials(a, out_a, b, out_b)
    # the fp32 sum rounded once to a bf16 output may sit an ulp from the float64 sum rounded once
    rtol = 8e-3 if out_dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out_a, a.double().sum(0).t().to(out_dtype), rtol=rtol, atol=1e-5)
    if b is not None:
        torch.testing.assert_close(out_b, b.double().sum(0).t().float(), rtol=1e-6, atol=1e-6)


def test_training_step_launch_counts():
    """The kernels SegFormer3D's bf16 training step launches (ATen ops and the fused ops' own launches, meta
    tensors): each fused backward sums its workspaces in one launch (GroupNorm/BatchNorm: reduce, finalize, dx;
    LayerNorm: the kernel and the parameter gradients' sum; attention: delta, dk/dv, their sum, dq)."""
    from bench.sass import launch_counts

    counts = launch_counts("segformer3d", side=64)
    launches = {op.split("::")[1]: n / calls for op, (calls, n) in counts["by_op"].items()}
    assert launches["group_norm_act_backward"] == 3 and launches["layer_norm_backward"] <= 2.5
    assert launches["add_layer_norm_backward"] == 2 and launches["attention_backward"] == 4
    assert launches["dwconv3d_backward"] <= 3  # the forward's tap-major weight read again, not remade
    assert counts["total"] == counts["aten"] + counts["fused"] < 600
