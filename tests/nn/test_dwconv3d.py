"""fastseg3d.nn.DepthwiseConv3d against nn.Conv3d."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fastseg3d
from fastseg3d.nn import DepthwiseConv3d
from tests.utils import assert_close

_CONFIGS = [
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    dict(in_channels=6, out_channels=6, kernel_size=(1, 3, 3), padding=(0, 1, 1), groups=6, bias=False),
    dict(in_channels=6, out_channels=6, kernel_size=5, padding="same", dilation=2, groups=6),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding="valid", groups=6),
    dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1, groups=6),  # falls back: stride
    dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6),  # falls back: multiplier
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, padding_mode="reflect"),  # falls back
    dict(in_channels=6, out_channels=4, kernel_size=3, padding=1),  # a dense conv: falls back
]


@pytest.mark.parametrize("cfg", _CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "groups"))
def test_same_constructor_state_dict_repr_and_output(cfg):
    torch.manual_seed(0)
    ref = nn.Conv3d(**cfg)
    torch.manual_seed(0)
    ours = DepthwiseConv3d(**cfg)
    assert repr(ours) == repr(ref).replace("Conv3d", "DepthwiseConv3d") and str(ours)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 6, 7, 8, 9, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    assert_close("y", ours(x), ref(x2), torch.float32)
    ours(x).sum().backward()
    ref(x2).sum().backward()
    assert_close("dx", x.grad, x2.grad, torch.float32)
    assert_close("dw", ours.weight.grad, ref.weight.grad, torch.float32)


def test_fused_only_for_depthwise_stride1_zero_padding():
    assert DepthwiseConv3d(4, 4, 3, padding=1, groups=4).unfusable_reasons() == []
    assert "stride (2, 2, 2)" in DepthwiseConv3d(4, 4, 3, stride=2, groups=4).unfusable_reasons()[0]
    assert "groups=4" in DepthwiseConv3d(4, 8, 3, groups=4).unfusable_reasons()[0]
    assert "circular" in DepthwiseConv3d(4, 4, 3, groups=4, padding=1, padding_mode="circular").unfusable_reasons()[0]


def test_unfusable_configuration_follows_the_backend_policy(caplog):
    """A configuration the op cannot take is a fallback like any other: logged under auto, an error under triton
    (never silent)."""
    conv = DepthwiseConv3d(4, 4, 3, stride=2, padding=1, groups=4)
    x = torch.randn(1, 4, 5, 5, 5)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match=r"stride \(2, 2, 2\)"):
        conv(x)
    fastseg3d.backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        y = conv(x)
    assert "stride (2, 2, 2)" in caplog.text
    assert_close("y", y, nn.functional.conv3d(x, conv.weight, conv.bias, 2, 1, 1, 4), torch.float32)


def test_unbatched_input_as_conv3d():
    torch.manual_seed(0)
    ref = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    ours = DepthwiseConv3d(4, 4, 3, padding=1, groups=4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5, 6, 7)
    assert_close("y", ours(x), ref(x), torch.float32)


def test_input_channels_must_match_like_conv3d():
    # the op would run a weight whose channels are a multiple of the input's as a channel multiplier
    conv = DepthwiseConv3d(4, 4, 3, padding=1, groups=4)
    for c in (1, 2):
        with pytest.raises(ValueError, match="in_channels=4"):
            conv(torch.randn(1, c, 5, 5, 5))
        with pytest.raises(RuntimeError):
            nn.Conv3d.forward(conv, torch.randn(1, c, 5, 5, 5))
    with pytest.raises(ValueError, match=r"input shape \(2, 5, 5, 5\)"):  # the caller's unbatched shape
        conv(torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match=r"unbatched 4-D \(C, D, H, W\), got shape \(4, 5, 5\)"):
        conv(torch.randn(4, 5, 5))


@pytest.mark.interpret
@pytest.mark.parametrize("padding", [1, "same", 0])
def test_interpret_module_fused_path(poison, padding):
    ref = nn.Conv3d(3, 3, 3, padding=padding, groups=3)
    ours = DepthwiseConv3d(3, 3, 3, padding=padding, groups=3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    with fastseg3d.backend("triton"):
        y = ours(x)
    assert_close("y", y, ref(x), torch.float32)
