"""DSDLoss against a float64 re-derivation of DSD's published loss (seeds.md §5.4), both head modes, 2-D, bad input,
a short training run, and the fused KL (Triton interpreter) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.distill import DSDOutput
from fastseg3d.losses import DSDLoss
from fastseg3d.networks.unet import dsd_unet
from tests.utils import assert_close

monai_losses = pytest.importorskip("monai.losses")


def _up(x, size):
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="trilinear" if x.dim() == 5 else "bilinear", align_corners=False)


def _kl_pix(student, teacher, temperature, detach):
    """DSD's KL_pix: KLDivLoss(reduction='none') summed over classes, mean over batch and voxels, times T^2."""
    t = teacher.detach() if detach else teacher
    kl = F.kl_div(torch.log_softmax(student / temperature, 1), torch.softmax(t / temperature, 1), reduction="none")
    return temperature**2 * kl.sum(1).mean()


def _expected(out, target, temperature=3.0, kl_weight=1.0, detach=False):
    dice_ce = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)
    size = tuple(target.shape[2:])
    total = dice_ce(out.main, target)
    for h in out.decoder:
        total = total + dice_ce(_up(h, size), target)
    kl = 0.0
    for heads in (out.decoder, out.encoder):
        # every pair over the label's voxels, as with the published full-resolution heads
        teacher = _up(heads[-1], size)
        for s in heads[:-1]:
            kl = kl + _kl_pix(_up(s, size), teacher, temperature, detach)
    return total + kl_weight * kl


