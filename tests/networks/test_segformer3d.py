"""SegFormer3D: parameter count, official keys, equality with a plain-PyTorch build, fused vs reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.networks import SegFormer3D
from fastseg3d.networks.segformer3d import MixFFN3d, _DWConvBN
from fastseg3d.reference.segformer3d import SegFormer3DRef as PlainSegFormer3D
from tests.utils import assert_backends_agree, assert_close

_SMALL = dict(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 2), decoder_dim=32)


def _pair(small=True, scales=(None,) * 4, **extra):
    cfg = dict(_SMALL) if small else {}
    ours = SegFormer3D(**cfg, **extra)
    plain = PlainSegFormer3D(**{k: v for k, v in cfg.items()}, scales=scales)
    plain.load_state_dict(ours.state_dict(), strict=True)
    return ours, plain


# ------------------------------------------------------------------------------------------------------
# CPU tier


def test_published_parameter_count_and_keys():
    net = SegFormer3D()
    assert sum(p.numel() for p in net.parameters()) == 4_525_251
    plain = PlainSegFormer3D()
    assert list(net.state_dict()) == list(plain.state_dict())
    sd = net.state_dict()
    assert sd["segformer_encoder.embed_1.patch_embeddings.weight"].shape == (32, 4, 7, 7, 7)
    assert sd["segformer_encoder.tf_block1.0.attention.sr.weight"].shape == (32, 32, 4, 4, 4)
    assert sd["segformer_encoder.tf_block2.1.mlp.dwconv.dwconv.weight"].shape == (256, 1, 3, 3, 3)
    assert "segformer_encoder.tf_block3.0.attention.sr.weight" not in sd
    assert sd["segformer_decoder.linear_fuse.0.weight"].shape == (256, 1024, 1, 1, 1)
    assert sd["segformer_decoder.linear_pred.weight"].shape == (3, 256, 1, 1, 1)
    assert "segformer_decoder.linear_fuse.1.num_batches_tracked" in sd


@pytest.mark.parametrize("mode", ["train", "eval"])
# Batch 2: at batch 1 the plain build's own gradients are wrong on torch 2.13 CPU (BatchNorm3d backward given the
# oddly strided gradient of ``flatten(2).transpose(1, 2)``); test_gradients_at_batch_1 covers batch 1.
@pytest.mark.parametrize("shape", [(2, 4, 32, 32, 32), (2, 4, 32, 64, 32)], ids=["cube", "non-cubic"])
def test_matches_plain_build(mode, shape):
    torch.manual_seed(0)
    ours, plain = _pair()
    ours, plain = ours.double(), plain.double()
    if mode == "eval":
        # Non-trivial running statistics so that folding BatchNorm into the conv is exercised.
        with torch.no_grad():
            for m in ours.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict(ours.state_dict())
    getattr(ours, mode)()
    getattr(plain, mode)()
    _check_against_plain(ours, plain, shape)


def _check_against_plain(ours, plain, shape):
    """Outputs, input gradient and every parameter gradient of the two float64 builds on one random input."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), plain(x2)
    assert y.shape == (shape[0], 3, *shape[2:])
    assert_close("logits", y, y_ref, torch.float64, scale=1e3)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x.grad, x2.grad, torch.float64, scale=1e3)
    named_ref = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        # A conv bias right before a training-mode BatchNorm has a zero gradient up to rounding: floor the scale.
        assert_close(f"d{name}", p.grad, named_ref[name].grad, torch.float64, scale=1e3, floor=1e-5)


def test_hooked_blocks_see_their_own_input_and_output():
    """A hooked block runs as a module (its residual adds are not deferred into the next norm), so forward hooks
    see what the plain build's block takes and returns; the network's outputs are unchanged."""
    torch.manual_seed(0)
    ours, plain = _pair()
    ours, plain = ours.double().train(), plain.double().train()
    seen = {}

    def record(name):
        def hook(module, args, out) -> None:  # a hook's return value would replace the output
            seen[name] = (args[0], out)
        return hook

    for name, net in (("ours", ours), ("plain", plain)):
        net.segformer_encoder.tf_block1[1].register_forward_hook(record(name))
    _check_against_plain(ours, plain, (2, 4, 32, 32, 32))
    for what, a, e in zip(("input", "output"), seen["ours"], seen["plain"]):
        assert_close(what, a, e, torch.float64)


