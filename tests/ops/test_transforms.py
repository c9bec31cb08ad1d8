"""torch.func transforms and forward-mode AD: the fused ops, the recomputes and the DiceCE loss have backward
formulas only, so under a transform the references run (``auto``) or the call raises (``triton``), never a wrong
gradient or a zero tangent (which PyTorch's custom-op autograd gives under ``jvp``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD

import fastseg3d
from fastseg3d import backends
from fastseg3d.losses import dice_ce
from fastseg3d.nn.recompute import norm_act_conv
from fastseg3d.ops import attention, dwconv3d, kl_distill
from fastseg3d.reference.dice_ce import dice_ce_ref
from fastseg3d.reference.kl_distill import kl_distill_ref
from tests.utils import assert_close

torch.manual_seed(0)
_W, _B = torch.randn(4, 1, 3, 3, 3), torch.randn(4)
_KV = torch.randn(2, 7, 2, 2, 16)
_TEACHER = torch.randn(2, 3, 2, 3, 4)
_LABEL = torch.randint(0, 3, (2, 1, 2, 3, 4))
_NORM, _CONV = nn.GroupNorm(2, 4), nn.Conv3d(4, 3, 3, padding=1)


def _attention(q, k, v):
    return torch.einsum("bhnm,bmhd->bnhd", torch.einsum("bnhd,bmhd->bhnm", q, k).mul(0.3).softmax(-1), v)


# name -> (fastseg3d's function of one input, an independent plain composition, the input's shape)
_CASES = {
    "dwconv3d": (lambda x: dwconv3d(x, _W, _B, activation="gelu"),
                 lambda x: F.gelu(F.conv3d(x, _W, _B, padding=1, groups=4)), (2, 4, 3, 4, 5)),
    "attention": (lambda q: attention(q, _KV[:, :, 0], _KV[:, :, 1], 0.3),
                  lambda q: _attention(q, _KV[:, :, 0], _KV[:, :, 1]), (2, 9, 2, 16)),
    "kl_distill": (lambda s: kl_distill(s, _TEACHER, temperature=2.0),
                   lambda s: kl_distill_ref(s, _TEACHER, temperature=2.0), (2, 3, 2, 3, 4)),
    "dice_ce": (lambda x: dice_ce(x, _LABEL), lambda x: dice_ce_ref(x, _LABEL), (2, 3, 2, 3, 4)),
    "norm_act_conv": (lambda x: norm_act_conv(x, _NORM, "relu", _CONV), lambda x: _CONV(F.relu(_NORM(x))),
                      (2, 4, 3, 3, 3)),
}


@pytest.fixture
def launchable(monkeypatch):
    """CPU tensors count as launchable, so only the transform keeps the ops (fp32 here) off their fused path (no
    kernel runs: every call here takes a reference)."""
    monkeypatch.setattr(backends, "device_reasons", lambda device: [])


@pytest.mark.parametrize("case", sorted(_CASES))
def test_transforms_run_the_references(case, launchable):
    fn, plain, shape = _CASES[case]
    x, t = torch.randn(shape), torch.randn(shape)
    scalar = (lambda f: lambda x: f(x).square().sum()) if case in ("dwconv3d", "attention", "norm_act_conv") else (
        lambda f: f)
    assert_close("grad", torch.func.grad(scalar(fn))(x), torch.func.grad(scalar(plain))(x), torch.float32)
    batch = torch.stack([x, 2 * x])
    assert_close("vmap", torch.func.vmap(fn)(batch), torch.func.vmap(plain)(batch), torch.float32)
    if case == "attention":  # the reference is SDPA, which has no forward-mode AD: PyTorch says so
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(fn, (x,), (t,))
        return
    assert_close("jvp", torch.func.jvp(fn, (x,), (t,))[1], torch.func.jvp(plain, (x,), (t,))[1], torch.float32)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent
    assert_close("forward AD", tangent, torch.func.jvp(plain, (x,), (t,))[1], torch.float32)


def test_triton_backend_refuses_a_transform(launchable):
    fn, _, shape = _CASES["dwconv3d"]
    x = torch.randn(shape)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="torch.func transform"):
        torch.func.grad(lambda x: fn(x).sum())(x)
