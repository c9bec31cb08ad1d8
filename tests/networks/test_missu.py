"""MISSU: released parameter count and keys, distillation pairs, fixes of the released defects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.losses import MISSUDistillLoss
from fastseg3d.networks import MISSU
from fastseg3d.networks.missu import _SelfAttention
from fastseg3d.profile import activation_memory
from tests.utils import assert_backends_agree, assert_close


def test_released_parameter_count_and_keys():
    net = MISSU()
    assert sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fusion.")) == 20_392_388
    released = MISSU(fusion=False)
    assert sum(p.numel() for p in released.parameters()) == 20_392_388
    assert list(released.state_dict()) == [k for k in net.state_dict() if not k.startswith("fusion.")]
    sd = net.state_dict()
    assert sd["position_encoding.position_embeddings"].shape == (1, 4096, 512)
    assert sd["conv_x.weight"].shape == (512, 128, 3, 3, 3)
    for i in (0, 2, 4, 6):
        assert sd[f"transformer.net.{i}.fn.fn.qkv.weight"].shape == (1536, 512)
        assert f"transformer.net.{i}.fn.fn.qkv.bias" not in sd
        assert f"transformer.net.{i + 1}.fn.fn.net.3.weight" in sd
    assert sd["endconv.weight"].shape == (4, 16, 1, 1, 1)
    for key in ("Unet.InitConv.conv.weight", "Unet.EnBlock4_4.conv2.weight", "Unet.EnDown3.conv.weight", "bn.weight",
                "pre_head_ln.weight", "linear_encoding.weight", "Enblock8_1.bn1.running_mean", "DeUp2.conv3.weight",
                "DeBlock2.bn2.weight"):
        assert key in sd, key


def test_training_returns_distillation_pairs_for_the_loss():
    torch.manual_seed(0)
    net = MISSU().train()
    logits, pairs = net(torch.randn(2, 4, 32, 32, 32))
    assert logits.shape == (2, 4, 32, 32, 32)
    assert [tuple(d.shape) for d, _ in pairs] == [(2, 64, 8, 8, 8), (2, 32, 16, 16, 16), (2, 16, 32, 32, 32)]
    assert all(d.shape == s.shape for d, s in pairs)
    loss = MISSUDistillLoss()([d for d, _ in pairs], [s for _, s in pairs])
    assert MISSUDistillLoss()(pairs) == loss  # the training output's pairs go in as they are
    (loss + logits.mean()).backward()
    assert torch.isfinite(loss) and net.DeBlock2.conv1.weight.grad is not None
    assert net.fusion[2].fuse.weight.grad is not None  # the fusion block learns from the distillation
    # every parameter that requires a gradient gets one (DDP needs no find_unused_parameters): the released
    # pre_head_ln and linear_encoding, kept for the keys, require none
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not any(p.requires_grad for p in [*net.pre_head_ln.parameters(), *net.linear_encoding.parameters()])


def test_fusion_block_is_training_only():
    torch.manual_seed(0)
    net = MISSU().eval()
    plain = MISSU(fusion=False).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fusion.")}, strict=True)
    x = torch.randn(1, 4, 16, 16, 24)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


def test_fusion_block_shapes():
    from fastseg3d.networks.missu import LocalMultiScaleFusion3d

    block = LocalMultiScaleFusion3d(8)
    x = torch.randn(2, 8, 7, 9, 11, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and block.dilate3.weight.grad is not None


@pytest.mark.parametrize("shape", [(7, 9, 11), (4, 5, 6)])  # (4, 5, 6): the 5- and 6-pools keep one voxel
def test_fusion_block_matches_its_definition(shape):
    """Dense atrous branches summed with the input, then max pooling at four scales, each squeezed to one channel
    and upsampled, concatenated with the features and fused by ``fuse`` (the block splits that conv in two)."""
    from fastseg3d.networks.missu import LocalMultiScaleFusion3d

    torch.manual_seed(0)
    block = LocalMultiScaleFusion3d(6).double()
    x = torch.randn(2, 6, *shape, dtype=torch.float64)
    d1, d2 = block.dilate1(x), block.dilate2(x)
    d21 = block.dilate2(d1)
    out = (x + F.relu(d1) + F.relu(block.conv1x1(d2)) + F.relu(block.conv1x1(d21))
           + F.relu(block.conv1x1(block.dilate3(d21))))
    pooled = [F.interpolate(block.pool_conv(F.max_pool3d(out, k, k, ceil_mode=True)), size=out.shape[2:],
                            mode="trilinear", align_corners=False) for k in (2, 3, 5, 6)]
    assert_close("y", block(x), block.fuse(torch.cat([out, *pooled], dim=1)), torch.float64)


def test_fusion_block_saves_no_concatenated_copy():
    from fastseg3d.networks.missu import LocalMultiScaleFusion3d

    shape = (2, 8, 12, 12, 12)
    saved = activation_memory(LocalMultiScaleFusion3d(8), shape, torch.float32)["total"]
    n = 2 * 12**3
    # the input, d1, ReLU(d1), d2, d21, dilate3(d21), three ReLU outputs of the shared 1x1x1 conv and the sum
    # (saved by the pooling): 10 full maps; the pooling indices (0.37 of a map), the pooled maps (0.18) and the four
    # upsampled one-channel maps (0.5) come on top. A concatenated copy of the sum would add one more map.
    assert 11.0 * 8 * n * 4 < saved < 11.1 * 8 * n * 4


def test_eval_is_deterministic_and_returns_logits():
    net = MISSU().eval()  # the release's first-layer dropout also dropped at inference
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    assert not torch.allclose(a.sum(1), torch.ones_like(a.sum(1)))  # logits: the release returned probabilities


def test_transformer_residual_adds_run_in_the_norms_kernels():
    """The bf16 training step (meta, as on a GPU): each residual add but the last runs in the next layer's
    LayerNorm kernel, and every norm writes its Linear's bf16 input (no ATen LayerNorm, no casts of its output)."""
    from fastseg3d.profile import write_traffic

    net = MISSU(dropout_rate=0.0, init_dropout=0.0)
    traffic = write_traffic(net, (2, 4, 64, 64, 64), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    assert forward["fastseg3d::add_layer_norm"][0] == 2 * 4 - 1 and forward["fastseg3d::layer_norm"][0] == 1
    assert "aten::native_layer_norm" not in forward
    assert backward["fastseg3d::add_layer_norm_backward (GeneratedBackwardFor_fastseg3d_add_layer_norm_default"
                    "Backward)"][0] == 7


def test_hooked_transformer_layers_see_their_own_input_and_output():
    """A hooked residual layer runs as a module: its hooks see what the plain composition's layer takes and
    returns, and the outputs are unchanged."""
    torch.manual_seed(0)
    net = MISSU(num_layers=2, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0).double().train()
    x = torch.randn(1, 4, 16, 16, 16, dtype=torch.float64)
    outputs, seen = [], []
    for hooked in (False, True):
        handle = None
        if hooked:
            handle = net.transformer.net[2].register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        torch.manual_seed(1)
        outputs.append(net(x)[0].detach())
        if handle is not None:
            handle.remove()
    assert torch.equal(outputs[0], outputs[1]) and len(seen) == 1
    inp, out = seen[0]
    assert torch.equal(out, net.transformer.net[2].fn(inp) + inp)
    # a replaced forward (activation checkpointing's way) and a hook on the whole stack run too
    calls = []
    layer = net.transformer.net[1]
    layer.forward = lambda x, _f=layer.forward: calls.append(1) or _f(x)
    net.transformer.net.register_forward_hook(lambda m, args, out: calls.append(2))
    torch.manual_seed(1)
    assert torch.equal(net(x)[0], outputs[0]) and calls == [1, 2]


def test_meta_device_at_128():
    with torch.device("meta"):
        net = MISSU()
        x = torch.randn(2, 4, 128, 128, 128)
    logits, pairs = net(x)
    assert logits.shape == (2, 4, 128, 128, 128)
    logits.sum().backward()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: MISSU(spatial_dims=2), "spatial_dims"),
        (lambda: MISSU(4, 4), "got 4 \\(its first argument.*MISSU\\(in_channels=4, out_channels=4\\)"),
        (lambda: MISSU(embedding_dim=256), "embedding_dim must be 512"),
        (lambda: MISSU(num_heads=7), "num_heads"),
        (lambda: MISSU(fusion="no"), "fusion must be a bool"),
        (lambda: MISSU()(torch.randn(1, 4, 32, 36, 32)), "dimension 1 \\(size 36\\)"),
        (lambda: MISSU()(torch.randn(1, 4, 0, 32, 32)), "dimension 0 \\(size 0\\).*positive multiple"),
        (lambda: MISSU()(torch.randn(1, 3, 32, 32, 32)), "in_channels=4"),
        # the bottleneck's BatchNorm over one voxel: ATen's error named neither the size nor the fix
        (lambda: MISSU(num_layers=1, hidden_dim=64).train()(torch.randn(1, 4, 8, 8, 8)),
         "\\(8, 8, 8\\) leaves a one-voxel bottleneck .* batch 1: make one side 16 or more, or train at batch 2"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_voxel_bottleneck_runs_where_batchnorm_can_normalise_it():
    net = MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0)
    logits, pairs = net.train()(torch.randn(2, 4, 8, 8, 8))
    assert logits.shape == (2, 4, 8, 8, 8) and len(pairs) == 3
    assert net.eval()(torch.randn(1, 4, 8, 8, 8)).shape == (1, 4, 8, 8, 8)


