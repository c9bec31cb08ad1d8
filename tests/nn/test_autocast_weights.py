"""fastseg3d.nn.autocast_weights: autocast's weight casts in one launch, with autocast's values and gradients."""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from torch import nn

import fastseg3d
from fastseg3d.nn import DepthwiseConv3d, autocast_weights
from fastseg3d.profile import write_traffic
from tests.utils import AtenOps

_module = sys.modules["fastseg3d.nn.autocast_weights"]


@contextlib.contextmanager
def _per_parameter_casts(on: bool = True):
    """Within: fastseg3d's blocks do nothing (autocast's own casts), when ``on``."""
    real = _module._traced
    if on:
        _module._traced = lambda: True
    try:
        yield
    finally:
        _module._traced = real


class _Net(nn.Module):
    """Every cast layer type, a shared Linear, a layer without bias, a frozen one, an unused one and a norm."""

    def __init__(self, wrap: bool = True):
        super().__init__()
        self.wrap = wrap
        self.conv = nn.Conv3d(3, 6, 3, padding=1)
        self.dw = DepthwiseConv3d(6, 6, 3, padding=1, groups=6, bias=False)
        self.norm = nn.GroupNorm(2, 6)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(4, 4)
        self.again = nn.Sequential(self.shared)  # the same Linear reached twice

    def body(self, x):
        h = self.norm(self.dw(self.conv(x)))
        t = self.up(h).flatten(2).transpose(1, 2)
        t = self.shared(self.fc(t)) + self.again(self.frozen(t))
        return t

    def forward(self, x):
        if not self.wrap:
            return self.body(x)
        with autocast_weights(self):
            return self.body(x)


def _step(net, x):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().square().mean().backward()
    return out, {n: p.grad for n, p in net.named_parameters()}


def _pair():
    ours = _Net(wrap=True).train()
    plain = copy.deepcopy(ours)
    plain.wrap = False
    return ours, plain


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU bf16 conv backward sums in a thread-dependent order
    yield
    torch.set_num_threads(threads)


def test_values_and_gradients_are_autocasts(one_thread):
    ours, plain = _pair()
    x = torch.randn(2, 3, 4, 5, 3)
    out, grads = _step(ours, x)
    ref_out, ref_grads = _step(plain, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for name, g in grads.items():
        ref = ref_grads[name]
        if ref is None:  # frozen and unused layers get none, as under autocast
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.stride() == ref.stride(), name
        torch.testing.assert_close(g, ref, rtol=0, atol=0, msg=name)
    assert grads["unused.weight"] is None and grads["frozen.weight"] is None and grads["shared.weight"] is not None


def test_parameters_swapped_inside_and_restored():
    net = _Net().train()
    params = dict(net.named_parameters())
    seen = {}

    def hook(module, args):
        seen["conv"] = (module.weight.dtype, type(module.weight))
        seen["norm"] = net.norm.weight.dtype

    net.conv.register_forward_pre_hook(hook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 3, 2, 2, 2))
    assert seen == {"conv": (torch.bfloat16, torch.Tensor), "norm": torch.float32}
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in net.parameters())


def test_one_cast_each_way():
    ours, plain = _pair()
    x = torch.randn(1, 3, 2, 2, 2)
    counts = {}
    for name, net in (("ours", ours), ("plain", plain)):
        mode = AtenOps()
        with torch.autocast("cpu", dtype=torch.bfloat16), mode:
            out = net(x)
            out.float().sum().backward()
        counts[name] = (mode.ops.count("aten::_to_copy"), mode.ops.count("aten::_foreach_copy_"))
    # autocast casts the 11 parameters the forward uses (the shared Linear's once: its cache) and the gradients
    # of the 9 that train; here one copy each way does
    assert counts["plain"][1] == 0 and counts["ours"][1] == 2
    assert counts["plain"][0] - counts["ours"][0] == 11 + 9, counts


