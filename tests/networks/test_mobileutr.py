"""MobileUtr / MobileUtr-L: parameter counts, released keys, equality with a plain-PyTorch build, fused vs reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.networks.mobileutr import MobileUtr, MobileUtrL
from tests.utils import TOLERANCES, assert_backends_agree, assert_close

# ------------------------------------------------------------------------------------------------------
# A plain-PyTorch build of the released Mobile U-ViT architecture (nn.Conv*, explicit softmax attention, the
# released token reshapes), registered under the released attribute names so a state_dict moves with strict=True.


def _conv(nd, *args, **kwargs):
    return (nn.Conv2d if nd == 2 else nn.Conv3d)(*args, **kwargs)


def _nrm(nd, c):
    return nn.BatchNorm2d(c) if nd == 2 else nn.InstanceNorm3d(c)


class _PlainDropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep) / keep


class _PlainResidual(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.fn = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.fn(x)


class _PlainConvUtr(nn.Module):
    def __init__(self, nd, cin, cout, depth, k):
        super().__init__()
        self.block = nn.Sequential(*[nn.Sequential(
            _PlainResidual(_conv(nd, cin, cin, k, padding=k // 2, groups=cin), nn.GELU(), _nrm(nd, cin)),
            _PlainResidual(_conv(nd, cin, 4 * cin, 1), nn.GELU(), _nrm(nd, 4 * cin),
                           _conv(nd, 4 * cin, cin, 1), nn.GELU(), _nrm(nd, cin)),
        ) for _ in range(depth)])
        self.up = nn.Sequential(_conv(nd, cin, cout, 3, padding=1), _nrm(nd, cout), nn.ReLU())

    def forward(self, x):
        return self.up(self.block(x))


class _PlainEmbeddings(nn.Module):
    def __init__(self, nd, cin, dims, depths, kernels):
        super().__init__()
        self.stem = nn.Sequential(_conv(nd, cin, dims[0], 3, padding=1), _nrm(nd, dims[0]), nn.ReLU())
        self.layer1 = _PlainConvUtr(nd, dims[0], dims[0], depths[0], kernels[0])
        self.layer2 = _PlainConvUtr(nd, dims[0], dims[1], depths[1], kernels[1])
        self.layer3 = _PlainConvUtr(nd, dims[1], dims[2], depths[2], kernels[2])


class _PlainCMlp(nn.Module):
    def __init__(self, nd, dim):
        super().__init__()
        self.fc1 = _conv(nd, dim, 4 * dim, 3, padding=1, groups=dim)
        self.fc2 = _conv(nd, 4 * dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _PlainLocalAgg(nn.Module):
    def __init__(self, nd, dim, dp):
        super().__init__()
        self.pos_embed = _conv(nd, dim, dim, 9, padding=4, groups=dim)
        self.norm1 = _nrm(nd, dim)
        self.conv1 = _conv(nd, dim, dim, 1)
        self.conv2 = _conv(nd, dim, dim, 1)
        self.attn = _conv(nd, dim, dim, 9, padding=4, groups=dim)
        self.drop_path = _PlainDropPath(dp)
        self.norm2 = _nrm(nd, dim)
        self.mlp = _PlainCMlp(nd, dim)

    def forward(self, x):
        x = x + x * (torch.sigmoid(self.pos_embed(x)) - 0.5)
        x = x + x * (torch.sigmoid(self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))) - 0.5)
        return x + x * (torch.sigmoid(self.drop_path(self.mlp(self.norm2(x)))) - 0.5)


class _PlainGSA(nn.Module):
    def __init__(self, nd, dim, heads, sr):
        super().__init__()
        self.nd, self.heads, self.sr = nd, heads, sr
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.LocalProp = (nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d)(dim, dim, sr, stride=sr,
                                                                                       groups=dim)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, spatial):
        b, n, c = x.shape
        if self.sr > 1:  # AvgPool(kernel 1, stride sr) as in the release
            pool = F.avg_pool2d if self.nd == 2 else F.avg_pool3d
            x = pool(x.transpose(1, 2).reshape(b, c, *spatial), 1, self.sr).flatten(2).transpose(1, 2)
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, -1, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        if self.sr > 1:
            x = x.permute(0, 2, 1).reshape(b, c, *[s // self.sr for s in spatial])
            x = self.norm(self.LocalProp(x).reshape(b, c, -1).permute(0, 2, 1))
        return self.proj(x)


class _PlainMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _PlainSelfAttn(nn.Module):
    def __init__(self, nd, dim, heads, sr, dp):
        super().__init__()
        self.pos_embed = _conv(nd, dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _PlainGSA(nd, dim, heads, sr)
        self.drop_path = _PlainDropPath(dp)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _PlainMlp(dim)

    def forward(self, x):
        x = x + self.pos_embed(x)
        b, c, *spatial = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x), spatial))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(b, c, *spatial)


class _PlainLGL(nn.Module):
    def __init__(self, nd, dim, heads, sr, dp):
        super().__init__()
        self.LocalAgg = _PlainLocalAgg(nd, dim, dp) if sr > 1 else nn.Identity()
        self.SelfAttn = _PlainSelfAttn(nd, dim, heads, sr, dp)

    def forward(self, x):
        return self.SelfAttn(self.LocalAgg(x))


class _PlainConvBlock(nn.Module):
    def __init__(self, nd, a, b):
        super().__init__()
        self.conv = nn.Sequential(_conv(nd, a, b, 3, padding=1), _nrm(nd, b), nn.ReLU(),
                                  _conv(nd, b, b, 3, padding=1), _nrm(nd, b), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class _PlainUpConv(nn.Module):
    def __init__(self, nd, a, b):
        super().__init__()
        self.nd = nd
        self.up = nn.Sequential(nn.Identity(), _conv(nd, a, b, 3, padding=1), _nrm(nd, b), nn.ReLU())

    def forward(self, x):
        if self.nd == 2:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.up(x)


class PlainMobileUtr(nn.Module):
    def __init__(self, nd, cin, cout, dims=(16, 32, 64, 128), depths=(1, 1, 3, 3, 3), kernels=(3, 3, 7),
                 num_heads=4, drop_path_rate=0.1):
        super().__init__()
        self.nd = nd
        self.patch_embeddings = _PlainEmbeddings(nd, cin, dims, depths, kernels)
        self.lklgl_bottleneck = nn.ModuleList(
            [_PlainLGL(nd, dims[2], num_heads, 2, drop_path_rate) for _ in range(depths[3])])
        self.transformer_bottleneck = nn.ModuleList(
            [_PlainLGL(nd, dims[3], num_heads, 1, 0.0) for _ in range(depths[4])])
        self.expend_dims = _PlainConvBlock(nd, dims[2], dims[3])
        self.reduce_dims = _PlainConvBlock(nd, dims[3], dims[2])
        self.Up_conv4 = _PlainConvBlock(nd, 2 * dims[2], dims[2])
        self.Up3 = _PlainUpConv(nd, dims[2], dims[1])
        self.Up_conv3 = _PlainConvBlock(nd, 2 * dims[1], dims[1])
        self.Up2 = _PlainUpConv(nd, dims[1], dims[0])
        self.Up_conv2 = _PlainConvBlock(nd, 2 * dims[0], dims[0])
        self.Up1 = _PlainUpConv(nd, dims[0], dims[0])
        self.head = _conv(nd, dims[0], cout, 1)

    def forward(self, x):
        pool = F.max_pool2d if self.nd == 2 else F.max_pool3d
        e = self.patch_embeddings
        x0 = e.layer1(e.stem(x))
        x1 = e.layer2(pool(x0, 2))
        x2 = e.layer3(pool(x1, 2))
        x = pool(x2, 2)
        for blk in self.lklgl_bottleneck:
            x = blk(x)
        x = self.expend_dims(x)
        for blk in self.transformer_bottleneck:
            x = blk(x)
        x = self.reduce_dims(x)
        x = self.Up_conv4(torch.cat((x, pool(x2, 2)), 1))
        x = self.Up_conv3(torch.cat((self.Up3(x), pool(x1, 2)), 1))
        x = self.Up_conv2(torch.cat((self.Up2(x), pool(x0, 2)), 1))
        return self.head(self.Up1(x))


_LARGE = dict(dims=(32, 64, 128, 256), depths=(1, 1, 3, 3, 4), num_heads=8)
# A reduced-width config of the same classes (head dims 16, fused) for the expensive tiers.
_TINY = dict(dims=(8, 16, 32, 32), depths=(1, 1, 1, 1, 1), num_heads=2)


def _build(cls, nd, cin, cout, **cfg):
    ours = cls(spatial_dims=nd, in_channels=cin, out_channels=cout, **cfg)
    plain_cfg = {**(_LARGE if cls is MobileUtrL else {}), **cfg}
    plain = PlainMobileUtr(nd, cin, cout, **plain_cfg)
    plain.load_state_dict(ours.state_dict(), strict=True)
    return ours, plain


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize(
    "cls,nd,cin,cout,expected",
    [
        (MobileUtr, 2, 3, 1, 1_390_305),
        (MobileUtrL, 2, 3, 1, 6_209_217),
        (MobileUtr, 3, 1, 14, 2_758_270),
        (MobileUtrL, 3, 1, 14, 11_060_206),
    ],
    ids=["2d-base", "2d-large", "3d-base", "3d-large"],
)
def test_released_parameter_counts_and_keys(cls, nd, cin, cout, expected):
    ours, plain = _build(cls, nd, cin, cout)
    assert _n_params(ours) == expected
    assert _n_params(plain) == expected
    sd, sd_plain = ours.state_dict(), plain.state_dict()
    assert list(sd) == list(sd_plain)
    assert all(sd[k].shape == sd_plain[k].shape for k in sd)
    # Defaults per spatial_dims are the release's.
    assert _n_params(cls(spatial_dims=nd)) == expected


def test_released_key_names_and_shapes_2d():
    sd = MobileUtr(spatial_dims=2).state_dict()
    expected = {
        "patch_embeddings.stem.0.weight": (16, 3, 3, 3),
        "patch_embeddings.layer3.block.0.0.fn.0.weight": (32, 1, 7, 7),
        "patch_embeddings.layer3.block.0.1.fn.0.weight": (128, 32, 1, 1),
        "patch_embeddings.layer3.block.0.1.fn.3.weight": (32, 128, 1, 1),
        "patch_embeddings.layer3.up.0.weight": (64, 32, 3, 3),
        "lklgl_bottleneck.0.LocalAgg.pos_embed.weight": (64, 1, 9, 9),
        "lklgl_bottleneck.0.LocalAgg.conv1.weight": (64, 64, 1, 1),
        "lklgl_bottleneck.0.LocalAgg.attn.weight": (64, 1, 9, 9),
        "lklgl_bottleneck.0.LocalAgg.mlp.fc1.weight": (256, 1, 3, 3),
        "lklgl_bottleneck.0.LocalAgg.mlp.fc2.weight": (64, 4, 3, 3),
        "lklgl_bottleneck.2.SelfAttn.pos_embed.weight": (64, 1, 3, 3),
        "lklgl_bottleneck.0.SelfAttn.attn.qkv.weight": (192, 64),
        "lklgl_bottleneck.0.SelfAttn.attn.LocalProp.weight": (64, 1, 2, 2),
        "lklgl_bottleneck.0.SelfAttn.attn.norm.weight": (64,),
        "lklgl_bottleneck.0.SelfAttn.mlp.fc1.weight": (256, 64),
        "transformer_bottleneck.0.SelfAttn.attn.qkv.weight": (384, 128),
        "expend_dims.conv.4.running_var": (128,),
        "Up_conv4.conv.0.weight": (64, 128, 3, 3),
        "Up3.up.1.weight": (32, 64, 3, 3),
        "Up1.up.2.weight": (16,),
        "head.weight": (1, 16, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("transformer_bottleneck.0.LocalAgg") for k in sd)
    assert "lklgl_bottleneck.3.SelfAttn.pos_embed.weight" not in sd
    assert "transformer_bottleneck.2.SelfAttn.norm2.weight" in sd
    assert "patch_embeddings.layer1.block.0.0.fn.2.num_batches_tracked" in sd
    # Module-level split of the release (seeds.md 2.5).
    net = MobileUtr(spatial_dims=2)
    split = {name: _n_params(m) for name, m in net.named_children()}
    assert split["patch_embeddings"] == 62_128
    assert split["lklgl_bottleneck"] == 225_216
    assert split["transformer_bottleneck"] == 598_656
    assert split["expend_dims"] == 221_952 and split["Up1"] == 2_352 and split["head"] == 17


def test_released_key_names_and_shapes_3d():
    sd = MobileUtrL(spatial_dims=3).state_dict()
    assert tuple(sd["patch_embeddings.stem.0.weight"].shape) == (32, 1, 3, 3, 3)
    assert tuple(sd["patch_embeddings.layer3.block.2.0.fn.0.weight"].shape) == (64, 1, 7, 7, 7)
    assert tuple(sd["lklgl_bottleneck.1.LocalAgg.pos_embed.weight"].shape) == (128, 1, 9, 9, 9)
    assert tuple(sd["lklgl_bottleneck.1.SelfAttn.attn.LocalProp.weight"].shape) == (128, 1, 2, 2, 2)
    assert tuple(sd["transformer_bottleneck.3.SelfAttn.attn.qkv.weight"].shape) == (768, 256)
    assert tuple(sd["head.weight"].shape) == (14, 32, 1, 1, 1)
    # InstanceNorm3d without affine parameters: no norm keys at all.
    assert "patch_embeddings.stem.1.weight" not in sd and "expend_dims.conv.1.running_mean" not in sd
    assert "patch_embeddings.layer1.block.0.1.fn.3.weight" in sd and "expend_dims.conv.3.weight" in sd


def _randomise_batchnorm(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(
    "cls,shape,mode",
    [
        (MobileUtr, (2, 3, 64, 64), "train"),
        (MobileUtr, (2, 3, 32, 48), "eval"),
        (MobileUtrL, (2, 3, 32, 32), "train"),
        (MobileUtr, (2, 1, 16, 16, 16), "train"),
        (MobileUtr, (1, 1, 16, 32, 16), "eval"),
    ],
    ids=["2d-64-train", "2d-32x48-eval", "2d-large-train", "3d-16-train", "3d-16x32x16-eval"],
)
def test_matches_plain_build(cls, shape, mode):
    nd = len(shape) - 2
    cout = 1 if nd == 2 else 14
    ours, plain = _build(cls, nd, shape[1], cout)
    ours, plain = ours.double(), plain.double()
    if mode == "eval" and nd == 2:
        _randomise_batchnorm(ours)
        plain.load_state_dict(ours.state_dict(), strict=True)
    getattr(ours, mode)()
    getattr(plain, mode)()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    # Same seed: in training the LGL blocks' stochastic depth draws the same masks in the same order.
    torch.manual_seed(1)
    with fastseg3d.backend("torch"):
        y = ours(x)
    torch.manual_seed(1)
    y_ref = plain(x2)
    assert y.shape == (shape[0], cout, *shape[2:])
    assert_close("logits", y, y_ref, torch.float64, scale=1e3)
    g = torch.randn_like(y)
    with fastseg3d.backend("torch"):
        y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x.grad, x2.grad, torch.float64, scale=1e3)
    named_ref = dict(plain.named_parameters())
    for name in ("patch_embeddings.layer1.block.0.0.fn.0.weight", "patch_embeddings.layer3.block.0.0.fn.0.bias",
                 "lklgl_bottleneck.0.LocalAgg.pos_embed.weight", "lklgl_bottleneck.0.LocalAgg.attn.bias",
                 "lklgl_bottleneck.0.SelfAttn.pos_embed.weight", "lklgl_bottleneck.0.SelfAttn.attn.qkv.weight",
                 "lklgl_bottleneck.0.SelfAttn.attn.LocalProp.weight", "transformer_bottleneck.0.SelfAttn.attn.qkv.bias",
                 "head.weight"):
        p = ours.get_parameter(name)
        assert_close(f"d{name}", p.grad, named_ref[name].grad, torch.float64, scale=1e3)


def test_grey_input_repeated_in_2d():
    net = MobileUtr(spatial_dims=2).eval()
    x = torch.randn(1, 1, 32, 32)
    assert_close("logits", net(x), net(x.repeat(1, 3, 1, 1)), torch.float32)


def test_eval_returns_one_tensor_for_sliding_window_inference():
    inferers = pytest.importorskip("monai.inferers")
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=3, **_TINY).eval()
    with torch.no_grad():
        out = inferers.sliding_window_inference(torch.randn(1, 1, 20, 16, 16), (16, 16, 16), 2, net, overlap=0.25)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 20, 16, 16)
    net.train()
    y = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 16, 16, 16)


def test_convert_and_revert_model_keep_keys_and_outputs():
    # the network keeps the released nn.Conv3d modules (its blocks call the fused op on their weights):
    # convert_model swaps its depthwise convs for fastseg3d's layer and revert_model swaps them back, with the same
    # keys and outputs either way
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=3, **_TINY).double().eval()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    expected = net(x)
    keys = list(net.state_dict())
    assert not any(isinstance(m, fastseg3d.nn.DepthwiseConv3d) for m in net.modules())
    fastseg3d.convert_model(net)
    assert sum(isinstance(m, fastseg3d.nn.DepthwiseConv3d) for m in net.modules()) == 7  # the tiny build's
    assert list(net.state_dict()) == keys
    assert_close("converted", net(x), expected, torch.float64)
    fastseg3d.revert_model(net)
    assert not any(isinstance(m, fastseg3d.nn.DepthwiseConv3d) for m in net.modules())
    assert list(net.state_dict()) == keys
    assert_close("reverted", net(x), expected, torch.float64)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_compile_fullgraph_train_step(spatial_dims):
    # aot_eager: the whole forward and backward captured as one graph (no graph breaks) without inductor's C++
    # code generation, which costs minutes on a cold cache on a 2-core CPU. The GPU tier compiles with inductor.
    # In 3-D the ConvUtr MLP's recompute (an autograd.Function) is captured too.
    torch._dynamo.reset()
    in_channels = 3 if spatial_dims == 2 else 1
    net = MobileUtr(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, **_TINY, drop_path_rate=0.0)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, in_channels, *(32,) * spatial_dims)
    y = compiled(x)
    assert_close("logits", y, net(x), torch.float32, scale=10)
    y.square().mean().backward()
    assert net.lklgl_bottleneck[0].LocalAgg.pos_embed.weight.grad is not None
    assert net.patch_embeddings.layer1.block[0][0].fn[0].weight.grad is not None
    assert net.patch_embeddings.layer1.block[0][1].fn[3].weight.grad is not None


@pytest.mark.parametrize("cls", [MobileUtr, MobileUtrL])
def test_meta_device_forward_backward_at_96(cls):
    with torch.device("meta"):
        net = cls(spatial_dims=3, in_channels=1, out_channels=14)
        x = torch.randn(2, 1, 96, 96, 96)
    y = net(x)
    assert y.shape == (2, 14, 96, 96, 96) and y.device.type == "meta"
    assert net(x.new_empty(1, 1, 96, 64, 32)).shape == (1, 14, 96, 64, 32)
    y.sum().backward()
    assert net.lklgl_bottleneck[0].SelfAttn.attn.qkv.weight.grad.device.type == "meta"
    assert net.patch_embeddings.layer3.block[0][0].fn[0].weight.grad.shape == net.patch_embeddings.layer3.block[
        0][0].fn[0].weight.shape


def test_hooks_anywhere_in_a_convutr_run():
    """A hook on any module of a ConvUtr (a container the fused path steps past, a GELU it calls by name, a conv
    whose weight it reads) sends the layer through its modules, so the hook runs, and the output is the same."""
    torch.manual_seed(0)
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=2, dims=(4, 8, 16, 16), depths=(1, 1, 1, 0, 1),
                    kernels=(3, 3, 3), num_heads=1, drop_path_rate=0.0)
    x = torch.randn(1, 1, 8, 16, 16)
    y = net(x)
    utr = net.patch_embeddings.layer1
    layer = utr.block[0]
    mlp = layer[1].fn
    modules = (mlp[1], mlp[4], mlp[3], mlp, layer[1], layer[0].fn[1], layer, utr.block, utr.up, utr.up[0])
    for module in modules:
        calls = []
        handle = module.register_forward_hook(lambda m, a, o: calls.append(m))
        assert torch.allclose(net(x), y, atol=1e-6) and calls == [module], module
        handle.remove()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_backward_rebuilds_no_views(backend):
    """No in-place op on a view (the released ReLU(inplace=True) after InstanceNorm3d, whose output is a view): its
    backward would rebuild the base's gradient with five input-sized writes per ReLU. With the fused kernels (on
    meta tensors, as on CUDA) the norms and their ReLUs are one op; with the references they are ATen's."""
    from fastseg3d.profile import write_traffic

    with fastseg3d.backend(backend):
        traffic = write_traffic(MobileUtr(spatial_dims=3, in_channels=1, out_channels=14), (2, 1, 96, 96, 96),
                                torch.bfloat16)
    names = list(traffic["backward"]["by_op"])
    expected = "ReluBackward0" if backend == "torch" else "fastseg3d::group_norm_act_backward"
    assert any(expected in name for name in names), names
    assert not any("CopySlices" in name or "AsStrided" in name for name in names), names


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: MobileUtr(spatial_dims=1), "spatial_dims"),
        (lambda: MobileUtr(spatial_dims=3, in_channels=0), "in_channels"),
        (lambda: MobileUtr(dims=(16, 32, 64)), "dims"),
        (lambda: MobileUtr(dims=16), "dims must be 4 ints"),
        (lambda: MobileUtr(kernels=3), "kernels must be"),
        (lambda: MobileUtr(depths=(1, 1, 3, 3)), "depths"),
        (lambda: MobileUtr(kernels=(3, 4, 7)), "odd"),
        (lambda: MobileUtr(num_heads=3), "divisible by num_heads"),
        # dims[2] (the LGL width) alone not divisible: its attention would split 40 channels into 16 heads
        (lambda: MobileUtr(dims=(16, 32, 40, 64), num_heads=16), "divisible by num_heads"),
        (lambda: MobileUtr(drop_path_rate=1.0), "drop_path_rate"),
        (lambda: MobileUtr(drop_path_rate="0.1"), "drop_path_rate"),
        (lambda: MobileUtr(mlp_ratio=2.5), "multiple of dims\\[2\\]"),
        (lambda: MobileUtr(spatial_dims=3, mlp_ratio=0.01), "empty MLP"),
        (lambda: MobileUtr(mlp_ratio="4"), "mlp_ratio must be a positive number"),
        (lambda: MobileUtr(mlp_ratio=float("inf")), "mlp_ratio must be a positive number"),
        (lambda: MobileUtr(**_TINY)(torch.randn(1, 1, 16, 0, 16)), "dimension 1 \\(size 0\\).*positive multiple"),
        (lambda: MobileUtr(spatial_dims=2, **_TINY)(torch.randn(1, 3, 0, 16)), "dimension 0 \\(size 0\\)"),
        # a one-voxel bottleneck (total stride 8 without the LGL blocks): InstanceNorm's error 14 frames deep, and
        # in eval too
        (lambda: MobileUtr(**{**_TINY, "depths": (1, 1, 1, 0, 1)}).eval()(torch.randn(1, 1, 8, 8, 8)),
         "one-voxel bottleneck"),
        (lambda: MobileUtr(**_TINY)(torch.randn(1, 1, 16, 24, 16)), "dimension 1 \\(size 24\\).*total stride 16"),
        (lambda: MobileUtr(**_TINY)(torch.randn(1, 1, 16, 16, 8)), "dimension 2 \\(size 8\\)"),
        (lambda: MobileUtr(**_TINY)(torch.randn(1, 2, 16, 16, 16)), "in_channels=1"),
        (lambda: MobileUtr(spatial_dims=2, **_TINY)(torch.randn(1, 2, 16, 16)), "in_channels=3"),
        (lambda: MobileUtr(**_TINY)(torch.randn(1, 16, 16, 16)), "5-D"),
        (lambda: MobileUtr(spatial_dims=2, **_TINY)(torch.randn(1, 3, 16, 16, 16)), "4-D"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_total_stride():
    assert MobileUtr().total_stride == 16
    assert MobileUtr(sr_ratio=4).total_stride == 32
    assert MobileUtr(depths=(1, 1, 1, 0, 1)).total_stride == 8


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the network on the fused kernels against the reference backend.
# The interpreter costs ~5 ms per (program, kernel tap): the released 3-D base at 16^3 runs its 9^3 LocalAgg convs
# as 64 programs x 729 taps each (minutes per conv), so this tier runs a reduced-width 2-D config of the same class
# (its depthwise convs go through the same 3-D kernels with depth-1 taps; head_dim 16 keeps attention fused). The
# released 3-D sizes are the GPU tier's.

_MICRO = dict(dims=(4, 8, 16, 16), depths=(1, 1, 1, 1, 1), num_heads=1)


@pytest.mark.interpret
def test_interpret_fused_network_matches_reference(poison):
    torch.manual_seed(0)
    net = MobileUtr(spatial_dims=2, in_channels=1, out_channels=2, **_MICRO).train()
    # a conv bias ahead of a norm gets a gradient of zero up to rounding: errors are measured against the largest
    assert_backends_agree(net, torch.randn(1, 1, 16, 16), "triton", floor=1e-3)


@pytest.mark.interpret
def test_interpret_3d_norm_chains_on_the_fused_kernel(monkeypatch, poison):
    """The 3-D network's InstanceNorm chains (ConvUtr's GELU -> norm -> 1x1 conv and GELU -> norm, the stem's and
    decoder's norm -> ReLU (-> conv)) on the fused GroupNorm kernels, every other op on its reference (the
    interpreter's depthwise convs would take minutes), against the reference backend."""
    from fastseg3d import backends

    select, chosen = backends.select, []
    monkeypatch.setattr(backends, "select", lambda op, reasons, device=None: (
        chosen.append(op) or True) if op == "group_norm_act" else select(op, reasons, device))
    torch.manual_seed(0)
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=2, dims=(4, 8, 16, 16), depths=(1, 1, 1, 0, 1),
                    kernels=(3, 3, 3), num_heads=1).train()
    # a conv bias ahead of an InstanceNorm has a gradient of zero up to rounding (1e-7 where others reach 1e-3):
    # errors are measured against a hundredth of the largest gradient
    assert_backends_agree(net, torch.randn(1, 1, 8, 16, 16), "auto", floor=1e-2)
    assert len(chosen) == 23  # stem 1, ConvUtr 3 x 3, conv blocks 5 x 2, up-convs 3


