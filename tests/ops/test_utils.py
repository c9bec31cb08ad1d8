"""fastseg3d.ops.utils: what every fused op shares."""

from __future__ import annotations

import pytest
import torch

import fastseg3d
from fastseg3d import backends
from fastseg3d.info import op_choices
from fastseg3d.ops import utils


def test_bf16_on_an_interpreter_that_computes_it_wrongly_is_refused(monkeypatch):
    """Triton's interpreter holds bf16 as bit patterns: ``tl.dot`` multiplies the integers and casts truncate, so a
    bf16 kernel on CPU gave values off by 1e9 without a word; the test tier replaces those two steps (conftest), and
    with them replaced bf16 runs."""
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    monkeypatch.setattr(backends, "interpreter_active", lambda: True)
    x = torch.randn(1, 5, 1, 16, dtype=torch.bfloat16)
    with fastseg3d.backend("triton"):
        assert not utils.base_reasons(x.float())
        assert any("interpreter" in r for r in utils.base_reasons(x))
        with pytest.raises(NotImplementedError, match="bfloat16 on Triton's interpreter"):
            fastseg3d.ops.attention(x, x, x)
        # fastseg3d info says so too
        choices = op_choices("cpu", torch.bfloat16)
        assert choices and all(how == "error" and "interpreter" in why for _, how, why in choices)
        assert all(how == "triton" for _, how, _ in op_choices("cpu", torch.float32))
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", lambda self, *args: None)
        assert not utils.base_reasons(x)
        assert all(how == "triton" for _, how, _ in op_choices("cpu", torch.bfloat16))


def test_only_bf16_is_refused_on_an_interpreter_that_computes_it_wrongly(monkeypatch):
    """fp16 and fp32 compute on Triton's interpreter as on a GPU: only bf16 is refused there."""
    pytest.importorskip("triton")
    monkeypatch.setattr(backends, "interpreter_active", lambda: True)
    x = torch.randn(1, 5, 1, 16)
    with fastseg3d.backend("triton"):
        assert utils.base_reasons(x.bfloat16()) and not utils.base_reasons(x.half())
    assert utils.interpreter_reasons(torch.device("cpu"), torch.float16) == []


def test_layout_of_is_channels_last_for_more_than_one_channel_with_unit_channel_stride():
    x = torch.empty(2, 2, 3, 4, 5)
    assert utils.layout_of(x) == torch.contiguous_format
    assert utils.layout_of(x.contiguous(memory_format=torch.channels_last_3d)) == torch.channels_last_3d
    one = torch.empty(2, 1, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)  # one channel: either layout
    assert utils.layout_of(one) == torch.contiguous_format
    assert utils.layout_of(torch.empty(4, 1)) == torch.contiguous_format  # not 5-D


def test_autocast_inputs_casts_only_floating_tensors():
    """Autocast casts floating inputs (not fp64), never integer ones, and nothing when it is off."""
    f, i, d = torch.randn(2), torch.arange(2), torch.randn(2, dtype=torch.float64)
    assert [t.dtype for t in utils.autocast_inputs("cpu", f, i)] == [torch.float32, torch.int64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = utils.autocast_inputs("cpu", f, i, d, None)
    assert [t.dtype for t in cast[:3]] == [torch.bfloat16, torch.int64, torch.float64] and cast[3] is None


def test_unit_grad_is_false_for_a_gradient_that_is_part_of_a_graph():
    """An incoming gradient that requires grad (a graph of the gradient is built) is not read back as 1."""
    assert utils.unit_grad(torch.ones(3))
    assert not utils.unit_grad(torch.ones(3, requires_grad=True))
    assert not utils.unit_grad(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("shape", [(0, 2, 2), (2, 0, 2), (True, 2, 2), (2, 2), (2.0, 2, 2)])
def test_check_spatial_shape_wants_three_positive_ints(shape):
    """A zero side is refused even where the token count is 0 too (0 voxels would match it)."""
    with pytest.raises(ValueError, match="spatial_shape must be 3 positive ints"):
        utils.check_spatial_shape(shape, 0 if 0 in shape else 4)
    assert utils.check_spatial_shape((1, 2, torch.tensor(2)), 4) == (1, 2, 2)


def test_check_norm_args_wants_per_channel_vectors_and_a_real_eps():
    """The affine parameters are (channels,) vectors, not any tensor with that many elements; eps is a real number
    (a bool is not one) that is finite and >= 0."""
    x = torch.randn(2, 8, 2, 2, 2)
    utils.check_norm_args(x, torch.ones(8), torch.zeros(8), 0, 8, "x's 8 channels")
    for weight, bias in ((torch.ones(2, 4), None), (None, torch.zeros(8, 1))):
        with pytest.raises(ValueError, match=r"must have shape \(8,\) for x's 8 channels"):
            utils.check_norm_args(x, weight, bias, 1e-5, 8, "x's 8 channels")
    for eps in (True, float("inf"), -1e-5, "1e-5"):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            utils.check_norm_args(x, None, None, eps, 8, "x's 8 channels")