@pytest.mark.parametrize("case", ["eval", "no_grad", "no_autocast", "no_cache", "backend_torch", "float64", "nested"])
def test_no_op_cases(case):
    net = _Net().train()
    x = torch.randn(1, 3, 2, 2, 2)
    if case == "float64":
        net, x = net.double(), x.double()
    if case == "eval":
        net.eval()
    calls = []
    real = _module._CastWeights.apply
    _module._CastWeights.apply = lambda *a: calls.append(1) or real(*a)
    try:
        with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no_autocast",
                             cache_enabled=case != "no_cache"),
              torch.set_grad_enabled(case != "no_grad"),
              fastseg3d.backend("torch" if case == "backend_torch" else "auto")):
            if case == "nested":
                with autocast_weights(net):  # the inner block (the network's own) finds the copies: no second cast
                    net(x)
            else:
                net(x)
    finally:
        _module._CastWeights.apply = real
    assert len(calls) == (1 if case == "nested" else 0)
    assert all(type(p) is nn.Parameter for p in net.parameters())


def test_exception_restores_parameters():
    net = _Net().train()
    params = list(net.parameters())
    with pytest.raises(RuntimeError, match="boom"), torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_weights(net):
            assert net.fc.weight.dtype == torch.bfloat16
            raise RuntimeError("boom")
    assert all(p is q for p, q in zip(net.parameters(), params))
    assert net.fc.weight.dtype == torch.float32


