"""Every Triton kernel compiles for an H100 (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as numpy and cannot show what only the compiler sees (type errors in loops, bf16 dots,
64-bit index paths, register spills). ``triton.compile`` with an explicit target runs the whole pipeline down to a
cubin with the ptxas bundled in the Triton wheel.
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(kernel, values: dict, num_warps: int = 4):
    """Compile ``kernel`` with ``values``: a type string ("*bf16", "i32", "fp32") per runtime argument and a value
    per ``tl.constexpr`` argument."""
    signature, constexprs = {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool)):
            # an int runtime argument given as a value: specialised, as Triton specialises an argument equal to 1
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[param.name] = value
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=H100,
                              options={"num_warps": num_warps})
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def _ints(*names):
    return {n: "i32" for n in names}


def _dwconv_fwd_values(dtype, kernel, act, int64, flip=False, grad=False, res=True, roll=True, lanes=0, rows=1,
                       columns=False, pairs=False, unit=1):
    values = {p: f"*{dtype}" for p in ("x_ptr", "bias_ptr", "r_ptr", "g_ptr", "y_ptr")}
    values["w_ptr"] = "*fp32"
    values.update(_ints("C", "CP", "D_in", "H_in", "W_in", "D_out", "H_out", "W_out", "J_CHUNK", "N_CHUNKS",
                        *[f"s{t}{a}" for t in "xrgy" for a in "bcdhw"],
                        "pad_d", "pad_h", "pad_w", "dil_d", "dil_h", "dil_w"))
    block = (32, rows, 32) if columns else (1, 8 * rows, 128) if lanes else (64, 1, 16)
    values.update(KD=kernel[0], KH=kernel[1], KW=kernel[2], FLIP=flip, ROLL=roll, LANES=lanes, ROWS=rows, HAS_BIAS=True,
                  HAS_RES=res, ACT=act, GRAD_ACT=grad, INT64=int64, BLOCK_C=block[0], BLOCK_H=block[1],
                  BLOCK_W=block[2], PAIRS=pairs, UNIT=unit, STAGES=1)
    return values


@pytest.mark.parametrize(
    "dtype,kernel,act,int64,flip,grad,roll,lanes,rows",
    [("bf16", (3, 3, 3), 2, False, False, False, True, 0, 1), ("fp16", (1, 3, 3), 4, False, False, False, True, 0, 1),
     ("fp32", (7, 7, 7), 3, True, False, False, False, 0, 1), ("bf16", (3, 3, 3), 0, False, True, False, True, 0, 1),
     ("bf16", (5, 5, 5), 2, False, False, True, False, 0, 1), ("fp32", (3, 3, 3), 1, True, True, True, True, 0, 1),
     ("bf16", (3, 3, 3), 2, False, False, False, True, 8, 1), ("fp16", (3, 3, 3), 0, False, True, True, True, 8, 2),
     ("fp32", (1, 3, 3), 4, True, False, False, True, 4, 4), ("bf16", (1, 3, 3), 0, True, True, False, True, 8, 4),
     # the general path's W-lane tiles (larger kernels): flipped taps and GELU's gradient, a 9x9x9 in int64
     ("bf16", (7, 7, 7), 2, False, True, True, False, 8, 2), ("fp32", (9, 9, 9), 0, True, False, False, False, 4, 4),
     # 2-byte rows that are multiples of 4 elements, not 8: 8-byte vectors of 4 lanes
     ("bf16", (3, 3, 3), 2, False, False, False, True, 4, 4), ("bf16", (9, 9, 9), 0, False, False, True, False, 4, 4)],
)
def test_dwconv3d_forward_kernel(dtype, kernel, act, int64, flip, grad, roll, lanes, rows):
    from fastseg3d.kernels.dwconv3d import _dwconv3d_fwd_kernel

    unit = lanes if lanes == 4 and dtype == "bf16" else 1  # 2-byte rows of 4-element multiples: W, strides in 4s
    compile_for_h100(_dwconv3d_fwd_kernel, _dwconv_fwd_values(dtype, kernel, act, int64, flip, grad, roll=roll,
                                                              lanes=lanes, rows=rows, unit=unit))


@pytest.mark.parametrize("dtype,channels_last,kernel", [
    (torch.bfloat16, False, (3, 3, 3)), (torch.bfloat16, True, (3, 3, 3)), (torch.float32, False, (3, 3, 3)),
    (torch.float16, True, (1, 3, 3))])
def test_dwconv3d_forward_pipelined_walk(dtype, channels_last, kernel):
    """The rolling walk with its slice loads software-pipelined (WALK_STAGES > 1, which bench.tune sweeps), compiled
    as the planner launches it (W-lane tiles NCDHW, channel-major columns channels-last, with the JIT's
    specialisation: without the divisibility hints the row loads are too narrow for cp.async): the loads go through
    shared memory with cp.async only when staged."""
    from unittest import mock

    from bench.sass import _captured, _compile_like_jit
    from fastseg3d.kernels import dwconv3d as k

    x = torch.empty(2, 32, 64, 64, 64, dtype=dtype, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    w = torch.empty(32, 1, *kernel, dtype=dtype, device="meta")
    compiled = []
    for stages in (1, 3):
        with mock.patch.object(k, "WALK_STAGES", stages), mock.patch.object(k, "INTERPRET", False):
            (fn, args, kwargs), = _captured(lambda: k.dwconv3d_fwd(
                x, k.taps_major(w), w.new_empty(32), None, torch.empty_like(x), tuple(s // 2 for s in kernel),
                (1, 1, 1), 0))
        assert kwargs["STAGES"] == stages and kwargs["LANES"] > 0
        compiled.append(_compile_like_jit(fn, args, kwargs))
    plain, staged = compiled
    assert "cp.async" not in plain.asm["ptx"] and "cp.async" in staged.asm["ptx"]
    assert staged.metadata.shared > plain.metadata.shared


@pytest.mark.parametrize("kernel,act,int64,pairs,lanes,rows,grad",
                         [((3, 3, 3), 0, False, True, 2, 1, False), ((1, 3, 3), 2, True, True, 2, 1, False),
                          ((3, 3, 3), 1, True, False, 2, 1, False),
                          # larger kernels: flipped taps (the dx pass) in int64, GELU's dz pass on two rows
                          ((7, 7, 7), 0, True, True, 4, 1, False), ((5, 5, 5), 2, False, False, 4, 2, True)])
def test_dwconv3d_forward_column_tiles(kernel, act, int64, pairs, lanes, rows, grad):
    """Channel-major column tiles (channels-last and tokens), bf16 read as channel pairs in int32 or as bf16."""
    from fastseg3d.kernels.dwconv3d import _dwconv3d_fwd_kernel

    roll = kernel[0] in (1, 3) and kernel[1] * kernel[2] <= 9
    compile_for_h100(_dwconv3d_fwd_kernel, _dwconv_fwd_values("bf16", kernel, act, int64, flip=int64, grad=grad,
                                                              roll=roll, lanes=lanes, rows=rows, columns=True,
                                                              pairs=pairs))


@pytest.mark.parametrize("dtype,kernel,kd_per,int64,roll,lanes,rows",
                         [("bf16", (3, 3, 3), 3, False, True, 0, 1), ("fp32", (3, 3, 3), 3, True, True, 0, 1),
                          ("fp16", (3, 3, 3), 3, False, False, 0, 1), ("bf16", (7, 7, 7), 1, False, False, 0, 1),
                          ("bf16", (3, 3, 3), 3, True, True, 8, 2), ("fp32", (1, 3, 3), 1, False, True, 4, 4),
                          ("bf16", (3, 3, 3), 3, True, True, 2, 1), ("bf16", (1, 3, 3), 1, False, True, 2, 1),
                          # larger kernels on W-lane tiles; 2-byte rows of 4-element multiples (8-byte vectors)
                          ("bf16", (7, 7, 7), 1, False, False, 8, 2), ("fp32", (9, 9, 9), 1, True, False, 4, 2),
                          ("bf16", (3, 3, 3), 3, False, True, 4, 4), ("bf16", (9, 9, 9), 1, False, False, 4, 2),
                          # 3x3x3 with dilated depth: all three depth taps in one program on W-lane tiles
                          ("bf16", (3, 3, 3), 3, False, False, 8, 2)])
def test_dwconv3d_weight_grad_kernel(dtype, kernel, kd_per, int64, roll, lanes, rows):
    from fastseg3d.kernels.dwconv3d import _dwconv3d_bwd_weight_kernel

    values = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dwp_ptr": "*fp32", "dbp_ptr": "*fp32"}
    values.update(_ints("C", "D_in", "H_in", "W_in", "D_out", "H_out", "W_out", "D_CHUNK",
                        *[f"s{t}{a}" for t in "xg" for a in "bcdhw"],
                        "pad_d", "pad_h", "pad_w", "dil_d", "dil_h", "dil_w"))
    block = (32, 1, 32) if lanes == 2 else (1, 8 * rows, 128) if lanes else (64, 1, 16)
    values.update(KD=kernel[0], KH=kernel[1], KW=kernel[2], KD_PER=kd_per, KH_PER=kernel[1], ROLL=roll, LANES=lanes,
                  ROWS=rows, HAS_BIAS=True, INT64=int64, BLOCK_C=block[0], BLOCK_H=block[1], BLOCK_W=block[2],
                  PAIRS=lanes == 2 and dtype == "bf16", UNIT=lanes if lanes == 4 and dtype == "bf16" else 1)
    compile_for_h100(_dwconv3d_bwd_weight_kernel, values)


@pytest.mark.parametrize("dtype,kernel,kh_per,int64,pairs", [("bf16", (7, 7, 7), 7, False, True),
                                                             ("fp32", (7, 7, 7), 4, True, False),
                                                             ("fp16", (1, 9, 9), 3, False, False)])
def test_dwconv3d_weight_grad_large_kernel_columns(dtype, kernel, kh_per, int64, pairs):
    """Larger kernels' weight gradient on channel-major column tiles, a depth tap's rows of taps whole or split
    over programs (the last chunk's rows past KH masked), bf16 read as channel pairs, 64-bit indexing."""
    from fastseg3d.kernels.dwconv3d import _dwconv3d_bwd_weight_kernel

    values = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dwp_ptr": "*fp32", "dbp_ptr": "*fp32"}
    values.update(_ints("C", "D_in", "H_in", "W_in", "D_out", "H_out", "W_out", "D_CHUNK",
                        *[f"s{t}{a}" for t in "xg" for a in "bcdhw"],
                        "pad_d", "pad_h", "pad_w", "dil_d", "dil_h", "dil_w"))
    values.update(KD=kernel[0], KH=kernel[1], KW=kernel[2], KD_PER=1, KH_PER=kh_per, ROLL=False, LANES=4, ROWS=1,
                  HAS_BIAS=True, INT64=int64, BLOCK_C=32, BLOCK_H=1, BLOCK_W=32, PAIRS=pairs, UNIT=1)
    compile_for_h100(_dwconv3d_bwd_weight_kernel, values)


def _attn_values(dtype, names):
    values = {n: f"*{dtype}" for n in names}
    for n in ("lse_ptr", "delta_ptr"):
        if n in values:
            values[n] = "*fp32"
    return values


# (masked tail, 64-bit row offsets) of each attention kernel compiled
_TAILS = tuple(itertools.product((False, True), repeat=2))


@pytest.mark.parametrize("dtype,head_dim,precision", [("bf16", 32, None), ("fp16", 64, None), ("fp32", 32, "ieee"),
                                                      ("fp32", 16, "tf32"), ("bf16", 128, None)])
def test_attention_kernels(dtype, head_dim, precision):
    from fastseg3d.kernels import attention as k

    strides = [f"s{t}{a}" for t in "qkvo" for a in ("b", "n" if t in "qo" else "m", "h")]
    values = _attn_values(dtype, ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "lse_ptr"])
    values.update(_ints("N", "M", "H", *strides), qk_scale="fp32", HEAD_DIM=head_dim, BLOCK_M=128, BLOCK_N=64,
                  PRECISION=precision)
    for key_tail, int64 in _TAILS:
        compile_for_h100(k._attn_fwd_kernel, {**values, "KEY_TAIL": key_tail, "INT64": int64},
                         num_warps=4 if head_dim <= 64 else 8)

    strides = [f"s{t}{a}" for t in "qkvd" for a in ("b", "n" if t in "qd" else "m", "h")]
    values = _attn_values(dtype, ["q_ptr", "k_ptr", "v_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr"])
    values.update(dk_ptr="*fp32", dv_ptr="*fp32")
    values.update(_ints("N", "M", "H", "ROWS_PER_SPLIT", *strides),
                  qk_scale="fp32", scale="fp32", HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_N=64, PRECISION=precision)
    for row_tail, int64 in _TAILS:
        compile_for_h100(k._attn_bwd_dkdv_kernel, {**values, "ROW_TAIL": row_tail, "INT64": int64})

    strides = [f"s{t}{a}" for t in "qkvdg" for a in ("b", "n" if t in "qdg" else "m", "h")]
    values = _attn_values(dtype, ["q_ptr", "k_ptr", "v_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dq_ptr"])
    values.update(_ints("N", "M", "H", *strides), qk_scale="fp32", scale="fp32", HEAD_DIM=head_dim, BLOCK_M=64,
                  BLOCK_N=64, PRECISION=precision)
    for key_tail, int64 in _TAILS:
        compile_for_h100(k._attn_bwd_dq_kernel, {**values, "KEY_TAIL": key_tail, "INT64": int64})

    values = {"o_ptr": f"*{dtype}", "do_ptr": f"*{dtype}", "delta_ptr": "*fp32"}
    values.update(_ints("N", "H", "sob", "son", "soh", "sdb", "sdn", "sdh"), HEAD_DIM=head_dim, BLOCK_M=64)
    for int64 in (False, True):
        compile_for_h100(k._attn_bwd_delta_kernel, {**values, "INT64": int64})


