"""fastseg3d.profile: the meta-device counts (activations saved, bytes written) and the emulation of CUDA
autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.profile import activation_memory


class _Tiny(nn.Module):
    """Linear -> LayerNorm -> softmax -> matmul with a parameter: one op of each autocast policy."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.w2 = nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return self.norm(self.fc(x)).softmax(-1) @ self.w2


def test_counts_what_each_op_saves_in_fp32_and_under_autocast():
    # fp32, input (2, 10, 8): fc saves its input (640 B; no weight, the input needs no gradient); LayerNorm its
    # input (1,280) and mean and rstd (80 each); softmax its output (1,280), which the matmul saves too.
    assert activation_memory(_Tiny(), (2, 10, 8)) == {"total": 3360, "fc": 640, "norm": 1440, "(top)": 1280}
    # CUDA autocast: fc runs on a half-precision copy of its input (320); LayerNorm casts back to fp32 (1,280 +
    # 160); softmax stays fp32 (1,280); the matmul saves half-precision copies of the probabilities (640) and of
    # w2 (128), as the probabilities need a gradient.
    for dtype in (torch.bfloat16, torch.float16):
        expected = {"total": 3808, "fc": 320, "norm": 1440, "(top)": 2048}
        assert activation_memory(_Tiny(), (2, 10, 8), dtype) == expected


class _Fp32Region(_Tiny):
    """_Tiny with its fc in a region the model keeps out of autocast, as models do for fp32-sensitive layers."""

    def forward(self, x):
        with torch.autocast("cuda", enabled=False):
            h = self.fc(x)
        return self.norm(h).softmax(-1) @ self.w2


def test_a_model_s_autocast_off_region_runs_uncast():
    # as _Tiny under autocast, but fc saves its fp32 input (640, not 320)
    expected = {"total": 4128, "fc": 640, "norm": 1440, "(top)": 2048}
    assert activation_memory(_Fp32Region(), (2, 10, 8), torch.bfloat16) == expected


class _Policies(nn.Module):
    def forward(self, x):
        up = F.interpolate(x, scale_factor=2, mode="trilinear")  # fp32 under CUDA autocast
        area = F.interpolate(x, size=(1, 1, 1), mode="area")  # not in the lists: the dtype it is given
        probs = torch.softmax(x.to(torch.bfloat16), 1, dtype=torch.bfloat16)  # an explicit dtype is kept
        positional = x.softmax(1, torch.bfloat16)  # also given positionally
        norms = (x.norm(dim=1), F.normalize(x, dim=1), torch.linalg.norm(x, dim=1))  # fp32 under autocast
        return (up.dtype, area.dtype, probs.dtype, positional.dtype, *(n.dtype for n in norms),
                x.double().exp().dtype)


def test_policies_of_the_emulation_and_no_leak():
    from fastseg3d.ops.utils import META_AUTOCAST, autocast_inputs
    from fastseg3d.profile import _autocast_on_meta

    x = torch.empty(1, 2, 3, 3, 3, device="meta", dtype=torch.bfloat16)
    with _autocast_on_meta(torch.bfloat16):
        f32, bf16 = torch.float32, torch.bfloat16
        assert _Policies()(x) == (f32, bf16, bf16, bf16, f32, f32, f32, torch.float64)
        # fastseg3d's fused ops cast their inputs as ATen's conv and attention do
        w = torch.empty(2, 1, 3, 3, 3, device="meta")
        assert [t.dtype for t in autocast_inputs("meta", w, x.double())] == [torch.bfloat16, torch.float64]
        with torch.autocast("cuda", enabled=False):
            assert _Policies()(x)[:4] == (bf16, bf16, bf16, bf16) and autocast_inputs("meta", w)[0].dtype == f32
    assert not META_AUTOCAST.get() and not torch.overrides._is_torch_function_mode_enabled()
    assert not torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
    assert autocast_inputs("meta", w)[0].dtype == torch.float32


def test_largest_cube_keeps_to_multiples_and_the_maximum():
    from fastseg3d.profile import largest_cube

    model = nn.Conv3d(1, 2, 3, padding=1)
    assert largest_cube(model, 1, 1, 2**40, max_side=48) == 32  # 64 is above the maximum: the largest multiple below
    side = largest_cube(model, 1, 1, 2**40, multiple=48, max_side=400)
    assert side == 384 and side % 48 == 0
    assert largest_cube(model, 1, 1, 1) == 0


