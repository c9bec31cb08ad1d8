"""Test tiers: the CPU tier runs by default; ``interpret`` tests need ``TRITON_INTERPRET=1`` in their own pytest
process (Triton reads it when kernels are decorated, and it breaks compile/opcheck); ``gpu`` tests need CUDA."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest -m interpret)")
    skip_not_interp = pytest.mark.skip(reason="compile/opcheck tests cannot run under TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpret" in item.keywords:
            if not INTERPRET:
                item.add_marker(skip_interp)
        elif INTERPRET:
            item.add_marker(skip_not_interp)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer fastseg3d hands to a kernel starts as NaN, so an unwritten element fails the comparison."""
    from fastseg3d.ops import utils

    real_empty = utils.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(utils, "empty", nan_empty)