def _kl_values(num_students, factors, teacher_factor, grad_teacher, int64=False):
    values = {p: "*bf16" for p in ("t_ptr", "gt_ptr", *[f"s{i}_ptr" for i in range(4)],
                                   *[f"gs{i}_ptr" for i in range(4)])}
    values["part_ptr"] = "*fp32"
    values.update(_ints("OD", "OH", "OW", "TD", "TH", "TW", *[f"S{i}{a}" for i in range(4) for a in "DHW"]))
    values.update({p: "fp32" for p in ("w0", "w1", "w2", "w3", "c0", "c1", "c2", "c3", "ct", "scale2")})
    values.update(NUM_S=num_students, TFD=teacher_factor[0], TFH=teacher_factor[1], TFW=teacher_factor[2],
                  INT64=int64, K=14, BLOCK_K=16, BLOCK_V=256, VEC=2, GRAD_T=grad_teacher, IL=0)
    if teacher_factor != (1, 1, 1) or any(f != (1, 1, 1) for f in factors):
        # as the launcher tiles upsampled inputs: flat accesses, and the upsampled ones class-interleaved
        values.update(BLOCK_V=128, VEC=1, IL=16)
    for i in range(4):
        for j, axis in enumerate("DHW"):
            values[f"F{i}{axis}"] = factors[i][j] if i < len(factors) else 1
        values[f"GRAD{i}"] = i < num_students
    return values