@pytest.mark.interpret
def test_interpret_fused_attention_matches_reference(poison):
    torch.manual_seed(0)
    net = MISSU(dropout_rate=0.0, init_dropout=0.0).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        with fastseg3d.backend("triton"):
            fused = net(x)
        with fastseg3d.backend("torch"):
            ref = net(x)
    assert_close("logits", fused, ref, torch.float32, scale=10)


@pytest.mark.interpret
def test_interpret_training_step_matches_reference(poison):
    """Training logits, input gradient and every parameter gradient (the fused attention's dq/dk/dv feed the
    transformer's) through the distillation loss, on the fused kernels against the reference backend."""
    torch.manual_seed(0)
    net = MISSU(dropout_rate=0.0, init_dropout=0.0).train()

    def loss(out):
        logits, pairs = out
        return logits.square().mean() + MISSUDistillLoss()([s for s, _ in pairs], [t for _, t in pairs])

    assert_backends_agree(net, torch.randn(2, 4, 16, 16, 16), "triton", floor=1e-3, loss=loss)


def test_compile_fullgraph_and_bundle_instantiation():
    torch._dynamo.reset()
    net = MISSU(dropout_rate=0.0, init_dropout=0.0)
    eager = copy.deepcopy(net)
    x = torch.randn(1, 4, 16, 16, 16)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")  # no graph breaks, forward and backward
    results = []
    for model, params in ((compiled, net), (eager, eager)):
        logits, pairs = model(x)
        # the students pass through the fusion blocks: their gradients are checked too
        loss = logits.square().mean() + sum(s.square().mean() for s, _ in pairs)
        loss.backward()
        results.append((logits.detach(), [s.detach() for s, _ in pairs], dict(params.named_parameters())))
    (logits, students, named), (logits_e, students_e, named_e) = results
    assert_close("logits", logits, logits_e, torch.float32, scale=10)
    for i, (s, e) in enumerate(zip(students, students_e)):
        assert_close(f"student{i}", s, e, torch.float32, scale=10)
    for name, p in named.items():
        if name in ("pre_head_ln.weight", "pre_head_ln.bias", "linear_encoding.weight", "linear_encoding.bias"):
            assert p.grad is None and named_e[name].grad is None  # unused, as in the release
            continue
        if named_e[name].grad.abs().max() < 1e-6:
            # A conv bias right before a training-mode BatchNorm: its gradient is zero up to rounding (about 1e-8
            # here; every other gradient is above 1e-4), so only its size is compared.
            assert p.grad.abs().max() < 1e-6, name
            continue
        assert_close(f"d{name}", p.grad, named_e[name].grad, torch.float32, scale=10)
    bundle = pytest.importorskip("monai.bundle")
    parser = bundle.ConfigParser({"net": {"_target_": "fastseg3d.networks.MISSU", "in_channels": 2, "out_channels": 3}})
    assert parser.get_parsed_content("net").eval()(torch.randn(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2.0}, "num_heads"),
        ({"in_channels": True}, "in_channels"),
        ({"embedding_dim": -512}, "embedding_dim"),
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"attn_dropout_rate": 1.0}, "attn_dropout_rate"),
        ({"init_dropout": -0.1}, "init_dropout"),
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        MISSU(**kwargs)


