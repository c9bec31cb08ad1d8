"""fastseg3d.nn.SABlock (MONAI's SABlock on the fused attention) against MONAI's own block, and its conversion."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastseg3d
from tests.utils import assert_close

pytest.importorskip("einops")  # MONAI's SABlock rearranges with it
blocks = pytest.importorskip("monai.networks.blocks.selfattention")
MonaiSABlock = blocks.SABlock


def _pair(dtype=torch.float64, device="cpu", std=0.2, **kwargs):
    """MONAI's block and its fused twin with the same parameters (the twin a copy, so the gradients are apart)."""
    torch.manual_seed(0)
    monai = MonaiSABlock(**kwargs).to(device, dtype)
    for p in monai.parameters():  # biases start at zero: give them values a wrong layout would show
        torch.nn.init.normal_(p, std=std)
    fused = fastseg3d.convert_model(copy.deepcopy(monai))
    assert type(fused) is fastseg3d.nn.SABlock
    return monai, fused


def _compare(monai, fused, shape, dtype, device="cpu", ref_dtype=torch.float64, mask=None):
    """Forward and every gradient of ``fused`` in ``dtype`` against ``monai`` in ``ref_dtype``."""
    torch.manual_seed(1)
    x = torch.randn(*shape, device=device, dtype=ref_dtype)
    ref = copy.deepcopy(monai).to(ref_dtype)
    x_ref = x.clone().requires_grad_()
    x_low = x.to(dtype).requires_grad_()
    y_ref = ref(x_ref) if mask is None else ref(x_ref, mask)
    y = fused(x_low) if mask is None else fused(x_low, mask)
    assert y.dtype == dtype
    assert_close("y", y, y_ref, dtype)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.to(dtype))
    assert_close("dx", x_low.grad, x_ref.grad, dtype, scale=2.0)
    # the key bias's gradient is zero up to rounding (it adds the same logit to every key of a query): each
    # parameter's error is measured against a tenth of the largest parameter gradient at least
    floor = 0.1 * max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert_close(f"d{name}", p.grad, p_ref.grad, dtype, scale=2.0, floor=floor)


_CONFIGS = [
    dict(hidden_size=32, num_heads=2),
    dict(hidden_size=32, num_heads=2, qkv_bias=True, use_combined_linear=False),
    dict(hidden_size=24, num_heads=3, dim_head=16, hidden_input_size=20, qkv_bias=True),
    dict(hidden_size=32, num_heads=2, include_fc=False),
    dict(hidden_size=32, num_heads=1, use_flash_attention=True),
]


@pytest.mark.parametrize("kwargs", _CONFIGS)
def test_matches_monai_forward_and_gradients(kwargs):
    monai, fused = _pair(**kwargs)
    assert list(fused.state_dict()) == list(monai.state_dict())
    with fastseg3d.backend("torch"):
        _compare(monai, fused, (2, 27, monai.hidden_input_size), torch.float64)


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, sequence_length=27),
    dict(save_attn=True),
    dict(rel_pos_embedding="decomposed", input_size=(3, 3, 3)),
    dict(attention_dtype=torch.float64),
    dict(dim_head=24),
])
def test_blocks_the_kernel_never_takes_stay_monais(kwargs, caplog):
    """convert_model leaves them MONAI's; built directly, the fused class runs MONAI's forward for them (logged
    under auto, refused under triton)."""
    torch.manual_seed(0)
    monai = MonaiSABlock(hidden_size=32, num_heads=2, **kwargs).double()
    assert type(fastseg3d.convert_model(monai)) is MonaiSABlock
    fused = fastseg3d.nn.SABlock(hidden_size=32, num_heads=2, **kwargs).double()
    fused.load_state_dict(monai.state_dict())
    x = torch.randn(2, 27, 32, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        assert torch.equal(fused(x), monai(x))  # MONAI's own forward, bit for bit
    assert any("attention falls back" in r.message for r in caplog.records)
    if kwargs.get("save_attn"):
        assert fused.att_mat.shape == (2, 2, 27, 27)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="attention"):
        fused(x)


def test_a_mask_or_dropping_everything_runs_monais_forward():
    monai, fused = _pair(hidden_size=32, num_heads=2)
    x = torch.randn(2, 27, 32, dtype=torch.float64)
    mask = (torch.rand(2, 27) > 0.3).double()
    assert torch.equal(fused(x, mask), monai(x, mask))
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="attn_mask"):
        fused(x, mask)
    monai, fused = _pair(hidden_size=32, num_heads=2, dropout_rate=1.0)
    torch.manual_seed(3)
    expected = monai.train()(x)
    torch.manual_seed(3)
    assert torch.equal(fused.train()(x), expected)  # (all zeros but the output bias)


def test_dropout_in_training_only():
    monai, fused = _pair(hidden_size=32, num_heads=2, dropout_rate=0.5)
    x = torch.randn(2, 27, 32, dtype=torch.float64)
    with fastseg3d.backend("torch"):
        fused.train()
        assert not torch.equal(fused(x), fused(x))
        fused.eval()
        assert_close("y", fused(x), monai.eval()(x), torch.float64)
    # MONAI's flash path passes its dropout rate to SDPA in eval too; the fused block has none in eval
    monai_flash, fused_flash = _pair(hidden_size=32, num_heads=2, dropout_rate=0.5, use_flash_attention=True)
    monai_plain = MonaiSABlock(hidden_size=32, num_heads=2, dropout_rate=0.5).double().eval()
    monai_plain.load_state_dict(monai_flash.state_dict())
    with fastseg3d.backend("torch"):
        assert_close("y", fused_flash.eval()(x), monai_plain(x), torch.float64)