def test_distillation_kernels():
    from fastseg3d.kernels import kl_distill as kl
    from fastseg3d.kernels import selfreg as sr

    compile_for_h100(kl._kl_fwd_kernel, _kl_values(3, [(1, 1, 1), (2, 2, 2), (4, 4, 4)], (1, 1, 1), True), 8)
    compile_for_h100(kl._kl_fwd_kernel, _kl_values(1, [(1, 2, 4)], (2, 1, 1), False, int64=True), 8)
    # class-interleaved upsampled inputs of 1, 2 and 5 classes (one load per corner), and fp32 on the 64-bit path
    for classes, il in ((1, 1), (2, 2), (5, 8)):
        compile_for_h100(kl._kl_fwd_kernel, {**_kl_values(2, [(2, 2, 2), (1, 1, 1)], (1, 1, 1), True), "K": classes,
                                             "BLOCK_K": il, "IL": il}, 4)
    fp32 = {n: "*fp32" if str(v).startswith("*") else v
            for n, v in _kl_values(1, [(2, 2, 2)], (1, 2, 1), True, int64=True).items()}
    compile_for_h100(kl._kl_fwd_kernel, fp32, 4)
    transpose = {"g_ptr": "*bf16", "out_ptr": "*bf16", **_ints("OD", "OH", "OW", "ND", "NH", "NW"), "coef": "fp32",
                 "K": 14, "GFD": 2, "GFH": 4, "GFW": 1, "LD": 4, "LH": 8, "LW": 1, "INT64": False, "BLOCK_K": 16,
                 "BLOCK_V": 128, "OUT_IL": False}
    # class-interleaved gradient buffers (bf16 read as class pairs in int32, fp32 as is) and the blocked one; the
    # separable passes' class-interleaved fp32 output
    for classes, il, dtype in ((14, 16, "*bf16"), (2, 2, "*bf16"), (5, 8, "*fp32"), (14, 0, "*bf16")):
        compile_for_h100(kl._interp_transpose_kernel, {**transpose, "g_ptr": dtype, "K": classes,
                                                       "BLOCK_K": il or 16, "IL": il}, 4)
    for classes, il in ((14, 16), (3, 4)):
        compile_for_h100(kl._interp_transpose_kernel, {**transpose, "out_ptr": "*fp32", "K": classes, "BLOCK_K": il,
                                                       "IL": il, "GFD": 1, "LD": 1, "OUT_IL": True}, 4)
    inter = {"s_ptr": "*bf16", "gs_ptr": "*bf16", "t_ptr": "*fp32", "idx_s_ptr": "*i64", "idx_t_ptr": "*i64",
             "part_ptr": "*fp32", **_ints("CS", "CT", "NPAIRS", "OD", "OH", "OW", "SD", "SH", "SW"), "coef": "fp32",
             "FD": 2, "FH": 2, "FW": 2, "NEED_GRAD": True, "INT64": False, "BLOCK_V": 1024}
    compile_for_h100(sr._selfreg_inter_kernel, inter, 8)
    compile_for_h100(sr._avg_pool_kernel, {"x_ptr": "*bf16", "y_ptr": "*fp32",
                                           **_ints("OD", "OH", "OW", "XD", "XH", "XW"),
                                           "FD": 2, "FH": 4, "FW": 1, "INT64": False, "BLOCK_V": 1024}, 8)
    compile_for_h100(sr._channel_stats_kernel, {"x_ptr": "*bf16", "sum_ptr": "*fp32", "sq_ptr": "*fp32", "NVOX": "i32",
                                                "INT64": False, "BLOCK_V": 1024}, 8)
    compile_for_h100(sr._selfreg_intra_kernel, {"x_ptr": "*bf16", "g_ptr": "*bf16", "order_ptr": "*i64",
                                                "part_ptr": "*fp32", **_ints("C", "HALF", "NVOX"), "coef": "fp32",
                                                "NEED_GRAD": True, "INT64": True, "BLOCK_V": 1024}, 8)