def test_encoder_norm_chains_save_only_their_inputs():
    """The encoder's GroupNorm -> ReLU -> conv chains (fastseg3d.nn.recompute.norm_act_conv) save only the norm's
    input: under (emulated CUDA) bf16 autocast 8 bytes per element less than the plain composition (its fp32 copy of
    the input, the fp32 ReLU output and the conv's bf16 input, against the bf16 input; both keep the conv's bf16
    weight, fastseg3d.nn.autocast_weights' copy or autocast's cast); in fp32 the ReLU output. Counted exactly on the
    meta device against fastseg3d.backend("torch")."""
    net = MISSU(fusion=False)
    b, side = 1, 32
    for dtype, per_element in ((torch.bfloat16, 8), (torch.float32, 4)):
        fused = activation_memory(net, (b, 4, side, side, side), dtype)
        with fastseg3d.backend("torch"):
            plain = activation_memory(net, (b, 4, side, side, side), dtype)
        # (channels, chains) per encoder level: EnBlock1, EnBlock2_x, EnBlock3_x, EnBlock4_x, two chains a block
        expected = sum(chains * per_element * b * c * (side >> level) ** 3
                       for level, (c, chains) in enumerate(((16, 2), (32, 4), (64, 4), (128, 8))))
        assert plain["Unet"] - fused["Unet"] == expected
        assert fused["total"] < plain["total"] - expected  # the top BatchNorm and the decoder blocks save less too