def test_residual_adds_run_in_the_norms_kernels():
    """The bf16 training step (meta, as on a GPU): every residual add is in the kernel of the LayerNorm after it,
    forward and backward (no add, no accumulation of the stream's gradient, no cast of the branch's)."""
    from fastseg3d.profile import write_traffic

    net = SegFormer3D(**_SMALL)
    traffic = write_traffic(net, (2, 4, 64, 64, 64), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    assert forward["fastseg3d::add_layer_norm"][0] == 2 * 8  # two per block
    assert "aten::add" not in forward
    assert not [k for k in backward if k.startswith("aten::_to_copy (AddBackward")]
    # the stream's gradient is accumulated only where a stage's first block reads the patch embedding's norm
    assert backward["aten::add (GeneratedBackwardFor_fastseg3d_layer_norm_defaultBackward)"][0] == 4
    with fastseg3d.backend("torch"):
        plain = write_traffic(net, (2, 4, 64, 64, 64), torch.bfloat16)
    assert plain["forward"]["by_op"]["aten::add"][0] >= 16
    assert traffic["backward"]["ops"] < plain["backward"]["ops"] - 32


def test_norms_read_and_write_the_dtypes_of_their_neighbours():
    """The bf16 training step (meta, as on a GPU): every LayerNorm runs in a fused kernel, the patch embeddings'
    reading the conv's bf16 output as it is and the stages' writing the bf16 the next patch conv and the decoder
    read: the only activation casts left are the input image's and the logits'."""
    from fastseg3d.profile import write_traffic

    traffic = write_traffic(SegFormer3D(**_SMALL), (2, 4, 64, 64, 64), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    assert "aten::native_layer_norm" not in forward
    assert forward["fastseg3d::layer_norm"][0] == 4 + 4 + 4 + 4  # patch embeddings, first blocks, sr, decoder
    assert forward["aten::_to_copy"][0] == 2
    assert backward["aten::_to_copy (ToCopyBackward0)"][0] == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_at_batch_1(mode):
    # An independent oracle: the directional derivative by central differences.
    torch.manual_seed(0)
    net = getattr(SegFormer3D(**_SMALL).double(), mode)()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = 0.0  # repeated forwards leave the running statistics unchanged
    x = torch.randn(1, 4, 32, 32, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 32, 32, 64, dtype=torch.float64)

    def f(x):
        return (net(x) * w).sum()

    f(x).backward()
    v, eps = torch.randn_like(x), 1e-6
    with torch.no_grad():
        numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert abs(numeric.item() - (x.grad * v).sum().item()) <= 1e-6 * abs(numeric.item())


def test_plain_build_with_sdpa_matches_explicit_softmax():
    """The benchmark's plain peer (the current release's SDPA core) computes what the oracle computes."""
    from fastseg3d.reference.segformer3d import SegFormer3DRef

    torch.manual_seed(0)
    explicit = SegFormer3DRef(**_SMALL).double().train()
    sdpa = SegFormer3DRef(**_SMALL, sdpa=True).double().train()
    sdpa.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 4, 32, 32, 32, dtype=torch.float64)
    assert_close("logits", sdpa(x), explicit(x), torch.float64, scale=1e3)


def test_num_heads_scale_matches_2024_release():
    ours, plain = _pair(attention_scale="num_heads", scales=tuple(h**-0.5 for h in _SMALL["num_heads"]))
    ours, plain = ours.double().eval(), plain.double().eval()
    x = torch.randn(1, 4, 32, 32, 32, dtype=torch.float64)
    assert_close("logits", ours(x), plain(x), torch.float64, scale=1e3)


def test_convert_model_on_plain_build_keeps_outputs():
    _, plain = _pair()
    plain = plain.double().eval()
    x = torch.randn(1, 4, 32, 32, 32, dtype=torch.float64)
    expected = plain(x)
    fastseg3d.convert_model(plain)
    assert any(isinstance(m, fastseg3d.nn.DepthwiseConv3d) for m in plain.modules())
    assert_close("logits", plain(x), expected, torch.float64)


def test_eval_returns_one_tensor_for_sliding_window_inference():
    inferers = pytest.importorskip("monai.inferers")
    net = SegFormer3D(**_SMALL).eval()
    with torch.no_grad():
        out = inferers.sliding_window_inference(torch.randn(1, 4, 40, 48, 36), (32, 32, 32), 2, net, overlap=0.25)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 40, 48, 36)
    for mode in (net.eval, net.train):  # NCDHW logits, as the official model's
        mode()
        assert net(torch.randn(2, 4, 32, 32, 32)).is_contiguous()


