"""SelfRegLoss against a float64 re-derivation of SelfReg's KDloss (seeds.md §3.2): explicit pooling and MSE,
gradients, reproducible channel draws, 2-D maps, segmentation option, bad input, a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg3d.distill import SelfRegOutput
from fastseg3d.losses import SelfRegLoss
from fastseg3d.networks.unet import selfreg_unet
from tests.utils import assert_close

monai_losses = pytest.importorskip("monai.losses")


def _intra(f):
    """IFD as coded: rank channels by the mean of per-(b, c) L2-normalised maps, MSE of top half vs bottom half."""
    flat = f.flatten(2)
    score = (flat / flat.detach().norm(dim=2, keepdim=True)).detach().mean(dim=(0, 2))
    x = f[:, torch.argsort(score, descending=True)]
    c = f.shape[1]
    return F.mse_loss(x[:, : c // 2], x[:, c // 2:])


def _inter(f, final, cs, ct):
    """SCR as coded: adaptive average pooling of the larger map to the smaller, MSE against the detached teacher."""
    pool = F.adaptive_avg_pool3d if f.dim() == 5 else F.adaptive_avg_pool2d
    size = tuple(min(a, b) for a, b in zip(f.shape[2:], final.shape[2:]))
    return F.mse_loss(pool(f, size)[:, cs], pool(final.detach(), size)[:, ct])


def _expected(out, seed, weight, target=None, num_channels=None):
    gen = torch.Generator().manual_seed(seed)
    kd = torch.stack([_intra(f) for f in out.encoder]).mean() + torch.stack([_intra(f) for f in out.decoder]).mean()
    inter = []
    for f in (*out.decoder, *out.encoder):
        k = min(f.shape[1], out.final.shape[1], num_channels or 10**9)
        cs = torch.randperm(f.shape[1], generator=gen)[:k]
        ct = torch.randperm(out.final.shape[1], generator=gen)[:k]
        inter.append(_inter(f, out.final, cs, ct))
    kd = kd + torch.stack(inter).mean()
    seg = 0.0 if target is None else monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)(out.logits, target)
    return seg + weight * kd


def _outputs(dtype, dims=3, b=2):
    def t(c, n):
        return torch.randn(b, c, *(n,) * dims, dtype=dtype, requires_grad=True)

    # a UNet_hd-like pyramid with F_final of 8 channels at 16^dims
    return SelfRegOutput(t(3, 16), (t(16, 8), t(32, 4), t(32, 2)), (t(16, 4), t(8, 8)), t(8, 16))


def _leaves(out):
    # F_final is only a detached teacher: it gets no gradient
    return [out.logits, *out.encoder, *out.decoder]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_published_formula(dims, dtype):
    out = _outputs(dtype, dims)
    target = torch.randint(0, 3, (2, 1, *(16,) * dims)).to(dtype)
    loss = SelfRegLoss(weight=0.5, generator=7)(out, target)
    g = torch.autograd.grad(loss, _leaves(out))
    ref_in = SelfRegOutput(*(tuple(x.detach().double().requires_grad_() for x in v) if isinstance(v, tuple)
                             else v.detach().double().requires_grad_() for v in out))
    ref = _expected(ref_in, 7, 0.5, target.double())
    g_ref = torch.autograd.grad(ref, _leaves(ref_in))
    assert_close("loss", loss.reshape(1), ref.reshape(1), dtype)
    for i, (a, e) in enumerate(zip(g, g_ref)):
        assert_close(f"grad[{i}]", a, e, dtype)


def test_mixed_and_half_precision_features():
    """Under autocast the features are bf16 but one taken after a LayerNorm (UNETR's ``decoder5:input``) stays
    fp32: the loss is the one of fp32 copies, each gradient in its feature's dtype (the DiceCE's included)."""
    out = _outputs(torch.bfloat16)
    out = out._replace(encoder=(*out.encoder[:-1], out.encoder[-1].detach().float().requires_grad_()))
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    loss = SelfRegLoss(weight=0.5, generator=7)(out, target)
    fp32 = SelfRegOutput(*(tuple(x.float() for x in v) if isinstance(v, tuple) else v.float() for v in out))
    torch.testing.assert_close(loss, SelfRegLoss(weight=0.5, generator=7)(fp32, target), rtol=1e-6, atol=0)
    grads = torch.autograd.grad(loss, _leaves(out))
    assert [g.dtype for g in grads] == [x.dtype for x in _leaves(out)]
    assert all(torch.isfinite(g).all() for g in grads)


def test_regulariser_only_and_channel_cap():
    out = _outputs(torch.float64)
    loss_fn = SelfRegLoss(weight=1.0, num_channels=4, generator=3, include_segmentation=False)
    loss = loss_fn(out)
    assert_close("loss", loss.reshape(1), _expected(out, 3, 1.0, num_channels=4).reshape(1), torch.float64)
    terms = SelfRegLoss(generator=3, include_segmentation=False).terms(out)
    assert set(terms) == {"intra", "inter"}
    with pytest.raises(ValueError, match="target"):
        SelfRegLoss()(out)


def test_channel_draws_are_reproducible():
    out = _outputs(torch.float32)
    a = SelfRegLoss(generator=11, include_segmentation=False)
    b = SelfRegLoss(generator=torch.Generator().manual_seed(11), include_segmentation=False)
    first = [a(out).item() for _ in range(3)]
    assert first == [b(out).item() for _ in range(3)]
    assert len(set(first)) > 1  # redrawn at every call
    assert SelfRegLoss(generator=12, include_segmentation=False)(out).item() != first[0]
    torch.manual_seed(5)
    c = SelfRegLoss(include_segmentation=False)(out).item()
    torch.manual_seed(5)
    assert SelfRegLoss(include_segmentation=False)(out).item() == c  # the global RNG when no generator


def test_compile_fullgraph_with_the_global_generator():
    # what the docstring advises: torch.compile cannot trace a torch.Generator object, torch's global RNG it can
    torch._dynamo.reset()
    out = _outputs(torch.float32)
    loss_fn = SelfRegLoss(include_segmentation=False)
    torch.manual_seed(3)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(out)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled, loss_fn(out))


def test_training_smoke():
    torch.manual_seed(0)
    net = selfreg_unet(2, 1, 3, channels=(4, 8, 16))
    loss_fn = SelfRegLoss(generator=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 1, 16, 16))
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()


def test_bad_arguments():
    for kwargs in ({"weight": -1}, {"weight": float("inf")}, {"num_channels": 0}, {"num_channels": 2.5},
                   {"generator": "seed"}, {"include_segmentation": 1}):
        with pytest.raises(ValueError):
            SelfRegLoss(**kwargs)
    out = _outputs(torch.float32)
    loss_fn = SelfRegLoss(include_segmentation=False)
    with pytest.raises(ValueError, match="training output"):
        loss_fn(out[:3])
    with pytest.raises(ValueError, match="non-empty"):
        loss_fn(SelfRegOutput(out.logits, (), out.decoder, out.final))
    odd = torch.randn(2, 5, 8, 8, 8)
    with pytest.raises(ValueError, match=r"encoder\[0\] has 5 channels.*even"):
        loss_fn(SelfRegOutput(out.logits, (odd,), out.decoder, out.final))
    with pytest.raises(ValueError, match=r"decoder\[1\] has 5 channels.*even"):
        loss_fn(SelfRegOutput(out.logits, out.encoder, (out.decoder[0], odd), out.final))
    with pytest.raises(ValueError, match="4-D"):
        loss_fn(SelfRegOutput(out.logits, (torch.randn(2, 4, 8),), out.decoder, out.final))
    # a 2-D map beside a 3-D final, a batch that differs and a ratio that does not divide, by the loss's own names
    with pytest.raises(ValueError, match=r"encoder\[0\] is 4-D but final is 5-D"):
        loss_fn(SelfRegOutput(out.logits, (out.encoder[0][:, :, 0],), out.decoder, out.final))
    with pytest.raises(ValueError, match=r"decoder\[0\] has batch size 1 but final has 2"):
        loss_fn(SelfRegOutput(out.logits, out.encoder, (out.decoder[0][:1], *out.decoder[1:]), out.final))
    with pytest.raises(ValueError, match=r"encoder\[0\]"):
        loss_fn(SelfRegOutput(out.logits, (out.encoder[0][:, :, :3],), out.decoder, out.final))


def test_the_default_weight_is_the_published_one():
    t = lambda c, n: torch.randn(2, c, n, n, n, dtype=torch.float64)  # noqa: E731
    out = SelfRegOutput(t(3, 8), (t(8, 4), t(8, 2)), (t(8, 4),), t(8, 8))
    assert SelfRegLoss().weight == 0.015
    torch.testing.assert_close(SelfRegLoss(generator=1, include_segmentation=False)(out),
                               SelfRegLoss(weight=0.015, generator=1, include_segmentation=False)(out))
