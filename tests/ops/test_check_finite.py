"""fastseg3d.check_finite: fused kernel calls check their inputs for NaN and infinity, forward and backward (CPU
tier: the eager ops run their reference bodies on CPU tensors; interpreter tier: the kernels, inside a network and
a loss)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastseg3d
from fastseg3d import backends
from fastseg3d.ops import utils

LN = utils.EAGER_OPS["fastseg3d::layer_norm"]


def _ln_args(x):
    return (x, torch.ones(8), torch.zeros(8), 1e-5, torch.float32)


def test_off_by_default_a_nan_passes():
    assert not backends.checking_finite()
    x = torch.randn(2, 3, 8)
    x[1, 2, 5] = float("nan")
    y = LN(*_ln_args(x))[0]
    assert y[1, 2].isnan().all() and not y[0].isnan().any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_forward_input_named(bad):
    x = torch.randn(2, 3, 8)
    x[0, 1, 2] = bad
    with fastseg3d.check_finite(), pytest.raises(ValueError, match=r"fastseg3d::layer_norm: x holds NaN or infinite"):
        LN(*_ln_args(x))
    with fastseg3d.check_finite():
        w = torch.ones(8)
        w[3] = bad
        with pytest.raises(ValueError, match="fastseg3d::layer_norm: weight holds"):
            LN(torch.randn(2, 3, 8), w, None, 1e-5, torch.float32)
    assert not backends.checking_finite()  # restored


def test_backward_gradient_named():
    x = torch.randn(2, 3, 8, requires_grad=True)
    grad = torch.ones(2, 3, 8)
    grad[0, 0, 0] = float("nan")
    with fastseg3d.check_finite():
        y = LN(*_ln_args(x))[0]  # finite inputs pass
        with pytest.raises(ValueError, match="fastseg3d::layer_norm_backward: grad holds"):
            y.backward(grad)


def test_dispatched_calls_are_checked_too():
    """Under a function or dispatch mode (here ``torch.device``) the op goes through the dispatcher: its inputs are
    checked all the same, a loss's list of students included."""
    import sys

    kl = sys.modules["fastseg3d.ops.kl_distill"]
    x = torch.randn(2, 3, 8)
    x[0, 1, 2] = float("nan")
    student = torch.randn(1, 3, 2, 2, 2)
    student[0, 1, 1, 1, 1] = float("inf")
    with fastseg3d.check_finite(), torch.device("cpu"):
        assert utils._eager_grad((x,)) is None  # the dispatcher's path
        with pytest.raises(ValueError, match="fastseg3d::layer_norm: x holds"):
            LN(*_ln_args(x))
        with pytest.raises(ValueError, match=r"fastseg3d::kl_distill: students\[0\] holds"):
            kl._kl_distill_op([student], torch.randn(1, 3, 2, 2, 2), 2.0, [2, 2, 2], [1.0], [False, False])


def test_lists_non_float_and_empty_tensors():
    ok = torch.randn(3)
    with fastseg3d.check_finite():
        utils.check_finite_inputs("op", ("xs", "index", "empty"), ([ok, ok], torch.tensor([1, 2]), torch.empty(0)))
        with pytest.raises(ValueError, match=r"op: xs\[1\] holds"):
            utils.check_finite_inputs("op", ("xs",), ([ok, torch.tensor([1.0, float("nan")])],))
        # meta and fake tensors hold no values (nor may a check read any back under CUDA-graph capture)
        utils.check_finite_inputs("op", ("x",), (torch.empty(3, device="meta"),))
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            utils.check_finite_inputs("op", ("x",), (mode.from_tensor(torch.tensor([float("nan")])),))


def test_switch_takes_a_bool_and_the_environment_sets_it():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with fastseg3d.check_finite("yes"):
            pass
    code = "import fastseg3d; print(fastseg3d.backends.checking_finite())"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"FASTSEG3D_CHECK_FINITE": value, "PATH": ""}, check=True)
        assert out.stdout.strip() == expected
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FASTSEG3D_CHECK_FINITE": "maybe", "PATH": ""})
    assert bad.returncode != 0 and "FASTSEG3D_CHECK_FINITE must be 0 or 1" in bad.stderr


@pytest.mark.interpret
def test_interpret_network_and_loss_name_the_op():
    """Through the kernels: a NaN in a SegFormer3D block's tokens stops at the first fused op that reads them, and a
    loss names its list argument."""
    from fastseg3d.nn import EfficientSelfAttention3d

    torch.manual_seed(0)
    attn = EfficientSelfAttention3d(dim=16, num_heads=1, sr_ratio=2)
    x = torch.randn(1, 4 * 4 * 4, 16)
    x[0, 3, 1] = float("nan")
    with fastseg3d.backend("triton"), fastseg3d.check_finite():
        with pytest.raises(ValueError, match="fastseg3d::.* holds NaN"):
            attn(x, (4, 4, 4))
        teacher, student = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 4, 4, 4)
        student[0, 0, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"fastseg3d::kl_distill: students\[0\] holds"):
            fastseg3d.ops.kl_distill(student, teacher, temperature=2.0)