def test_training_step_matches_plain_norm_chains():
    """The recomputing norm chains and the split fusion conv against the plain composition (the torch backend),
    in float64: the outputs, every parameter's gradient and the BatchNorm statistics."""
    torch.manual_seed(0)
    net = MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0).double()
    plain = copy.deepcopy(net)
    x = torch.randn(2, 4, 16, 16, 16, dtype=torch.float64)
    results = []
    for model, backend in ((net, "auto"), (plain, "torch")):
        with fastseg3d.backend(backend):
            logits, pairs = model(x)
            loss = logits.square().mean() + sum(s.square().mean() for s, _ in pairs)
            loss.backward()
        results.append((logits.detach(), [s.detach() for s, _ in pairs]))
    assert_close("logits", results[0][0], results[1][0], torch.float64)
    for i, (s, e) in enumerate(zip(results[0][1], results[1][1])):
        assert_close(f"student{i}", s, e, torch.float64)
    for (name, p), p_ref in zip(net.named_parameters(), plain.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
        elif p_ref.grad.abs().max() < 1e-12:  # a conv bias right before a training BatchNorm: zero up to rounding
            assert p.grad.abs().max() < 1e-12, name
        else:
            assert_close(name, p.grad, p_ref.grad, torch.float64)
    for (name, b), b_ref in zip(net.named_buffers(), plain.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), rtol=1e-12, atol=1e-15), name


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MISSU(fusion=False, dropout_rate=0.0, init_dropout=0.0).double().eval()


def _randomise_norm(norm):
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)


