"""fastseg3d.nn.EfficientSelfAttention3d against SegFormer3D's unfused composition."""

from __future__ import annotations

import logging

import pytest
import torch

import fastseg3d
from fastseg3d.nn import EfficientSelfAttention3d
from fastseg3d.reference.attention import efficient_self_attention3d_ref
from tests.utils import AtenOps, assert_close

_OFFICIAL_KEYS = ["query.weight", "query.bias", "key_value.weight", "key_value.bias", "proj.weight", "proj.bias"]


def test_state_dict_keys_match_segformer3d():
    assert list(EfficientSelfAttention3d(32, 1, sr_ratio=1).state_dict()) == _OFFICIAL_KEYS
    keys = list(EfficientSelfAttention3d(32, 1, sr_ratio=4).state_dict())
    assert keys == _OFFICIAL_KEYS + ["sr.weight", "sr.bias", "sr_norm.weight", "sr_norm.bias"]
    sd = EfficientSelfAttention3d(64, 2, sr_ratio=2).state_dict()
    assert sd["key_value.weight"].shape == (128, 64) and sd["sr.weight"].shape == (64, 64, 2, 2, 2)
    assert "query.bias" not in EfficientSelfAttention3d(32, 1, qkv_bias=False).state_dict()


def _compare(module, spatial, dtype, device, train_grads=True):
    torch.manual_seed(1)
    b, c = 2, module.dim
    n = spatial[0] * spatial[1] * spatial[2]
    x = torch.randn(b, n, c, device=device, dtype=dtype, requires_grad=True)
    ref_module = EfficientSelfAttention3d(c, module.num_heads, module.sr_ratio, scale=module.scale).to(device)
    ref_module = ref_module.double()
    ref_module.load_state_dict(module.state_dict())
    x_ref = x.detach().double().requires_grad_()
    y = module(x, spatial)
    y_ref = efficient_self_attention3d_ref(ref_module, x_ref, spatial)
    assert_close("y", y, y_ref, dtype)
    if train_grads:
        g = torch.randn_like(y_ref)
        y.backward(g.to(dtype))
        y_ref.backward(g)
        assert_close("dx", x.grad, x_ref.grad, dtype, scale=2.0)
        # the spatial-reduction norm's bias reaches the keys as a logit shift the softmax cancels: part of its
        # gradient is zero up to rounding, which 16-bit rounding dominates (a plain bf16 composition misses the
        # tolerance by 9x there): in fp16/bf16 each parameter's error is measured against a twentieth of the
        # largest parameter gradient at least
        floor = 0.0
        if dtype in (torch.float16, torch.bfloat16):
            floor = 0.05 * max(p.grad.abs().max().item() for p in ref_module.parameters())
        for (name, p), p_ref in zip(module.named_parameters(), ref_module.parameters()):
            assert_close(f"d{name}", p.grad, p_ref.grad, dtype, scale=2.0, floor=floor)


@pytest.mark.parametrize("sr,spatial", [(1, (3, 5, 4)), (2, (4, 6, 2)), (4, (8, 4, 12))])
def test_reference_backend_matches_unfused_composition(sr, spatial):
    module = EfficientSelfAttention3d(16, 2, sr_ratio=sr).double()
    with fastseg3d.backend("torch"):
        _compare(module, spatial, torch.float64, "cpu")


def test_num_heads_scale_reproduces_2024_release():
    module = EfficientSelfAttention3d(64, 2, sr_ratio=2, scale=2**-0.5).double()
    _compare(module, (4, 4, 2), torch.float64, "cpu")