def test_double_backward(one_thread):
    ours, plain = _pair()
    x = torch.randn(1, 3, 2, 2, 2)
    second = []
    for net in (ours, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
        (g,) = torch.autograd.grad(loss, net.fc.weight, create_graph=True)
        assert g.requires_grad
        second.append(torch.autograd.grad(g.square().sum(), net.fc.weight)[0])
    torch.testing.assert_close(second[0], second[1], rtol=0, atol=0)


def test_compiled_forward_skips_the_swap():
    """Under torch.compile the block is a null context (Inductor fuses the casts): no copy in the graph, the same
    values, and a graph break inside the block splits the frame instead of running it eagerly."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    ours, plain = _pair()
    x = torch.randn(1, 3, 2, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(ours, fullgraph=True, backend=record)(x)
        ref = plain(x)
    torch.testing.assert_close(out, ref)
    assert len(graphs) == 1 and "_foreach_copy_" not in graphs[0] and "to(torch.bfloat16" in graphs[0].replace(
        "dtype = torch.bfloat16", "to(torch.bfloat16")
    assert all(type(p) is nn.Parameter for p in ours.parameters())

    class Breaks(_Net):
        def body(self, x):
            h = super().body(x)
            torch._dynamo.graph_break()
            return h * 2

    graphs.clear()
    net = Breaks().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(net, backend=record)(x)
    assert len(graphs) == 2, graphs


def test_rejects_non_module():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        autocast_weights(nn.Linear(2, 2), torch.zeros(1))
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        autocast_weights(nn.Linear(2, 2), exclude=[torch.zeros(1)])
    with pytest.raises(TypeError, match="at least one module"):
        autocast_weights()


def test_frozen_layers_stay_out_of_the_graph():
    """A frozen layer's copy does not require grad, as autocast's cast of it does not: backward neither reaches it
    nor computes its weight gradient."""
    frozen, head = nn.Linear(8, 8), nn.Linear(8, 2)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, head).train()
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(model):
        h = frozen(torch.randn(4, 8))
        assert frozen.weight.dtype == torch.bfloat16 and not frozen.weight.requires_grad
        out = head(h)
    assert not h.requires_grad
    out.float().sum().backward()
    assert frozen.weight.grad is None and head.weight.grad.dtype == torch.float32


def test_backward_that_reaches_no_copy():
    """A graph whose gradient stops before every copy (a function returning no input gradient) runs backward."""

    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    lin = nn.Linear(4, 4).train()
    x = torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(lin):
        out = NoGrad.apply(lin(x))
    (out.float().sum() + x.sum()).backward()
    assert lin.weight.grad is None and torch.equal(x.grad, torch.ones_like(x))


def test_excluded_layers_keep_their_parameters():
    net = _Net(wrap=False).train()
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(net, exclude=[net.up, net.again]):
        assert net.up.weight.dtype == torch.float32 and net.shared.weight.dtype == torch.float32
        assert net.fc.weight.dtype == torch.bfloat16


def test_exclude_takes_any_iterable():
    """A generator (or any iterator) was spent by the argument check, and nothing was excluded."""
    net = _Net(wrap=False).train()
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(net, exclude=(m for m in (net.up, net.again))):
        assert net.up.weight.dtype == torch.float32 and net.fc.weight.dtype == torch.bfloat16


def test_several_modules_share_one_launch_and_skip_eval_ones():
    a, b, c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(a, b, c):
        assert a.weight.dtype == b.bias.dtype == torch.bfloat16 and a.weight.grad_fn is b.bias.grad_fn
        assert c.weight.dtype == torch.float32  # a module in eval mode keeps its parameters
        out = b(a(torch.randn(2, 3)))
    out.float().sum().backward()
    assert a.weight.grad.dtype == torch.float32 and c.weight.grad is None


def test_segformer3d_step_casts_once():
    """The network runs its training forward in the block: no parameter cast is left but the one launch each way
    (the rest are activations': the input, and the fp32 residual stream's gradients)."""
    from fastseg3d.networks import SegFormer3D

    net = SegFormer3D(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32)
    traffic = write_traffic(net, (2, 4, 64, 64, 64), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    n_cast = sum(1 for m in net.modules() if type(m) in _module._CAST_TYPES for p in m.parameters(recurse=False))
    assert n_cast > 100
    assert forward["aten::_foreach_copy_"][0] == 1 and backward["aten::_foreach_copy_ (_CastWeightsBackward)"][0] == 1
    assert forward["aten::_to_copy"][0] < 20
    assert sum(c for k, (c, _) in backward.items() if k.startswith("aten::_to_copy (ToCopyBackward0)")) < 20
    with fastseg3d.backend("torch"):
        plain = write_traffic(net, (2, 4, 64, 64, 64), torch.bfloat16)
    assert plain["forward"]["by_op"]["aten::_to_copy"][0] > n_cast


def test_dsd_heads_cast_once():
    from fastseg3d.networks.unet import dsd_unet

    traffic = write_traffic(dsd_unet(channels=(8, 16, 32)), (2, 1, 32, 32, 32), torch.bfloat16)
    # the U-Net's block and the heads' block: every cast the step makes is an activation's
    assert traffic["forward"]["by_op"]["aten::_foreach_copy_"][0] == 2
    assert traffic["forward"]["by_op"].get("aten::_to_copy", (0, 0))[0] <= 2


@pytest.mark.timeout(480)  # a network's ~70-90 Triton specialisations compile one after another in one worker
@pytest.mark.gpu
def test_gpu_network_step_matches_per_parameter_casts():
    """On CUDA (the multi-tensor copy's fast path converts dtypes): a SegFormer3D training step under bf16 autocast
    with the one-launch casts against the same step with autocast's own, fused kernels on both sides."""
    from fastseg3d.networks import SegFormer3D

    torch.manual_seed(0)
    ours = SegFormer3D(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32).cuda()
    plain = copy.deepcopy(ours)
    x = torch.randn(2, 4, 64, 64, 64, device="cuda")
    results = []
    for net, off in ((ours, False), (plain, True)):
        with _per_parameter_casts(off):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(x)
            out.float().square().mean().backward()
        results.append((out, {n: p.grad for n, p in net.named_parameters()}))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        # the fused weight gradients sum their tiles in a fixed order, but cuBLAS may pick other kernels; errors
        # relative to each gradient's scale (the attention projections' reach 1e-4), with a floor for the conv
        # biases ahead of a BatchNorm, whose gradients are zero up to rounding (1e-8)
        ref = ref_grads[name]
        torch.testing.assert_close(g, ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item() + 1e-7, msg=name)


@pytest.mark.parametrize("network", ["segformer3d", "mobileutr", "missu", "unet"])
def test_every_cast_layer_of_the_networks_runs(network, one_thread):
    """The networks' blocks hold only layers their training forward runs (so no parameter passes through the copy
    without being used: hooks on it would get None), and their training step is autocast's, bitwise."""
    from fastseg3d.networks import MISSU, MobileUtr, SegFormer3D
    from fastseg3d.networks.unet import UNet

    torch.manual_seed(0)
    make, shape = {
        "segformer3d": (lambda: SegFormer3D(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32),
                        (1, 4, 96, 96, 96)),
        "mobileutr": (lambda: MobileUtr(spatial_dims=3, in_channels=1, out_channels=3), (1, 1, 32, 32, 32)),
        "missu": (lambda: MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0), (1, 4, 32, 32, 32)),
        "unet": (lambda: UNet(3, 1, 2, channels=(4, 8, 16)), (2, 1, 16, 16, 16)),
    }[network]
    net = make().train()
    plain = copy.deepcopy(net)
    x = torch.randn(shape)
    grads = []
    for model, off in ((net, False), (plain, True), (copy.deepcopy(plain), True)):
        with _per_parameter_casts(off):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            outputs = [out[0], *(s for s, _ in out[1])] if isinstance(out, tuple) else [out]  # MISSU's students
            sum(o.float().square().mean() for o in outputs).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    excluded = {"linear_encoding"} if network == "missu" else set()
    for name, m in net.named_modules():
        if type(m) in _module._CAST_TYPES and name.split(".")[0] not in excluded:
            for pname, _ in m.named_parameters(recurse=False):
                assert grads[0][f"{name}.{pname}"] is not None, f"{name}.{pname}"
    # sizes with no 2^3 stage: there ATen's CPU bf16 conv weight gradients read uninitialised memory (two plain
    # runs differ); the plain step runs twice to show the comparison is to a reproducible result
    for name, g in grads[0].items():
        ref = grads[1][name]
        assert ref is None or torch.equal(ref, grads[2][name]), name
        assert (g is None) == (ref is None), name
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=0, atol=0, msg=name)


