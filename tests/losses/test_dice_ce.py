"""fastseg3d's DiceCE against MONAI's DiceCELoss(to_onehot_y=True, softmax=True): value and gradient in float64,
half-precision logits, the upsampled heads, what it saves for backward, meta, compile and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg3d import backend
from fastseg3d.losses import DiceCELoss, dice_ce
from fastseg3d.reference.dice_ce import dice_ce_ref

monai_losses = pytest.importorskip("monai.losses")

CASES = [  # logits shape, target spatial shape, include_background, lambda_dice, lambda_ce
    ((2, 3, 5, 6, 7), (5, 6, 7), True, 1.0, 1.0),
    ((1, 4, 3, 4, 5), (6, 8, 5), False, 0.6, 0.4),  # a head at half the label's resolution on two axes
    ((3, 2, 9, 10), (18, 10), True, 1.0, 0.0),  # 2-D, Dice alone
    ((2, 5, 2, 3, 3), (8, 6, 9), True, 0.0, 1.0),  # CE alone, factors 4, 2, 3
    ((2, 3, 7, 1, 5), (7, 1, 5), False, 1.0, 1.0),
]


def _monai(logits, target, include_background, lambda_dice, lambda_ce, **forms):
    """MONAI's loss on the logits upsampled with F.interpolate (the composition DSD's deep supervision runs)."""
    size = target.shape[2:]
    if tuple(logits.shape[2:]) != tuple(size):
        mode = "trilinear" if logits.dim() == 5 else "bilinear"
        logits = F.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)
    fn = monai_losses.DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True,
                                 lambda_dice=lambda_dice, lambda_ce=lambda_ce, **forms)
    return fn(logits, target)


def _data(shape, size, seed=0, dtype=torch.float64, target_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0], 1, *size), generator=g).to(target_dtype)
    return logits, target


@pytest.mark.parametrize("impl", ["lean", "reference"])
@pytest.mark.parametrize("shape,size,include_background,lambda_dice,lambda_ce", CASES)
def test_matches_monai_in_float64(impl, shape, size, include_background, lambda_dice, lambda_ce):
    logits, target = _data(shape, size)
    expected = _monai(logits, target, include_background, lambda_dice, lambda_ce)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    if impl == "lean":
        out = dice_ce(logits, target, include_background, lambda_dice, lambda_ce)
    else:
        out = dice_ce_ref(logits, target, include_background, lambda_dice, lambda_ce)
    (grad,) = torch.autograd.grad(out, logits)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", ["lean", "reference"])
@pytest.mark.parametrize("forms", [dict(batch=True), dict(squared_pred=True), dict(reduction="sum"),
                                   dict(squared_pred=True, batch=True, reduction="sum")],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("case", [
    ((2, 3, 3, 4, 5), (6, 8, 5), False, 0.6, 0.4),  # a head at half the label's resolution on two axes
    ((3, 2, 9, 10), (18, 10), True, 1.0, 0.5),  # 2-D, two classes
    ((2, 4, 5, 6, 7), (5, 6, 7), True, 0.3, 1.0),
], ids=["half-res-head", "2d", "full-res"])
def test_monai_forms_in_float64(impl, forms, case):
    """MONAI's batch, squared_pred and sum reductions (batches of two and three), on heads below the label's
    resolution too."""
    shape, size, include_background, lambda_dice, lambda_ce = case
    logits, target = _data(shape, size, seed=7)
    expected = _monai(logits, target, include_background, lambda_dice, lambda_ce, **forms)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    fn = dice_ce if impl == "lean" else dice_ce_ref
    out = fn(logits, target, include_background, lambda_dice, lambda_ce, **forms)
    (grad,) = torch.autograd.grad(out, logits)
    tol = 1e-8 if forms.get("squared_pred") else 1e-12  # MONAI's squared intersection cancels digits
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, expected_grad, rtol=100 * tol, atol=10 * tol * expected_grad.abs().max().item())
    if impl == "lean":  # and the reference, which sums the squares as the formula does, much closer
        reference = dice_ce_ref(logits, target, include_background, lambda_dice, lambda_ce, **forms)
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, torch.autograd.grad(reference, logits)[0], rtol=1e-10, atol=1e-14)


def test_gradcheck():
    logits, target = _data((2, 3, 3, 2, 4), (6, 4, 4), seed=1)
    torch.autograd.gradcheck(lambda z: dice_ce(z, target, False, 0.7, 0.3, 1e-3, 1e-3), (logits,))
    torch.autograd.gradcheck(lambda z: dice_ce(z, target, False, 0.7, 0.3, 1e-3, 1e-3, squared_pred=True,
                                               batch=True, reduction="sum"), (logits,))


def test_backend_torch_runs_the_reference():
    """The lean loss saves only the logits, the target and two (B, K) tables; the reference (backend torch, the
    plain composition) saves softmax, log-softmax and one-hot label as well."""
    def saved_bytes(fn):
        seen, total = set(), [0]

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        logits, target = _data((2, 4, 8, 8, 8), (8, 8, 8), dtype=torch.bfloat16, target_dtype=torch.int64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, target)
        return total[0], logits, target

    lean, logits, target = saved_bytes(dice_ce)
    tables = 2 * 2 * 4 * 4
    assert lean == logits.numel() * 2 + target.numel() * 8 + tables
    with backend("torch"):
        plain, logits, _ = saved_bytes(dice_ce)
    assert plain >= target.numel() * 8 + 3 * logits.numel() * 4  # fp32 softmax, log-softmax, one-hot


def test_saved_logits_stay_at_the_heads_resolution():
    saved = []
    logits, target = _data((1, 3, 4, 4, 4), (16, 16, 16), dtype=torch.bfloat16, target_dtype=torch.int64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dice_ce(logits, target)
    assert max(t.numel() for t in saved if t.dtype.is_floating_point) == logits.numel()


def _peak_bytes(fn) -> int:
    """The peak of the bytes that ``fn`` allocates on the CPU and has not freed (the profiler's memory events, which
    include the temporaries inside ATen kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("k,target_dtype", [(5, torch.int64), (2, torch.int64), (2, torch.uint8)])
@pytest.mark.parametrize("factor", [1, 2])
def test_transient_memory(factor, k, target_dtype):
    """In fp32 maps of the upsampled logits: forward peaks at one map, a bool one-hot label (a quarter map) and two
    (B, 1, voxels) maps (1/K each) at most, backward at two maps and two (B, 1, voxels) maps, and a label that is
    not int64 adds its int64 copy (2/K); the
    plain composition's forward at three or four maps, which it then keeps for backward."""
    logits = torch.randn(2, k, 24 // factor, 24 // factor, 24 // factor).bfloat16().requires_grad_()
    target = torch.randint(0, k, (2, 1, 24, 24, 24)).to(target_dtype)
    fp32_map = 2 * k * 24**3 * 4
    labels = 0 if target_dtype == torch.int64 else 2 / k
    peaks = {}
    for name in ("auto", "torch"):
        with backend(name):
            out = {}
            forward = _peak_bytes(lambda: out.setdefault("loss", dice_ce(logits, target)))
            backward = _peak_bytes(lambda: out["loss"].backward())
        peaks[name] = (forward / fp32_map, backward / fp32_map)
    assert peaks["auto"][0] <= 1.25 + 2 / k + labels + 0.05, peaks
    assert peaks["auto"][1] <= 2 + 2 / k + labels + 0.05, peaks
    assert peaks["torch"][0] >= 3, peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_low_precision_logits(dtype, layout):
    """Computed in fp32 from the logits as given; the gradient comes back in the logits' dtype (and the loss in
    fp32); against the float64 composition on the same rounded logits."""
    logits, target = _data((2, 4, 5, 6, 3), (10, 12, 6), seed=2, dtype=dtype)
    logits = logits.detach().contiguous(memory_format=layout).requires_grad_()
    out = dice_ce(logits, target, False, 0.6, 0.4)
    (grad,) = torch.autograd.grad(out, logits)
    exact = logits.detach().double().requires_grad_()
    expected = _monai(exact, target, False, 0.6, 0.4)
    (expected_grad,) = torch.autograd.grad(expected, exact)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())


def test_module_and_grad_output_scale():
    logits, target = _data((2, 3, 4, 5, 6), (4, 5, 6), seed=3)
    loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, lambda_dice=0.6, lambda_ce=0.4)
    (grad,) = torch.autograd.grad(3.0 * loss(logits, target), logits)
    expected = 3.0 * _monai(logits, target, False, 0.6, 0.4)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