def test_encoder_block_is_a_pre_activation_residual(net):
    """TransBTS's EnBlock: GN1 -> ReLU -> conv1 -> GN2 -> ReLU -> conv2, plus the input (norms randomised so that
    using one for the other shows)."""
    torch.manual_seed(1)
    block = net.Unet.EnBlock2_1
    _randomise_norm(block.bn1), _randomise_norm(block.bn2)
    x = torch.randn(2, 32, 6, 4, 5, dtype=torch.float64)
    h = F.conv3d(F.relu(F.group_norm(x, 8, block.bn1.weight, block.bn1.bias, 1e-5)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    h = F.conv3d(F.relu(F.group_norm(h, 8, block.bn2.weight, block.bn2.bias, 1e-5)), block.conv2.weight,
                 block.conv2.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), h + x)


@pytest.mark.parametrize("name,residual", [("Enblock8_1", False), ("Enblock8_2", True), ("DeBlock4", True),
                                           ("DeBlock3", True), ("DeBlock2", True)])
def test_decoder_blocks_match_the_release(net, name, residual):
    """conv1 -> BN1 -> ReLU -> conv2 -> BN2 -> ReLU, plus the input in every block but Enblock8_1 (the release's
    EnBlock1 has no shortcut, its EnBlock2 and DeBlock have one); eval mode, randomised running statistics."""
    torch.manual_seed(2)
    block = getattr(net, name)
    _randomise_norm(block.bn1), _randomise_norm(block.bn2)
    x = torch.randn(1, block.conv1.in_channels, 4, 4, 4, dtype=torch.float64)

    def bn(h, m):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = F.relu(bn(F.conv3d(x, block.conv1.weight, block.conv1.bias, padding=1), block.bn1))
    h = F.relu(bn(F.conv3d(h, block.conv2.weight, block.conv2.bias, padding=1), block.bn2))
    with torch.no_grad():
        torch.testing.assert_close(block(x), h + x if residual else h)


def test_deup_concatenates_the_skip_first(net):
    """DeUp_Cat as released: conv3(cat(skip, deconv(conv1(x)))), the skip in the first half of conv3's inputs."""
    torch.manual_seed(3)
    up = net.DeUp2
    x = torch.randn(1, 32, 4, 4, 4, dtype=torch.float64)
    skip = torch.randn(1, 16, 8, 8, 8, dtype=torch.float64)
    y = F.conv_transpose3d(F.conv3d(x, up.conv1.weight, up.conv1.bias), up.conv2.weight, up.conv2.bias, stride=2)
    expected = F.conv3d(torch.cat((skip, y), dim=1), up.conv3.weight, up.conv3.bias)
    with torch.no_grad():
        torch.testing.assert_close(up(x, skip), expected)


def test_self_attention_matches_explicit_softmax():
    """softmax(q k^T / sqrt(head_dim)) v on the qkv projection's (3, heads, head_dim) split, then proj."""
    torch.manual_seed(4)
    attn = _SelfAttention(32, 2, 0.0, 0.0).double().eval()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    b, n, c = x.shape
    q, k, v = (x @ attn.qkv.weight.T).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1) @ v
    expected = attn.proj(out.transpose(1, 2).reshape(b, n, c))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)


def test_only_the_attention_layers_drop_after_the_branch():
    """The release wraps attention in PreNormDrop (dropout on the branch) and the feed-forward in PreNorm (no
    dropout besides its own two)."""
    net = MISSU(fusion=False, num_layers=2, hidden_dim=64, dropout_rate=0.3)
    for i, layer in enumerate(net.transformer.net):
        if i % 2 == 0:
            assert isinstance(layer.fn.dropout, nn.Dropout) and layer.fn.dropout.p == 0.3, i
        else:
            assert isinstance(layer.fn.dropout, nn.Identity), i


def test_transformer_tokens_become_the_decoder_volume_in_dhw_order(net):
    """The (B, N, C) tokens, N in (D, H, W) order, return to a (B, C, D, H, W) volume by a transpose (not a
    reshape of the token-major memory); a non-cubic grid (2, 2, 3)."""
    seen = {}
    h1 = net.transformer.register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", o))
    h2 = net.Enblock8_1.register_forward_pre_hook(lambda m, a: seen.__setitem__("volume", a[0]))
    try:
        with torch.no_grad():
            net(torch.randn(1, 4, 16, 16, 24, dtype=torch.float64))
    finally:
        h1.remove(), h2.remove()
    tokens, volume = seen["tokens"], seen["volume"]
    assert tokens.shape == (1, 12, 512) and volume.shape == (1, 512, 2, 2, 3)
    for n, (d, h, w) in enumerate((d, h, w) for d in range(2) for h in range(2) for w in range(3)):
        torch.testing.assert_close(volume[0, :, d, h, w], tokens[0, n])


def test_position_embedding_is_resampled_along_its_own_axes(net):
    """The 16^3 learned embedding resampled to a (16, 16, 8) grid: D and H kept, W halved (trilinear,
    align_corners=False, is the mean of voxel pairs 2w and 2w + 1), tokens in (D, H, W) order."""
    torch.manual_seed(5)
    with torch.no_grad():
        net.position_encoding.position_embeddings.normal_()
    pos = net.position_encoding.position_embeddings.detach().view(16, 16, 16, -1)
    expected = (0.5 * (pos[:, :, 0::2] + pos[:, :, 1::2])).reshape(1, 16 * 16 * 8, -1)
    torch.testing.assert_close(net._position_embeddings((16, 16, 8)).detach(), expected)