def test_largest_cube_below_the_sides_a_network_trains_is_none():
    """Stepping down from a start side that does not fit reaches sides the network refuses to train (SegFormer3D's
    last stage holds one token at 32^3, batch 1, which BatchNorm refuses in training): none fits."""
    from fastseg3d.networks import SegFormer3D
    from fastseg3d.profile import largest_cube

    assert largest_cube(SegFormer3D(), 1, 4, 10 * 2**20, torch.bfloat16) == 0
    with pytest.raises(ValueError, match="channels"):  # a wrong input at the start side is still the caller's error
        largest_cube(SegFormer3D(), 1, 3, 10 * 2**20, torch.bfloat16)


def test_largest_cube_of_a_network_with_a_larger_stride():
    """A 7-level U-Net (stride 64) refuses 64^3 (a one-voxel bottleneck) and 96^3 (off its stride): the start moves
    up to 128, and refused sides count as not fitting, where they ended the search with the network's error."""
    from fastseg3d.networks import UNet
    from fastseg3d.profile import largest_cube, training_memory

    net = UNet(3, 1, 2, channels=(4,) * 7)
    budget = training_memory(net, (1, 1, 256, 256, 256), torch.bfloat16)["total"]
    assert largest_cube(net, 1, 1, budget, torch.bfloat16) == 256
    assert largest_cube(net, 1, 1, budget, torch.bfloat16, multiple=64) == 256
    assert largest_cube(net, 1, 1, budget - 1, torch.bfloat16, multiple=64) == 192
    assert largest_cube(net, 1, 1, budget, torch.bfloat16, max_side=100) == 0  # every side up to it refused


class _DropsAGraph(nn.Module):
    """Builds and drops small graphs before the tensors it keeps: their freed storages' addresses come back."""

    def __init__(self, drop: bool):
        super().__init__()
        self.w, self.drop = nn.Parameter(torch.ones(1)), drop

    def forward(self, x):
        if self.drop:
            for _ in range(2):
                y = (x[:, :1, :1] * self.w).sin()
                del y
        return (x * self.w).sin().cos()


def test_a_storage_freed_during_the_forward_does_not_hide_a_later_one():
    shape = (1, 8, 16, 32, 32)
    kept = activation_memory(_DropsAGraph(False), shape)["total"]
    assert kept >= 2 * 4 * 8 * 16 * 32 * 32  # x * w and its sin, fp32
    assert activation_memory(_DropsAGraph(True), shape)["total"] >= kept  # counted, never hidden


def test_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        activation_memory(_Tiny(), (2, 10, 8), torch.float64)


def test_counts_a_training_forward_whatever_the_callers_grad_mode():
    """Under no_grad or inference_mode nothing would be saved for backward: the count runs with grad on (it
    counted 0 and every cube fitted), and a torch.compile'd model is counted as its eager module."""
    from fastseg3d.profile import largest_cube, write_traffic

    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))
    shape = (1, 1, 16, 16, 16)
    expected = activation_memory(model, shape)["total"]
    side = largest_cube(model, 1, 1, 2**30, max_side=1024)
    assert expected > 0 and side < 1024
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert activation_memory(model, shape)["total"] == expected
            assert largest_cube(model, 1, 1, 2**30, max_side=1024) == side
            assert write_traffic(model, shape)["backward"]["ops"] > 0
    assert activation_memory(torch.compile(model), shape)["total"] == expected
    assert all(p.device.type == "cpu" and not p.is_inference() for p in model.parameters())