def test_monai_bundle_instantiation():
    bundle = pytest.importorskip("monai.bundle")
    parser = bundle.ConfigParser({"network": {"_target_": "fastseg3d.networks.SegFormer3D", "in_channels": 1,
                                              "out_channels": 2, "embed_dims": [16, 32, 32, 32],
                                              "num_heads": [1, 1, 1, 2], "decoder_dim": 32}})
    net = parser.get_parsed_content("network")
    assert isinstance(net, SegFormer3D)
    assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_compile_fullgraph_train_step():
    torch._dynamo.reset()
    net = SegFormer3D(**_SMALL, depths=(1, 1, 1, 1))  # one block per stage keeps compilation short
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(2, 4, 32, 32, 32)
    y = compiled(x)
    assert_close("logits", y, net(x), torch.float32, scale=10)
    y.square().mean().backward()
    assert net.segformer_encoder.embed_1.patch_embeddings.weight.grad is not None


def test_meta_device_forward_backward_at_128():
    with torch.device("meta"):
        net = SegFormer3D()
        x = torch.randn(2, 4, 128, 128, 128)
    y = net(x)
    assert y.shape == (2, 3, 128, 128, 128) and y.device.type == "meta"
    y.sum().backward()
    assert net.segformer_decoder.linear_pred.weight.grad.shape == (3, 256, 1, 1, 1)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: SegFormer3D(spatial_dims=2), "spatial_dims"),
        (lambda: SegFormer3D(embed_dims=(32, 64, 161, 256)), "divisible by num_heads"),
        (lambda: SegFormer3D(depths=(2, 2, 2)), "4 stages"),
        (lambda: SegFormer3D(attention_scale="dim"), "attention_scale"),
        (lambda: SegFormer3D(patch_padding=(1, 1, 1, 1)), "patch_padding \\(1, 1, 1\\) of stage 0"),
        (lambda: SegFormer3D(patch_kernel_size=(7, 3, (1, 3, 3), 3)), "stage 2"),
        (lambda: SegFormer3D(**_SMALL)(torch.randn(1, 4, 32, 48, 32)), "dimension 1 \\(size 48\\)"),
        (lambda: SegFormer3D(**_SMALL)(torch.randn(1, 4, 32, 0, 32)), "dimension 1 \\(size 0\\).*positive multiple"),
        (lambda: SegFormer3D(**_SMALL)(torch.randn(1, 3, 32, 32, 32)), "in_channels=4"),
        (lambda: SegFormer3D(**_SMALL)(torch.randn(4, 32, 32, 32)), "5-D"),
        (lambda: SegFormer3D(num_heads=(0, 1, 1, 1)), "num_heads must be 4 ints >= 1"),
        (lambda: SegFormer3D(depths=(-1, 2, 2, 2)), "depths must be 4 ints >= 0"),
        (lambda: SegFormer3D(embed_dims=(32.0, 64, 160, 256)), "embed_dims"),
        (lambda: SegFormer3D(decoder_dim=0), "decoder_dim"),
        (lambda: SegFormer3D(in_channels=True), "in_channels"),
        (lambda: SegFormer3D(out_channels="3"), "out_channels"),
        (lambda: SegFormer3D(decoder_dropout=2), "decoder_dropout"),
        # a rate of 1 zeroes every input of the prediction conv in training
        (lambda: SegFormer3D(decoder_dropout=1.0), "decoder_dropout must be a number in \\[0, 1\\)"),
        # an entry that is no (D, H, W) triple is refused by name, not by an IndexError or a conv's error
        (lambda: SegFormer3D(patch_stride=(4, (2, 2), 2, 2)), "patch_stride entries must be ints >= 1 or 3-tuples"),
        (lambda: SegFormer3D(patch_kernel_size=(7, 3, 3, (3, 3, 3, 3))), "patch_kernel_size entries must be"),
        # floats, bools and out-of-range entries by name too, not a TypeError from iterating a number
        (lambda: SegFormer3D(patch_padding=(3.0, 1, 1, 1)), "patch_padding entries must be ints >= 0"),
        (lambda: SegFormer3D(patch_stride=(4, 2, 2, True)), "patch_stride entries"),
        (lambda: SegFormer3D(patch_stride=(4, 2, 2, (2, 0, 2))), "patch_stride entries"),
        (lambda: SegFormer3D(patch_padding=(3, 1, 1, (1, -1, 1))), "patch_padding entries"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_integer_patch_entries():
    """Per-axis entries read from a NumPy config (np.int64) are taken as ints, as the other integer arguments are."""
    net = SegFormer3D(patch_stride=(np.int64(4), 2, 2, (np.int64(2),) * 3))
    assert net.segformer_encoder.embed_1.patch_embeddings.stride == (4, 4, 4)
    assert all(type(s) is int for s in net.segformer_encoder.embed_4.patch_embeddings.stride)


_ANISOTROPIC = dict(patch_kernel_size=((3, 7, 7), 3, 3, 3), patch_stride=((2, 4, 4), 2, 2, 2),
                   patch_padding=((1, 3, 3), 1, 1, 1), sr_ratios=(2, 2, 1, 1))


def test_anisotropic_patch_kernels():
    net = SegFormer3D(**_SMALL, **_ANISOTROPIC).eval()
    assert net.total_stride == (16, 32, 32)
    assert net(torch.randn(1, 4, 16, 32, 64)).shape == (1, 3, 16, 32, 64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_anisotropic_matches_plain_build(mode):
    ours = SegFormer3D(**_SMALL, **_ANISOTROPIC).double()
    plain = PlainSegFormer3D(**_SMALL, **_ANISOTROPIC).double()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    plain.load_state_dict(ours.state_dict(), strict=True)
    getattr(ours, mode)()
    getattr(plain, mode)()
    _check_against_plain(ours, plain, (2, 4, 16, 32, 64))


def test_training_with_one_value_per_batch_norm_channel_raises_like_the_plain_build():
    # Batch 1 at 32^3: the stage-4 grid is 1^3, one value per channel for its Mix-FFN BatchNorm. This used to store
    # NaN in running_var (and every later eval output was NaN) where the plain build raises.
    ours, plain = _pair()
    x = torch.randn(1, 4, 32, 32, 32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        plain.train()(x)
    with pytest.raises(ValueError, match="more than 1 value per channel .* last stage holds one token"):
        ours.train()(x)
    assert all(torch.isfinite(m.running_var).all() for m in ours.modules() if isinstance(m, nn.BatchNorm3d))
    assert torch.isfinite(ours.eval()(x)).all()
    # no BatchNorm at the last stage, or its BatchNorms frozen: nothing to refuse
    assert SegFormer3D(**_SMALL, depths=(1, 1, 1, 0)).train()(x).shape == (1, 3, 32, 32, 32)
    frozen = SegFormer3D(**_SMALL).train()
    frozen.segformer_encoder.tf_block4.eval()
    assert frozen(x).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("ratio", [4.0, (4.0, 2, 4, 3.0), [4, 4, 4, 4]])
def test_mlp_ratio_accepts_integral_numbers(ratio):
    net = SegFormer3D(**_SMALL, mlp_ratio=ratio)
    per_stage = (ratio,) * 4 if isinstance(ratio, float) else ratio
    for s, r in enumerate(per_stage):
        fc1 = getattr(net.segformer_encoder, f"tf_block{s + 1}")[0].mlp.fc1
        assert fc1.out_features == int(r) * _SMALL["embed_dims"][s]
    assert net.eval()(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("ratio", [2.5, 0, -4, (4, 4, 4, 1.5), (4, 4, 4, True), "4444", (4, 4, 4)])
def test_mlp_ratio_rejects_non_integral_or_non_positive(ratio):
    with pytest.raises(ValueError, match="mlp_ratio"):
        SegFormer3D(**_SMALL, mlp_ratio=ratio)


@pytest.mark.parametrize("name,value", [("mlp_ratio", None), ("embed_dims", 32), ("depths", None),
                                        ("patch_kernel_size", 7), ("sr_ratios", "4211")])
def test_per_stage_arguments_of_the_wrong_type(name, value):
    """A ValueError naming the argument (MONAI's convention), not a TypeError from deep inside the constructor."""
    with pytest.raises(ValueError, match=f"{name} must give 4 stages"):
        SegFormer3D(**{**_SMALL, name: value})


def _fake_world(monkeypatch, world_size: int | None, calls: list):
    """torch.distributed "initialized" with ``world_size`` processes (None: not initialized); SyncBatchNorm.forward
    records its calls and runs BatchNorm's math (the real one would all-reduce, which needs processes and a GPU)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: world_size is not None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world_size)

    def forward(self, x):
        calls.append(self)
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", forward)


def _train_step(net, x):
    net.zero_grad()
    y = net.train()(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("world_size", [2, 1, None], ids=["synced", "world-size-1", "not-initialized"])
def test_sync_batch_norm_after_conversion(monkeypatch, world_size):
    # As the trainer converts the network under DDP: with more than one process every BatchNorm must run through
    # SyncBatchNorm.forward, else its statistics stay per rank. In one process the fused path stays, with the same
    # values.
    import copy

    torch.manual_seed(0)
    net = SegFormer3D(**_SMALL, depths=(1, 1, 1, 1)).double()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    sync_bns = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync_bns) == 5  # one per Mix-FFN, one in the decoder
    calls = []
    _fake_world(monkeypatch, world_size, calls)
    x = torch.randn(2, 4, 32, 32, 32, dtype=torch.float64)
    y_ref, grads_ref = _train_step(net, x)
    y, grads = _train_step(synced, x)
    if world_size != 2:
        assert calls == []  # the fused path (SyncBatchNorm.forward would run plain BatchNorm here)
    else:
        assert sorted(map(id, calls)) == sorted(map(id, sync_bns))
    assert_close("logits", y, y_ref, torch.float64, scale=1e3)
    for name, g in grads.items():
        assert_close(f"d{name}", g, grads_ref[name], torch.float64, scale=1e3, floor=1e-5)
    bn_ref = dict(net.named_buffers())
    for name, b in synced.named_buffers():
        if "running" in name:
            assert_close(name, b, bn_ref[name], torch.float64)


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the whole network on the fused kernels against the reference backend


@pytest.mark.interpret
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_interpret_fused_network_matches_reference(mode, poison):
    """Logits, input gradient and every parameter gradient on the fused kernels against the reference backend."""
    torch.manual_seed(0)
    # the interpreter is slow: two blocks in the first stage (a residual add deferred into the next block's norm),
    # one in the others
    net = getattr(SegFormer3D(**_SMALL, depths=(2, 1, 1, 1)), mode)()
    assert_backends_agree(net, torch.randn(2, 4, 32, 32, 32), "triton", floor=1e-3)


@pytest.mark.interpret
def test_interpret_fused_network_matches_reference_under_bf16_autocast(poison):
    """The training step under CPU bf16 autocast, every kernel in bf16 where the network feeds it bf16 (conftest
    makes the interpreter's bf16 dots and casts those of a GPU)."""
    torch.manual_seed(0)
    net = SegFormer3D(**_SMALL, depths=(1, 1, 1, 1)).train()

    def loss(y):
        assert y.dtype == torch.bfloat16
        return y.float().square().mean()

    # scale 15: the last stage holds two tokens at 32^3, so its weight gradients are sums of two outer products of
    # bf16-rounded vectors, with no averaging of the rounding (tf_block4's fc1 differs by 11x bf16's RMS tolerance,
    # the rest by at most 8x)
    assert_backends_agree(net, torch.randn(2, 4, 32, 32, 32), "triton", floor=1e-2, loss=loss,
                          dtype=torch.bfloat16, autocast=torch.bfloat16, scale=15)


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.timeout(480)  # a network's ~70-90 Triton specialisations compile one after another in one worker
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_network_matches_reference(no_tf32, dtype):
    # fp32 convs on both sides: TF32 ones would turn fp32 rounding differences into errors above the tolerance
    torch.manual_seed(0)
    net = SegFormer3D().cuda()
    x = torch.randn(2, 4, 64, 64, 64, device="cuda")
    outs = []
    for backend in ("triton", "torch"):
        net.zero_grad()
        with fastseg3d.backend(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = net(x)
        y.float().square().mean().backward()
        outs.append((y.detach().float(), net.segformer_encoder.embed_1.patch_embeddings.weight.grad.clone()))
    for name, a, e in zip(("logits", "dembed"), *outs):
        assert_close(name, a, e, dtype, scale=10)


def test_activation_memory_at_128_is_at_most_half_of_the_plain_build():
    from fastseg3d.profile import activation_memory

    ours = activation_memory(SegFormer3D(), (2, 4, 128, 128, 128))
    plain = activation_memory(PlainSegFormer3D(), (2, 4, 128, 128, 128))
    assert 1.3 * 2**30 < plain["total"] < 1.5 * 2**30  # the published model saves about 1.4 GiB
    assert ours["total"] <= 0.5 * plain["total"], (ours, plain)
    assert ours["total"] == ours["segformer_encoder"] + ours["segformer_decoder"]


def test_train_step_updates_batch_norm_statistics_like_the_plain_build():
    ours, plain = _pair()
    ours, plain = ours.double().train(), plain.double().train()
    x = torch.randn(2, 4, 32, 32, 32, dtype=torch.float64)
    ours(x).sum().backward()
    plain(x).sum().backward()
    ref = plain.state_dict()
    for name, value in ours.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert_close(name, value.double(), ref[name].double(), torch.float64)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hooks_on_fused_layers_fire_and_change_nothing_else(mode):
    """Hooks on the layers a fused path reads directly (the decoder's embeddings, linear_fuse and linear_pred, a
    Mix-FFN's depthwise conv, BatchNorm and fc2) see their calls, as MONAI's GradCAM and the distillation taps need;
    the network's output and gradients stay those of the fused path."""
    import copy

    torch.manual_seed(0)
    net = SegFormer3D(embed_dims=(8, 16, 32, 32), num_heads=(1, 1, 2, 2), decoder_dim=16)
    fused, hooked = copy.deepcopy(net), copy.deepcopy(net)
    getattr(fused, mode)(), getattr(hooked, mode)()
    fired = set()
    mlp = hooked.segformer_encoder.tf_block1[0].mlp
    for name, layer in (("pred", hooked.segformer_decoder.linear_pred), ("c2", hooked.segformer_decoder.linear_c2),
                        ("fuse", hooked.segformer_decoder.linear_fuse[0]), ("dw", mlp.dwconv.dwconv),
                        ("bn", mlp.dwconv.bn), ("fc2", mlp.fc2), ("drop", hooked.segformer_decoder.dropout)):
        layer.register_forward_hook(lambda m, i, o, name=name: fired.add(name))
    x = torch.randn(2, 4, 32, 32, 32)
    expected, out = fused(x), hooked(x)
    assert fired == {"pred", "c2", "fuse", "dw", "bn", "fc2", "drop"}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if mode == "train":
        expected.square().mean().backward()
        out.square().mean().backward()
        grads = dict(fused.named_parameters())
        for name, p in hooked.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)
    hooked.segformer_decoder.linear_pred = nn.Sequential(nn.Identity(), hooked.segformer_decoder.linear_pred)
    torch.testing.assert_close(hooked(x), expected, rtol=1e-4, atol=1e-4)  # a replaced layer runs as called


class _ScaledConv3d(nn.Conv3d):
    """A conv subclass that computes its own weight (as a weight-standardised conv does)."""

    def forward(self, x):
        return self._conv_forward(x, 2.0 * self.weight, self.bias)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mix_ffn_runs_a_conv_subclass_as_called(mode):
    """A depthwise conv replaced by a Conv3d subclass with its own forward is called, not read for its weight."""
    torch.manual_seed(0)
    mlp = MixFFN3d(8, 2)
    getattr(mlp, mode)()
    old = mlp.dwconv.dwconv
    new = _ScaledConv3d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding,
                        groups=old.groups)
    new.load_state_dict(old.state_dict())
    mlp.dwconv.dwconv = new
    x = torch.randn(2, 4 * 4 * 4, 8)
    vol = mlp.dwconv(mlp.fc1(x).unflatten(1, (4, 4, 4)).permute(0, 4, 1, 2, 3))
    expected = mlp.fc2(F.gelu(vol).permute(0, 2, 3, 4, 1).flatten(1, 3))
    torch.testing.assert_close(mlp(x, (4, 4, 4)), expected)


class _ScaledDWConvBN(_DWConvBN):
    """A user's subclass of the Mix-FFN's conv block with a forward of its own."""

    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mix_ffn_runs_a_subclassed_conv_block_as_called(mode):
    """A subclass of a sub-block (not only of a leaf layer) runs through its own forward, not the fused path."""
    torch.manual_seed(0)
    mlp = MixFFN3d(8, 2)
    mlp.dwconv.__class__ = _ScaledDWConvBN
    getattr(mlp, mode)()
    x = torch.randn(2, 4 * 4 * 4, 8)
    with torch.no_grad():
        before = {k: v.clone() for k, v in mlp.state_dict().items()}
        vol = mlp.dwconv(mlp.fc1(x).unflatten(1, (4, 4, 4)).permute(0, 4, 1, 2, 3))
        expected = mlp.fc2(F.gelu(vol).permute(0, 2, 3, 4, 1).flatten(1, 3))
        mlp.load_state_dict(before)  # the running statistics as before the reference call
        torch.testing.assert_close(mlp(x, (4, 4, 4)), expected)


def test_eval_fold_uses_each_batch_norm_eps():
    """A BatchNorm eps other than the default (a converted or fine-tuned model's) must reach the eval-mode fold of
    BatchNorm into the Mix-FFN's depthwise conv: against the plain build with the same eps."""
    torch.manual_seed(0)
    ours, plain = _pair()
    ours, plain = ours.double(), plain.double()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.05, 0.2)  # small variances: eps = 0.1 matters
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(ours.state_dict())
    for net in (ours, plain):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eps = 0.1
        net.eval()
    _check_against_plain(ours, plain, (2, 4, 32, 32, 32))


def test_decoder_dropout_follows_the_fuse_batch_norm():
    """Decoder dropout sits before the prediction conv, after linear_fuse's BatchNorm -> ReLU (as released): the
    BatchNorm's batch statistics, and so its running statistics, are those of the undropped features, whatever
    the dropout draws. Compared with the same weights and decoder_dropout=0."""
    torch.manual_seed(0)
    dropped = SegFormer3D(**_SMALL, decoder_dropout=0.5).double().train()
    plain = SegFormer3D(**_SMALL).double().train()
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 4, 32, 32, 32, dtype=torch.float64)
    y = dropped(x)
    plain(x)
    assert torch.isfinite(y).all()
    bn, bn_ref = dropped.segformer_decoder.linear_fuse[1], plain.segformer_decoder.linear_fuse[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    dropped.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))  # no dropout in eval


def test_official_initialisation():
    """The official init: Linear weights trunc_normal(std 0.02) with zero bias; convs normal(0, sqrt(2 / fan_out))
    with fan_out = kernel volume x out_channels / groups (so a depthwise 3^3 conv has std sqrt(2 / 27)); norms at
    weight 1, bias 0."""
    torch.manual_seed(0)
    net = SegFormer3D()
    linear = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, nn.Linear)])
    assert abs(linear.std().item() / 0.02 - 1) < 0.05 and linear.abs().max() <= 2.0
    assert all(m.bias is None or not m.bias.any() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv3d)))
    enc = net.segformer_encoder
    for conv in (enc.embed_1.patch_embeddings, enc.embed_3.patch_embeddings, enc.tf_block1[0].mlp.dwconv.dwconv,
                 enc.tf_block4[1].mlp.dwconv.dwconv, enc.tf_block1[0].attention.sr):
        fan_out = math.prod(conv.kernel_size) * conv.out_channels / conv.groups
        assert abs(conv.weight.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.1, conv
    for m in net.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm3d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


def test_mix_ffn_batch_norm_without_running_statistics_in_eval():
    """A BatchNorm built with track_running_stats=False normalises with the batch's statistics in eval too
    (nn.BatchNorm3d's rule), so there is nothing to fold into the conv: against the plain composition."""
    torch.manual_seed(0)
    mlp = MixFFN3d(8, 2).double()
    mlp.dwconv.bn = nn.BatchNorm3d(16, track_running_stats=False).double()
    with torch.no_grad():
        mlp.dwconv.bn.weight.uniform_(0.5, 1.5)
        mlp.dwconv.bn.bias.uniform_(-0.5, 0.5)
    mlp.eval()
    x = torch.randn(2, 4 * 4 * 4, 8, dtype=torch.float64)
    vol = mlp.fc1(x).unflatten(1, (4, 4, 4)).permute(0, 4, 1, 2, 3)
    conv = mlp.dwconv.dwconv
    h = F.conv3d(vol, conv.weight, conv.bias, padding=1, groups=16)
    h = F.batch_norm(h, None, None, mlp.dwconv.bn.weight, mlp.dwconv.bn.bias, True, 0.0, mlp.dwconv.bn.eps)
    expected = mlp.fc2(F.gelu(h).permute(0, 2, 3, 4, 1).flatten(1, 3))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x, (4, 4, 4)), expected)