def test_attention_dropouts_apply_in_training_only():
    """attn_dropout (on the probabilities) and dropout (on the projection's output) act in training only: in eval the
    block is the dropout-free one exactly; in training the probabilities' dropout changes the output and the
    projection's zeroes about that share of it."""
    torch.manual_seed(4)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    attn = _SelfAttention(32, 2, 0.5, 0.0).double()
    plain = _SelfAttention(32, 2, 0.0, 0.0).double()
    plain.load_state_dict(attn.state_dict())
    proj = _SelfAttention(32, 2, 0.0, 0.5).double()
    proj.load_state_dict(attn.state_dict())
    with torch.no_grad():
        expected = plain.eval()(x)
        torch.testing.assert_close(attn.eval()(x), expected)
        torch.testing.assert_close(proj.eval()(x), expected)
        assert not torch.allclose(attn.train()(x), expected)
        dropped = proj.train()(x) == 0
    assert 0.35 < dropped.double().mean().item() < 0.65


def test_position_embedding_dropout_in_training():
    """pe_dropout (dropout_rate) drops the embedded tokens before the transformer in training: each entry is 0 or
    (token + position) / (1 - p); in eval the transformer reads the sum itself."""
    torch.manual_seed(0)
    net = MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.5, init_dropout=0.0, fusion=False).double()
    with torch.no_grad():
        net.position_encoding.position_embeddings.normal_()
    seen = {}
    net.conv_x.register_forward_hook(lambda m, a, o: seen.__setitem__("conv", o))
    net.transformer.register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0]))
    x = torch.randn(1, 4, 16, 16, 16, dtype=torch.float64)
    for mode in ("train", "eval"):
        with torch.no_grad():
            getattr(net, mode)()(x)
            expected = seen["conv"].flatten(2).transpose(1, 2) + net._position_embeddings((2, 2, 2))
        tokens = seen["tokens"]
        if mode == "eval":
            torch.testing.assert_close(tokens, expected)
        else:
            kept = tokens != 0
            assert 0.35 < kept.double().mean().item() < 0.65
            torch.testing.assert_close(tokens[kept], 2 * expected[kept])


def test_fusion_block_dilation_rates_and_size():
    """The dense atrous branches' rates 1, 3 and 5 (receptive fields 3, 7, 9 and 19, as CE-Net's DAC), each padded to
    keep the size; the three blocks of the default build add 447,331 parameters to the released 20,392,388."""
    from fastseg3d.networks.missu import LocalMultiScaleFusion3d

    block = LocalMultiScaleFusion3d(8)
    convs = (block.dilate1, block.dilate2, block.dilate3)
    expected = [((3, 3, 3), (rate,) * 3, (rate,) * 3) for rate in (1, 3, 5)]
    assert [(c.kernel_size, c.dilation, c.padding) for c in convs] == expected
    assert sum(p.numel() for p in MISSU().fusion.parameters()) == 447_331


def test_a_side_of_8_trains_at_batch_1_when_another_is_larger():
    """Only an input with every side 8 leaves one bottleneck voxel: (8, 16, 16) at batch 1 trains (a 1x2x2
    bottleneck, four values per BatchNorm channel)."""
    net = MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0).train()
    logits, pairs = net(torch.randn(1, 4, 8, 16, 16))
    assert logits.shape == (1, 4, 8, 16, 16) and len(pairs) == 3


def test_students_are_the_fusion_blocks_outputs():
    """In training each pair's student is the decoder output of its scale refined by that scale's fusion block
    (DeBlock4 by fusion[0], DeBlock3 by fusion[1], DeBlock2 by fusion[2]), not the raw decoder feature."""
    torch.manual_seed(0)
    net = MISSU(num_layers=1, hidden_dim=64, dropout_rate=0.0, init_dropout=0.0).double().train()
    names, seen = ("DeBlock4", "DeBlock3", "DeBlock2"), {}
    for name in names:
        getattr(net, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        _, pairs = net(torch.randn(2, 4, 16, 16, 16, dtype=torch.float64))
        for (student, _), block, name in zip(pairs, net.fusion, names):
            torch.testing.assert_close(student, block(seen[name]))