MONAI_SETTINGS = [  # (keyword arguments of MONAI's DiceCELoss, whether fastseg3d computes them)
    (dict(to_onehot_y=True, softmax=True), True),
    (dict(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=0.0, smooth_dr=1e-3, lambda_ce=0.3),
     True),
    (dict(to_onehot_y=True, softmax=True, batch=True), True),
    (dict(to_onehot_y=True, softmax=True, squared_pred=True), True),
    (dict(to_onehot_y=True, softmax=True, reduction="sum", lambda_dice=0.7), True),
    # MISSU's softmax Dice (seeds §4.4) and TransUNet's, which SelfReg trains with (§3.3)
    (dict(to_onehot_y=True, softmax=True, include_background=False, reduction="sum", batch=True, smooth_nr=0.0,
          lambda_ce=0.0), True),
    (dict(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, lambda_dice=0.4, lambda_ce=0.6), True),
    (dict(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True,
          reduction="sum"), True),
    (dict(to_onehot_y=True, softmax=True, weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), False),
    (dict(to_onehot_y=True, softmax=True, squared_pred=True, jaccard=True), False),
    (dict(to_onehot_y=True, softmax=True, label_smoothing=0.1), False),
    (dict(to_onehot_y=True, sigmoid=True), False),
    (dict(to_onehot_y=True, other_act=torch.tanh), False),
    (dict(softmax=True), False),  # a one-hot target
    ({}, False),  # MONAI's defaults: the logits as probabilities, a one-hot target
]