# ------------------------------------------------------------------------------------------------------
# GPU tier (not run here: no GPU in this environment)


@pytest.mark.timeout(480)  # a network's ~70-90 Triton specialisations compile one after another in one worker
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_3d_base_matches_reference(no_tf32, dtype):
    """The logits against the reference backend's; the gradients against a float64 run, no further from it than
    the reference backend's own (times two, plus the tolerance): the network's ReLUs and max-pools turn rounding
    differences between two correct fp32 runs into gradient jumps (half an ulp per layer moves dx by 6e-4 RMS, 7x
    the tolerance), so fused and reference gradients are not compared with each other. Under bf16 autocast the
    input gradient is noise against float64 on either backend (0.99 RMS): finite, and no worse than the
    reference's."""
    # fp32 convs on both sides: TF32 ones would turn fp32 rounding differences into errors above the tolerance
    torch.manual_seed(0)
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=14).cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    runs = []
    for backend, model, run_dtype in (("triton", net, dtype), ("torch", net, dtype),
                                      ("torch", copy.deepcopy(net).double(), torch.float64)):
        xi = x.clone().to(torch.float64 if run_dtype == torch.float64 else torch.float32).requires_grad_()
        model.zero_grad()
        with fastseg3d.backend(backend), torch.autocast("cuda", dtype=dtype, enabled=run_dtype in (
                torch.bfloat16, torch.float16)):
            y = model(xi)
        (y if y.dtype == torch.float64 else y.float()).square().mean().backward()
        runs.append((y.detach(), xi.grad, model.lklgl_bottleneck[0].LocalAgg.pos_embed.weight.grad.clone()))
    (y, *grads), (y_ref, *grads_ref), (_, *grads64) = runs
    assert_close("logits", y.float(), y_ref.float(), dtype, scale=10)

    def rel_rms(a, e):
        a, e = a.double(), e.double()
        return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item()

    for name, g, g_ref, g64 in zip(("dx", "dpos_embed"), grads, grads_ref, grads64):
        assert torch.isfinite(g).all(), name
        fused, reference = rel_rms(g, g64), rel_rms(g_ref, g64)
        assert fused <= 2 * reference + 10 * TOLERANCES[dtype][0], (name, fused, reference)