def test_jit_trace_for_deployment():
    """torch.jit.trace (and the legacy ONNX exporter built on it) hands the decoder's target size over as 0-d
    tensors, which the resize-and-sum refused; the traced network gives the eager outputs."""
    torch.manual_seed(0)
    net = SegFormer3D(in_channels=1, out_channels=3, **_SMALL).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), net(x))


def test_num_heads_scale_with_several_heads_over_several_keys():
    """attention_scale="num_heads" is the 2024 release's 1/sqrt(num_heads) where it changes the softmax: two heads
    over 8 keys in stages 2 and 3 (at 32^3 _SMALL's only two-head stage holds one token, where every scale agrees)."""
    torch.manual_seed(0)
    cfg = dict(_SMALL, num_heads=(1, 2, 2, 2))
    ours = SegFormer3D(**cfg, attention_scale="num_heads").double().eval()
    plain = PlainSegFormer3D(**cfg, scales=tuple(h**-0.5 for h in cfg["num_heads"])).double().eval()
    plain.load_state_dict(ours.state_dict(), strict=True)
    head_dim = PlainSegFormer3D(**cfg).double().eval()
    head_dim.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 4, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
        assert_close("logits", y, plain(x), torch.float64, scale=1e3)
        assert not torch.allclose(y, head_dim(x), rtol=1e-9, atol=0)  # the two scales differ at this size


