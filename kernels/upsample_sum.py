"""Triton kernel of a sum of trilinear resizes: ``y = sum_i interpolate(x_i, size)``, written once.

``interpolate`` is ``F.interpolate(mode="trilinear", align_corners=False)`` without a scale factor (the source
coordinate of output index o along an axis of input size n and output size m is ``max((o + 0.5) * n / m - 0.5, 0)``,
its two neighbours and weights as ATen's CUDA kernel takes them); an input already at ``size`` is added as it is.
SegFormer3D's decoder sums its four 256-channel maps this way: plainly each resize and each add writes a
full-resolution tensor (fp32 under autocast), six writes where this makes one.

Every input and the output are contiguous in one layout (NCDHW or ``channels_last_3d``; strides follow from the
shapes). A program owns a [BLOCK_V, BLOCK_C] tile of the output of one batch element: a run of output voxels and a
few channels on NCDHW, up to 64 channels of a short run of voxels on channels-last, so the output's stores and the
inputs' gathers stay coalesced along the unit-stride axis. Up to four inputs, each with its own size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg3d.kernels.utils import cdiv, f32, next_power_of_2, wrap

__all__ = ["MAX_INPUTS", "upsample_sum"]

MAX_INPUTS = 4
_INT32_MAX = 2**31 - 1
_MAX_BLOCK_C = 64
_WARPS = 4


@triton.jit
def _source(o, n, scale):
    """(i0, i1, weight of i1) along one axis for output indices ``o``, as ATen's upsample_trilinear3d computes them."""
    real = tl.maximum(scale * (o.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = real.to(tl.int32)  # truncation is the floor: real >= 0
    return i0, tl.where(i0 < n - 1, i0 + 1, i0), real - i0.to(tl.float32)


@triton.jit
def _voxel(d, h, w, D, H, W, C, CL: tl.constexpr):
    """The element offset of voxel (d, h, w) of channel 0 in a (C, D, H, W) volume of the given layout."""
    if CL:
        off = ((d * H + h) * W + w) * C
    else:
        off = (d * H + h) * W + w
    return off


@triton.jit
def _add_input(acc, x_ptr, b, ch, mask, od, oh, ow, OD, OH, OW, C, D, H, W, sd, sh, sw,
               SAME: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr):
    """``acc`` plus input ``x`` resized to the output's voxels (od, oh, ow) for channels ``ch``."""
    if INT64:  # tl.cast: a size of 1 arrives as a constant, which has no .to
        D, H, W = tl.cast(D, tl.int64), tl.cast(H, tl.int64), tl.cast(W, tl.int64)
    if CL:
        base = x_ptr + b * (D * H * W * C) + ch[None, :]
    else:
        base = x_ptr + b * (D * H * W * C) + ch[None, :] * (D * H * W)
    if SAME:
        v = tl.load(base + _voxel(od, oh, ow, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        out = acc + v
    else:
        d0, d1, ld = _source(od, D, sd)
        h0, h1, lh = _source(oh, H, sh)
        w0, w1, lw = _source(ow, W, sw)
        if INT64:
            d0, d1, h0, h1, w0, w1 = d0.to(tl.int64), d1.to(tl.int64), h0.to(tl.int64), h1.to(tl.int64), \
                w0.to(tl.int64), w1.to(tl.int64)
        ld, lh, lw = ld[:, None], lh[:, None], lw[:, None]
        kd, kh, kw = 1.0 - ld, 1.0 - lh, 1.0 - lw
        # ATen's order: depth, then height, then width weights outermost to innermost
        x000 = tl.load(base + _voxel(d0, h0, w0, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x001 = tl.load(base + _voxel(d0, h0, w1, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x010 = tl.load(base + _voxel(d0, h1, w0, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x011 = tl.load(base + _voxel(d0, h1, w1, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x100 = tl.load(base + _voxel(d1, h0, w0, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x101 = tl.load(base + _voxel(d1, h0, w1, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x110 = tl.load(base + _voxel(d1, h1, w0, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        x111 = tl.load(base + _voxel(d1, h1, w1, D, H, W, C, CL)[:, None], mask=mask, other=0.0).to(tl.float32)
        v = (kd * (kh * (kw * x000 + lw * x001) + lh * (kw * x010 + lw * x011))
             + ld * (kh * (kw * x100 + lw * x101) + lh * (kw * x110 + lw * x111)))
        out = acc + v
    return out


@triton.jit
def _upsample_sum_kernel(
    y_ptr, x0_ptr, x1_ptr, x2_ptr, x3_ptr, C, OD, OH, OW,
    D0, H0, W0, sd0, sh0, sw0, D1, H1, W1, sd1, sh1, sw1,
    D2, H2, W2, sd2, sh2, sw2, D3, H3, W3, sd3, sh3, sw3,
    N: tl.constexpr, SAME0: tl.constexpr, SAME1: tl.constexpr, SAME2: tl.constexpr, SAME3: tl.constexpr,
    CL: tl.constexpr, INT64: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    sd0, sh0, sw0 = f32(sd0), f32(sh0), f32(sw0)
    sd1, sh1, sw1 = f32(sd1), f32(sh1), f32(sw1)
    sd2, sh2, sw2 = f32(sd2), f32(sh2), f32(sw2)
    sd3, sh3, sw3 = f32(sd3), f32(sh3), f32(sw3)
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    if INT64:
        v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        b, ch, C = b.to(tl.int64), ch.to(tl.int64), tl.cast(C, tl.int64)
        OD, OH, OW = tl.cast(OD, tl.int64), tl.cast(OH, tl.int64), tl.cast(OW, tl.int64)
    mask = (v < OD * OH * OW)[:, None] & (ch < C)[None, :]
    ow = v % OW
    oh = (v // OW) % OH
    od = v // (OW * OH)
    acc = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
    acc = _add_input(acc, x0_ptr, b, ch, mask, od, oh, ow, OD, OH, OW, C, D0, H0, W0, sd0, sh0, sw0,
                     SAME0, CL, INT64)
    if N > 1:
        acc = _add_input(acc, x1_ptr, b, ch, mask, od, oh, ow, OD, OH, OW, C, D1, H1, W1, sd1, sh1, sw1,
                         SAME1, CL, INT64)
    if N > 2:
        acc = _add_input(acc, x2_ptr, b, ch, mask, od, oh, ow, OD, OH, OW, C, D2, H2, W2, sd2, sh2, sw2,
                         SAME2, CL, INT64)
    if N > 3:
        acc = _add_input(acc, x3_ptr, b, ch, mask, od, oh, ow, OD, OH, OW, C, D3, H3, W3, sd3, sh3, sw3,
                         SAME3, CL, INT64)
    if CL:
        offs = b * (OD * OH * OW * C) + v[:, None] * C + ch[None, :]
    else:
        offs = b * (OD * OH * OW * C) + ch[None, :] * (OD * OH * OW) + v[:, None]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _scale(n: int, m: int) -> float:
    """ATen's ``n / m`` source-to-output ratio; Triton passes it as fp32, the correctly rounded quotient ATen's
    fp32 division gives."""
    return n / m


def upsample_sum(inputs: list[torch.Tensor], out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Writes ``sum_i interpolate(inputs[i], out's size)`` into ``out`` and returns it; every tensor (B, C, ...)
    contiguous in the layout ``channels_last`` names, 1 to ``MAX_INPUTS`` inputs."""
    b, c, od, oh, ow = out.shape
    if channels_last:
        block_c = min(next_power_of_2(c), _MAX_BLOCK_C)
    else:
        block_c = min(next_power_of_2(c), 4)
    block_v = 512 // block_c  # 4 values a thread: the eight gathers of three inputs spill at 8
    args, same = [], []
    for i in range(MAX_INPUTS):
        x = inputs[i] if i < len(inputs) else inputs[0]
        d, h, w = x.shape[2:]
        args += [d, h, w, _scale(d, od), _scale(h, oh), _scale(w, ow)]
        same.append(i < len(inputs) and (d, h, w) == (od, oh, ow))
    pointers = [inputs[i] if i < len(inputs) else inputs[0] for i in range(MAX_INPUTS)]
    int64 = max(t.numel() for t in (out, *inputs)) > _INT32_MAX
    wrap(_upsample_sum_kernel)[(cdiv(od * oh * ow, block_v), cdiv(c, block_c), b)](
        out, *pointers, c, od, oh, ow, *args,
        N=len(inputs), SAME0=same[0], SAME1=same[1], SAME2=same[2], SAME3=same[3], CL=channels_last, INT64=int64,
        BLOCK_V=block_v, BLOCK_C=block_c, num_warps=_WARPS,
    )
    return out