def test_bad_input():
    _, fused = _pair(hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\) tokens"):
        fused(torch.randn(27, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\) tokens"):
        fused(torch.randn(2, 27, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fused([[0.0] * 32])


def test_compile_fullgraph_forward_backward():
    _, fused = _pair(torch.float32, hidden_size=32, num_heads=2)
    x = torch.randn(2, 27, 32, requires_grad=True)
    eager = fused(x)
    eager.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(fused, fullgraph=True)(x)
    compiled.sum().backward()
    assert_close("y", compiled, eager, torch.float32)
    assert_close("dx", x.grad, grad, torch.float32)


def test_convert_unetr_keeps_keys_parameters_and_outputs():
    from monai.networks.nets import UNETR

    net = UNETR(1, 2, (32, 32, 32), feature_size=8, hidden_size=64, mlp_dim=128, num_heads=4).eval()
    keys = list(net.state_dict())
    params = dict(net.named_parameters())
    x = torch.randn(1, 1, 32, 32, 32)
    expected = net(x)
    untouched = fastseg3d.convert_model(copy.deepcopy(net), attention=False)
    assert not any(isinstance(m, fastseg3d.nn.SABlock) for m in untouched.modules())

    fastseg3d.convert_model(net)
    swapped = [m for m in net.modules() if isinstance(m, MonaiSABlock)]
    assert len(swapped) == 12 and all(type(m) is fastseg3d.nn.SABlock for m in swapped)
    assert list(net.state_dict()) == keys
    assert all(p is params[name] for name, p in net.named_parameters())
    assert_close("y", net(x), expected, torch.float32)

    fastseg3d.revert_model(net)
    assert all(type(m) is MonaiSABlock for m in swapped)
    assert_close("y", net(x), expected, torch.float32)
    with pytest.raises(TypeError, match="attention must be a bool"):
        fastseg3d.convert_model(net, attention="yes")


def test_convert_spatial_attention_block():
    """MONAI's SpatialAttentionBlock (generative U-Nets) feeds its SABlock a transposed, non-contiguous view."""
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock

    torch.manual_seed(0)
    block = SpatialAttentionBlock(spatial_dims=3, num_channels=32, num_head_channels=16).double().eval()
    x = torch.randn(2, 32, 3, 4, 5, dtype=torch.float64)
    expected = block(x)
    fastseg3d.convert_model(block)
    assert type(block.attn) is fastseg3d.nn.SABlock
    assert_close("y", block(x), expected, torch.float64)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kwargs", [
    dict(hidden_size=32, num_heads=2, qkv_bias=True),  # head dim 16
    dict(hidden_size=64, num_heads=2, use_combined_linear=False),  # head dim 32, separate projections
])
def test_interpret_matches_monai(poison, dtype, kwargs):
    monai, fused = _pair(**kwargs)
    fused = fused.to(dtype)
    with fastseg3d.backend("triton"):
        _compare(monai, fused, (2, 29, kwargs["hidden_size"]), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_monai(no_tf32, dtype):
    """UNETR's block at 128^3 with 16^3 patches: 512 tokens, 12 heads of 64. The logits' spread grows as std^2 x
    hidden_size: the interpreter tier's 0.2 gives logits of std 31 here, a one-hot softmax whose bf16 rounding of
    q and k alone (exact arithmetic after it) misses the tolerance; 0.04 gives std 1.2, the best case then at 58%
    (bf16) and 36% (fp16) of the tolerance."""
    monai, fused = _pair(torch.float64, "cuda", std=0.04, hidden_size=768, num_heads=12, qkv_bias=True)
    fused = fused.to(dtype)
    with fastseg3d.backend("triton"):
        _compare(monai, fused, (2, 512, 768), dtype, "cuda")


@pytest.mark.gpu
def test_gpu_never_forms_the_attention_matrix():
    """4,096 tokens (8^3 patches of 128^3), 6 heads: one bf16 N x N matrix per head is 192 MiB; the fused block's
    forward and backward together stay far below it beyond the inputs, projections and gradients."""
    monai, fused = _pair(torch.bfloat16, "cuda", hidden_size=384, num_heads=6, qkv_bias=True)
    x = torch.randn(1, 4096, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    matrix = 6 * 4096 * 4096 * 2
    peaks = {}
    for name, block in (("monai", monai), ("fused", fused)):
        with fastseg3d.backend("triton"):
            block(x).sum().backward()  # warm-up: kernels compiled, gradients allocated
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            block(x).sum().backward()
            torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["monai"] > 2 * matrix, peaks  # the scores and probabilities, saved for backward
    # what the fused block holds beyond its inputs: q, k, v, the output and their gradients (about 27 MiB in bf16)
    # and the backward's fp32 dk/dv partials, 12 MiB a row split (two on 114-132 SMs): 48 MiB, a quarter of the
    # matrix to 0.4%; a third leaves room for a third split on a larger GPU
    assert peaks["fused"] < matrix / 3, peaks
