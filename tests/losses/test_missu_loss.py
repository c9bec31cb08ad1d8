"""MISSUDistillLoss against a float64 re-derivation of MISSU's DistillKL (seeds.md §4.3), gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg3d.losses import MISSUDistillLoss
from tests.utils import assert_close


def _distill_kl(student, teacher, reduction):
    """As released: kl_div(log_softmax_c(s), softmax_c(t).detach(), 'sum') / (B*C*H*W) ("faithful"), or the
    channel-summed KL averaged over batch and voxels ("mean")."""
    kl = F.kl_div(torch.log_softmax(student, 1), torch.softmax(teacher, 1).detach(), reduction="sum")
    if reduction == "faithful":
        b, c, _, h, w = student.shape
        return kl / (b * c * h * w)
    return kl / (student.numel() // student.shape[1])


def _pairs(dtype, dims=3):
    # MISSU's (y4, x3_1), (y3, x2_1), (y2, x1_1) at toy sizes: channels halve as resolution doubles
    dec = [torch.randn(2, 16 // 2**i, *(2 * 2**i,) * dims, dtype=dtype, requires_grad=True) for i in range(3)]
    skip = [torch.randn_like(d).mul_(2).requires_grad_() for d in dec]
    return dec, skip


@pytest.mark.parametrize("reduction", ["mean", "faithful"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_released_formula(reduction, dtype):
    dec, skip = _pairs(dtype)
    loss = MISSUDistillLoss(weight=0.3, reduction=reduction)(dec, skip)
    loss.backward()
    ref_dec = [d.detach().double().requires_grad_() for d in dec]
    ref = 0.3 * sum(_distill_kl(d, s.detach().double(), reduction) for d, s in zip(ref_dec, skip))
    ref.backward()
    assert_close("loss", loss.reshape(1), ref.reshape(1), dtype)
    for i, (d, r) in enumerate(zip(dec, ref_dec)):
        assert_close(f"grad[{i}]", d.grad, r.grad, dtype)
    assert all(s.grad is None for s in skip)  # the skips are detached teachers


def test_two_dimensional_mean():
    dec, skip = _pairs(torch.float64, dims=2)
    loss = MISSUDistillLoss()(dec, skip)
    ref = sum(_distill_kl(d.unsqueeze(2), s.unsqueeze(2), "mean") for d, s in zip(dec, skip))
    assert_close("loss", loss.reshape(1), ref.reshape(1), torch.float64)


def test_bad_arguments():
    for kwargs in ({"weight": -0.1}, {"weight": "1"}, {"reduction": "sum"}):
        with pytest.raises(ValueError):
            MISSUDistillLoss(**kwargs)
    dec, skip = _pairs(torch.float32)
    loss_fn = MISSUDistillLoss()
    with pytest.raises(ValueError, match="one skip per decoder feature"):
        loss_fn(dec, skip[:2])
    with pytest.raises(ValueError, match="or MISSU's pairs"):  # one argument: it must be the (decoder, skip) pairs
        loss_fn(dec)
    with pytest.raises(ValueError, match="non-empty"):
        loss_fn([], [])
    with pytest.raises(ValueError, match="non-empty"):
        loss_fn(dec[0], skip[0])
    with pytest.raises(ValueError, match=r"spatial shape.*(decoder_features|skip_features)\[0\]|"
                                         r"(decoder_features|skip_features)\[0\].*spatial shape"):
        loss_fn([dec[0]], [skip[0][:, :, :1]])
    with pytest.raises(ValueError, match=r"decoder_features\[1\] has batch size 1 but skip_features\[1\] has 2"):
        loss_fn([dec[0], dec[1][:1]], skip[:2])


def test_meta_device_and_compile():
    """The loss on the meta device (forward and the students' gradients) and under torch.compile(fullgraph=True):
    the eager value and gradients."""
    torch.manual_seed(0)
    students = [torch.randn(2, c, n, n, n, requires_grad=True) for c, n in ((8, 4), (16, 2))]
    teachers = [torch.randn(2, c, n, n, n) for c, n in ((8, 4), (16, 2))]
    loss = MISSUDistillLoss()
    meta = [s.detach().to("meta").requires_grad_() for s in students]
    value = loss(meta, [t.to("meta") for t in teachers])
    value.backward()
    assert value.device.type == "meta" and [s.grad.shape for s in meta] == [s.shape for s in students]
    eager = loss(students, teachers)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(students, teachers)
    assert_close("loss", compiled, eager, torch.float32)
    for i, (g, g_ref) in enumerate(zip(torch.autograd.grad(compiled, students), torch.autograd.grad(eager, students))):
        assert_close(f"dstudent{i}", g, g_ref, torch.float32)