def _outputs(dtype, mode, spatial=(8, 8, 8), b=2, k=3):
    """Random DSD outputs: all heads at full resolution ("deconv") or at 1/16 .. 1/1 ("interp")."""
    def t(f):
        size = tuple(max(s // f, 1) for s in spatial)
        return torch.randn(b, k, *size, dtype=dtype).mul_(2).requires_grad_()

    if mode == "deconv":
        return DSDOutput(t(1), tuple(t(1) for _ in range(4)), tuple(t(1) for _ in range(4)))
    return DSDOutput(t(1), (t(8), t(4), t(2), t(2)), (t(1), t(2), t(4), t(8)))


def _grads(out):
    return [out.main, *out.decoder, *out.encoder]


@pytest.mark.parametrize("mode", ["deconv", "interp"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_published_formula(mode, detach, dtype):
    out = _outputs(dtype, mode)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).to(dtype)
    loss_fn = DSDLoss(num_classes=3, temperature=3.0, kl_weight=0.7, detach_teacher=detach)
    loss = loss_fn(out, target)
    g = torch.autograd.grad(loss, _grads(out), allow_unused=True, materialize_grads=True)
    ref_in = DSDOutput(*(
        tuple(x.detach().double().requires_grad_() for x in v) if isinstance(v, tuple)
        else v.detach().double().requires_grad_() for v in out))
    ref = _expected(ref_in, target.double(), 3.0, 0.7, detach)
    g_ref = torch.autograd.grad(ref, _grads(ref_in), allow_unused=True, materialize_grads=True)
    assert_close("loss", loss.reshape(1), ref.reshape(1), dtype)
    for i, (a, e) in enumerate(zip(g, g_ref)):
        assert_close(f"grad[{i}]", a, e, dtype)
    if detach:
        # the teachers' gradients are the DiceCE ones alone (encoder teacher: none at all)
        assert g[-1].abs().max() == 0


def test_terms_and_tensor_input():
    out = _outputs(torch.float64, "deconv")
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss_fn = DSDLoss(3, kl_weight=2.0)
    terms = loss_fn.terms(out, target)
    assert set(terms) == {"dice_ce", "kl_decoder", "kl_encoder"}
    total = terms["dice_ce"] + 2.0 * (terms["kl_decoder"] + terms["kl_encoder"])
    assert torch.allclose(loss_fn(out, target), total)
    # a plain tensor (the wrapper's eval output) gives its DiceCE alone
    dice_ce = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)
    assert torch.allclose(loss_fn(out.main, target), dice_ce(out.main, target))


def test_dice_ce_kwargs_set_every_dice_ce_term():
    """MONAI's further DiceCE settings reach every supervised head, upsampled ones included; one only MONAI's
    composition computes (which takes no upsampled head) is refused."""
    out = _outputs(torch.float64, "interp")
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    forms = dict(batch=True, squared_pred=True, reduction="sum")
    loss_fn = DSDLoss(3, dice_ce_kwargs=forms)
    dice_ce = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, **forms)
    size = tuple(target.shape[2:])
    expected = sum(dice_ce(_up(h, size), target) for h in (out.main, *out.decoder))
    torch.testing.assert_close(loss_fn.terms(out, target)["dice_ce"], expected, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="dice_ce_kwargs=.*label_smoothing"):
        DSDLoss(3, dice_ce_kwargs={"label_smoothing": 0.1})


def test_two_dimensional():
    def t(f):
        return torch.randn(2, 3, 8 // f, 8 // f, dtype=torch.float64)

    out = DSDOutput(t(1), tuple(t(f) for f in (8, 4, 2, 2)), tuple(t(f) for f in (1, 2, 4, 8)))
    target = torch.randint(0, 3, (2, 1, 8, 8)).double()
    loss = DSDLoss(3)(out, target)
    assert_close("2-D loss", loss.reshape(1), _expected(out, target).reshape(1), torch.float64)


def test_single_head_has_no_kl():
    out = DSDOutput(torch.randn(1, 2, 4, 4, 4), (torch.randn(1, 2, 4, 4, 4),), (torch.randn(1, 2, 4, 4, 4),))
    terms = DSDLoss(2).terms(out, torch.randint(0, 2, (1, 1, 4, 4, 4)))
    assert terms["kl_decoder"] == 0 and terms["kl_encoder"] == 0


@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_training_smoke(mode):
    torch.manual_seed(0)
    net = dsd_unet(3, 1, 2, channels=(4, 8, 8, 8), head_mode=mode)
    loss_fn = DSDLoss(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 2, (2, 1, 16, 16, 16))
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()


@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_dice_ce_terms_keep_only_the_heads(mode, monkeypatch):
    """bf16 outputs (autocast): the five DiceCE terms keep the logits as given (each head at its own resolution),
    where MONAI's DiceCE would keep an fp32 softmax, log-softmax and one-hot label per head. (The KL terms, which
    on the CPU run their reference, are replaced by a term that saves nothing.)"""
    import fastseg3d.losses.dsd as dsd_module

    monkeypatch.setattr(dsd_module, "kl_distill_multi", lambda s, t, *a, **k: t.float().sum() * 0.0)
    out = _outputs(torch.bfloat16, mode)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        DSDLoss(3)(out, target)
    floats = [t for t in saved if t.dtype.is_floating_point and t.dim() > 2]  # not the (B, K) tables
    assert {id(t) for t in floats} == {id(h) for h in (out.main, *out.decoder)}


def test_half_precision_outputs_need_no_cast():
    """bf16 outputs: the loss is the one of fp32 copies of the outputs (every term computes in fp32), and every
    gradient comes back in bf16; the eval output (a tensor) gets the DiceCE alone."""
    for mode in ("deconv", "interp"):
        out = _outputs(torch.bfloat16, mode)
        target = torch.randint(0, 3, (2, 1, 8, 8, 8))
        loss_fn = DSDLoss(3)
        loss = loss_fn(out, target)
        fp32 = DSDOutput(out.main.float(), tuple(h.float() for h in out.decoder),
                         tuple(h.float() for h in out.encoder))
        torch.testing.assert_close(loss, loss_fn(fp32, target), rtol=1e-6, atol=0)
        grads = torch.autograd.grad(loss, _grads(out))
        assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
        expected = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)(out.main.float(), target)
        torch.testing.assert_close(loss_fn(out.main, target), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [np.float32(2.5), np.int64(2), torch.tensor(2.5), torch.tensor(2)],
                         ids=["np.float32", "np.int64", "tensor", "int-tensor"])
def test_temperature_of_numpy_scalars_and_0d_tensors(temperature):
    loss_fn = DSDLoss(3, temperature=temperature)
    assert type(loss_fn.temperature) is float and loss_fn.temperature == float(temperature)
    out = _outputs(torch.float32, "interp")
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    assert loss_fn(out, target).item() == DSDLoss(3, temperature=float(temperature))(out, target).item()


def test_weights_of_numpy_scalars():
    loss_fn = DSDLoss(3, kl_weight=np.float32(0.5), lambda_ce=np.int64(1))
    assert type(loss_fn.kl_weight) is float and loss_fn.kl_weight == 0.5


def test_bad_arguments():
    for kwargs in ({"num_classes": 0}, {"num_classes": 2, "temperature": 0},
                   {"num_classes": 2, "temperature": torch.tensor(-1.0)},
                   {"num_classes": 2, "kl_weight": -1}, {"num_classes": 2, "kl_weight": float("nan")},
                   {"num_classes": 2, "detach_teacher": 1}, {"num_classes": 2, "lambda_ce": -1.0}):
        with pytest.raises(ValueError):
            DSDLoss(**kwargs)
    for temperature in ("3", None, True, torch.tensor([3.0])):
        with pytest.raises(TypeError, match="temperature"):
            DSDLoss(2, temperature=temperature)
    loss_fn = DSDLoss(3)
    out = _outputs(torch.float32, "deconv")
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        DSDLoss(4)(out, target)
    with pytest.raises(ValueError, match="target"):
        loss_fn(out, target[:, 0])
    with pytest.raises(ValueError, match="spatial shape"):
        loss_fn(out, torch.randint(0, 3, (2, 1, 4, 4, 4)))
    with pytest.raises(ValueError, match="training output"):
        loss_fn((out.main, out.decoder), target)
    with pytest.raises(ValueError, match="non-empty"):
        loss_fn(DSDOutput(out.main, (), out.encoder), target)
    # errors name the loss's own arguments, not the fused op's students and teacher
    with pytest.raises(ValueError, match=r"decoder\[1\] has batch size 1 but main has 2"):
        loss_fn(DSDOutput(out.main, (out.decoder[0], out.decoder[1][:1], *out.decoder[2:]), out.encoder), target)
    odd = torch.randn(2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"encoder\[0\] has spatial shape \(3, 8, 8\)"):
        loss_fn(DSDOutput(out.main, out.decoder, (odd, *out.encoder[1:])), target)
    with pytest.raises(ValueError, match=r"decoder\[0\] has spatial shape \(3, 8, 8\)"):
        loss_fn(DSDOutput(out.main, (odd, *out.decoder[1:]), out.encoder), target)
    with pytest.raises(ValueError, match="main must be \\(5-D\\) logits"):
        loss_fn(DSDOutput(out.main[..., None], out.decoder, out.encoder), target)


@pytest.mark.interpret
def test_fused_kl_matches_reference(poison):
    # Decoder students below the teacher's resolution (upsampled inside the kernel), encoder heads at full
    # resolution. A teacher coarser than its students (DSD's interp-mode encoder) is left to the op's own tests:
    # the interpreter takes tens of seconds on it even at 4x4x2.
    torch.manual_seed(0)

    def t(f):
        return torch.randn(1, 3, 4 // f, 4 // f, 2 // min(f, 2), requires_grad=True)

    out = DSDOutput(t(1), (t(4), t(2), t(1), t(1)), tuple(t(1) for _ in range(4)))
    target = torch.randint(0, 3, (1, 1, 4, 4, 2))
    loss_fn = DSDLoss(3)
    results = {}
    for name in ("triton", "torch"):
        with fastseg3d.backend(name):
            terms = loss_fn.terms(out, target)
            kl = terms["kl_decoder"] + terms["kl_encoder"]
            results[name] = (kl, torch.autograd.grad(kl, _grads(out)[1:]))
    assert_close("kl", results["triton"][0].reshape(1), results["torch"][0].reshape(1), torch.float32)
    for i, (a, e) in enumerate(zip(results["triton"][1], results["torch"][1])):
        assert_close(f"grad[{i}]", a, e, torch.float32)


def test_kl_terms_trace_with_symbolic_sizes():
    # the loss resolution comes from the label's shape, a SymInt under symbolic tracing (torch.export with dynamic
    # sizes)
    from torch.fx.experimental.proxy_tensor import make_fx

    loss_fn = DSDLoss(num_classes=3)
    out = _outputs(torch.float32, "interp")
    heads = [h.detach() for h in out.decoder]
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    graph = make_fx(lambda d, t: loss_fn._kl(d, "decoder", tuple(t.shape[2:])), tracing_mode="symbolic")(heads, target)
    assert_close("kl", graph(heads, target), loss_fn._kl(heads, "decoder", (8, 8, 8)), torch.float32)


def test_compile_fullgraph_matches_eager():
    """The whole loss (DiceCE on every head and the six KL terms) under torch.compile(fullgraph=True): the eager
    value and the gradient of every head."""
    torch.manual_seed(0)
    net = dsd_unet(3, 1, 3, channels=(4, 8, 8, 8))
    out = net(torch.randn(1, 1, 16, 16, 16))
    label = torch.randint(0, 3, (1, 1, 16, 16, 16))
    heads = [out.main, *out.decoder, *out.encoder]
    loss = DSDLoss(3)
    eager = loss(out, label)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(out, label)
    assert_close("loss", compiled, eager, torch.float32)
    for i, (g, g_ref) in enumerate(zip(torch.autograd.grad(compiled, heads, retain_graph=True),
                                       torch.autograd.grad(eager, heads, retain_graph=True))):
        assert_close(f"dhead{i}", g, g_ref, torch.float32)


def test_one_student_per_teacher_has_its_kl():
    """Two heads a side (the teacher and one student): each side's KL term is the pair's, T^2 KL at T = 2."""
    t = lambda: torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)  # noqa: E731
    out = DSDOutput(t(), (t(), t()), (t(), t()))
    terms = DSDLoss(3, temperature=2.0).terms(out, torch.randint(0, 3, (2, 1, 4, 4, 4)))
    for name, (student, teacher) in (("kl_decoder", out.decoder), ("kl_encoder", out.encoder)):
        kl = 4 * F.kl_div(torch.log_softmax(student / 2, 1), torch.softmax(teacher / 2, 1),
                          reduction="none").sum(1).mean()
        assert_close(name, terms[name], kl, torch.float32)