def test_segformer3d_with_frozen_batch_norms_folds_from_fp32_weights(one_thread):
    """Training with frozen (eval) BatchNorms folds each into its depthwise conv's fp32 weight: those convs stay
    out of the block, so the step is autocast's, bitwise."""
    from fastseg3d.networks import SegFormer3D

    torch.manual_seed(0)
    net = SegFormer3D(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eval()
            m.running_var.uniform_(0.5, 2.0)
    plain = copy.deepcopy(net)
    x = torch.randn(2, 4, 32, 32, 32)
    outs = []
    for model, off in ((net, False), (plain, True)):
        with _per_parameter_casts(off):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


def test_a_parameter_tied_between_two_layers_is_cast_once():
    """A weight shared by two distinct Linear layers (``model.modules()`` yields a module reached twice only once, so
    this is the case the cast-once bookkeeping is for): cast once, and its gradient summed as autocast sums it,
    bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU bf16 matmul backward sums in a thread-dependent order
    try:
        a, b = nn.Linear(64, 64), nn.Linear(64, 64)
        b.weight = a.weight
        net = nn.Sequential(a, nn.GELU(), b).train()
        x = torch.randn(32, 64)
        grads = []
        for wrap in (True, False):
            net.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with autocast_weights(net) if wrap else contextlib.nullcontext():
                    out = net(x)
            out.float().square().mean().backward()
            grads.append(a.weight.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