@pytest.mark.parametrize("dtype,int64,act,block_c,pre", [("bf16", False, 1, 4, False), ("fp16", True, 2, 64, False),
                                                         ("fp32", False, 4, 1, False), ("bf16", True, 0, 16, False),
                                                         ("fp32", True, 3, 4, False), ("bf16", False, 5, 32, False),
                                                         ("bf16", False, 2, 64, True), ("fp32", True, 4, 4, True)])
def test_group_norm_act_kernels(dtype, int64, act, block_c, pre):
    """Every GroupNorm kernel in each dtype, activation (after the norm, or before it with ``pre``) and index width,
    at the tile shapes the launcher picks (NCDHW: up to 4 channels; channels-last: up to 64), without spills."""
    from bench.sass import _stats
    from fastseg3d.kernels import group_norm_act as gn

    values = {"x_ptr": f"*{dtype}", "dy_ptr": "*bf16", "y_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "w_ptr": "*fp32",
              "bias_ptr": "*fp32", **{p: "*fp32" for p in ("mean_ptr", "m2_ptr", "rstd_ptr", "out_mean_ptr",
                                                           "out_rstd_ptr", "sdz_ptr", "sdzx_ptr", "c1_ptr", "c2_ptr")},
              **_ints("C", "S", "G", "GB", "CG", "SPLIT", "SPLIT_B", "tiles_per_split", "chunk", "sb", "sc", "ss"),
              "eps": "fp32",
              "slope": "fp32",
              "HAS_W": not pre, "HAS_B": act != 0, "ACT": act, "PRE": pre, "BLOCK_S": 2048 // block_c,
              "BLOCK_C": block_c,
              "INT64": int64, "BLOCK_P": 64, "BLOCK_CG": 32}
    for kernel in (gn._stats_kernel, gn._apply_kernel, gn._bwd_reduce_kernel, gn._bwd_dx_kernel):
        assert _stats(compile_for_h100(kernel, values, gn._WARPS))["spill_bytes"] == 0, kernel.__name__
    assert _stats(compile_for_h100(gn._finalize_kernel, values))["spill_bytes"] == 0