class _Heads(nn.Module):
    """A training output that is not one tensor: a NamedTuple of a tensor and a dict of tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv3d(1, 2, 1), nn.Conv3d(1, 3, 1)

    def forward(self, x):
        from collections import namedtuple

        return namedtuple("Out", "main aux")(self.a(x), {"b": self.b(x), "n": 3})


def test_a_model_that_cannot_be_copied_gets_a_clear_error():
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv3d(1, 2, 1)))
    model(torch.randn(1, 1, 2, 2, 2))  # the computed weight, a non-leaf tensor, stays on the module
    with pytest.raises(TypeError, match="cannot be copied to the meta device"):
        activation_memory(model, (1, 1, 4, 4, 4))


def test_write_traffic_runs_backward_from_every_floating_output():
    from fastseg3d.profile import write_traffic

    traffic = write_traffic(_Heads(), (1, 1, 4, 4, 4))
    names = " ".join(traffic["backward"]["by_op"])
    assert names.count("ConvolutionBackward0") >= 1 and traffic["backward"]["bytes"] > 0
    # both heads' weight gradients are written: 2 and 3 output channels
    assert traffic["backward"]["by_op"]["aten::convolution_backward (ConvolutionBackward0)"][0] == 2
    with pytest.raises(ValueError, match="no floating-point tensor that requires grad"):
        write_traffic(nn.ReLU(), (1, 1, 4, 4, 4))


@pytest.mark.parametrize("call,match", [
    (lambda: activation_memory(_Tiny(), (2, -1, 8)), "input_shape"),
    (lambda: activation_memory(_Tiny(), (2, 10.5, 8)), "input_shape"),
    (lambda: activation_memory(_Tiny(), ()), "input_shape"),
    (lambda: activation_memory(_Tiny(), (2, True, 8)), "input_shape"),
    (lambda: activation_memory(_Tiny(), (2, 0, 8)), "input_shape"),  # an empty input has no step to count
])
def test_rejects_bad_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_training_memory_and_largest_cube_reject_bad_arguments():
    from fastseg3d.profile import largest_cube, training_memory

    model = nn.Conv3d(1, 2, 1)
    with pytest.raises(ValueError, match="optimizer_states"):
        training_memory(model, (1, 1, 4, 4, 4), optimizer_states=-1)
    for kwargs, name in (({"batch": 0}, "batch"), ({"multiple": 0}, "multiple"), ({"budget": -1}, "budget"),
                         ({"in_channels": 0}, "in_channels"), ({"max_side": 0}, "max_side"), ({"start": 0}, "start")):
        args = {"batch": 1, "in_channels": 1, "budget": 2**30, **kwargs}
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            largest_cube(model, **args)


class _Containers(nn.Module):
    """Children that are never called themselves: a ModuleList holding a Linear and a ModuleDict."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.ModuleDict({"inner": nn.Linear(8, 8)})])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks[1]["inner"](self.blocks[0](x)))


def test_container_children_get_what_the_modules_inside_save():
    # Each Linear saves its (2, 8) fp32 input, 64 B; the container's two used to be counted under "(top)".
    assert activation_memory(_Containers(), (2, 8)) == {"total": 192, "blocks": 128, "head": 64}


@pytest.mark.parametrize("network", ["missu", "mobileutr"])
def test_networks_with_module_lists_are_attributed_per_child(network):
    from fastseg3d.networks import MISSU
    from fastseg3d.networks.mobileutr import MobileUtr

    if network == "missu":  # the fusion blocks, called from MISSU.forward in training
        model, shape, containers = MISSU(), (1, 4, 16, 16, 16), ["fusion"]
    else:
        model, shape, containers = MobileUtr(), (1, 1, 32, 32, 32), ["lklgl_bottleneck", "transformer_bottleneck"]
    report = activation_memory(model, shape)
    assert all(report.get(name, 0) > 0 for name in containers), report
    assert sum(v for k, v in report.items() if k != "total") == report["total"]
    assert report.get("(top)", 0) < 0.01 * report["total"], report


def test_segformer3d_with_one_value_per_batch_norm_channel_raises_as_in_training():
    # Batch 1 at 32^3: the stage-4 grid is 1^3. The meta count used to fail with a ZeroDivisionError inside
    # BatchNorm's decomposition; it now gives the ValueError a training step raises.
    from fastseg3d.networks import SegFormer3D

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        activation_memory(SegFormer3D(), (1, 4, 32, 32, 32))
    assert activation_memory(SegFormer3D(), (2, 4, 32, 32, 32))["total"] > 0


def test_segformer3d_under_bf16_autocast_saves_less_than_in_fp32_and_than_the_plain_build():
    """At 128³, batch 2: the fused network saves 0.37 GiB under bf16 autocast (0.60 in fp32), the published
    composition 1.10 (1.37; its softmax probabilities and upsampled maps stay fp32 under autocast)."""
    from fastseg3d.networks import SegFormer3D
    from fastseg3d.reference.segformer3d import SegFormer3DRef

    shape = (2, 4, 128, 128, 128)
    ours = {dt: activation_memory(SegFormer3D(), shape, dt)["total"] for dt in (torch.float32, torch.bfloat16)}
    plain = {dt: activation_memory(SegFormer3DRef(), shape, dt)["total"] for dt in (torch.float32, torch.bfloat16)}
    assert ours[torch.bfloat16] < 0.75 * ours[torch.float32] and plain[torch.bfloat16] < plain[torch.float32]
    assert ours[torch.bfloat16] <= 0.45 * plain[torch.bfloat16], (ours, plain)


