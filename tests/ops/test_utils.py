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