@pytest.mark.parametrize("cg,groups,has_w", [(1, 1024, True), (64, 8, True), (4096, 1, False), (6, 5, True)])
def test_group_norm_act_backward_finalize_kernel(cg, groups, has_w):
    """The backward's one-launch sums of the partials at the launcher's tiles (one channel a group, as BatchNorm and
    InstanceNorm; GroupNorm's wider groups; a group wider than the 1024-channel tile), without spills."""
    from bench.sass import _stats
    from fastseg3d.kernels import group_norm_act as gn
    from fastseg3d.kernels.utils import next_power_of_2

    block_k = min(next_power_of_2(cg), 1024)
    block_g = min(next_power_of_2(groups), max(1, 256 // block_k))
    values = {**{p: "*fp32" for p in ("sdz_ptr", "sdzx_ptr", "w_ptr", "c1_ptr", "c2_ptr", "dw_ptr", "db_ptr")},
              **_ints("B", "C", "G", "CG", "SPLIT", "NB", "N_A"), "count": "fp32", "HAS_W": has_w,
              "BLOCK_P": max(1, 2048 // (block_g * block_k)), "BLOCK_G": block_g, "BLOCK_K": block_k,
              "BLOCK_P2": 32, "BLOCK_C2": 64}
    assert _stats(compile_for_h100(gn._bwd_finalize_kernel, values, 8))["spill_bytes"] == 0
    values.update(CG=1, NB=1)  # as the JIT specialises InstanceNorm's (one channel a group, one batch element a row)
    if cg == 1:
        assert _stats(compile_for_h100(gn._bwd_finalize_kernel, values, 8))["spill_bytes"] == 0


@pytest.mark.parametrize("out,int64", [("fp32", False), ("bf16", True)])
def test_sum_partials_kernel(out, int64):
    """The fixed-order sums of per-program partials (parameter gradients; attention's dk/dv), without spills."""
    from bench.sass import _stats
    from fastseg3d.kernels import utils as ku

    values = {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_a_ptr": f"*{out}", "out_b_ptr": "*fp32",
              **_ints("KA", "KB", "P", "C", "BLOCKS_A"), "BLOCK_P": 8, "BLOCK_N": 256, "INT64": int64}
    assert _stats(compile_for_h100(ku._sum_partials_kernel, values))["spill_bytes"] == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_group_norm_act_running_stats_kernel(dtype):
    """A training BatchNorm's running-statistics update, in each buffer dtype, at the launcher's 1024 channels a
    program."""
    from bench.sass import _stats
    from fastseg3d.kernels import group_norm_act as gn

    values = {"rm_ptr": f"*{dtype}", "rv_ptr": f"*{dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "C": "i32",
              "eps": "fp32", "momentum": "fp32", "unbias": "fp32", "BLOCK": 1024}
    assert _stats(compile_for_h100(gn._running_stats_kernel, values, 8))["spill_bytes"] == 0


@pytest.mark.parametrize("dtype,n,same,cl,int64,ones", [("bf16", 4, (False, False, False, True), True, False, False),
                                                        ("fp32", 2, (False, False, False, False), False, True, False),
                                                        ("fp16", 3, (True, False, False, False), True, True, True)])
def test_upsample_sum_kernel(dtype, n, same, cl, int64, ones):
    """The resize-and-sum kernel for SegFormer3D's decoder (four maps, the last at the output's size) and other
    cases, at the launcher's tiles (channels-last: 64 channels x 8 voxels; NCDHW: 4 x 128), without spills; with
    ``ones``, sizes and a channel count of 1, which Triton specialises as constants (also on the 64-bit path)."""
    from bench.sass import _stats
    from fastseg3d.kernels import upsample_sum as us

    block_c = 64 if cl else 4
    values = {"y_ptr": "*fp32", **{f"x{i}_ptr": f"*{dtype}" for i in range(4)}, **_ints("C", "OD", "OH", "OW"),
              **_ints(*[f"{a}{i}" for i in range(4) for a in ("D", "H", "W")]),
              **{f"s{a}{i}": "fp32" for i in range(4) for a in "dhw"},
              "N": n, **{f"SAME{i}": same[i] for i in range(4)}, "CL": cl, "INT64": int64,
              "BLOCK_V": 512 // block_c, "BLOCK_C": block_c}
    if ones:
        values.update(C=1, OD=1, D0=1, H1=1, W2=1)
    assert _stats(compile_for_h100(us._upsample_sum_kernel, values, us._WARPS))["spill_bytes"] == 0


@pytest.mark.parametrize("dtype,out,c,int64,res", [("fp32", "bf16", 32, False, None), ("bf16", "bf16", 160, True, None),
                                                   ("fp16", "fp32", 4096, False, None),
                                                   ("fp32", "bf16", 32, False, "bf16"),
                                                   ("fp32", "bf16", 256, True, "bf16"),
                                                   ("bf16", "bf16", 4096, False, "bf16")])
def test_layer_norm_kernels(dtype, out, c, int64, res):
    """LayerNorm forward and backward at the launcher's tiles (2048 elements; one row of up to 4096), without
    spills; with a residual (``res``, its dtype: the add, the sum written and its gradient added and written twice)
    too."""
    from bench.sass import _stats
    from fastseg3d.kernels import layer_norm as ln

    block_m, block_c, warps = ln._block(c)
    values = {"x_ptr": f"*{dtype}", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": f"*{out}", "dy_ptr": f"*{out}",
              "dx_ptr": f"*{dtype}", **{p: "*fp32" for p in ("mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr")},
              "r_ptr": f"*{res or dtype}", "s_ptr": f"*{dtype}", "ds_ptr": f"*{dtype}", "dr_ptr": f"*{res or dtype}",
              **_ints("M", "C", "sx", "sr", "tiles_per_program"), "eps": "fp32", "HAS_W": True, "HAS_B": True,
              "NEED_DX": True, "HAS_RES": res is not None, "HAS_DS": res is not None, "NEED_DR": res is not None,
              "BLOCK_M": block_m, "BLOCK_C": block_c, "COL_TAIL": c != block_c, "INT64": int64}
    for kernel in (ln._layer_norm_fwd_kernel, ln._layer_norm_bwd_kernel):
        assert _stats(compile_for_h100(kernel, values, warps))["spill_bytes"] == 0, kernel.__name__


@pytest.mark.parametrize("which", ["fwd", "bwd_weight"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dwconv3d_hot_loops_keep_to_registers(which, channels_last, dtype):
    """The benchmark's 3x3x3 conv with bias at (2, 32, 128^3), as the launcher configures it: no register spills
    and no barrier in the main loop (the weight gradient reduces its per-tap accumulators after the loop)."""
    from bench.sass import profile_dwconv3d

    stats = profile_dwconv3d((2, 32, 128, 128, 128), (3, 3, 3), dtype, channels_last, which)
    assert stats["spill_bytes"] == 0, stats
    # for the forward on NCDHW: the lanes are register moves, not a round trip through shared memory
    assert stats["loop_barriers"] == 0, stats
    # NCDHW takes the W-lane path: one 16-byte vector per thread and row; channels-last takes columns, 4 channels
    # at 2 W positions per thread
    assert stats["lanes"] == (2 if channels_last else 16 // dtype.itemsize), stats
    if dtype == torch.bfloat16:
        # bf16 today: forward 36.5 (NCDHW, two rows of 8 lanes per thread; 36.2 on Triton 3.6) and 47.6
        # (channels-last, channel pairs read as int32; 50.5 splitting bf16 vectors), weight gradient 41 (NCDHW, 2
        # rows of 8 lanes and one sum per tap and thread) and 49.9 (53.5).
        # One row per thread: forward 40.9; 4 lanes with a tile per tap: weight gradient 54.8. Before a row's loads
        # shared one address: 42.2 and 59 on NCDHW; before the channel-major columns: forward
        # 44.5 and 61, weight gradient 59 and 65; before the lanes and fp32 padded weights: 77 and 105, 74 and 65;
        # before the rolling walk: 108-138 and 211-437. An H200's copy rate leaves room for about 40 at 70%.
        limit = {("fwd", False): 39, ("fwd", True): 50, ("bwd_weight", False): 44, ("bwd_weight", True): 52}
        assert stats["per_output"] < limit[which, channels_last], stats


@pytest.mark.parametrize("which", ["fwd", "dz"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv3d_fused_gelu_keeps_to_registers(which, channels_last):
    """bf16 3x3x3 with bias and GELU (MobileUtr's ConvUtr; SegFormer3D's Mix-FFN with BatchNorm folded), forward and
    the dz pass of its backward: no spills, no barrier, and on NCDHW two rows of 8 lanes per thread within 128
    registers (16 warps per SM)."""
    from bench.sass import profile_dwconv3d

    stats = profile_dwconv3d((2, 32, 128, 128, 128), (3, 3, 3), torch.bfloat16, channels_last, which, "gelu")
    assert stats["spill_bytes"] == 0 and stats["loop_barriers"] == 0, stats
    if not channels_last:
        assert stats["rows"] == 2 and stats["registers"] <= 128, stats
    # Today 56.5 and 66.8 (forward, NCDHW and channels-last), 63.8 and 75.2 (dz). With libdevice's erff, Triton's
    # divisions and one row per thread: 72.3, 79.4, 84.2 and 92.4.
    limit = {("fwd", False): 59, ("fwd", True): 69, ("dz", False): 66, ("dz", True): 78}
    assert stats["per_output"] < limit[which, channels_last], stats


@pytest.mark.parametrize("shape,kernel,act,which,lanes,limit", [
    ((2, 32, 24, 24, 24), (7, 7, 7), "gelu", "fwd", 8, 90),  # 83.2 today; 470 with a masked load per tap
    ((2, 32, 24, 24, 24), (7, 7, 7), None, "bwd_weight", 8, 80),  # 72.0; 416
    ((2, 64, 12, 12, 12), (9, 9, 9), None, "fwd", 4, 195),  # 181.6; 912
    ((2, 64, 12, 12, 12), (9, 9, 9), None, "bwd_weight", 4, 135),  # 125.0; 674
])
def test_dwconv3d_large_kernels_keep_to_registers(shape, kernel, act, which, lanes, limit):
    """MobileUtr's 7x7x7 and 9x9x9 depthwise convs at the 96^3 benchmark (bf16, NCDHW, rows of 24 and 12 elements)
    take W-lane tiles: no spills, and main-loop instructions per output and depth tap within a bound."""
    from bench.sass import profile_dwconv3d

    stats = profile_dwconv3d(shape, kernel, torch.bfloat16, False, which, act)
    assert stats["lanes"] == lanes and stats["spill_bytes"] == 0, stats
    assert stats["per_output"] < limit, stats


@pytest.mark.parametrize("shape,kernel,act,which,dtype,limit", [
    ((2, 32, 24, 24, 24), (7, 7, 7), "gelu", "dz", torch.bfloat16, 112),  # 105.8 today; 249 with a load per tap
    ((2, 64, 12, 12, 12), (9, 9, 9), None, "fwd", torch.bfloat16, 215),  # 202.9; 600
    ((2, 32, 24, 24, 24), (7, 7, 7), None, "fwd", torch.float32, 78),  # 73.1 (two rows a thread); 186
    ((2, 32, 24, 24, 24), (7, 7, 7), None, "bwd_weight", torch.bfloat16, 130),  # 122.0; 410
    ((2, 64, 12, 12, 12), (9, 9, 9), None, "bwd_weight", torch.float32, 190),  # 179.6 over three programs; 556
])
def test_dwconv3d_channels_last_large_kernels_keep_to_registers(shape, kernel, act, which, dtype, limit):
    """The same convs on channels-last volumes take channel-major column tiles: no spills, and main-loop
    instructions per output and depth tap within a bound."""
    from bench.sass import profile_dwconv3d

    stats = profile_dwconv3d(shape, kernel, dtype, True, which, act)
    assert stats["lanes"] > 0 and stats["spill_bytes"] == 0, stats
    assert stats["per_output"] < limit, stats


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
def test_attention_kernels_keep_to_registers(head_dim, dtype, tf32):
    """The tiles the launchers pick compile without spills (fp32 IEEE dots spilled kilobytes on half tiles) and
    without a serialised wgmma pipeline (TF32 on eight warps at head dim 16; bf16 dk/dv at head dim 64 when padded
    query rows were left unmasked)."""
    from bench.sass import profile_attention

    rows = profile_attention(32768, 512, 1, head_dim, dtype, allow_tf32=tf32)
    assert len(rows) == 4
    for row in rows:
        assert row["spill_bytes"] == 0 and not row["wgmma_serialised"], row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kl_distill_forward_keeps_to_registers(dtype):
    """DSD's published configuration (three full-resolution students, 14 classes at 128^3; and BraTS' 4 classes),
    DSD with its heads at 1/2, 1/4 and 1/8 resolution (and the transposed interpolations of their gradients),
    MISSU's widest channel KL (64 channels at 32^3) and a 512-channel one run without spills; up to 64 channels no
    barrier either (a voxel's channels stay in one warp), and DSD's forward stays under 23 instructions per logit
    read (62 when the classes were spread over warps), with upsampled heads under 40 in bf16."""
    from bench.sass import profile_kl_distill

    full = (2, 14, 128, 128, 128)
    dsd = profile_kl_distill(full, (full,) * 3, (128, 128, 128), dtype)
    brats = profile_kl_distill((2, 4, 128, 128, 128), ((2, 4, 128, 128, 128),) * 3, (128, 128, 128), dtype)
    low = profile_kl_distill((2, 14, 64, 64, 64), ((2, 14, 32, 32, 32), (2, 14, 16, 16, 16), (2, 14, 8, 8, 8)),
                             (64, 64, 64), dtype)
    missu = profile_kl_distill((2, 64, 32, 32, 32), ((2, 64, 32, 32, 32),), (32, 32, 32), dtype)
    missu32 = profile_kl_distill((2, 32, 32, 32, 32), ((2, 32, 32, 32, 32),), (32, 32, 32), dtype)
    wide = profile_kl_distill((2, 512, 16, 16, 16), ((2, 512, 16, 16, 16),), (16, 16, 16), dtype)
    assert [r["kernel"] for r in dsd + brats + missu + wide] == ["_kl_fwd_kernel"] * 4
    # each head's gradient: H and W transposed first, then D (two launches)
    assert [r["kernel"] for r in low] == ["_kl_fwd_kernel"] + ["_interp_transpose_kernel"] * 6
    for row in dsd + brats + low + missu + missu32:
        assert row["spill_bytes"] == 0 and row["loop_barriers"] == 0, row
    assert wide[0]["spill_bytes"] == 0, wide
    # 20.2 in bf16, 19.1 in fp32 (24.6 and 22.9 while each student logit formed its log2 q and its KL term alone)
    assert dsd[0]["per_element"] < 23, dsd
    # gathers (upsampled heads) flatten their accesses: Triton 3.6 otherwise lays threads along the classes (159);
    # the heads are class-interleaved copies, a corner's 14 classes 16-byte loads: 37.4 in bf16 (41.3 with
    # per-logit log2 q, 46.3 with a 16-bit split of each class pair, 55.4 with a 2-byte load and an address per
    # class), 32.0 in fp32 (43.7 while a voxel's 64 bytes were loaded as two 32-byte halves, which spread it over
    # two threads and converted the layout through shared memory: 17 barriers, 29 before the gradient buffers
    # were interleaved; 20 and 32 on Triton 3.6)
    assert low[0]["per_element"] < 35 if dtype == torch.float32 else low[0]["per_element"] < 40, low
    assert low[0]["barriers"] <= 8, low  # the three loss partial sums' reductions: 5 on Triton 3.9, 8 on 3.6
    # and the transposed interpolations keep one voxel per thread with its classes, read from class-interleaved
    # buffers and with no layout conversion: 3.0 to 3.4 instructions per class and tap in bf16 (5.6 from blocked
    # buffers, a 2-byte load per class; 8.4 with a 64-bit address per class), 2.0 to 3.4 in fp32; a D pass whose
    # taps are unrolled counts its whole kernel (7.1)
    for row in low[1:]:
        assert row["barriers"] == 0 and row["per_class_tap"] < (4 if row["loop_instructions"] else 8), row
    if dtype == torch.bfloat16:
        assert missu[0]["per_element"] < 28, missu  # 32 channels per thread: 25.9 (31 with 16)
        assert missu32[0]["per_element"] < 25, missu32  # one thread per voxel: 23.2 (31 with two)


def test_selfreg_pooling_keeps_to_registers():
    """SelfReg's pooling and inter kernels at the benchmark's map, 2x2x2 cells: no spills, and the cell's loads
    from one address per pooled voxel (94 instructions per pooled voxel today; 117 with a loop over the cell)."""
    from bench.sass import profile_selfreg

    pool, inter = profile_selfreg()
    assert pool["spill_bytes"] == 0 and inter["spill_bytes"] == 0, (pool, inter)
    assert pool["loop_instructions"] == 0 and pool["per_pooled_voxel"] < 100, pool


_NORM_ACT = ("group_norm_act", "group_norm_act_apply", "group_norm_act_backward")


# MobileUtr's 7x7x7 and 9x9x9 layers take minutes of compiles on a CI core (its inference alone about two):
# `python -m bench.sass network mobileutr` (and `mobileutrl`) checks their launches.
@pytest.mark.parametrize("network,modes,ops", [
    ("segformer3d", ("train_step", "infer"), {"attention", "attention_backward", "dwconv3d", "dwconv3d_backward",
                                              "upsample_sum", "layer_norm", "layer_norm_backward", "add_layer_norm",
                                              "add_layer_norm_backward", *_NORM_ACT,
                                              "group_norm_act_running_stats"}),
    ("missu", ("train_step", "infer"), {"attention", "attention_backward", "channel_kl", *_NORM_ACT,
                                        "group_norm_act_running_stats", "layer_norm", "layer_norm_backward",
                                        "add_layer_norm", "add_layer_norm_backward"}),
    # the U-Nets' fused parts: their training losses, and their norm -> LeakyReLU chains
    ("dsd_unet", ("train_step",), {"kl_distill", *_NORM_ACT}),
    ("selfreg_unet", ("train_step",), {"selfreg_inter", "selfreg_intra", *_NORM_ACT}),
])
def test_network_launches_fit_an_h100(network, modes, ops):
    """Every launch of a benchmark network (its benchmark size, bf16 autocast, the launchers configured for an
    H100's 132 SMs) compiles for sm_90 within an H100's shared memory, registers and grid limits, without spills."""
    from bench.sass import profile_network

    rows = profile_network(network, modes=modes)
    assert {op for row in rows for op in row["ops"]} == ops
    assert {mode for row in rows for mode in row["modes"]} == set(modes)
    for row in rows:
        assert not row["problems"] and row["spill_bytes"] == 0, row


def test_network_launch_limits_are_checked(monkeypatch):
    from bench import sass

    monkeypatch.setattr(sass, "SM90_SHARED_BYTES", 8)
    monkeypatch.setattr(sass, "GRID_LIMITS", (100, 1, 1))
    rows = sass.profile_network("dsd_unet", modes=("train_step",))
    (row,) = [r for r in rows if r["ops"] == ["kl_distill"]]
    assert row["grid"] == (8192, 2, 1) and row["shared_bytes"] > 8, row
    assert row["problems"] == [f"{row['shared_bytes']} bytes of shared memory (at most 8)",
                               "grid axis 0: 8192 programs (at most 100)", "grid axis 1: 2 programs (at most 1)"]


def test_every_op_registers_its_launches():
    import fastseg3d.ops  # noqa: F401
    from fastseg3d.ops.utils import LAUNCHES

    import fastseg3d.losses  # noqa: F401  (registers the one op without Triton launches)

    ops = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastseg3d::")}
    # the resizes' adjoint (upsample_sum's and DiceCE's backward) is an op only so that traced backwards take
    # symbolic sizes: ATen (or interpolation matrices) computes it, no Triton launch
    assert "fastseg3d::upsample_adjoint" in ops and set(LAUNCHES) == ops - {"fastseg3d::upsample_adjoint"}


def test_network_cli_reports_and_fails_on_refused_launches(monkeypatch, capsys):
    """`python -m bench.sass network NAME` prints a row per distinct launch and a summary, and exits 1 when an H100
    would refuse a launch; a network needs its name, and the op reports take none."""
    from bench import sass

    sass.main(["network", "dsd_unet"])
    out = capsys.readouterr().out.splitlines()
    launches = len(out) - 1  # a row per distinct launch, then the summary
    assert out[-1] == f"{launches} distinct launches, {out[-1].split(', ')[1]}, 0 spilling, 0 an H100 would refuse"
    monkeypatch.setattr(sass, "GRID_LIMITS", (100, 65535, 65535))
    with pytest.raises(SystemExit) as exc:
        sass.main(["network", "dsd_unet"])
    rows = capsys.readouterr().out.splitlines()
    refused = sum("grid axis 0" in row for row in rows[:-1])
    assert exc.value.code == 1 and refused >= 1 and rows[-1].endswith(f", {refused} an H100 would refuse")
    for argv in (["network"], ["dwconv3d", "mobileutr"]):
        with pytest.raises(SystemExit) as exc:
            sass.main(argv)
        assert exc.value.code == 2