def test_monai_bundle_instantiation():
    bundle = pytest.importorskip("monai.bundle")
    parser = bundle.ConfigParser({"net": {"_target_": "fastseg3d.networks.MobileUtr", "spatial_dims": 3,
                                          "in_channels": 1, "out_channels": 2}})
    net = parser.get_parsed_content("net")
    assert isinstance(net, MobileUtr)
    assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_hooks_on_fused_depthwise_convs_fire():
    """The position-encoding and attention depthwise convs run fused from their weights: a hook on one is called
    (and what it returns is used), as for any layer."""
    torch.manual_seed(0)
    net = MobileUtr(3, 1, 3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    expected = net(x)
    block = net.lklgl_bottleneck[0]
    fired = []
    block.SelfAttn.pos_embed.register_forward_hook(lambda m, i, o: fired.append("pos"))
    block.LocalAgg.attn.register_forward_hook(lambda m, i, o: fired.append("attn"))
    torch.testing.assert_close(net(x), expected)
    assert sorted(fired) == ["attn", "pos"]
    block.SelfAttn.pos_embed.register_forward_hook(lambda m, i, o: o * 0)
    assert not torch.allclose(net(x), expected)


def test_depthwise_conv_subclass_runs_as_called():
    """A depthwise conv replaced by a subclass with its own forward (a computed weight) is called, not read for its
    weight: the network then equals one whose conv holds that computed weight."""

    class Doubled(torch.nn.Conv3d):
        def forward(self, x):
            return self._conv_forward(x, 2.0 * self.weight, self.bias)

    torch.manual_seed(0)
    net = MobileUtr(3, 1, 3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    block = net.lklgl_bottleneck[0]
    old = block.SelfAttn.pos_embed
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.lklgl_bottleneck[0].SelfAttn.pos_embed.weight.mul_(2.0)
    new = Doubled(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, groups=old.groups)
    new.load_state_dict(old.state_dict())
    block.SelfAttn.pos_embed = new
    torch.testing.assert_close(net(x), twin(x))


@pytest.mark.parametrize("mlp_ratio", [2, 3.0])
def test_mlp_ratio_sets_every_block_mlp_width(mlp_ratio):
    dims = (8, 16, 32, 48)
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=2, dims=dims, depths=(1, 1, 1, 1, 1),
                    num_heads=2, mlp_ratio=mlp_ratio)
    for blocks, dim in ((net.lklgl_bottleneck, dims[2]), (net.transformer_bottleneck, dims[3])):
        for block in blocks:
            mlp = block.SelfAttn.mlp
            assert (mlp.fc1.in_features, mlp.fc1.out_features) == (dim, int(dim * mlp_ratio))
            assert (mlp.fc2.in_features, mlp.fc2.out_features) == (int(dim * mlp_ratio), dim)
    local = net.lklgl_bottleneck[0].LocalAgg.mlp  # grouped 3x3 convs dim -> int(dim * mlp_ratio) -> dim
    assert (local.fc1.out_channels, local.fc2.in_channels) == (int(dims[2] * mlp_ratio),) * 2
    assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("kwargs", [{"depths": (1, 1, 1, 0, 1)}, {"sr_ratio": 1}], ids=["no-lgl-blocks", "sr-1"])
def test_mlp_ratio_width_check_only_where_the_grouped_mlp_is_built(kwargs):
    """The multiple-of-dims[2] rule is LocalAgg's (a conv grouped by dims[2]): without LGL blocks, or with sr_ratio 1
    (no LocalAgg), a ratio such as 2.5 builds and runs."""
    net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=2, dims=(8, 16, 32, 32), num_heads=2, mlp_ratio=2.5,
                    **{"depths": (1, 1, 1, 1, 1), **kwargs})
    assert all(isinstance(block.LocalAgg, nn.Identity) for block in net.lklgl_bottleneck)
    assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
