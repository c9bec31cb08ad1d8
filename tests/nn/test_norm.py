"""fastseg3d.nn.GroupNorm and InstanceNorm3d against torch's norms: keys, repr, fallbacks, errors, and the fused
kernel's values and gradients (interpreter and GPU tiers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastseg3d
from fastseg3d.nn import GroupNorm, InstanceNorm3d
from tests.utils import assert_close

PAIRS = [  # (torch layer, fastseg3d layer)
    (lambda: nn.GroupNorm(3, 6), lambda: GroupNorm(3, 6)),
    (lambda: nn.GroupNorm(2, 6, affine=False, eps=1e-3), lambda: GroupNorm(2, 6, affine=False, eps=1e-3)),
    (lambda: nn.InstanceNorm3d(6, affine=True), lambda: InstanceNorm3d(6, affine=True)),
    (lambda: nn.InstanceNorm3d(6), lambda: InstanceNorm3d(6)),
]
IDS = ["group", "group-no-affine", "instance-affine", "instance"]


def _twins(pair):
    torch.manual_seed(0)
    ref, ours = pair[0](), pair[1]()
    for p in ref.parameters():  # not the default ones and zeros
        p.data.normal_()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_drop_in_keys_repr_and_values(pair):
    ref, ours = _twins(pair)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    x, g = torch.randn(2, 6, 3, 4, 5, requires_grad=True), torch.randn(2, 6, 3, 4, 5)
    assert_close("y", ours(x), ref(x), torch.float32)
    (gx,) = torch.autograd.grad(ours(x), x, g)
    (ex,) = torch.autograd.grad(ref(x), x, g)
    assert_close("dx", gx, ex, torch.float32)


def test_fallbacks_and_errors():
    # not a volume (a 2-D GroupNorm, an unbatched InstanceNorm3d): torch's own forward
    for (ref, ours), x in ((_twins(PAIRS[0]), torch.randn(2, 6, 4, 5)), (_twins(PAIRS[2]), torch.randn(6, 3, 4, 5))):
        assert_close("y", ours(x), ref(x), torch.float32)
    # with running statistics: torch's forward, which updates them
    tracked, torch_tracked = (cls(6, affine=True, track_running_stats=True) for cls in (InstanceNorm3d,
                                                                                        nn.InstanceNorm3d))
    x = torch.randn(2, 6, 3, 4, 5)
    assert_close("y", tracked(x), torch_tracked(x), torch.float32)
    assert not torch.equal(tracked.running_mean, torch.zeros(6))
    assert torch.equal(tracked.running_mean, torch_tracked.running_mean)
    with pytest.raises(ValueError, match=r"input has 4 channels but this layer normalises 6"):
        GroupNorm(3, 6)(torch.randn(1, 4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"input has 4 channels but this layer normalises 6"):
        InstanceNorm3d(6, affine=True)(torch.randn(1, 4, 3, 3, 3))
    # statistics of one value: refused as torch refuses them (InstanceNorm: one voxel; GroupNorm: one value in all)
    for norm in (InstanceNorm3d(6), InstanceNorm3d(6).eval(), nn.InstanceNorm3d(6)):
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            norm(torch.randn(2, 6, 1, 1, 1))
    for norm in (GroupNorm(1, 1), nn.GroupNorm(1, 1)):
        with pytest.raises(ValueError):
            norm(torch.randn(1, 1, 1, 1, 1))
    assert_close("y", GroupNorm(3, 3)(x := torch.randn(2, 3, 1, 1, 1)), nn.GroupNorm(3, 3)(x), torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["ncdhw", "cl"])
@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_interpret_fused_forward_and_backward(poison, pair, layout):
    ref, ours = _twins(pair)
    x = torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=layout).requires_grad_()
    g = torch.randn(2, 6, 3, 4, 5)
    with fastseg3d.backend("triton"):
        y = ours(x)
        grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    assert y.is_contiguous(memory_format=layout)
    expected = ref(x)
    assert_close("y", y, expected, torch.float32)
    for name, got, want in zip(["dx", "dweight", "dbias"], grads,
                               torch.autograd.grad(expected, [x, *ref.parameters()], g)):
        assert_close(name, got, want, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_gpu_autocast_output_keeps_the_input_dtype(pair):
    """Under bf16 autocast GroupNorm is one of autocast's fp32 ops (torch's returns fp32) and InstanceNorm runs in
    its input's dtype; these return bf16 either way, the values of torch's computed in fp32."""
    ref, ours = (m.cuda() for m in _twins(pair))
    x = torch.randn(2, 6, 16, 12, 10, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        y, expected = ours(x), ref(x)
    torch_dtype = torch.float32 if isinstance(ref, nn.GroupNorm) else torch.bfloat16
    assert y.dtype == torch.bfloat16 and expected.dtype == torch_dtype
    assert_close("y", y, expected, torch.bfloat16)
    g = torch.randn(expected.shape, device="cuda")
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    (ex,) = torch.autograd.grad(expected, x, g.to(expected.dtype))
    assert_close("dx", gx, ex, torch.bfloat16)
