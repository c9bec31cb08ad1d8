"""Kernels launch on their tensors' GPU: Triton uses the current CUDA device and its stream, so an op on
``cuda:1`` tensors while ``cuda:0`` is current must switch devices around the launch."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from fastseg3d.ops.utils import launch_device


def test_launch_device_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = launch_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch_device(SimpleNamespace(device=torch.device("cuda", 0))), contextlib.nullcontext)
    # "cuda" without an index is the current device: nothing to switch
    assert isinstance(launch_device(SimpleNamespace(device=torch.device("cuda"))), contextlib.nullcontext)
    assert isinstance(launch_device(torch.randn(2)), contextlib.nullcontext)


def test_launch_device_leaves_traced_tensors_alone(monkeypatch):
    """Compiling traces the op bodies with fake tensors (also ahead of time, on machines without CUDA): no CUDA call,
    and Inductor guards the launches it emits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_cuda():
        raise AssertionError("queried the CUDA device while tracing")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    with FakeTensorMode():
        fake = torch.empty(2, device="cuda:1")
    assert isinstance(launch_device(fake), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_ops_on_a_device_that_is_not_current():
    import fastseg3d

    torch.cuda.set_device(0)
    x = torch.randn(1, 8, 6, 7, 9, device="cuda:1", requires_grad=True)
    w = torch.randn(8, 1, 3, 3, 3, device="cuda:1", requires_grad=True)
    q = torch.randn(1, 40, 2, 32, device="cuda:1", requires_grad=True)
    s, t = torch.randn(2, 2, 4, 8, 8, 8, device="cuda:1").unbind(0)  # selfreg_intra: even C

    def losses():
        return (fastseg3d.ops.kl_distill(s, t, 2.0), fastseg3d.ops.channel_kl(s, t),
                fastseg3d.ops.selfreg_intra(s), fastseg3d.ops.selfreg_inter(s, t[:, :, ::2, ::2, ::2], [0, 1], [2, 0]))

    with fastseg3d.backend("triton"):
        y = fastseg3d.ops.dwconv3d(x, w, activation="gelu")
        o = fastseg3d.ops.attention(q, q, q)
        fused = losses()
    # (the autograd engine runs the backward on a thread set to cuda:1 already; it is checked for its values)
    (y.square().sum() + o.square().sum()).backward()
    grads = [t.grad for t in (x, w, q)]
    for t in (x, w, q):
        t.grad = None
    with fastseg3d.backend("torch"):
        y_ref = fastseg3d.ops.dwconv3d(x, w, activation="gelu")
        o_ref = fastseg3d.ops.attention(q, q, q)
        reference = losses()
    (y_ref.square().sum() + o_ref.square().sum()).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o, o_ref, rtol=1e-3, atol=1e-3)
    for a, e in zip(grads, (x.grad, w.grad, q.grad)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
    for a, e in zip(fused, reference):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