@pytest.mark.parametrize("kwargs,fused", MONAI_SETTINGS, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_module_takes_monais_signature(kwargs, fused):
    """Code written for MONAI's DiceCELoss runs unchanged: the same value and gradient for every setting, the label
    maps with a softmax computed here and the rest by MONAI's own loss."""
    logits, labels = _data((2, 3, 4, 5, 3), (4, 5, 3), seed=5)
    one_hot = kwargs.get("to_onehot_y", False) is False
    target = F.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).double() if one_hot else labels
    loss = DiceCELoss(**kwargs)
    assert loss.fused is fused and (loss.composition is None) is fused
    out = loss(logits, target)
    (grad,) = torch.autograd.grad(out, logits)
    expected = monai_losses.DiceCELoss(**kwargs)(logits, target)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    # with squared_pred MONAI forms the intersection as (|p|^2 + |y|^2 - |p - y|^2) / 2, which cancels digits
    tol = 1e-8 if kwargs.get("squared_pred") else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, expected_grad, rtol=100 * tol, atol=tol)
    if fused:  # what autograd keeps is the logits and the label, not MONAI's softmax maps
        assert out.grad_fn.name() != monai_losses.DiceCELoss(**kwargs)(logits, target).grad_fn.name()


def test_module_without_monai_names_the_settings_it_cannot_fuse(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_monai(name, *args, **kwargs):
        if name == "monai" or name.startswith("monai."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_monai)
    assert DiceCELoss(to_onehot_y=True, softmax=True).fused
    with pytest.raises(ValueError, match=r"DiceCELoss\(to_onehot_y=False, softmax=False\) is MONAI's composition"):
        DiceCELoss()
    with pytest.raises(ValueError, match=r"DiceCELoss\(label_smoothing=0.1\)"):
        DiceCELoss(to_onehot_y=True, softmax=True, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"DiceCELoss\(reduction='none'\)"):
        DiceCELoss(to_onehot_y=True, softmax=True, reduction="none")


def test_meta_device_forward_and_backward():
    logits = torch.empty(2, 14, 16, 16, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    target = torch.empty(2, 1, 32, 32, 32, device="meta", dtype=torch.int64)
    out = dice_ce(logits, target)
    out.backward()
    assert out.shape == () and logits.grad.shape == logits.shape and logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_matches_eager(dynamic):
    """fullgraph, also with sizes that change between calls (symbolic shapes in the upsampling's adjoint)."""
    torch._dynamo.reset()

    def step(z, t):
        return dice_ce(z, t, False, 0.6, 0.4)

    fn = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for seed, (shape, size) in enumerate([((2, 3, 4, 4, 6), (8, 8, 6)), ((2, 3, 3, 5, 4), (6, 10, 4)),
                                          ((1, 3, 2, 3, 3), (4, 6, 3))]):
        logits, target = _data(shape, size, seed=seed, dtype=torch.float32)
        out = fn(logits, target)
        (grad,) = torch.autograd.grad(out, logits)
        expected = step(logits, target)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, expected_grad)


def test_zero_weights_leave_their_term_out():
    logits, target = _data((2, 3, 4, 4, 4), (4, 4, 4))
    for impl in ("auto", "torch"):
        with backend(impl):
            for weights in ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0)):
                out = dice_ce(logits, target, True, *weights)
                expected = _monai(logits, target, True, *weights)
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
                (grad,) = torch.autograd.grad(out, logits)
                torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0], rtol=1e-10, atol=1e-14)