def test_plain_build_sdpa_flag_reaches_every_attention(monkeypatch):
    """SegFormer3DRef(sdpa=True) runs F.scaled_dot_product_attention in each of its blocks and the default never
    does: else the SDPA peer of the benchmark (and the test comparing it) would be the explicit build again."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x = torch.randn(1, 4, 32, 32, 32)
    for flag, expected in ((False, 0), (True, 8)):  # two blocks in each of the four stages
        calls.clear()
        with torch.no_grad():
            PlainSegFormer3D(**_SMALL, sdpa=flag).eval()(x)
        assert len(calls) == expected, flag


def test_total_stride_includes_the_last_stage_spatial_reduction():
    """sr 4 on the last stage's 1/32 grid makes every side a multiple of 128 (its sr conv needs a grid divisible by
    4), so a 64 side is refused by name before any conv runs."""
    net = SegFormer3D(**_SMALL, sr_ratios=(4, 2, 1, 4))
    assert net.total_stride == (128, 128, 128)
    with pytest.raises(ValueError, match=r"dimension 0 \(size 64\) .* multiple of the total stride 128"):
        net(torch.randn(1, 4, 64, 128, 128))


def test_decoder_dropout_drops_in_training():
    """decoder_dropout drops linear_fuse's output on the fused training path too (the plain path a hook selects is not
    the only one that does): the logits differ from a decoder_dropout=0 twin's and from one draw to the next."""
    torch.manual_seed(0)
    net = SegFormer3D(**_SMALL, decoder_dropout=0.5).double().train()
    undropped = SegFormer3D(**_SMALL).double().train()
    undropped.load_state_dict(net.state_dict())
    x = torch.randn(2, 4, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = []
        for model, seed in ((net, 1), (net, 1), (net, 2), (undropped, 1)):
            torch.manual_seed(seed)
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2]) and not torch.allclose(outs[0], outs[3])


