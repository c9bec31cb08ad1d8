"""SegFormer3D as the published code composes it (an NCDHW copy before the spatial reduction, the 2024 release's
explicit softmax or the current release's SDPA), in plain ``torch.nn`` layers.

The oracle for :class:`fastseg3d.networks.SegFormer3D` (same ``state_dict`` keys) and the "plain" peer of the model
benchmark. It takes explicit (D, H, W) grids instead of the official cube-root, so non-cubic inputs work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegFormer3DRef"]




class _PlainAttention(nn.Module):
    def __init__(self, dim, heads, sr, scale):
        super().__init__()
        self.heads, self.sr_ratio, self.scale = heads, sr, scale
        self.sdpa = False
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(0.0)
        if sr > 1:
            self.sr = nn.Conv3d(dim, dim, sr, sr)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x, dhw):
        b, n, c = x.shape
        d = c // self.heads
        q = self.query(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3).contiguous()
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(b, c, *dhw).contiguous()
            x_ = self.sr_norm(self.sr(x_).reshape(b, c, -1).permute(0, 2, 1).contiguous())
        else:
            x_ = x
        kv = self.key_value(x_).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0].contiguous(), kv[1].contiguous()
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q @ k.transpose(-2, -1)) * (self.scale or d**-0.5)).softmax(-1) @ v
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class _PlainDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, 3, 1, 1, bias=True, groups=dim)
        self.bn = nn.BatchNorm3d(dim)

    def forward(self, x, dhw):
        # as released: views both ways (the conv takes the tokens as a channels-last volume), no copies
        b, n, c = x.shape
        x = x.transpose(1, 2).view(b, c, *dhw)
        return self.bn(self.dwconv(x)).flatten(2).transpose(1, 2)


class _PlainMLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.dwconv = _PlainDWConv(ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x, dhw):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), dhw)))


class _PlainBlock(nn.Module):
    def __init__(self, dim, heads, sr, ratio, scale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = _PlainAttention(dim, heads, sr, scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _PlainMLP(dim, ratio)

    def forward(self, x, dhw):
        x = x + self.attention(self.norm1(x), dhw)
        return x + self.mlp(self.norm2(x), dhw)


class _PlainEmbed(nn.Module):
    def __init__(self, cin, dim, k, s, p):
        super().__init__()
        self.patch_embeddings = nn.Conv3d(cin, dim, k, s, p)
        self.norm = nn.LayerNorm(dim)


class _PlainEncoder(nn.Module):
    def __init__(self, cin, dims, depths, heads, srs, ratio, ks, ss, ps, scales):
        super().__init__()
        for i in range(4):
            setattr(self, f"embed_{i + 1}", _PlainEmbed(cin if i == 0 else dims[i - 1], dims[i], ks[i], ss[i], ps[i]))
            setattr(self, f"tf_block{i + 1}", nn.ModuleList(
                [_PlainBlock(dims[i], heads[i], srs[i], ratio, scales[i]) for _ in range(depths[i])]))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i]))

    def forward(self, x):
        out = []
        for i in range(1, 5):
            embed = getattr(self, f"embed_{i}")
            y = embed.patch_embeddings(x)
            dhw = y.shape[2:]
            t = embed.norm(y.flatten(2).transpose(1, 2))
            for blk in getattr(self, f"tf_block{i}"):
                t = blk(t, dhw)
            t = getattr(self, f"norm{i}")(t)
            x = t.reshape(t.shape[0], *dhw, -1).permute(0, 4, 1, 2, 3).contiguous()
            out.append(x)
        return out


class _PlainMLP_(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Linear(cin, dim)
        self.bn = nn.LayerNorm(dim)


class _PlainDecoder(nn.Module):
    def __init__(self, dims, dim, classes, upsample=4.0):
        super().__init__()
        self.upsample = upsample
        for i in range(4):
            setattr(self, f"linear_c{i + 1}", _PlainMLP_(dims[i], dim))
        self.linear_fuse = nn.Sequential(nn.Conv3d(4 * dim, dim, 1, bias=False), nn.BatchNorm3d(dim), nn.ReLU())
        self.linear_pred = nn.Conv3d(dim, classes, 1)

    def forward(self, c1, c2, c3, c4):
        maps = []
        for i, c in ((4, c4), (3, c3), (2, c2), (1, c1)):
            mlp = getattr(self, f"linear_c{i}")
            m = mlp.bn(mlp.proj(c.flatten(2).transpose(1, 2))).permute(0, 2, 1).reshape(c.shape[0], -1, *c.shape[2:])
            maps.append(F.interpolate(m, size=c1.shape[2:], mode="trilinear", align_corners=False))
        x = self.linear_pred(self.linear_fuse(torch.cat(maps, 1)))
        return F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=False)


class SegFormer3DRef(nn.Module):
    """The published SegFormer3D in plain layers; ``scales`` overrides the attention scale per stage.

    ``patch_kernel_size``, ``patch_stride`` and ``patch_padding`` give each stage's patch embedding (an int or a
    (D, H, W) tuple, as ``nn.Conv3d`` takes them); the published model is the default, and the output upsampling
    undoes the first stage's stride. The attention core is the 2024 release's explicit softmax (its probabilities
    saved for backward, the activation-memory reference of about 1.4 GiB at 128³, batch 2); ``sdpa=True`` runs the
    current release's ``F.scaled_dot_product_attention`` instead (on a GPU its flash or memory-efficient kernels,
    no N x M tensor), the stronger peer the model benchmark measures.
    """

    def __init__(self, in_channels=4, out_channels=3, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2),
                 num_heads=(1, 2, 5, 8), sr_ratios=(4, 2, 1, 1), mlp_ratio=4, decoder_dim=256, scales=(None,) * 4,
                 patch_kernel_size=(7, 3, 3, 3), patch_stride=(4, 2, 2, 2), patch_padding=(3, 1, 1, 1), sdpa=False):
        super().__init__()
        self.segformer_encoder = _PlainEncoder(in_channels, embed_dims, depths, num_heads, sr_ratios, mlp_ratio,
                                               patch_kernel_size, patch_stride, patch_padding, scales)
        first = patch_stride[0]
        upsample = float(first) if isinstance(first, int) else tuple(float(s) for s in first)
        self.segformer_decoder = _PlainDecoder(embed_dims, decoder_dim, out_channels, upsample)
        for module in self.modules():
            if isinstance(module, _PlainAttention):
                module.sdpa = sdpa

    def forward(self, x):
        return self.segformer_decoder(*self.segformer_encoder(x))