def test_bad_inputs():
    logits, target = _data((2, 3, 4, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        dice_ce(logits[:, :1], target)
    with pytest.raises(ValueError, match="logits"):
        dice_ce(logits[0], target[0])
    with pytest.raises(ValueError, match="target"):
        dice_ce(logits, target.expand(2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="target"):
        dice_ce(logits, target[:1])
    with pytest.raises(ValueError, match="divide"):
        dice_ce(logits, torch.zeros(2, 1, 6, 4, 4))
    with pytest.raises(ValueError, match="divide"):
        dice_ce(logits, torch.zeros(2, 1, 2, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        dice_ce(logits.detach().long(), target)
    with pytest.raises(TypeError, match="target"):
        dice_ce(logits, target.numpy())
    with pytest.raises(TypeError, match="device"):
        dice_ce(logits, target.to("meta"))
    with pytest.raises(ValueError, match="lambda_ce"):
        dice_ce(logits, target, lambda_ce=-1.0)
    with pytest.raises(ValueError, match="smooth_dr"):
        dice_ce(logits, target, smooth_dr=float("nan"))
    with pytest.raises(ValueError, match="include_background"):
        DiceCELoss(include_background=1)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        dice_ce(logits, target, reduction="none")
    with pytest.raises(ValueError, match="batch must be a bool"):
        dice_ce(logits, target, batch=1)
    with pytest.raises(TypeError, match="squared_pred must be a bool"):
        DiceCELoss(to_onehot_y=True, softmax=True, squared_pred="yes")
    # an older positional call, DiceCELoss(include_background, lambda_dice, lambda_ce), is not read as MONAI's
    with pytest.raises(TypeError, match="to_onehot_y must be a bool, got 0.6 .*by keyword"):
        DiceCELoss(False, 0.6, 0.4)
    # labels outside [0, K) would index past the one-hot map (a device-side assert on a GPU)
    with pytest.raises(ValueError, match="target holds labels from 1 to 3; the 3 classes"):
        dice_ce(logits, target.clamp(0, 2) + 1)
    with pytest.raises(ValueError, match="labels from -1"):
        DiceCELoss(to_onehot_y=True, softmax=True)(logits, target - 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        dice_ce(logits, target.float().masked_fill(target == 0, float("nan")))
    dice_ce(logits, target.float())  # float labels that are class indices are fine, as in MONAI


def test_double_backward_raises_instead_of_a_silent_zero():
    x, target = torch.randn(2, 4, 4, 5, 6), torch.randint(0, 3, (2, 1, 4, 5, 6))
    w = torch.randn(3, 4, 1, 1, 1, requires_grad=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(dice_ce(F.conv3d(x, w), target), w, create_graph=True)
    with backend("torch"):  # the reference has one
        (grad,) = torch.autograd.grad(dice_ce(F.conv3d(x, w), target), w, create_graph=True)
    assert grad.requires_grad


def test_an_empty_batch_gives_nan_as_monai():
    logits = torch.randn(0, 3, 4, 5, 6, requires_grad=True)
    target = torch.zeros(0, 1, 4, 5, 6, dtype=torch.long)
    loss = dice_ce(logits, target)
    assert loss.isnan() and _monai(logits, target, True, 1.0, 1.0).isnan()


@pytest.mark.gpu
def test_gpu_bf16_matches_monai_and_holds_a_sixth():
    """DSD's head size at 128^3 with 14 classes, bf16 logits: the value and gradient of MONAI's loss on fp32 copies,
    and what stays allocated between forward and backward at most a fifth of MONAI's."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2, 14, 128, 128, 128, device="cuda", generator=g).mul_(2).bfloat16()
    target = torch.randint(0, 14, (2, 1, 128, 128, 128), device="cuda", generator=g)
    held, results = {}, {}
    for name in ("lean", "monai"):
        x = logits.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = dice_ce(x, target) if name == "lean" else _monai(x.float(), target, True, 1.0, 1.0)
        held[name] = torch.cuda.memory_allocated() - base
        loss.backward()
        results[name] = (loss.detach().float(), x.grad.float())
    torch.testing.assert_close(results["lean"][0], results["monai"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["lean"][1], results["monai"][1], rtol=1e-2,
                               atol=1e-2 * results["monai"][1].abs().max().item())
    assert held["lean"] <= held["monai"] / 5, held


@pytest.mark.parametrize("shape,size", [((2, 3, 3, 4, 5), (6, 8, 5)), ((1, 2, 4, 3), (8, 9))])
def test_upsample_adjoint_op(shape, size):
    """The upsampling's adjoint (an op so that traced backwards take symbolic sizes): opcheck, and the adjoint
    identity <up(x), g> == <x, up^T(g)>."""
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(*shape[:2], *size, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastseg3d.upsample_adjoint.default, (g, list(shape)))
    up = F.interpolate(x, size=size, mode="trilinear" if x.dim() == 5 else "bilinear", align_corners=False)
    adjoint = torch.ops.fastseg3d.upsample_adjoint(g, list(shape))
    torch.testing.assert_close((up * g).sum(), (x * adjoint).sum(), rtol=1e-12, atol=1e-12)


def test_label_check_reads_no_value_while_tracing():
    """The labels are read back only in eager calls: torch.func transforms, fake tensors and make_fx trace through
    (they run the reference), as before the check existed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    logits, target = torch.randn(4, 1, 3, 4, 4, 4), torch.randint(0, 3, (4, 1, 1, 4, 4, 4))
    batched = torch.vmap(dice_ce)(logits, target)
    torch.testing.assert_close(batched, torch.stack([dice_ce(x, t) for x, t in zip(logits, target)]))
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert dice_ce(logits[0], target[0]).shape == ()
    graph = make_fx(DiceCELoss(to_onehot_y=True, softmax=True))(logits[0], target[0])
    torch.testing.assert_close(graph(logits[0], target[0]), dice_ce(logits[0], target[0]))