def test_compile_fullgraph_forward_backward():
    """The compiled module's output and every gradient (tokens and parameters) against eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = EfficientSelfAttention3d(32, 2, sr_ratio=2)
    x = torch.randn(2, 4 * 6 * 2, 32, requires_grad=True)
    g = torch.randn(2, 4 * 6 * 2, 32)
    y_eager = module(x, (4, 6, 2))
    y_eager.backward(g)
    eager = {"x": x.grad.clone(), **{name: p.grad.clone() for name, p in module.named_parameters()}}
    x.grad = None
    module.zero_grad(set_to_none=True)
    y = torch.compile(module, fullgraph=True)(x, (4, 6, 2))
    assert_close("y", y, y_eager, torch.float32)
    y.backward(g)
    compiled = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    assert set(compiled) == set(eager) and len(eager) == 11
    for name, grad in compiled.items():
        assert_close(f"d{name}", grad, eager[name], torch.float32)


def test_meta_device_at_full_resolution():
    with torch.device("meta"):
        module = EfficientSelfAttention3d(32, 1, sr_ratio=4)
        x = torch.randn(2, 64 * 64 * 64, 32, requires_grad=True)
    y = module(x, (64, 64, 64))
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert module.query.weight.grad.shape == (32, 32)


def test_attention_dropout_in_training_only():
    module = EfficientSelfAttention3d(16, 1, sr_ratio=1, attn_drop=0.5)
    x = torch.randn(1, 27, 16)
    module.train()
    assert not torch.equal(module(x, (3, 3, 3)), module(x, (3, 3, 3)))
    module.eval()
    assert torch.equal(module(x, (3, 3, 3)), module(x, (3, 3, 3)))


def test_attention_dropout_falls_back_through_the_backend_policy(caplog):
    """Dropout has no fused kernel: the reference, logged under auto, an error under the triton backend."""
    module = EfficientSelfAttention3d(16, 1, attn_drop=0.1).train()
    x = torch.randn(1, 27, 16)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        module(x, (3, 3, 3))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        fastseg3d.backends._logged.clear()
        module(x, (3, 3, 3))
    assert "dropout_p=0.1" in caplog.text


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: EfficientSelfAttention3d(30, 4), "multiple of num_heads"),
        (lambda: EfficientSelfAttention3d(32, 2, sr_ratio=0), "sr_ratio"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 10, 32), (2, 2, 2)), "has 8 voxels"),
        (lambda: EfficientSelfAttention3d(32, 2, sr_ratio=2)(torch.randn(1, 24, 32), (2, 3, 4)), "divisible by"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 8, 16), (2, 2, 2)), "tokens"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 8, 32), (8,)), "spatial_shape"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 32, 32), (2.9, 4, 4)), "3 positive ints"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 32, 32), (-2, -4, 4)), "3 positive ints"),
        (lambda: EfficientSelfAttention3d(32, 2)(torch.randn(1, 1, 32), (True, True, True)), "3 positive ints"),
        (lambda: EfficientSelfAttention3d(32, 2, scale=-1.0), "scale"),
        (lambda: EfficientSelfAttention3d(32, 2, attn_drop=1.0), "attn_drop must be a number in"),
        (lambda: EfficientSelfAttention3d(32, 2, proj_drop=-0.1), "proj_drop must be a number in"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=32, num_heads=2.0), "num_heads must be an int"), (dict(dim=32.0, num_heads=2), "dim must be an int"),
    (dict(dim=32, num_heads=True), "num_heads must be an int"), (dict(dim=32, num_heads=2, sr_ratio=2.0), "sr_ratio"),
    (dict(dim=32, num_heads=2, sr_ratio=True), "sr_ratio must be an int"),
    (dict(dim=32, num_heads=2, scale=True), "scale must be a Python or NumPy real number"),
    (dict(dim=32, num_heads=2, scale=torch.tensor(0.5)), "scale must be a Python or NumPy real number"),
    (dict(dim=32, num_heads=2, attn_drop="0.1"), "attn_drop must be a Python or NumPy real number"),
    (dict(dim=32, num_heads=2, attn_drop=torch.tensor(0.1)), "attn_drop must be a Python or NumPy real number"),
    (dict(dim=32, num_heads=2, proj_drop=None), "proj_drop must be a Python or NumPy real number")])
def test_non_integer_sizes_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        EfficientSelfAttention3d(**kwargs)


def test_numpy_sizes_and_a_non_tensor_input():
    import numpy as np

    module = EfficientSelfAttention3d(np.int64(32), np.int32(2), sr_ratio=np.int64(2))
    assert (module.dim, module.num_heads, module.sr_ratio) == (32, 2, 2) and type(module.dim) is int
    assert module(torch.randn(1, 8, 32), (2, 2, 2)).shape == (1, 8, 32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module(None, (2, 2, 2))


@pytest.mark.interpret
@pytest.mark.parametrize("sr,spatial,heads", [(1, (3, 5, 4), 1), (2, (4, 6, 2), 2), (4, (8, 4, 12), 1)])
def test_interpret_module_matches_unfused_composition(poison, sr, spatial, heads):
    module = EfficientSelfAttention3d(16 * heads, heads, sr_ratio=sr)
    with fastseg3d.backend("triton"):
        _compare(module, spatial, torch.float32, "cpu")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sr,spatial,heads", [(1, (3, 5, 4), 2), (2, (4, 6, 2), 1)])
def test_interpret_half_module_matches_unfused_composition(poison, sr, spatial, heads, dtype):
    """fp16 and bf16 parameters and tokens (the interpreter's bf16 dots made faithful by conftest's
    ``_bf16_as_on_gpu``)."""
    module = EfficientSelfAttention3d(32 * heads, heads, sr_ratio=sr).to(dtype)
    with fastseg3d.backend("triton"):
        _compare(module, spatial, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_matches_unfused_composition(no_tf32, dtype):
    # true fp32 everywhere, the strided conv of the spatial reduction (cuDNN) included
    module = EfficientSelfAttention3d(32, 1, sr_ratio=4).cuda().to(dtype)
    with fastseg3d.backend("triton"):
        _compare(module, (32, 32, 24), dtype, "cuda")


def _attention_modules():
    from fastseg3d.networks.missu import _SelfAttention
    from fastseg3d.networks.mobileutr import _GlobalSparseAttn

    x = torch.randn(2, 4 * 4 * 2, 32, requires_grad=True)
    return [
        ("segformer3d", lambda: EfficientSelfAttention3d(32, 2, sr_ratio=2)(x, (4, 4, 2))),
        ("missu", lambda: _SelfAttention(32, 2, 0.0, 0.0)(x)),
        ("mobileutr", lambda: _GlobalSparseAttn(3, 32, 2, 1, True)(x, (4, 4, 2))),
    ]


@pytest.mark.parametrize("name", ["segformer3d", "missu", "mobileutr"])
def test_kv_gradient_is_one_stack(name):
    """k and v (and q) are views of one projection's output; their gradients reach it in one stack, not through a
    zero-filled buffer per view and the sums of those."""
    forward = dict(_attention_modules())[name]
    out = forward()
    with AtenOps() as log:
        out.sum().backward()
    assert "aten::select_backward" not in log.ops and "aten::stack" in log.ops, log.ops


def test_spatial_reduction_reads_the_tokens_in_place():
    """The module's forward and backward copy no token-sized tensor (the published code copies the tokens into an
    NCDHW volume before the strided conv: the same detector sees that copy in the reference composition)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.found = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name
            leaves = torch.utils._pytree.tree_leaves(out)
            if name in ("aten::clone", "aten::_to_copy", "aten::copy_", "aten::_reshape_copy") and any(
                    isinstance(t, torch.Tensor) and t.numel() == self.numel for t in leaves):
                self.found.append(name)
            return out

    torch.manual_seed(0)
    module = EfficientSelfAttention3d(32, 2, sr_ratio=2)
    spatial = (4, 6, 8)
    x = torch.randn(2, 4 * 6 * 8, 32, requires_grad=True)
    with Copies(x.numel()) as log:
        module(x, spatial).sum().backward()
    assert not log.found, log.found
    with Copies(x.numel()) as log, fastseg3d.backend("torch"):
        efficient_self_attention3d_ref(module, x, spatial)
    assert "aten::clone" in log.found


def test_default_scale_is_head_dims():
    """The default scale is head_dim ** -0.5 (SDPA's own default), judged without the module's ``scale``: the
    reference reads it from the module."""
    import torch.nn.functional as F

    m = EfficientSelfAttention3d(16, 2, sr_ratio=1).double()  # head_dim 8 and 2 heads: the two scales differ
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    q = m.query(x).view(2, 12, 2, 8).transpose(1, 2)
    k, v = m.key_value(x).view(2, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
    expected = m.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 12, 16))
    assert_close("y", m(x, (2, 3, 2)), expected, torch.float64)