def _saved_on_cuda(model: nn.Module, shape, dtype) -> int:
    """What activation_memory counts, measured on a real CUDA forward under torch.autocast."""
    model = model.cuda().train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    x = torch.randn(shape, device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
    del out
    return total


@pytest.mark.timeout(480)  # a network's ~70-90 Triton specialisations compile one after another in one worker
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_meta_count_matches_a_cuda_forward(dtype):
    """The meta count (and its autocast emulation) against the same count on a CUDA forward under torch.autocast:
    the tiny model exactly, SegFormer3D (fused and published composition) within 2%."""
    from fastseg3d.networks import SegFormer3D
    from fastseg3d.reference.segformer3d import SegFormer3DRef

    assert activation_memory(_Tiny(), (2, 10, 8), dtype)["total"] == _saved_on_cuda(_Tiny(), (2, 10, 8), dtype)
    for build in (SegFormer3D, SegFormer3DRef):
        meta = activation_memory(build(), (2, 4, 64, 64, 64), dtype)["total"]
        cuda = _saved_on_cuda(build(), (2, 4, 64, 64, 64), dtype)
        assert abs(meta - cuda) <= 0.02 * cuda, (build.__name__, meta, cuda)


def test_write_traffic_counts_ops_that_write_and_their_bytes():
    """Linear -> GELU on a (4, 8) fp32 input: addmm and gelu write 4 x 16 fp32 values each in forward (the weight's
    transpose is a view, not counted); backward runs GELU's own backward (256 bytes) and the weight and bias
    gradients (16 x 8 and 16 values) under the nodes that ran them."""
    from fastseg3d.profile import write_traffic

    model = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    traffic = write_traffic(model, (4, 8))
    forward, backward = traffic["forward"], traffic["backward"]
    assert forward["by_op"] == {"aten::addmm": (1, 256), "aten::gelu": (1, 256)}
    assert forward["ops"] == 2 and forward["bytes"] == 512
    assert backward["by_op"]["aten::gelu_backward (GeluBackward0)"] == (1, 256)
    assert backward["by_op"]["aten::mm (AddmmBackward0)"] == (1, 16 * 8 * 4)
    assert backward["by_op"]["aten::sum (AddmmBackward0)"] == (1, 16 * 4)
    assert backward["bytes"] == sum(b for _, b in backward["by_op"].values())
    assert not any(name.startswith(("aten::t ", "aten::view", "aten::expand")) for name in backward["by_op"])
    # under bf16 autocast the Linear runs on cast copies: the casts are counted
    bf16 = write_traffic(model, (4, 8), torch.bfloat16)["forward"]["by_op"]
    assert bf16["aten::_to_copy"] == (3, (4 * 8 + 16 * 8 + 16) * 2) and bf16["aten::addmm"] == (1, 128)
    with pytest.raises(ValueError, match="dtype"):
        write_traffic(model, (4, 8), torch.float64)


class _IntoBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        out = torch.empty_like(x)  # written by the out= op, not here
        return torch.mul(x, 2, out=out) + x.new_empty(x.shape).fill_(1) * self.w


def test_write_traffic_counts_a_buffer_where_it_is_written():
    from fastseg3d.profile import write_traffic

    by_op = write_traffic(_IntoBuffer(), (4, 8))["forward"]["by_op"]
    assert by_op == {"aten::mul": (2, 256), "aten::fill_": (1, 128), "aten::add": (1, 128)}


class _Foreach(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        a, b = torch.empty_like(x), x.new_empty(3, dtype=torch.bfloat16)
        with torch.no_grad():
            torch._foreach_copy_([a, b], [x * 2, x.new_ones(3)])  # returns nothing: what it writes is its first list
        return (a + b) * self.w


def test_write_traffic_counts_in_place_ops_that_return_nothing():
    from fastseg3d.profile import write_traffic

    by_op = write_traffic(_Foreach(), (3,))["forward"]["by_op"]
    assert by_op["aten::_foreach_copy_"] == (1, 3 * 4 + 3 * 2)


def test_activation_memory_runs_the_backward_on_meta():
    """The training step's backward runs on the meta device too (the model's hooks, kept on the copy, see it); one
    that fails there is warned about and the forward's count returned."""
    seen = []
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    # on the last conv, whose input needs a gradient (the first's does not, and its hook would fire with a warning)
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].device.type))
    report = activation_memory(net, (1, 2, 8, 8, 8))
    assert seen == ["meta"] and report["total"] > 0

    class NoMetaBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise NotImplementedError("no meta kernel")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)

        def forward(self, x):
            return NoMetaBackward.apply(self.conv(x))

    with pytest.warns(UserWarning, match="backward on the meta device failed \\(NotImplementedError: no meta"):
        failed = activation_memory(Model(), (1, 2, 8, 8, 8))
    assert failed["total"] == activation_memory(torch.nn.Conv3d(2, 2, 3, padding=1), (1, 2, 8, 8, 8))["total"] > 0


