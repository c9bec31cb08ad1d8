"""Swap fastseg3d layers into an existing model, and back, in place."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.ops.dwconv3d import fusable_kernel

__all__ = ["convert_model", "revert_model"]


def _is_depthwise(module: nn.Module) -> bool:
    """A plain depthwise ``nn.Conv3d`` whose settings the fused kernel takes (stride 1, zero padding, odd kernels up
    to 9): the others would run ATen's conv anyway, and the ``triton`` backend would refuse them."""
    return (parametrize.type_before_parametrizations(module) is nn.Conv3d
            and module.groups == module.in_channels == module.out_channels
            and tuple(module.stride) == (1, 1, 1) and module.padding_mode == "zeros"
            and fusable_kernel(module.kernel_size))


def _is_fused(module: nn.Module) -> bool:
    return parametrize.type_before_parametrizations(module) is DepthwiseConv3d


def _change_class(module: nn.Module, cls: type[nn.Module]) -> None:
    # The module object itself changes class: its parameters, buffers, hooks (whose weak references point at it),
    # a compiled call and every place that holds it stay as they are, so state_dict keys, optimizer references,
    # tied layers and outputs are unchanged.
    if parametrize.is_parametrized(module):
        # the class torch.nn.utils.parametrize made on top of the old one carries the parametrized properties
        extra = {k: v for k, v in vars(type(module)).items() if k not in ("__dict__", "__weakref__", "__module__")}
        cls = type(f"Parametrized{cls.__name__}", (cls,), extra)
    module.__class__ = cls


def _swap(model: nn.Module, match, cls: type[nn.Module]) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if match(module):
            _change_class(module, cls)
    return model


def convert_model(model: nn.Module) -> nn.Module:
    """Make every depthwise ``nn.Conv3d`` (groups == in == out channels) of ``model`` that the fused kernel takes
    (stride 1, ``padding_mode="zeros"``, odd kernel sizes up to 9; strided down-sampling convs stay as they are) a
    :class:`fastseg3d.nn.DepthwiseConv3d`, in place (the modules change class, so everything that holds them,
    hooks included, keeps working); returns ``model``, which may itself be such a conv. Parametrized convs
    (``torch.nn.utils.parametrize``) keep their parametrizations. ``torch.fx.symbolic_trace`` and
    ``torch.jit.script`` cannot follow ``DepthwiseConv3d.forward``, which branches on its input: revert the model
    first (``torch.jit.trace``, ``torch.export`` and ``torch.compile`` take it as it is).

    Example:
        >>> import torch, fastseg3d
        >>> net = torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1, groups=8), torch.nn.GELU())
        >>> net = fastseg3d.convert_model(net)
        >>> type(net[0]).__name__
        'DepthwiseConv3d'
    """
    return _swap(model, _is_depthwise, DepthwiseConv3d)


def revert_model(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_model`: every ``DepthwiseConv3d`` becomes a plain ``nn.Conv3d`` again, in place."""
    return _swap(model, _is_fused, nn.Conv3d)
