"""Triton kernels of the fused depthwise 3D convolution (stride 1, any padding and dilation).

    y = act(conv3d(x, w, b, groups=C)) + residual

Every tensor is addressed through its five logical (B, C, D, H, W) strides, so one kernel serves NCDHW,
``channels_last_3d`` and the token layout (B, N, C) viewed as (B, C, D, H, W). A program owns a
[BLOCK_C, BLOCK_H, BLOCK_W] output tile and a run of depths, which it walks with one accumulator per depth tap
(each input slice is read once per in-plane tap, not once per tap); the block shape follows the layout (wide
along C when the channel stride is 1, wide along W otherwise) so loads stay coalesced. On W-major tiles with
3-wide W taps a thread's outputs are one vector along W, and the W taps are that vector's lanes shifted in
registers; on channel-major tiles a thread's outputs are a channel vector at a few consecutive W positions, so
each input column it loads serves several W taps and each tap's weights several outputs. Larger kernels (MobileUtr's
5x5x5 to 9x9x9) take one output slice a program and loop over its depth taps; on W-major tiles with centred W taps
a thread's outputs are again a vector along W (and a few rows), whose input row is its own vector and the two beside
it, so each loaded element serves up to KW taps.

Backward:
* ``dz = dy * act'(z)``, with ``z = conv(x) + b`` recomputed by the forward kernel (nothing but the input is
  saved);
* ``dx`` is the same forward kernel run on ``dz`` with the taps flipped and the padding mirrored;
* ``dw``/``db``: each program walks a chunk of depth slices for one spatial tile (for 3x3x3 and 1x3x3 the input
  slices, against a rolling window of dz slices, as the forward does), keeps one accumulator per tap in
  registers (a tile, or on NCDHW lane tiles one sum per thread), reduces each once at the end and writes the sums
  to its own row of an fp32 workspace, which is then summed in a fixed order. There are no atomics, so the weight
  gradient is bitwise deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.libdevice import fast_dividef

from fastseg3d.kernels import utils
from fastseg3d.kernels.utils import INTERPRET, bf16_pair_to_fp32, cdiv, next_power_of_2, wrap

__all__ = ["ACT_IDS", "dwconv3d_bwd_weight", "dwconv3d_fwd", "taps_major"]

ACT_IDS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

_INT32_MAX = 2**31 - 1
_MAX_BLOCK_C = 64
# Outputs per thread on channel-major column tiles, by KD: the most that compile without spills for sm_90
_COLUMN_OUTPUTS = {1: 16, 3: 8}
# Rows a thread holds on the general path's W-lane tiles, by lanes (8: 2-byte inputs, 4: fp32)
_WIDE_ROWS = {8: 2, 4: 4}
# The forward's rolling walk along depth: the grid's programs per SM (its runs are cut until it has them) and the
# software-pipelining depth of its slice loads (1: none; 2 or 3 stage them through shared memory with cp.async;
# sm_90 bf16 3x3x3 at 3 stages: NCDHW 144 -> 166 registers on Triton 3.6, 128 -> 155 on 3.9, and 48 KB of shared
# memory; channels-last 215 -> 227, 24 KB). Not yet chosen by measurement: ``python -m bench.tune dwconv3d``
# sweeps both on a GPU.
PROGRAMS_PER_SM = 8
WALK_STAGES = 1


if INTERPRET:  # the interpreter has no libdevice fast math

    @triton.jit
    def _fast_div(x, y):
        return x / y

else:

    @triton.jit
    def _fast_div(x, y):
        """x / y within 2 ulp for |y| in [2^-126, 2^126] (0 beyond): a reciprocal and a multiply, where the
        division Triton emits adds range checks (about 8 instructions in all)."""
        return fast_dividef(x, y)


@triton.jit
def _sigmoid(z):
    # exp2 compiles to ex2.approx.ftz; tl.exp and tl.sigmoid to the non-flushing form, which takes 3 more.
    return _fast_div(1.0, 1.0 + tl.exp2(-1.4426950408889634 * z))


@triton.jit
def _tanh(u):
    return 2.0 * _sigmoid(2.0 * u) - 1.0


@triton.jit
def _erf_over_sqrt2(z):
    """erf(z / sqrt(2)) in fp32, absolute error below 5e-7 (libdevice's erff: about 1.2e-7).

    A rational approximation in u = z^2, numerator and denominator of degree 5: about 20 instructions on sm_90,
    where erff computes both of its branches (a polynomial and an exponential) for about 30, which made GELU cost
    as much as the 3x3x3 conv around it. The coefficients come from a weighted least-squares fit of erf(x) / x in
    x^2 on [0, 4] (erf rounds to 1 in fp32 from x = 3.92), iterated toward the least maximum relative error (Loeb's
    and Lawson's weights), then rescaled to z = x sqrt(2) (powers of two: exact); their fp32 evaluation and the
    approximate reciprocal, not the fit (below 5e-8), set the error. In fp32 the rational reaches 1 from about
    |z| = 5.8 on, so clamping the result at +-1 makes erf exactly +-1 there, and GELU exactly 0 for large negative z
    (not |z| times the error); z is clamped at 6.5 only to keep u finite. Tested against float64 erf."""
    zc = tl.minimum(tl.maximum(z, -6.5), 6.5)
    u = zc * zc
    p = 4.38990604e-08 * u + 1.25748702e-05
    p = p * u + 0.000343195134
    p = p * u + 0.00938685145
    p = p * u + 0.0684249774
    p = p * u + 0.797884524
    q = 1.16928754e-06 * u + 7.40880787e-05
    q = q * u + 0.00190077489
    q = q * u + 0.0288363826
    q = q * u + 0.25242427
    q = q * u + 1.0
    return tl.minimum(tl.maximum(_fast_div(zc * p, q), -1.0), 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in PyTorch
    elif ACT == 2:
        h = 0.5 * z
        z = h + h * _erf_over_sqrt2(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        z = z * _sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, in fp32."""
    if ACT == 1:
        g = tl.where(z <= 0.0, 0.0, 1.0)  # NaN passes the gradient, as PyTorch's threshold_backward does
    elif ACT == 2:
        # Phi(z) + z phi(z), phi(z) = exp2(-z^2 log2(e) / 2) / sqrt(2 pi)
        cdf = 0.5 + 0.5 * _erf_over_sqrt2(z)
        g = cdf + z * 0.3989422804014327 * tl.exp2(z * z * -0.7213475204444817)
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 4:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g


@triton.jit
def _tap_weight(w_ptr, offs_c, CP, kd, kh, kw, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                FLIP: tl.constexpr):
    """The (BLOCK_C, 1, 1) fp32 weights of one tap (rows of CP channels, padded: no mask); FLIP reads the taps in
    reverse (the dx correlation)."""
    tap = (kd * KH + kh) * KW + kw
    if FLIP:
        tap = KD * KH * KW - 1 - tap
    return tl.load(w_ptr + tap * CP + offs_c)[:, None, None]


@triton.jit
def _finish(
    z, j, j0, j1, r, b, c3, h3, w3, out_mask, r_ptr, g_ptr, y_ptr, dil_d,
    srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, GRAD_ACT: tl.constexpr, INT64: tl.constexpr,
):
    """Store output j of the program's run (od = r + dil_d * j) from its pre-activation z (the conv sum, bias
    included): act(z) + residual, or g * act'(z). Nothing is stored for j outside [j0, j1)."""
    # A [1, 1, 1] tensor, not a scalar: the interpreter mis-types `tensor & scalar_bool` masks.
    j = j + tl.zeros([1, 1, 1], dtype=tl.int32)
    od = r + dil_d * j
    if INT64:
        od = od.to(tl.int64)
    mask = out_mask & (j >= j0) & (j < j1)
    if GRAD_ACT:
        g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + w3 * sgw, mask=mask, other=0.0)
        out = g.to(tl.float32) * _act_grad(z, ACT)
    else:
        out = _act(z, ACT)
        if HAS_RES:
            res = tl.load(r_ptr + b * srb + c3 * src + od * srd + h3 * srh + w3 * srw, mask=mask, other=0.0)
            out += res.to(tl.float32)
    tl.store(y_ptr + b * syb + c3 * syc + od * syd + h3 * syh + w3 * syw, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plane_taps(acc, xs, w_ptr, offs_c, C, CP, kd, c3, h3, w3, d_ok, H_in, W_in, sxh, sxw, pad_h, pad_w, dil_h, dil_w,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr):
    """acc + sum over the in-plane taps of depth tap kd, for the input slice at ``xs`` (pointers at (c, 0, 0)).

    Each load feeds its FMA at once: for the large kernels this serves, all taps loaded first (as
    :func:`_plane_loads` gives them) spill several times more on sm_90 (7x7x7 NCDHW: 776 bytes against 16)."""
    for kh in tl.static_range(KH):
        ih = h3 - pad_h + kh * dil_h
        dh_ok = (c3 < C) & d_ok & (ih >= 0) & (ih < H_in)
        for kw in tl.static_range(KW):
            iw = w3 - pad_w + kw * dil_w
            xv = tl.load(xs + ih * sxh + iw * sxw, mask=dh_ok & (iw >= 0) & (iw < W_in), other=0.0)
            acc += xv.to(tl.float32) * _tap_weight(w_ptr, offs_c, CP, kd, kh, kw, KD, KH, KW, FLIP)
    return acc


@triton.jit
def _plane_loads(xs, ok, h3, w3, H_in, W_in, sxh, sxw, pad_h, pad_w, dil_h, dil_w,
                 KH: tl.constexpr, KW: tl.constexpr):
    """The KH*KW in-plane taps of the input slice at ``xs`` (pointers at (c, 0, 0)) as a tuple of fp32 tiles, tap
    (kh, kw) at kh * KW + kw; ``ok`` masks the channels and the slice, out-of-volume taps read 0."""
    loaded = ()
    for kh in tl.static_range(KH):
        ih = h3 - pad_h + kh * dil_h
        h_ok = ok & (ih >= 0) & (ih < H_in)
        for kw in tl.static_range(KW):
            iw = w3 - pad_w + kw * dil_w
            xv = tl.load(xs + ih * sxh + iw * sxw, mask=h_ok & (iw >= 0) & (iw < W_in), other=0.0)
            loaded = loaded + (xv.to(tl.float32),)
    return loaded


@triton.jit
def _halves(x, BH: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
    """[BH, G, N] -> its even and odd lanes, each [BH, G, N // 2]."""
    return tl.split(tl.reshape(x, (BH, G, N // 2, 2)))


@triton.jit
def _split_lanes(x, BH: tl.constexpr, G: tl.constexpr, V: tl.constexpr):
    """[BH, G, V] (V = 4 or 8, held by one thread) -> the tuple of its V lanes in order, each [BH, G, 1]; register
    moves only."""
    e, o = _halves(x, BH, G, V)
    if V == 4:
        l0, l2 = _halves(e, BH, G, 2)
        l1, l3 = _halves(o, BH, G, 2)
        lanes = (l0, l1, l2, l3)
    else:
        ee, eo = _halves(e, BH, G, 4)
        oe, oo = _halves(o, BH, G, 4)
        l0, l4 = _halves(ee, BH, G, 2)
        l2, l6 = _halves(eo, BH, G, 2)
        l1, l5 = _halves(oe, BH, G, 2)
        l3, l7 = _halves(oo, BH, G, 2)
        lanes = (l0, l1, l2, l3, l4, l5, l6, l7)
    return lanes


@triton.jit
def _pair(a, b, BH: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
    """Interleave two [BH, G, N // 2] tensors into [BH, G, N] (the inverse of :func:`_halves`)."""
    return tl.reshape(tl.join(a, b), (BH, G, N))


@triton.jit
def _join_lanes(lanes, BH: tl.constexpr, G: tl.constexpr, V: tl.constexpr):
    """The inverse of :func:`_split_lanes`: V lanes [BH, G, 1] -> [BH, G, V]."""
    if V == 4:
        x = _pair(_pair(lanes[0], lanes[2], BH, G, 2), _pair(lanes[1], lanes[3], BH, G, 2), BH, G, 4)
    else:
        e = _pair(_pair(lanes[0], lanes[4], BH, G, 2), _pair(lanes[2], lanes[6], BH, G, 2), BH, G, 4)
        o = _pair(_pair(lanes[1], lanes[5], BH, G, 2), _pair(lanes[3], lanes[7], BH, G, 2), BH, G, 4)
        x = _pair(e, o, BH, G, 8)
    return x


@triton.jit
def _lane_row(row, ok, w3, wg, W_in, sxw, pad_w, V: tl.constexpr):
    """One input row for 3-wide undilated W taps on a lane tile (output w = wg + lane = w3), in fp32: the aligned
    vector the outputs sit on (mid) and the element on each side of it (left, right)."""
    # All three from the vector's own address: with unit W stride and padding 1 (the common case, which Triton
    # specialises), the edges are immediate offsets of the same 64-bit address instead of two more.
    vec = row + wg * sxw
    iw = w3 + (1 - pad_w)
    mid = tl.load(vec + (w3 - wg + (1 - pad_w)) * sxw, mask=ok & (iw >= 0) & (iw < W_in), other=0.0).to(tl.float32)
    iw = wg - pad_w
    left = tl.load(vec - pad_w * sxw, mask=ok & (iw >= 0) & (iw < W_in), other=0.0).to(tl.float32)
    iw = wg + (V + 1) - pad_w
    right = tl.load(vec + ((V + 1) - pad_w) * sxw, mask=ok & (iw >= 0) & (iw < W_in), other=0.0).to(tl.float32)
    return left, mid, right


@triton.jit
def _lane_coords(pid_hw, n_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr,
                 INT64: tl.constexpr):
    """A W-lane tile's (rows, G, LANES) coordinates: the first of a thread's ROWS adjacent rows (hr, [BR, 1, 1]),
    its vector's first W (wg, [1, G, 1]) and each lane's W (wl = wg + lane, [1, G, LANES])."""
    hr = ((pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H // ROWS) * ROWS)[:, None, None]
    wg = ((pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W // LANES) * LANES)[None, :, None]
    if INT64:
        hr = hr.to(tl.int64)
        wg = wg.to(tl.int64)
    return hr, wg, wg + tl.arange(0, LANES)[None, None, :]


@triton.jit
def _times(unit: tl.constexpr, a, b, c, d):
    return a * unit, b * unit, c * unit, d * unit


@triton.jit
def _wide_row(row, ok, wg, wl, W_in, sxw, BR: tl.constexpr, G: tl.constexpr, V: tl.constexpr, PW: tl.constexpr):
    """One input row for centred, undilated W taps (KW = 2 * PW + 1) on a W-lane tile whose thread holds outputs
    w = wg + lane (``wl``), in fp32: the tuple of the V + 2 * PW inputs w - PW + m those outputs read, tap kw of
    lane i at m = i + kw. They come from three aligned vector loads, the thread's own vector and its neighbours on
    either side (PW <= V), split into lanes in registers; out-of-volume inputs read 0."""
    vec = row + wg * sxw
    lane = tl.arange(0, V)[None, None, :]
    mid = _split_lanes(tl.load(vec + lane * sxw, mask=ok & (wl < W_in), other=0.0).to(tl.float32), BR, G, V)
    win = mid
    if PW > 0:
        # compared as wl against constants (not wl - V >= 0, wl + V < W_in): the JIT proves these constant over
        # a vector, so the loads stay vectors
        prev = tl.load(vec + (lane - V) * sxw, mask=ok & (wl >= V) & (wl < W_in + V), other=0.0)
        after = tl.load(vec + (lane + V) * sxw, mask=ok & (wl < W_in - V), other=0.0)
        left = _split_lanes(prev.to(tl.float32), BR, G, V)
        right = _split_lanes(after.to(tl.float32), BR, G, V)
        win = ()
        for m in tl.static_range(V + 2 * PW):
            if m < PW:
                win = win + (left[V - PW + m],)
            elif m < PW + V:
                win = win + (mid[m - PW],)
            else:
                win = win + (right[m - PW - V],)
    return win


@triton.jit
def _column_row(xs, ok, ih, wg, H_in, W_in, sxh, sxw, pad_w, N: tl.constexpr):
    """Input row ih of the slice at ``xs`` for a channel-major column tile (lane i at output w = wg + i), in fp32:
    the N columns wg - pad_w + j, j < N, each feeding lane i through W tap j - i."""
    row = xs + ih * sxh
    ok = ok & (ih >= 0) & (ih < H_in)
    cols = ()
    for j in tl.static_range(N):
        iw = wg + (j - pad_w)
        cols = cols + (tl.load(row + iw * sxw, mask=ok & (iw >= 0) & (iw < W_in), other=0.0).to(tl.float32),)
    return cols


@triton.jit
def _load_pairs(ptrs, mask):
    """fp32 [2 * P, H, W] from bf16 channel pairs read as int32 through pointers [P, H, W] (channels-last 3x3x3
    forward on sm_90: 50.5 -> 47.6 instructions per output against splitting bf16 vectors)."""
    even, odd = bf16_pair_to_fp32(tl.load(ptrs, mask=mask, other=0))
    return tl.reshape(tl.permute(tl.join(even, odd), (0, 3, 1, 2)), (2 * ptrs.shape[0], ptrs.shape[1], ptrs.shape[2]))


@triton.jit
def _pair_base(ptr, b, sb, pid_c, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """[BLOCK_C // 2, 1, 1] int32 pointers to batch b's channel pairs of the program's channel block (strides in
    pairs)."""
    cp = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    if INT64:
        cp = cp.to(tl.int64)
    return ptr.to(tl.pointer_type(tl.int32), bitcast=True) + b * sb + cp[:, None, None]


@triton.jit
def _column_row_pairs(xp, ok, ih, wg, H_in, W_in, sxh2, sxw2, pad_w, N: tl.constexpr):
    """:func:`_column_row` for bf16 read as channel pairs (``xp``: :func:`_pair_base` at the slice)."""
    row = xp + ih * sxh2
    ok = ok & (ih >= 0) & (ih < H_in)
    cols = ()
    for j in tl.static_range(N):
        iw = wg + (j - pad_w)
        cols = cols + (_load_pairs(row + iw * sxw2, ok & (iw >= 0) & (iw < W_in)),)
    return cols


@triton.jit
def _column_row_any(x_base, xp_base, off_d, d_ok, c_ok, ih, wg, H_in, W_in, sxh, sxw, pad_w, N: tl.constexpr,
                    PAIRS: tl.constexpr):
    """:func:`_column_row_pairs` (PAIRS) or :func:`_column_row` for the slice at offset ``off_d``."""
    if PAIRS:
        return _column_row_pairs(xp_base + off_d, d_ok, ih, wg, H_in, W_in, sxh, sxw, pad_w, N)
    return _column_row(x_base + off_d, d_ok & c_ok, ih, wg, H_in, W_in, sxh, sxw, pad_w, N)


@triton.jit
def _dwconv3d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, r_ptr, g_ptr, y_ptr,
    C, CP, D_in, H_in, W_in, D_out, H_out, W_out, J_CHUNK, N_CHUNKS,
    sxb, sxc, sxd, sxh, sxw,
    srb, src, srd, srh, srw,
    sgb, sgc, sgd, sgh, sgw,
    syb, syc, syd, syh, syw,
    pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr, ROLL: tl.constexpr,
    LANES: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    GRAD_ACT: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PAIRS: tl.constexpr, UNIT: tl.constexpr, STAGES: tl.constexpr,
):
    """y = act(conv + bias) + residual, or with GRAD_ACT: y = g * act'(conv + bias).

    A program owns one (C, H, W) tile and a run of output depths od = r + dil_d * j, j in [j0, j1) (r is the
    program's residue modulo the depth dilation).

    ROLL (KD of 1 or 3, at most 3x3 in-plane taps): the program walks the input slices its outputs read, in order,
    loads each slice once per in-plane tap and adds it to KD rolling accumulators, acc_k holding the output this
    slice feeds through depth tap k. After each slice acc_{KD-1} is complete: it is stored and the accumulators
    shift. Every input element is loaded and converted KH*KW times instead of KD*KH*KW times. Otherwise (larger
    kernels, whose KD*KH*KW unrolled taps would spill registers) the run is one output slice, which loops over
    its depth taps.

    LANES without ROLL (those larger kernels on a width-major tile, centred undilated W taps, KW // 2 <= LANES): a
    thread holds ROWS adjacent rows of LANES consecutive W outputs; an input row is three aligned vector loads (the
    thread's own vector and its neighbours), split into lanes in registers, and each W tap of each output is one FMA
    on them. With undilated H taps the rows share their input rows. 7x7x7 in bf16 on sm_90: 83 instructions per
    output and depth tap (two rows of 8 lanes), 376 with one masked load per tap; 9x9x9 at 16^3 (one row): 186
    against 806.

    LANES, on a width-major tile (a rolling walk with 3-wide, undilated W taps: NCDHW): a thread holds LANES
    consecutive outputs along W. Each input row is one aligned vector load plus the two elements beside the
    thread's vector, and the three W taps are that vector's lanes shifted in registers. Without it the two
    shifted taps are unaligned loads, which the compiler splits into one scalar load per element. The thread
    holds ROWS adjacent rows of such outputs: with undilated H taps they share their input rows (ROWS + KH - 1
    row loads per slice instead of ROWS * KH; 3x3x3 bf16 on sm_90: 36.5 instructions per output with two rows,
    40.9 with one).

    LANES, on a channel-major tile (BLOCK_C > 1, a rolling walk with undilated W taps: channels-last, tokens): a
    thread holds a channel vector at LANES consecutive W outputs, one (C, H, W // LANES) tile per lane. An input
    row is LANES + KW - 1 column loads, each shared by the lanes it feeds, and the taps' weights are loaded once
    per program, before the walk: 3x3x3 in bf16 issues 47.6 instructions per output on sm_90 (PAIRS: channel pairs
    read as int32; 50.5 splitting bf16 vectors), 54 with the weights loaded per slice, 61 with one output per
    thread. PAIRS needs C to be a multiple of BLOCK_C (no channel mask, which would split the vectors) and takes
    x's strides in pairs.

    LANES on a channel-major tile without ROLL (larger kernels, undilated W taps): one output slice, a loop over
    depth taps; a thread holds a channel vector at ROWS x LANES outputs, an input row is LANES + KW - 1 column
    loads shared by the lanes (and with undilated H taps by the rows) it feeds, and a tap's weights serve them
    all: 7x7x7 in bf16 issues 105 instructions per output and depth tap on sm_90 (fp32 with two rows: 73), 249
    with one load per tap.

    UNIT > 1 (W-lane tiles whose rows are not multiples of 16 elements): W and every stride but W's come divided by
    UNIT, the lanes of a thread's vector, and are multiplied back here, so the JIT knows them multiples of it and the
    vectors aligned (it specialises integer arguments on divisibility by 16 only: rows of 24 or 12 elements would
    load element by element).
    """
    if UNIT > 1:
        W_in, W_out = W_in * UNIT, W_out * UNIT
        sxb, sxc, sxd, sxh = _times(UNIT, sxb, sxc, sxd, sxh)
        srb, src, srd, srh = _times(UNIT, srb, src, srd, srh)
        sgb, sgc, sgd, sgh = _times(UNIT, sgb, sgc, sgd, sgh)
        syb, syc, syd, syh = _times(UNIT, syb, syc, syd, syh)
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    n_h = tl.cdiv(H_out, BLOCK_H)
    n_w = tl.cdiv(W_out, BLOCK_W)
    pid_c = pid // (n_h * n_w)
    pid_hw = pid % (n_h * n_w)
    r = pid_d // N_CHUNKS
    j0 = (pid_d % N_CHUNKS) * J_CHUNK
    j1 = tl.minimum(j0 + J_CHUNK, tl.cdiv(D_out - r, dil_d))
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = (pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    if INT64:
        b = b.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
        offs_w = offs_w.to(tl.int64)
    c3 = offs_c[:, None, None]
    h3 = offs_h[None, :, None]
    w3 = offs_w[None, None, :]
    out_mask = (c3 < C) & (h3 < H_out) & (w3 < W_out)
    x_base = x_ptr + b * sxb + c3 * sxc
    bias = tl.zeros([BLOCK_C, 1, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None, None]

    if LANES > 0 and BLOCK_C > 1 and ROLL:
        G: tl.constexpr = BLOCK_W // LANES
        # (C, H, G) column tiles: output w = wg + lane; the input column wg - pad_w + i feeds lane i - kw
        wg = ((pid_hw % n_w) * BLOCK_W + tl.arange(0, G) * LANES)[None, None, :]
        if INT64:
            wg = wg.to(tl.int64)
        fresh = tl.broadcast_to(bias, [BLOCK_C, BLOCK_H, G])
        accs = (fresh,) * (KD * LANES)
        w_all = ()
        for i in tl.static_range(KD * KH * KW):
            w_all = w_all + (_tap_weight(w_ptr, offs_c, CP, i // (KH * KW), (i // KW) % KH, i % KW, KD, KH, KW, FLIP),)
        if PAIRS:  # bf16 channel pairs as int32: x's strides come in pairs, C is a multiple of BLOCK_C
            xp_base = _pair_base(x_ptr, b, sxb, pid_c, BLOCK_C, INT64)
        for t in tl.range(j0, j1 + KD - 1, num_stages=STAGES):
            idp = r - pad_d + dil_d * t + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            d_ok = (c3 < C) & (idp >= 0) & (idp < D_in)
            for kh in tl.static_range(KH):
                if PAIRS:
                    cols = _column_row_pairs(xp_base + idp * sxd, (idp >= 0) & (idp < D_in),
                                             h3 - pad_h + kh * dil_h, wg, H_in, W_in, sxh, sxw, pad_w,
                                             LANES + KW - 1)
                else:
                    cols = _column_row(x_base + idp * sxd, d_ok, h3 - pad_h + kh * dil_h, wg, H_in, W_in, sxh,
                                       sxw, pad_w, LANES + KW - 1)
                updated = ()
                for kd in tl.static_range(KD):
                    ws = ()
                    for kw in tl.static_range(KW):
                        ws = ws + (w_all[(kd * KH + kh) * KW + kw],)
                    for i in tl.static_range(LANES):
                        a = accs[kd * LANES + i]
                        for kw in tl.static_range(KW):
                            a += cols[i + kw] * ws[kw]
                        updated = updated + (a,)
                accs = updated
            for i in tl.static_range(LANES):
                wi = wg + i
                _finish(accs[(KD - 1) * LANES + i], t - (KD - 1), j0, j1, r, b, c3, h3, wi,
                        (c3 < C) & (h3 < H_out) & (wi < W_out), r_ptr, g_ptr, y_ptr, dil_d,
                        srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                        HAS_RES, ACT, GRAD_ACT, INT64)
            shifted = (fresh,) * LANES
            for i in tl.static_range((KD - 1) * LANES):
                shifted = shifted + (accs[i],)
            accs = shifted
    elif LANES > 0 and BLOCK_C > 1:
        # Larger kernels on channel-major column tiles: one output slice, a loop over depth taps. A thread holds
        # ROWS rows of LANES consecutive W outputs, each a channel vector; an input row is LANES + KW - 1 column
        # loads, each shared by the lanes it feeds and (undilated H taps) by the rows it feeds, and a tap's weights
        # serve every lane.
        G: tl.constexpr = BLOCK_W // LANES
        BR: tl.constexpr = BLOCK_H // ROWS
        NCOL: tl.constexpr = LANES + KW - 1
        wg = ((pid_hw % n_w) * BLOCK_W + tl.arange(0, G) * LANES)[None, None, :]
        hr = ((pid_hw // n_w) * BLOCK_H + tl.arange(0, BR) * ROWS)[None, :, None]
        if INT64:
            wg = wg.to(tl.int64)
            hr = hr.to(tl.int64)
        accs = (tl.broadcast_to(bias, [BLOCK_C, BR, G]),) * (ROWS * LANES)
        xp_base = x_base
        if PAIRS:
            xp_base = _pair_base(x_ptr, b, sxb, pid_c, BLOCK_C, INT64)
        for kd in range(KD):
            idp = r - pad_d + dil_d * (j0 + kd) + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            d_ok = (idp >= 0) & (idp < D_in)
            # win: the columns of input rows kh .. kh + ROWS - 1 (undilated H when ROWS > 1), row o feeding output
            # row hr + o through H tap kh; each step loads one new row, and a tap's weights serve every row
            win = ()
            for j in tl.static_range(ROWS - 1):
                win = win + _column_row_any(x_base, xp_base, idp * sxd, d_ok, c3 < C, hr - pad_h + j, wg, H_in, W_in,
                                            sxh, sxw, pad_w, NCOL, PAIRS)
            for kh in tl.static_range(KH):
                win = win + _column_row_any(x_base, xp_base, idp * sxd, d_ok, c3 < C,
                                            hr - pad_h + kh * dil_h + ROWS - 1, wg, H_in, W_in, sxh, sxw, pad_w,
                                            NCOL, PAIRS)
                for kw in tl.static_range(KW):
                    w = _tap_weight(w_ptr, offs_c, CP, kd, kh, kw, KD, KH, KW, FLIP)
                    updated = ()
                    for i in tl.static_range(ROWS * LANES):
                        updated = updated + (accs[i] + win[(i // LANES) * NCOL + i % LANES + kw] * w,)
                    accs = updated
                rest = ()
                for m in tl.static_range((ROWS - 1) * NCOL):
                    rest = rest + (win[NCOL + m],)
                win = rest
        for o in tl.static_range(ROWS):
            for i in tl.static_range(LANES):
                wi = wg + i
                _finish(accs[o * LANES + i], j0, j0, j1, r, b, c3, hr + o, wi,
                        (c3 < C) & (hr + o < H_out) & (wi < W_out), r_ptr, g_ptr, y_ptr, dil_d,
                        srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                        HAS_RES, ACT, GRAD_ACT, INT64)
    elif LANES > 0 and ROLL:
        G: tl.constexpr = BLOCK_W // LANES
        BR: tl.constexpr = BLOCK_H // ROWS
        # The weights of every tap, loaded once: BLOCK_C is 1 here, one register per tap.
        ws = ()
        for i in tl.static_range(KD * KH * 3):
            ws = ws + (_tap_weight(w_ptr, offs_c, CP, i // (KH * 3), (i // 3) % KH, i % 3, KD, KH, 3, FLIP),)
        # a thread's outputs are ROWS adjacent rows from hr, each at w = wg + lane (wl)
        hr, wg, wl = _lane_coords(pid_hw, n_w, BLOCK_H, BLOCK_W, ROWS, LANES, INT64)
        # accumulators start at the bias: their first FMA adds it, no separate pass over the outputs;
        # accs[(kd * ROWS + o) * LANES + i] is output row hr + o, lane i, fed by the slice through depth tap kd
        fresh = tl.broadcast_to(bias, [BR, G, 1])
        accs = (fresh,) * (KD * ROWS * LANES)
        # unrolled KD times, the accumulators' roles rotate in the code instead of moving between registers
        for t in tl.range(j0, j1 + KD - 1, loop_unroll_factor=KD, num_stages=STAGES):
            idp = r - pad_d + dil_d * t + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            d_ok = (c3 < C) & (idp >= 0) & (idp < D_in)
            # input row hr - pad_h + j feeds output row hr + o through H tap j - o: with ROWS > 1 (undilated H taps)
            # a thread's rows share their loads
            for j in tl.static_range(ROWS + KH - 1):
                ih = hr - pad_h + j * dil_h
                row = x_base + idp * sxd + ih * sxh
                left, mid, right = _lane_row(row, d_ok & (ih >= 0) & (ih < H_in), wl, wg, W_in, sxw, pad_w, LANES)
                lanes = _split_lanes(mid, BR, G, LANES)
                updated = ()
                for kd in tl.static_range(KD):
                    for o in tl.static_range(ROWS):
                        for i in tl.static_range(LANES):
                            a = accs[(kd * ROWS + o) * LANES + i]
                            if j - o >= 0 and j - o < KH:
                                for kw in tl.static_range(3):
                                    w = ws[(kd * KH + j - o) * 3 + kw]
                                    if i + kw == 0:
                                        a += left * w
                                    elif i + kw == LANES + 1:
                                        a += right * w
                                    else:
                                        a += lanes[i + kw - 1] * w
                            updated = updated + (a,)
                accs = updated
            for o in tl.static_range(ROWS):
                done = ()
                for i in tl.static_range(LANES):
                    done = done + (accs[((KD - 1) * ROWS + o) * LANES + i],)
                _finish(_join_lanes(done, BR, G, LANES), t - (KD - 1), j0, j1, r, b, c3, hr + o, wl,
                        (c3 < C) & (hr + o < H_out) & (wl < W_out), r_ptr, g_ptr, y_ptr, dil_d,
                        srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                        HAS_RES, ACT, GRAD_ACT, INT64)
            shifted = (fresh,) * (ROWS * LANES)
            for i in tl.static_range((KD - 1) * ROWS * LANES):
                shifted = shifted + (accs[i],)
            accs = shifted
    elif LANES > 0:
        # Larger kernels on W-lane tiles: one output slice, a loop over depth taps, ROWS x LANES outputs a thread.
        G: tl.constexpr = BLOCK_W // LANES
        BR: tl.constexpr = BLOCK_H // ROWS
        PW: tl.constexpr = (KW - 1) // 2  # the launcher takes this path for centred W taps only
        hr, wg, wl = _lane_coords(pid_hw, n_w, BLOCK_H, BLOCK_W, ROWS, LANES, INT64)
        accs = (tl.broadcast_to(bias, [BR, G, 1]),) * (ROWS * LANES)
        for kd in range(KD):
            idp = r - pad_d + dil_d * (j0 + kd) + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            d_ok = (idp >= 0) & (idp < D_in)
            # input row hr - pad_h + j * dil_h feeds output row hr + o through H tap j - o (ROWS > 1: undilated H)
            for j in tl.static_range(ROWS + KH - 1):
                ih = hr - pad_h + j * dil_h
                win = _wide_row(x_base + idp * sxd + ih * sxh, d_ok & (ih >= 0) & (ih < H_in), wg, wl, W_in, sxw,
                                BR, G, LANES, PW)
                updated = ()
                for o in tl.static_range(ROWS):
                    for i in tl.static_range(LANES):
                        a = accs[o * LANES + i]
                        if j - o >= 0 and j - o < KH:
                            for kw in tl.static_range(KW):
                                a += win[i + kw] * _tap_weight(w_ptr, offs_c, CP, kd, j - o, kw, KD, KH, KW, FLIP)
                        updated = updated + (a,)
                accs = updated
        for o in tl.static_range(ROWS):
            done = ()
            for i in tl.static_range(LANES):
                done = done + (accs[o * LANES + i],)
            _finish(_join_lanes(done, BR, G, LANES), j0, j0, j1, r, b, c3, hr + o, wl,
                    (c3 < C) & (hr + o < H_out) & (wl < W_out), r_ptr, g_ptr, y_ptr, dil_d,
                    srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                    HAS_RES, ACT, GRAD_ACT, INT64)
    elif ROLL:
        fresh = tl.broadcast_to(bias, [BLOCK_C, BLOCK_H, BLOCK_W])
        acc0 = fresh
        acc1 = fresh
        acc2 = fresh
        for t in tl.range(j0, j1 + KD - 1, num_stages=STAGES):
            idp = r - pad_d + dil_d * t + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            ok = (c3 < C) & (idp >= 0) & (idp < D_in)
            xs = _plane_loads(x_base + idp * sxd, ok, h3, w3, H_in, W_in, sxh, sxw, pad_h, pad_w, dil_h, dil_w,
                              KH, KW)
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    xv = xs[kh * KW + kw]
                    acc0 += xv * _tap_weight(w_ptr, offs_c, CP, 0, kh, kw, KD, KH, KW, FLIP)
                    if KD == 3:
                        acc1 += xv * _tap_weight(w_ptr, offs_c, CP, 1, kh, kw, KD, KH, KW, FLIP)
                        acc2 += xv * _tap_weight(w_ptr, offs_c, CP, 2, kh, kw, KD, KH, KW, FLIP)
            z = acc0
            if KD == 3:
                z = acc2
            _finish(z, t - (KD - 1), j0, j1, r, b, c3, h3, w3, out_mask, r_ptr, g_ptr, y_ptr, dil_d,
                    srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                    HAS_RES, ACT, GRAD_ACT, INT64)
            if KD == 3:
                acc2 = acc1
                acc1 = acc0
            acc0 = fresh
    else:
        # One output slice per program (J_CHUNK = 1): a loop over several would let the compiler hoist every
        # tap's offsets and masks out of it, which spills for kernels this large.
        acc = tl.broadcast_to(bias, [BLOCK_C, BLOCK_H, BLOCK_W])
        for kd in range(KD):
            idp = r - pad_d + dil_d * (j0 + kd) + tl.zeros([1, 1, 1], dtype=tl.int32)
            if INT64:
                idp = idp.to(tl.int64)
            d_ok = (idp >= 0) & (idp < D_in)
            acc = _plane_taps(acc, x_base + idp * sxd, w_ptr, offs_c, C, CP, kd, c3, h3, w3, d_ok, H_in, W_in,
                              sxh, sxw, pad_h, pad_w, dil_h, dil_w, KD, KH, KW, FLIP)
        _finish(acc, j0, j0, j1, r, b, c3, h3, w3, out_mask, r_ptr, g_ptr, y_ptr, dil_d,
                srb, src, srd, srh, srw, sgb, sgc, sgd, sgh, sgw, syb, syc, syd, syh, syw,
                HAS_RES, ACT, GRAD_ACT, INT64)


@triton.jit
def _walk_slices(t, pad_d, INT64: tl.constexpr):
    """Step t of the weight gradient's depth walk as [1, 1, 1] indices: the dz slice od = t + pad_d whose tap 0
    reads input slice t, and that input slice."""
    od = t + pad_d + tl.zeros([1, 1, 1], dtype=tl.int32)
    idp = t + tl.zeros([1, 1, 1], dtype=tl.int32)
    if INT64:
        od = od.to(tl.int64)
        idp = idp.to(tl.int64)
    return od, idp


@triton.jit
def _dwconv3d_bwd_weight_kernel(
    x_ptr, g_ptr, dwp_ptr, dbp_ptr,
    C, D_in, H_in, W_in, D_out, H_out, W_out, D_CHUNK,
    sxb, sxc, sxd, sxh, sxw,
    sgb, sgc, sgd, sgh, sgw,
    pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KD_PER: tl.constexpr, KH_PER: tl.constexpr,
    ROLL: tl.constexpr,
    LANES: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIRS: tl.constexpr, UNIT: tl.constexpr,
):
    """Per-program partial dw (over KD_PER depth taps starting at kd0) and db over a chunk of depth slices;
    ``g`` is the gradient at the pre-activation, dz. ROLL (all KD taps in the program, depth dilation 1) walks the
    input slices instead of the output slices.

    Each tap keeps an elementwise accumulator over the tile (a tuple of KD_PER*KH*KW register tiles), so the
    walk over depth slices is loads and FMAs only; the tile is reduced once per tap at the end.

    LANES on a width-major tile (NCDHW): the rolling walk with a thread's dz as ROWS adjacent rows of LANES
    consecutive W positions, the input rows read as in the forward's lane path (shared by the rows), and one
    accumulator per tap and thread: each lane's product is one FMA into it, so the registers hold 27 sums, not
    27 tiles, and a thread can take 16 outputs. LANES without ROLL (larger kernels, centred undilated W taps): the
    same sums per tap and thread over the output slices, each input row read as the forward's general lane path
    reads it (three aligned vectors), so each loaded element meets up to KW taps of each dz lane.

    LANES on a channel-major tile without ROLL (larger kernels or dilated depth taps, undilated W taps:
    channels-last, tokens): over the output slices, a thread's dz at LANES consecutive W positions meets each input
    row's LANES + KW - 1 columns, with one sum per tap and channel; a program takes KH_PER rows of one depth tap's
    taps.

    UNIT: as in the forward kernel (W and the strides but W's in units of the lanes).
    """
    if UNIT > 1:
        W_in, W_out = W_in * UNIT, W_out * UNIT
        sxb, sxc, sxd, sxh = _times(UNIT, sxb, sxc, sxd, sxh)
        sgb, sgc, sgd, sgh = _times(UNIT, sgb, sgc, sgd, sgh)
    KVOL: tl.constexpr = KD * KH * KW
    NT: tl.constexpr = KD_PER * KH_PER * KW
    N_KH: tl.constexpr = (KH + KH_PER - 1) // KH_PER
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_bd = tl.program_id(2)
    n_h = tl.cdiv(H_out, BLOCK_H)
    n_w = tl.cdiv(W_out, BLOCK_W)
    n_dchunks = tl.cdiv(D_out, D_CHUNK)
    pid_c = pid // (n_h * n_w)
    pid_hw = pid % (n_h * n_w)
    b = pid_bd // n_dchunks
    d_start = (pid_bd % n_dchunks) * D_CHUNK
    d_end = tl.minimum(d_start + D_CHUNK, D_out)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = (pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    if INT64:
        b = b.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
        offs_w = offs_w.to(tl.int64)
    c3 = offs_c[:, None, None]
    h3 = offs_h[None, :, None]
    w3 = offs_w[None, None, :]
    COLUMNS: tl.constexpr = LANES > 0 and BLOCK_C > 1
    if COLUMNS:
        # (C, H, G) column tiles: lane i holds output w = w3 + i
        w3 = ((pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W // LANES) * LANES)[None, None, :]
        if INT64:
            w3 = w3.to(tl.int64)
    elif LANES > 0:
        # dz rows h3 + o (o < ROWS) at w = wg + lane (w3)
        h3, wg, w3 = _lane_coords(pid_hw, n_w, BLOCK_H, BLOCK_W, ROWS, LANES, INT64)
    out_mask = (c3 < C) & (h3 < H_out) & (w3 < W_out)
    x_base = x_ptr + b * sxb + c3 * sxc
    # the program's taps: KD_PER depth taps from kd0, or (KD_PER = 1, larger kernels on column tiles) KH_PER rows
    # of one depth tap's taps from kh0 (the last chunk's rows past KH are computed, not stored)
    kd0 = (pid_t // N_KH) * KD_PER
    kh0 = (pid_t % N_KH) * KH_PER

    accs = (tl.zeros(out_mask.shape, dtype=tl.float32),) * NT
    acc_b = tl.zeros(out_mask.shape, dtype=tl.float32)
    if COLUMNS and ROLL:
        # The rolling walk below on column tiles: win[kd * LANES + i] is lane i's dz slice for depth tap kd; an
        # input row is LANES + KW - 1 column loads, column j meeting lane i through tap kw = j - i.
        win = (tl.zeros(out_mask.shape, dtype=tl.float32),) * (KD * LANES)
        if PAIRS:  # bf16 channel pairs as int32, as in the forward (x's and dz's strides in pairs)
            xp_base = _pair_base(x_ptr, b, sxb, pid_c, BLOCK_C, INT64)
            gp_base = _pair_base(g_ptr, b, sgb, pid_c, BLOCK_C, INT64)
        for t in range(d_start - pad_d, d_end - pad_d + KD - 1):
            od, idp = _walk_slices(t, pad_d, INT64)
            shifted = ()
            for i in tl.static_range(LANES):
                if PAIRS:
                    g_ok = (h3 < H_out) & (w3 + i < W_out) & (od >= d_start) & (od < d_end)
                    g = _load_pairs(gp_base + od * sgd + h3 * sgh + (w3 + i) * sgw, g_ok)
                else:
                    g_ok = (c3 < C) & (h3 < H_out) & (w3 + i < W_out) & (od >= d_start) & (od < d_end)
                    g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + (w3 + i) * sgw, mask=g_ok,
                                other=0.0).to(tl.float32)
                acc_b += g
                shifted = shifted + (g,)
            for i in tl.static_range((KD - 1) * LANES):
                shifted = shifted + (win[i],)
            win = shifted
            ok = (c3 < C) & (idp >= 0) & (idp < D_in)
            updated = accs
            for kh in tl.static_range(KH):
                if PAIRS:
                    cols = _column_row_pairs(xp_base + idp * sxd, (idp >= 0) & (idp < D_in), h3 - pad_h + kh * dil_h,
                                             w3, H_in, W_in, sxh, sxw, pad_w, LANES + KW - 1)
                else:
                    cols = _column_row(x_base + idp * sxd, ok, h3 - pad_h + kh * dil_h, w3, H_in, W_in, sxh, sxw,
                                       pad_w, LANES + KW - 1)
                new = ()
                for n in tl.static_range(NT):
                    a = updated[n]
                    if (n // KW) % KH == kh:
                        for i in tl.static_range(LANES):
                            a += win[(n // (KH * KW)) * LANES + i] * cols[i + n % KW]
                    new = new + (a,)
                updated = new
            accs = updated
    elif COLUMNS:
        # Larger kernels on column tiles: over the output slices, a thread's dz at LANES consecutive W positions
        # meets each input row's LANES + KW - 1 columns, column j meeting lane i through tap kw = j - i; a tap's
        # accumulator takes every lane's product.
        xp_base = x_base
        if PAIRS:
            xp_base = _pair_base(x_ptr, b, sxb, pid_c, BLOCK_C, INT64)
            gp_base = _pair_base(g_ptr, b, sgb, pid_c, BLOCK_C, INT64)
        for od_i in range(d_start, d_end):
            od = od_i
            if INT64:
                od = tl.cast(od_i, tl.int64)
            dz = ()
            for i in tl.static_range(LANES):
                if PAIRS:
                    g = _load_pairs(gp_base + od * sgd + h3 * sgh + (w3 + i) * sgw, (h3 < H_out) & (w3 + i < W_out))
                else:
                    g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + (w3 + i) * sgw,
                                mask=(c3 < C) & (h3 < H_out) & (w3 + i < W_out), other=0.0).to(tl.float32)
                acc_b += g
                dz = dz + (g,)
            for kdi in tl.static_range(KD_PER):
                idp = od - pad_d + (kd0 + kdi) * dil_d + tl.zeros([1, 1, 1], dtype=tl.int32)
                d_ok = (idp >= 0) & (idp < D_in)
                for khi in tl.static_range(KH_PER):
                    cols = _column_row_any(x_base, xp_base, idp * sxd, d_ok, c3 < C, h3 - pad_h + (kh0 + khi) * dil_h,
                                           w3, H_in, W_in, sxh, sxw, pad_w, LANES + KW - 1, PAIRS)
                    updated = ()
                    for n in tl.static_range(NT):
                        a = accs[n]
                        if n // (KH_PER * KW) == kdi and (n // KW) % KH_PER == khi:
                            for i in tl.static_range(LANES):
                                a += dz[i] * cols[i + n % KW]
                        updated = updated + (a,)
                    accs = updated
    elif LANES > 0 and ROLL:
        BR: tl.constexpr = BLOCK_H // ROWS
        G: tl.constexpr = BLOCK_W // LANES
        accs = (tl.zeros([BR, G, 1], dtype=tl.float32),) * NT
        acc_b = tl.zeros([BR, G, 1], dtype=tl.float32)
        # win[(kd * ROWS + o) * LANES + i]: lane i of dz row h3 + o at od = t + pad_d - kd (zero outside the run)
        win = (tl.zeros([BR, G, 1], dtype=tl.float32),) * (KD * ROWS * LANES)
        # not unrolled: rotating the window in the code instead of moving it (2 moves per output) takes 193
        # registers instead of 124 on sm_90 for 3x3x3, half the warps per SM
        for t in range(d_start - pad_d, d_end - pad_d + KD - 1):
            od, idp = _walk_slices(t, pad_d, INT64)
            shifted = ()
            for o in tl.static_range(ROWS):
                g_ok = (c3 < C) & (h3 + o < H_out) & (w3 < W_out) & (od >= d_start) & (od < d_end)
                g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + (h3 + o) * sgh + w3 * sgw, mask=g_ok, other=0.0)
                lanes = _split_lanes(g.to(tl.float32), BR, G, LANES)
                for i in tl.static_range(LANES):
                    acc_b += lanes[i]
                    shifted = shifted + (lanes[i],)
            for i in tl.static_range((KD - 1) * ROWS * LANES):
                shifted = shifted + (win[i],)
            win = shifted
            # input row h3 - pad_h + j * dil_h meets dz row h3 + o through H tap j - o (ROWS > 1: undilated)
            ok = (c3 < C) & (idp >= 0) & (idp < D_in)
            for j in tl.static_range(ROWS + KH - 1):
                ih = h3 - pad_h + j * dil_h
                left, mid, right = _lane_row(x_base + idp * sxd + ih * sxh, ok & (ih >= 0) & (ih < H_in), w3, wg,
                                             W_in, sxw, pad_w, LANES)
                xl = _split_lanes(mid, BR, G, LANES)
                updated = ()
                for n in tl.static_range(NT):
                    a = accs[n]
                    for o in tl.static_range(ROWS):
                        if j - o == (n // 3) % KH:
                            for i in tl.static_range(LANES):
                                dz = win[((n // (KH * 3)) * ROWS + o) * LANES + i]
                                if i + n % 3 == 0:
                                    a += dz * left
                                elif i + n % 3 == LANES + 1:
                                    a += dz * right
                                else:
                                    a += dz * xl[i + n % 3 - 1]
                    updated = updated + (a,)
                accs = updated
    elif LANES > 0:
        BR: tl.constexpr = BLOCK_H // ROWS
        G: tl.constexpr = BLOCK_W // LANES
        accs = (tl.zeros([BR, G, 1], dtype=tl.float32),) * NT
        acc_b = tl.zeros([BR, G, 1], dtype=tl.float32)
        for od_i in range(d_start, d_end):
            od = od_i
            if INT64:
                od = tl.cast(od_i, tl.int64)
            dz = ()  # dz[o * LANES + i]: lane i of dz row h3 + o
            for o in tl.static_range(ROWS):
                g_ok = (c3 < C) & (h3 + o < H_out) & (w3 < W_out)
                g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + (h3 + o) * sgh + w3 * sgw, mask=g_ok, other=0.0)
                lanes = _split_lanes(g.to(tl.float32), BR, G, LANES)
                for i in tl.static_range(LANES):
                    acc_b += lanes[i]
                    dz = dz + (lanes[i],)
            for kdi in tl.static_range(KD_PER):
                idp = od - pad_d + (kd0 + kdi) * dil_d + tl.zeros([1, 1, 1], dtype=tl.int32)
                d_ok = (c3 < C) & (idp >= 0) & (idp < D_in)
                # input row h3 - pad_h + j * dil_h meets dz row h3 + o through H tap j - o (ROWS > 1: undilated)
                for j in tl.static_range(ROWS + KH - 1):
                    ih = h3 - pad_h + j * dil_h
                    win = _wide_row(x_base + idp * sxd + ih * sxh, d_ok & (ih >= 0) & (ih < H_in), wg, w3, W_in,
                                    sxw, BR, G, LANES, (KW - 1) // 2)
                    updated = ()
                    for n in tl.static_range(NT):
                        a = accs[n]
                        if n // (KH * KW) == kdi:
                            for o in tl.static_range(ROWS):
                                if j - o == (n // KW) % KH:
                                    for i in tl.static_range(LANES):
                                        a += dz[o * LANES + i] * win[i + n % KW]
                        updated = updated + (a,)
                    accs = updated
    elif ROLL:
        # Walk the input slices the run reads, each loaded once per in-plane tap, against a window of the KD
        # dz slices that read it (win[kd] is dz at od = id + pad_d - kd; zero outside the run, so every
        # (output, tap) pair is counted once).
        win = (tl.zeros(out_mask.shape, dtype=tl.float32),) * KD
        for t in range(d_start - pad_d, d_end - pad_d + KD - 1):
            od, idp = _walk_slices(t, pad_d, INT64)
            g_ok = out_mask & (od >= d_start) & (od < d_end)
            g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + w3 * sgw, mask=g_ok, other=0.0)
            g = g.to(tl.float32)
            acc_b += g
            shifted = (g,)
            for i in tl.static_range(KD - 1):
                shifted = shifted + (win[i],)
            win = shifted
            ok = out_mask & (idp >= 0) & (idp < D_in)
            xs = _plane_loads(x_base + idp * sxd, ok, h3, w3, H_in, W_in, sxh, sxw, pad_h, pad_w, dil_h, dil_w,
                              KH, KW)
            updated = ()
            for kd in tl.static_range(KD):
                for i in tl.static_range(KH * KW):
                    updated = updated + (accs[kd * KH * KW + i] + win[kd] * xs[i],)
            accs = updated
    else:
        for od_i in range(d_start, d_end):
            od = od_i
            if INT64:
                od = tl.cast(od_i, tl.int64)
            g = tl.load(g_ptr + b * sgb + c3 * sgc + od * sgd + h3 * sgh + w3 * sgw, mask=out_mask, other=0.0)
            g = g.to(tl.float32)
            acc_b += g
            updated = ()
            for kdi in tl.static_range(KD_PER):
                # A [1, 1, 1] tensor, not a scalar: the interpreter mis-types `tensor & scalar_bool` masks.
                idp = od - pad_d + (kd0 + kdi) * dil_d + tl.zeros([1, 1, 1], dtype=tl.int32)
                ok = out_mask & (idp >= 0) & (idp < D_in)
                xs = _plane_loads(x_base + idp * sxd, ok, h3, w3, H_in, W_in, sxh, sxw, pad_h, pad_w, dil_h, dil_w,
                                  KH, KW)
                for i in tl.static_range(KH * KW):
                    updated = updated + (accs[kdi * KH * KW + i] + g * xs[i],)
            accs = updated

    row = pid_bd * (n_h * n_w) + pid_hw
    if INT64:  # the workspace (rows, KVOL, C) can pass 2^31 elements where x does not (channels-last, 9x9x9)
        row = row.to(tl.int64)
    dw_row = dwp_ptr + row * KVOL * C + (kd0 * KH + kh0) * KW * C + offs_c
    for i in tl.static_range(NT):
        tap_ok = offs_c < C
        if KH_PER < KH:
            # a vector, not a scalar: the interpreter mis-types `tensor & scalar_bool` masks
            tap_ok = tap_ok & (offs_c * 0 + kh0 + i // KW < KH)
        tl.store(dw_row + i * C, _tile_sum(accs[i], LANES > 0 and not COLUMNS), mask=tap_ok)
    if HAS_BIAS:
        if pid_t == 0:
            tl.store(dbp_ptr + row * C + offs_c, _tile_sum(acc_b, LANES > 0 and not COLUMNS), mask=offs_c < C)


@triton.jit
def _tile_sum(acc, ONE_CHANNEL: tl.constexpr):
    """Per-channel sum of a (C, H, W) tile, or the whole sum of an (H, G, LANES) lane tile (one channel)."""
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    if ONE_CHANNEL:
        total = tl.sum(total, axis=0)
    return total


# --------------------------------------------------------------------------------------------------------
# Launchers. They take tensors already validated by fastseg3d.ops.dwconv3d and write into given outputs.
# The weight comes tap-major, (KD, KH, KW, CP) contiguous fp32 (see ``taps_major``): a tap's weights for a channel
# tile are then one vector load, where the (C, 1, KD, KH, KW) layout costs one scalar load per channel and tap.


def taps_major(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, KD, KH, KW) -> (KD, KH, KW, CP) contiguous fp32, the weight layout the kernels read: CP is C rounded
    up to a multiple of 64 (the widest channel block), zero-padded, so tap loads need no mask. fp32 (exact for
    half weights), because the kernels reload taps inside their loops and a half weight costs a conversion
    each time."""
    c = weight.shape[0]
    cp = cdiv(c, _MAX_BLOCK_C) * _MAX_BLOCK_C
    taps = weight[:, 0].permute(1, 2, 3, 0)
    # ops, not Python indexing into a new tensor, which cost ~7 us more per call on the host
    if cp > c:
        return F.pad(taps.float(), (0, cp - c)).contiguous()  # pad may keep a permuted weight's layout
    return taps.new_empty(taps.shape, dtype=torch.float32).copy_(taps)


def _needs_int64(*tensors: torch.Tensor | None) -> bool:
    return utils.needs_int64(*tensors, limit=_INT32_MAX)


def _blocks(x: torch.Tensor, h_out: int, w_out: int, tile: int) -> tuple[int, int, int]:
    """Tile shape: channel-major when the channel stride is 1 (coalesced along C), else width-major."""
    c = x.shape[1]
    np2 = next_power_of_2
    if x.stride(1) == 1 and c > 1:
        block_c = min(np2(c), _MAX_BLOCK_C)
        rest = max(1, tile // block_c)
        block_w = min(np2(w_out), rest)
        block_h = min(np2(h_out), max(1, rest // block_w))
    else:
        block_c = 1
        block_w = min(np2(w_out), 128)
        block_h = min(np2(h_out), max(1, tile // block_w))
    return block_c, block_h, block_w


def _lanes(three_wide_roll, padding, dilation, block_c, block_w, width) -> int:
    """LANES of a launch: ``width`` (the aligned W vector a thread can take, 0 for none) for a rolling walk with
    3-wide undilated W taps on a W-major tile, on a GPU with the center tap on the output, else 0.

    Unaligned rows load element by element, and the compiler then moves the lanes through shared memory: on a GPU
    ``width`` comes from :func:`_vector_lanes`. The interpreter takes lanes on any shape, so
    the tests cover them on tiny ones."""
    if not (width and three_wide_roll and dilation[2] == 1 and block_c == 1 and block_w >= width):
        return 0
    return width if INTERPRET or padding[2] == 1 else 0


def _multiples(lanes: int, *tensors: torch.Tensor | None) -> bool:
    """Whether W and every stride but W's (a unit one) of these tensors are multiples of ``lanes``."""
    return all(t is None or (t.shape[4] % lanes == 0 and t.stride(4) == 1
                             and all(s % lanes == 0 for s in t.stride()[:4])) for t in tensors)


def _vector_lanes(vec: int, *tensors: torch.Tensor | None) -> int:
    """The lanes of a thread's W vector in the forward kernel on a GPU: 16 bytes (``vec`` elements) where W and
    every stride but W's are multiples of ``vec``, else 8 bytes where they are multiples of half of it (2-byte
    types), on 16-byte aligned data; 0 where neither. The kernel takes W and those strides in units of the lanes
    (UNIT), so that rows of 24 or 40 elements (96^3 and 160^3 inputs at their 1/4 scale) are aligned vectors too."""
    if vec < 4:  # fp64: the lanes split into 4 or 8
        return 0
    if INTERPRET:
        return vec
    if any(t is not None and t.storage_offset() % vec for t in tensors):
        return 0
    for lanes in (vec, vec // 2):
        if lanes >= 4 and _multiples(lanes, *tensors):
            return lanes
    return 0


def _unit(lanes: int, block_c: int, int64: bool, *tensors: torch.Tensor | None) -> int:
    """UNIT of a W-lane launch: ``lanes`` where W and the strides are multiples of them but not of 16, and the
    indexing is 32-bit (the kernel's products would overflow int32 arguments otherwise), else 1."""
    # multiples of 16: the divisibility Triton specialises integer arguments on
    if lanes and block_c == 1 and not int64 and not _multiples(16, *tensors) and _multiples(lanes, *tensors):
        return lanes
    return 1


def _wide_lanes(x, kernel, padding, dilation, h_out, w_out, width) -> bool:
    """Whether the general path (kernels the rolling walk does not take) runs on W-lane tiles of ``width`` lanes
    (the aligned W vector a thread can take, 0 for none): a W-major tile, centred undilated W taps reaching at most
    ``width`` to either side, on a GPU planes of at least a warp's vectors."""
    kw = kernel[2]
    if (not width or x.stride(1) == 1 and x.shape[1] > 1 or kw % 2 == 0 or dilation[2] != 1
            or padding[2] != (kw - 1) // 2 or kw // 2 > width):
        return False
    groups = min(next_power_of_2(w_out), 32 * width) // width
    return INTERPRET or next_power_of_2(h_out) * groups >= 32


def _wide_lane_tile(h_out: int, w_out: int, lanes: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_W, ROWS, num_warps) of a general-path W-lane tile: up to four warps (4096 outputs under the
    interpreter) of ``rows`` x ``lanes`` outputs a thread, a warp's lane groups across W. Small planes take fewer
    rows per thread, then fewer warps: a tile with fewer outputs than its threads hold would not keep a thread's
    outputs one vector (see :func:`_lane_tile_rows`)."""
    block_w = max(lanes, min(next_power_of_2(w_out), 32 * lanes))
    groups = block_w // lanes
    h_pad = next_power_of_2(h_out)
    rows = max(1, min(rows, h_pad * groups // 32))
    cap = 4096 // (rows * lanes) if INTERPRET else 128
    threads = max(groups, min(cap, h_pad * groups // rows))
    return rows * threads // groups, block_w, rows, max(1, threads // 32)


def _lane_tile_rows(h_out: int, groups: int, rows: int) -> tuple[int, int]:
    """(BLOCK_H, ROWS) of a W-lane tile on a GPU: 128 threads of `rows` x LANES outputs each, `groups` lane groups
    along W. A plane too short for that takes fewer rows per thread first: on a tile with fewer outputs than its
    threads hold, a thread's elements stop being one vector and the lanes go through conversions (32^3 planes:
    86 instructions per output instead of 41)."""
    h_pad = next_power_of_2(h_out)
    rows = max(1, min(rows, h_pad * groups // 128))
    return min(h_pad, rows * 128 // groups), rows


def _takes_columns(x: torch.Tensor, kw: int, dilation: tuple[int, int, int]) -> bool:
    """A channel-major tile (unit channel stride) whose W taps are adjacent: channel-major columns."""
    return x.stride(1) == 1 and x.shape[1] > 1 and (kw == 1 or dilation[2] == 1)


def _large_columns(element_size: int, kw: int, dil_h: int) -> tuple[int, int, int]:
    """(channels, lanes, rows) a thread holds on the channel-major column tiles of kernels larger than the rolling
    walk takes. Chosen on sm_90 compiles at (2, 32, 128^3) and (2, 32, 24^3) for 7x7x7 and (2, 64, 12^3) for 9x9x9
    (main-loop instructions per output and depth tap, against 249 and 600 with one load per tap): 2-byte inputs 4
    channels by 4 lanes (105, 147 to 207 registers; two rows spilled, and 8 by 2 by two rows read as bf16 vectors,
    98.5 with no activation, spilled with GELU) and for 9-wide rows 8 by 2 (203; 4 by 4 spilled); fp32 4 by 4 by two
    rows (73, 152 registers; 93 with one row) and for 9-wide rows 4 by 2 by two rows (146; one row of 4 lanes 150).
    Rows share their input rows only where the H taps are undilated."""
    if element_size == 4:
        return (4, 4 if kw <= 7 else 2, 2) if dil_h == 1 else (4, 4, 1)
    return (4, 4, 1) if kw <= 7 else (8, 2, 1)


def _large_grad_columns(element_size: int, kh: int, kw: int) -> tuple[int, int, int]:
    """(channels, lanes, rows of taps) of the weight gradient's column tiles for kernels its rolling walk does not
    take (larger ones, dilated depth taps): 2 channels at 4 lanes a thread and one fp32 sum per tap and channel,
    up to 49 taps a program for 2-byte inputs (7x7: 122 instructions per output and depth tap on sm_90, 225
    registers) and 28 for fp32 and 9-wide rows (7x7 fp32: 127 over two programs, 182 registers; 9x9: 203 in bf16,
    180 in fp32), against 410 and 674 with one load per tap; 4 channels spilled or took every register, for about
    10% fewer instructions."""
    taps = 49 if element_size == 2 and kw <= 7 else 28
    return 2, 4, max(1, min(kh, taps // kw))


def _channel_pairs(x: torch.Tensor, block_c: int) -> bool:
    """Whether a channel-major tile reads bf16 ``x`` as channel pairs in int32: every pair 4-byte aligned (even
    strides and offset) and whole tiles of channels, so that the loads need no channel mask (a mask that varies
    within a vector would split it)."""
    return (x.dtype == torch.bfloat16 and x.shape[1] % block_c == 0 and block_c % 2 == 0
            and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for i, s in enumerate(x.stride()) if i != 1))


def _pair_strides(t: torch.Tensor, pairs: bool) -> tuple[int, ...]:
    """t's strides, counted in channel pairs but for the channel stride when ``pairs``."""
    return tuple(s // 2 if pairs and i != 1 else s for i, s in enumerate(t.stride()))


def _strides(t: torch.Tensor | None, unit: int = 1) -> tuple[int, ...]:
    """t's strides, but for W's divided by ``unit`` (the kernel's UNIT)."""
    if t is None:
        return (0, 0, 0, 0, 0)
    return (*(s // unit for s in t.stride()[:4]), t.stride(4))


def _chunks(n: int, kd: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(J_CHUNK, N_CHUNKS) of the rolling walk: split ``n`` outputs of a depth residue into runs. A run of J
    outputs reads J + KD - 1 slices, so runs are at least 4 * (KD - 1) long; beyond that they are cut until the
    grid has PROGRAMS_PER_SM programs for each SM."""
    shortest = max(1, 4 * (kd - 1))
    if INTERPRET:
        shortest = 2  # several runs even on the tests' tiny shapes
        wanted = cdiv(n, shortest)
    else:
        sms = utils.sm_count(device)
        wanted = 1 if sms is None else cdiv(PROGRAMS_PER_SM * sms, tiles)
    j_chunk = max(shortest, cdiv(n, max(1, wanted)))
    return j_chunk, cdiv(n, j_chunk)


def dwconv3d_fwd(
    x: torch.Tensor,
    weight_taps: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    act: int,
    flip: bool = False,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the forward kernel into ``out``; with ``grad`` it writes ``grad * act'(conv(x) + bias)``.

    ``weight_taps``: the weight as :func:`taps_major` gives it. ``bias``: any (C,) tensor; the kernel reads it at
    unit stride (a copy of C elements where it is a strided view).
    """
    if bias is not None:
        bias = bias.contiguous()
    _, c, d_in, h_in, w_in = x.shape
    bsz, _, d_out, h_out, w_out = out.shape
    kd, kh, kw, _ = weight_taps.shape
    roll = kd in (1, 3) and kh * kw <= 9
    vec = 16 // x.element_size()
    rows = 1
    warps = 4
    if _takes_columns(x, kw, dilation):
        # Channel-major columns: a thread holds a vector of channels at `lanes` consecutive W outputs, so each
        # input column it loads serves up to KW outputs and each tap's weights serve `lanes` outputs. For 3x3x3
        # (three accumulators per output) 4 channels by 2 columns; for 1x3x3 a 16-byte vector by 16 / vec.
        if roll:
            channels = vec if kd == 1 else 4
            lanes = min(_COLUMN_OUTPUTS[kd] // channels, next_power_of_2(w_out))
        else:
            channels, lanes, rows = _large_columns(x.element_size(), kw, dilation[1])
            lanes = min(lanes, next_power_of_2(w_out))
            rows = min(rows, next_power_of_2(h_out))
        tile = 4096 if INTERPRET else 128 * channels
        # the tile in units of a thread's rows and lanes
        block_c, block_h, groups = _blocks(x, cdiv(h_out, rows), cdiv(w_out, lanes), tile)
        block_h *= rows
        block_w = groups * lanes
        pairs = _channel_pairs(x, block_c)
    else:
        pairs = False
        # The in-plane taps are unrolled and their loads issued together, so they share the registers with the KD
        # accumulators: up to 3x3 taps, 16 (KD = 1) or 8 (KD = 3) outputs per thread compile without spills for
        # sm_90 (4 for fp32 channel-major tiles, whose fp32 tap weights take twice the registers); larger kernels
        # loop over depth taps with up to about 200 in-plane taps x outputs per thread (8 x 5x5 spilled, 4 x 7x7
        # takes 180 to 216 registers, 4 x 9x9 spilled), or on W-lane tiles with two rows of 8 lanes (2-byte inputs:
        # 96 registers at 7x7x7; four rows, 197, save another 14%) or four rows of 4 (fp32: 159 registers).
        per_thread = 16 if roll and kd == 1 else 8
        while per_thread * kh * kw > 196:
            per_thread //= 2
        if roll and x.element_size() == 4 and x.stride(1) == 1:
            per_thread //= 2
        tile = 4096 if INTERPRET else 128 * per_thread
        block_c, block_h, block_w = _blocks(x, h_out, w_out, tile)
        width = _vector_lanes(vec, x, out, residual, grad)
        lanes = _lanes(roll and kw == 3, padding, dilation, block_c, block_w, width)
        if not roll and _wide_lanes(x, (kd, kh, kw), padding, dilation, h_out, w_out, width):
            lanes = width
            block_h, block_w, rows, warps = _wide_lane_tile(h_out, w_out, lanes,
                                                            _WIDE_ROWS[lanes] if dilation[1] == 1 else 1)
        elif lanes and kh == 3 and dilation[1] == 1:
            # A thread's outputs on W-lane tiles: `lanes` along W by `rows` adjacent rows, which share their input
            # rows (rows + 2 loads for 3 * rows), up to 4 rows while the KD * rows * lanes accumulators stay within
            # a budget. 48 (two rows of 8 for 3x3x3) for 2-byte inputs compiles within 128 registers for sm_90,
            # which keeps 16 warps per SM, but for the dz pass of relu and silu (139 to 157); fp32 would take 150
            # to 250.
            budget = 48 if vec == 8 and (grad is None or act not in (ACT_IDS["relu"], ACT_IDS["silu"])) else 24
            rows = min(4, 1 << ((budget // (kd * lanes)).bit_length() - 1), block_h)
            if not INTERPRET:
                block_h, rows = _lane_tile_rows(h_out, block_w // lanes, rows)
    n_tiles = cdiv(c, block_c) * cdiv(h_out, block_h) * cdiv(w_out, block_w)
    dil_d = dilation[0]
    n_per_residue = cdiv(d_out, dil_d)
    if roll:
        j_chunk, n_chunks = _chunks(n_per_residue, kd, n_tiles * bsz * dil_d, x.device)
    else:
        j_chunk, n_chunks = 1, n_per_residue
    grid = (n_tiles, dil_d * n_chunks, bsz)
    # W-lane tiles take W and the strides in units of their lanes where those are multiples of the lanes but not of
    # 16 (on a GPU: any lane tile but those): the products cost registers (3x3x3 GELU dz pass: 124 -> 159). Not
    # with 64-bit indexing, where they would overflow the 32-bit arguments.
    tensors = (x, out, residual, grad)
    int64 = _needs_int64(*tensors)
    unit = _unit(lanes, block_c, int64, *tensors)
    wrap(_dwconv3d_fwd_kernel)[grid](
        x, weight_taps, bias if bias is not None else weight_taps, residual if residual is not None else x,
        grad if grad is not None else x, out,
        c, weight_taps.shape[3], d_in, h_in, w_in // unit, d_out, h_out, w_out // unit, j_chunk, n_chunks,
        *(_strides(x, unit) if unit > 1 else _pair_strides(x, pairs)), *_strides(residual, unit),
        *_strides(grad, unit), *_strides(out, unit), *padding, *dilation,
        KD=kd, KH=kh, KW=kw, FLIP=flip, ROLL=roll, LANES=lanes, ROWS=rows, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, ACT=act, GRAD_ACT=grad is not None, INT64=int64,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, PAIRS=pairs, UNIT=unit, STAGES=WALK_STAGES,
        num_warps=warps,
    )
    return out


def dwconv3d_bwd_weight(
    x: torch.Tensor,
    dz: torch.Tensor,
    kernel_size: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    with_bias: bool,
    empty=torch.empty,
    dtypes: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias gradients (shapes (C, KD*KH*KW) and (C,), the latter when ``with_bias``, in ``dtypes``) from
    the gradient ``dz`` at the pre-activation. ``empty`` allocates the workspaces (tests pass a NaN-filling one)."""
    bsz, c, d_in, h_in, w_in = x.shape
    _, _, d_out, h_out, w_out = dz.shape
    kd, kh, kw = kernel_size
    kvol = kd * kh * kw
    # One elementwise accumulator per tap: up to 27 taps per program (larger kernels split by depth tap), with
    # the tile sized so that the accumulators hold about 128 fp32 values per thread, 64 where a split kernel has
    # more than 9 in-plane taps (100 for 5x5x5 and 98 for 7x7x7 spilled on sm_90). Channel-major columns (3x3x3:
    # 8 outputs per thread, about 200 registers and no spills) and NCDHW lane tiles (one sum per tap and thread)
    # size their tiles below.
    kd_per = kd if kvol <= 27 else 1
    n_tap_chunks = kd // kd_per
    kh_per = kh
    # As in the forward: the rolling walk for 3x3x3 and 1x3x3 (each input slice read once per in-plane tap).
    roll = kd in (1, 3) and kh * kw <= 9 and dilation[0] == 1
    taps = kd_per * kh * kw
    budget = 64 if kd_per == 1 and taps > 9 else 128
    tile = 4096 if INTERPRET else 128 * min(8, 1 << (max(1, budget // taps).bit_length() - 1))
    lane_rows = 1
    warps = 4
    if roll and _takes_columns(x, kw, dilation):
        # channel-major columns, as in the forward: 4 channels at 2 consecutive W positions per thread
        lanes = min(2, next_power_of_2(w_out))
        block_c, block_h, groups = _blocks(x, h_out, cdiv(w_out, lanes), 4096 if INTERPRET else 512)
        block_w = groups * lanes
        pairs = _channel_pairs(x, block_c) and dz.stride(1) == 1 and _channel_pairs(dz, block_c)
    elif _takes_columns(x, kw, dilation):
        # larger kernels (or dilated depth taps) on channel-major columns: one sum per tap and channel a thread
        # holds, over kh_per rows of taps a program
        channels, lanes, kh_per = _large_grad_columns(x.element_size(), kh, kw)
        kd_per, n_tap_chunks = 1, kd * cdiv(kh, kh_per)
        lanes = min(lanes, next_power_of_2(w_out))
        block_c, block_h, groups = _blocks(x, h_out, cdiv(w_out, lanes), 4096 if INTERPRET else 128 * channels)
        block_w = groups * lanes
        pairs = _channel_pairs(x, block_c) and dz.stride(1) == 1 and _channel_pairs(dz, block_c)
    else:
        pairs = False
        block_c, block_h, block_w = _blocks(x, h_out, w_out, tile)
        width = _vector_lanes(16 // x.element_size(), x, dz)
        lanes = _lanes(roll and kw == 3, padding, dilation, block_c, block_w, width)
        if not roll and _wide_lanes(x, kernel_size, padding, dilation, h_out, w_out, width):
            # larger kernels: one sum per tap and thread, over two rows of dz lanes (7x7x7 on sm_90: 168 registers
            # in bf16; fp32 with four rows of 4 took 238, 11% fewer instructions)
            lanes = width
            block_h, block_w, lane_rows, warps = _wide_lane_tile(h_out, w_out, lanes, 2 if dilation[1] == 1 else 1)
        elif lanes:
            # One sum per tap and thread: a thread takes a 16-byte vector of dz along W by `rows` adjacent rows,
            # which share their input rows, while its window of KD * rows * lanes dz values stays within 48.
            if kh == 3 and dilation[1] == 1:
                lane_rows = min(4, 1 << ((48 // (kd * lanes)).bit_length() - 1), next_power_of_2(h_out))
            if INTERPRET:
                lane_rows = min(lane_rows, block_h)
            else:
                block_h, lane_rows = _lane_tile_rows(h_out, block_w // lanes, lane_rows)
    n_hw = cdiv(h_out, block_h) * cdiv(w_out, block_w)
    n_c = cdiv(c, block_c)
    sms = utils.sm_count(x.device)
    if INTERPRET:
        n_dchunks = min(2, d_out)  # the chunk boundaries, exercised on the tests' tiny shapes
    elif sms is None:
        n_dchunks = 1
    else:
        n_dchunks = max(1, min(d_out, cdiv(8 * sms, n_hw * n_c * n_tap_chunks * bsz)))
    d_chunk = cdiv(d_out, n_dchunks)
    n_dchunks = cdiv(d_out, d_chunk)
    rows = bsz * n_dchunks * n_hw
    dwp = empty((rows, kvol, c), dtype=torch.float32, device=x.device)
    dbp = empty((rows, c), dtype=torch.float32, device=x.device) if with_bias else None
    grid = (n_c * n_hw, n_tap_chunks, bsz * n_dchunks)
    int64 = _needs_int64(x, dz, dwp)
    unit = _unit(lanes, block_c, int64, x, dz)
    wrap(_dwconv3d_bwd_weight_kernel)[grid](
        x, dz, dwp, dbp if dbp is not None else dwp,
        c, d_in, h_in, w_in // unit, d_out, h_out, w_out // unit, d_chunk,
        *(_pair_strides(x, pairs) if pairs else _strides(x, unit)),
        *(_pair_strides(dz, pairs) if pairs else _strides(dz, unit)),
        *padding, *dilation,
        KD=kd, KH=kh, KW=kw, KD_PER=kd_per, KH_PER=kh_per, ROLL=roll, LANES=lanes, ROWS=lane_rows, HAS_BIAS=with_bias,
        INT64=int64,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, PAIRS=pairs, UNIT=unit, num_warps=warps,
    )
    # Fixed-order reductions over the workspace rows (one launch): deterministic for a given shape and device.
    dw = empty((c, kvol), dtype=dtypes[0], device=x.device)
    db = empty((c,), dtype=dtypes[1], device=x.device) if with_bias else None
    utils.sum_partials(dwp, dw, dbp.view(rows, 1, c) if with_bias else None, db)
    return dw, db