def _conv_step_bytes(side: int) -> int:
    """A Conv3d(1, 2, 3) training step at batch 1 on an fp32 side^3 input, by hand: the input it saves for its
    weight's gradient (4 bytes a voxel), 56 parameters (2 x 27 weights, 2 biases) of 4 bytes, as many gradient
    bytes, and Adam's two states of them."""
    params = (2 * 27 + 2) * 4
    return 4 * side**3 + params + params + 2 * params


def test_largest_cube_takes_a_side_whose_estimate_fills_the_budget_exactly():
    """"Fits in ``budget``" is ``<=``: a budget of exactly a side's estimate takes that side, at the start side and
    at the smallest multiple the step-down below it reaches."""
    from fastseg3d.profile import largest_cube, training_memory

    model = nn.Conv3d(1, 2, 3, padding=1)
    assert training_memory(model, (1, 1, 64, 64, 64))["total"] == _conv_step_bytes(64)  # the count is the hand one
    assert largest_cube(model, 1, 1, _conv_step_bytes(64)) == 64
    assert largest_cube(model, 1, 1, _conv_step_bytes(64) - 1) == 32
    assert largest_cube(model, 1, 1, _conv_step_bytes(96)) == 96  # bisection between 64 and 128
    # below the start side: each multiple down to the smallest is tried
    assert largest_cube(model, 1, 1, _conv_step_bytes(32)) == 32
    assert largest_cube(model, 1, 1, _conv_step_bytes(32) - 1) == 0
    assert largest_cube(model, 1, 1, _conv_step_bytes(16), multiple=16) == 16


def test_training_memory_counts_buffers_and_only_the_trainable_parameters_gradients():
    """Parameters and buffers are held, whether they train or not; gradients and optimizer states are kept for the
    trainable parameters only (a frozen conv, a BatchNorm with its running statistics)."""
    from fastseg3d.profile import activation_memory, training_memory

    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    model[0].requires_grad_(False)
    shape = (2, 1, 4, 4, 4)
    conv = (2 * 1 + 2) * 4  # frozen: 2 weights, 2 biases
    norm = (2 + 2) * 4  # trainable: weight and bias
    buffers = 2 * 4 + 2 * 4 + 8  # running mean and variance, and the int64 batch count
    report = training_memory(model, shape, optimizer_states=2)
    assert report["parameters"] == conv + norm + buffers
    assert report["gradients"] == norm and report["optimizer"] == 2 * norm
    assert report["total"] == activation_memory(model, shape)["total"] + conv + norm + buffers + 3 * norm


def test_emulation_keeps_fp64_and_promotes_to_the_widest_input():
    """CUDA autocast never casts fp64 (a mixed call keeps its fp64 tensor) and promotes to the widest floating input
    (fp32 over bf16, whichever comes first); "area" interpolation stays uncast however its mode is passed."""
    from fastseg3d.profile import _autocast_on_meta

    x = torch.empty(1, 2, 4, 4, 4, device="meta", dtype=torch.bfloat16)
    with _autocast_on_meta(torch.bfloat16):
        assert torch.pow(x.double(), x).dtype == torch.float64
        assert torch.addcmul(x, x.float(), x.float()).dtype == torch.float32
        assert F.interpolate(x, (1, 1, 1), None, "area").dtype == torch.bfloat16