def test_mix_ffn_dropout_in_training_only():
    """MixFFN3d(dropout=p), as the official Mix-FFN: dropout on the activated hidden features and on fc2's output in
    training (fc2 an identity here: each output is 0 or the hidden feature / (1 - p)^2, 3/4 of them 0), none in
    eval."""
    torch.manual_seed(0)
    mlp = MixFFN3d(8, 1, dropout=0.5).double().train()
    with torch.no_grad():
        mlp.fc2.weight.copy_(torch.eye(8))
        mlp.fc2.bias.zero_()
    x = torch.randn(2, 8 * 8 * 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = mlp(x, (8, 8, 8))
        vol = mlp.fc1(x).unflatten(1, (8, 8, 8)).permute(0, 4, 1, 2, 3)
        h = F.gelu(mlp.dwconv.bn(mlp.dwconv.dwconv(vol))).permute(0, 2, 3, 4, 1).flatten(1, 3)
        kept = y != 0
        assert 0.7 < 1 - kept.double().mean().item() < 0.8
        assert_close("kept", y[kept], 4 * h[kept], torch.float64)
        undropped = MixFFN3d(8, 1).double().eval()
        undropped.load_state_dict(mlp.state_dict())
        assert_close("eval", mlp.eval()(x, (8, 8, 8)), undropped(x, (8, 8, 8)), torch.float64)
