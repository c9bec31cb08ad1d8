"""Tensor subclasses that override ``__torch_function__`` only (MONAI's MetaTensor, what MONAI's transforms and
loaders hand a network) through the fused ops: the kernels run on the tensors' memory as on plain tensors, the
outputs come back as the subclass (with its metadata), and the gradients match. CPU tier (the op's body), then the
interpreter and GPU tiers (every public op, forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastseg3d
from fastseg3d import ops
from fastseg3d.ops import utils
from tests.utils import assert_close

MetaTensor = pytest.importorskip("monai.data").MetaTensor
_AFFINE = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.0]))
_B, _C, _D, _H, _W = 1, 4, 3, 4, 5


def _vol(c=_C, device="cpu"):
    return torch.randn(_B, c, _D, _H, _W, device=device)


# name -> (a call of the public function on two tensors that both need gradients, the two tensors on a device)
_CASES = {
    "dwconv3d": (lambda x, w: ops.dwconv3d(x, w, w[:, 0, 0, 0, 0], activation="gelu"),
                 lambda dev: [_vol(device=dev), torch.randn(_C, 1, 3, 3, 3, device=dev)]),
    "dwconv3d_tokens": (lambda x, w: ops.dwconv3d_tokens(x, (_D, _H, _W), w, None, residual=x),
                        lambda dev: [torch.randn(_B, _D * _H * _W, _C, device=dev), torch.randn(_C, 1, 3, 3, 3,
                                                                                                 device=dev)]),
    "group_norm_act": (lambda x, w: ops.group_norm_act(x, 2, w, None, activation="silu"),
                       lambda dev: [_vol(device=dev), torch.randn(_C, device=dev)]),
    "layer_norm": (lambda x, w: ops.layer_norm(x, w, None),
                   lambda dev: [torch.randn(2, 7, 16, device=dev), torch.randn(16, device=dev)]),
    "add_layer_norm": (lambda x, r: torch.cat(ops.add_layer_norm(x, r, None, None)),
                       lambda dev: [torch.randn(2, 7, 16, device=dev), torch.randn(2, 7, 16, device=dev)]),
    "attention": (lambda q, k: ops.attention(q, k, k),
                  lambda dev: [torch.randn(1, 9, 2, 16, device=dev), torch.randn(1, 5, 2, 16, device=dev)]),
    "kl_distill": (lambda s, t: ops.kl_distill(s, t, temperature=2.0),
                   lambda dev: [_vol(3, dev), _vol(3, dev)]),
    "channel_kl": (lambda s, t: ops.channel_kl(s, t), lambda dev: [_vol(3, dev), _vol(3, dev)]),
    "selfreg_intra": (lambda f, g: ops.selfreg_intra(f + g), lambda dev: [_vol(device=dev), _vol(device=dev)]),
    "selfreg_inter": (lambda s, t: ops.selfreg_inter(s, t, torch.tensor([0, 1]), torch.tensor([2, 0])),
                      lambda dev: [_vol(device=dev), _vol(device=dev)]),
    "upsample_sum": (lambda a, b: ops.upsample_sum([a, b], (_D, _H, _W)),
                     lambda dev: [_vol(device=dev), torch.randn(_B, _C, 2, 2, 3, device=dev)]),
}


def _check(name: str, device: str) -> None:
    """The op on MetaTensors against the op on the same plain tensors, both on the Triton kernels."""
    fn, make = _CASES[name]
    torch.manual_seed(0)
    tensors = make(device)
    plain = [t.clone().requires_grad_() for t in tensors]
    meta = [MetaTensor(t.clone(), affine=_AFFINE).requires_grad_() for t in tensors]
    with fastseg3d.backend("triton"):
        expected = fn(*plain)
        out = fn(*meta)
        expected.float().sum().backward()
        out.float().sum().backward()
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, _AFFINE.double())
    assert_close(name, out.as_tensor(), expected, torch.float32)
    for i, (m, p) in enumerate(zip(meta, plain)):
        assert (m.grad is None) == (p.grad is None), f"{name}: gradient {i}"
        if p.grad is not None:
            assert_close(f"{name} gradient {i}", m.grad, p.grad, torch.float32)


# ------------------------------------------------------------------------------------------------------
# CPU tier


def test_op_body_gets_plain_tensors_and_the_subclass_wraps_the_output():
    """Through the dispatcher a MetaTensor reached the op's body as itself, and its ``new_empty`` (another
    signature than torch's) broke Triton's interpreter; the body now gets plain aliases of the same memory."""
    seen = []

    def body(x: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        seen.extend(type(t) for t in (x, *xs))
        x.add_(1)  # an alias: the caller's memory
        return x + xs[0]

    op = utils.EagerOp("fastseg3d::_subclass_body_test", body, mutates_args=("x",))
    x = MetaTensor(torch.zeros(3), affine=_AFFINE)
    y = op(x, [MetaTensor(torch.ones(3)), torch.ones(3)])
    assert seen == [torch.Tensor] * 3
    assert torch.equal(x.as_tensor(), torch.ones(3)) and isinstance(y, MetaTensor)
    assert torch.equal(y.as_tensor(), torch.full((3,), 2.0)) and torch.equal(y.affine, _AFFINE.double())


def test_dispatching_subclasses_stay_as_they_are():
    """Fake tensors (torch.compile's tracing) and parameters are not unwrapped."""
    p = torch.nn.Parameter(torch.ones(2))
    assert utils._plain(p) is p and utils._plain(None) is None and utils._plain(2.0) == 2.0
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
        assert utils._plain(fake) is fake and utils._plain([fake])[0] is fake


# ------------------------------------------------------------------------------------------------------
# Interpreter tier


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(_CASES))
def test_kernel_takes_meta_tensors(name):
    _check(name, "cpu")


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_CASES))
def test_gpu_kernel_takes_meta_tensors(name):
    _check(name, "cuda")