def test_counts_a_batch_norm_step_exactly_without_its_buffers():
    """Conv3d -> BatchNorm3d on (2, 1, 4, 4, 4) fp32: the conv saves its input (512 B), BatchNorm its input (1,024)
    and its batch mean and inverse std (8 + 8); its running statistics, buffers like the parameters, are not
    activations."""
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    assert activation_memory(model, (2, 1, 4, 4, 4)) == {"total": 1552, "0": 512, "1": 1040}


def test_an_eval_mode_model_is_counted_as_it_trains():
    """The count is a training step's whatever the caller's mode (Dropout saves its mask only in training), and
    the caller's model stays in its mode."""
    model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Dropout(0.5), nn.Conv3d(4, 2, 1))
    trained = activation_memory(model, (1, 1, 4, 4, 4))
    model.eval()
    assert activation_memory(model, (1, 1, 4, 4, 4)) == trained
    assert trained["1"] > 0 and not model.training


class _DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        import dataclasses

        out = dataclasses.make_dataclass("Out", ["main", "mask"])
        y = self.conv(x)
        return out(y, y.detach() > 0)  # a second output that needs no gradient


def test_outputs_in_dataclasses_and_outputs_without_gradients():
    """A dataclass output is unpacked for backward, and an output that needs no gradient is left out of it (the
    backward would otherwise fail and the count warn)."""
    import warnings

    from fastseg3d.profile import write_traffic

    traffic = write_traffic(_DataclassOut(), (1, 1, 4, 4, 4))
    assert traffic["backward"]["by_op"]["aten::convolution_backward (ConvolutionBackward0)"][0] == 1

    class _Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert activation_memory(_Detached(), (1, 1, 4, 4, 4))["total"] > 0


def test_training_memory_scales_the_optimizer_states_and_rejects_a_bool():
    from fastseg3d.profile import training_memory

    model = nn.Conv3d(1, 2, 1)
    trainable = (2 + 2) * 4
    for states in (0, 1, 3):
        assert training_memory(model, (1, 1, 4, 4, 4), optimizer_states=states)["optimizer"] == states * trainable
    with pytest.raises(ValueError, match="optimizer_states"):
        training_memory(model, (1, 1, 4, 4, 4), optimizer_states=True)


class _RefusesBelow(nn.Module):
    """A network that refuses (ValueError, as the networks do) cubes with a side below ``side``."""

    def __init__(self, side: int):
        super().__init__()
        self.side, self.conv = side, nn.Conv3d(1, 1, 1)

    def forward(self, x):
        if x.shape[-1] < self.side:
            raise ValueError(f"side {x.shape[-1]} is below {self.side}")
        return self.conv(x)


def test_largest_cube_start_below_the_multiple_and_refused_start_sides():
    """A start below ``multiple`` starts at ``multiple``; a refused start moves up to four times the start (160 is
    the fourth side from 64 in steps of 32); refused all the way to four times the start, short of ``max_side``,
    the network's error is raised, not 0."""
    from fastseg3d.profile import largest_cube

    assert largest_cube(nn.Conv3d(1, 2, 1), 1, 1, 2**40, multiple=128, max_side=256) == 256
    assert largest_cube(_RefusesBelow(160), 1, 1, 2**40, max_side=320) == 320
    with pytest.raises(ValueError, match="side 64 is below"):
        largest_cube(_RefusesBelow(10**6), 1, 1, 2**40, max_side=288)


class _OutBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        buf = x.new_empty(3)
        with torch.no_grad():  # an out= op returning nothing: what it writes is its keyword argument
            torch.ops.aten._foreach_mul.Scalar_out([x], 2.0, out=[buf])
        return (x + buf) * self.w


def test_write_traffic_counts_a_keyword_out_argument():
    from fastseg3d.profile import write_traffic

    assert write_traffic(_OutBuffer(), (3,))["forward"]["by_op"]["aten::_foreach_mul"] == (1, 3 * 4)


def test_write_traffic_counts_op_calls_not_op_names():
    """"ops" is the floor on a step's launches: every call counts (bf16 autocast's three casts are three ops)."""
    from fastseg3d.profile import write_traffic

    forward = write_traffic(nn.Sequential(nn.Linear(8, 16), nn.GELU()), (4, 8), torch.bfloat16)["forward"]
    assert forward["by_op"]["aten::_to_copy"][0] == 3 and forward["ops"] == 3 + 1 + 1
