"""Swap fastseg3d layers into an existing model, and back, in place."""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.utils import parametrize

from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.nn.norm import GroupNorm, InstanceNorm3d
from fastseg3d.ops.dwconv3d import fusable_kernel

__all__ = ["convert_model", "revert_model"]


def _is_depthwise(module: nn.Module) -> bool:
    """A plain depthwise ``nn.Conv3d`` whose settings the fused kernel takes (stride 1, zero padding, odd kernels up
    to 9): the others would run ATen's conv anyway, and the ``triton`` backend would refuse them."""
    return (parametrize.type_before_parametrizations(module) is nn.Conv3d
            and module.groups == module.in_channels == module.out_channels
            and tuple(module.stride) == (1, 1, 1) and module.padding_mode == "zeros"
            and fusable_kernel(module.kernel_size))


def _of_type(cls: type[nn.Module]):
    return lambda module: parametrize.type_before_parametrizations(module) is cls


# fastseg3d's layer for each torch layer it replaces
_NORMS = ((nn.GroupNorm, GroupNorm), (nn.InstanceNorm3d, InstanceNorm3d))
_FUSED = ((DepthwiseConv3d, nn.Conv3d), (GroupNorm, nn.GroupNorm), (InstanceNorm3d, nn.InstanceNorm3d))


def _monai_sablock() -> type[nn.Module] | None:
    # A model holding MONAI's SABlock has imported it: nothing to convert, and nothing imported, without it.
    module = sys.modules.get("monai.networks.blocks.selfattention")
    return getattr(module, "SABlock", None)


def _fused_pairs() -> list[tuple[type[nn.Module], type[nn.Module]]]:
    pairs = list(_FUSED)
    fused_sablock = sys.modules.get("fastseg3d.nn.sablock")
    if fused_sablock is not None:
        pairs.append((fused_sablock.SABlock, _monai_sablock()))
    return pairs


def _change_class(module: nn.Module, cls: type[nn.Module]) -> None:
    # The module object itself changes class: its parameters, buffers, hooks (whose weak references point at it),
    # a compiled call and every place that holds it stay as they are, so state_dict keys, optimizer references,
    # tied layers and outputs are unchanged.
    if parametrize.is_parametrized(module):
        # the class torch.nn.utils.parametrize made on top of the old one carries the parametrized properties
        extra = {k: v for k, v in vars(type(module)).items() if k not in ("__dict__", "__weakref__", "__module__")}
        cls = type(f"Parametrized{cls.__name__}", (cls,), extra)
    module.__class__ = cls


def _swap(model: nn.Module, swaps) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        for match, cls in swaps:
            if match(module):
                _change_class(module, cls)
                break
    return model


def convert_model(model: nn.Module, *, conv: bool = True, attention: bool = True, norm: bool = False) -> nn.Module:
    """Swap fastseg3d's layers into ``model``, in place (the modules change class, so everything that holds them,
    hooks included, keeps working, and the ``state_dict`` keys stay); returns ``model``, which may itself be such
    a layer. Parametrized layers (``torch.nn.utils.parametrize``) keep their parametrizations. Lazy layers
    (``nn.LazyConv3d``, ...) are matched once a first forward has made them the layers they stand for.

    - ``conv``: every depthwise ``nn.Conv3d`` (groups == in == out channels) that the fused kernel takes (stride 1,
      ``padding_mode="zeros"``, odd kernel sizes up to 9; strided down-sampling convs stay as they are) becomes a
      :class:`fastseg3d.nn.DepthwiseConv3d`.
    - ``attention``: every MONAI ``SABlock`` (the attention of ViT and UNETR) becomes a
      :class:`fastseg3d.nn.SABlock`, which runs the flash-style attention kernel and never forms the N x N matrix
      (blocks with ``causal``, ``rel_pos_embedding``, ``save_attn``, ``attention_dtype`` or a head size other than
      16, 32, 64 or 128 stay MONAI's).
    - ``norm``: every ``nn.GroupNorm`` becomes a :class:`fastseg3d.nn.GroupNorm` and every ``nn.InstanceNorm3d`` an
      :class:`fastseg3d.nn.InstanceNorm3d` (the fused GroupNorm kernel on volumes; under autocast their output
      keeps the input's dtype, where torch's GroupNorm returns fp32: off by default for that reason). For models
      built from torch's layers: fastseg3d's own networks fuse their norms already (their recomputed norm blocks
      take torch's norm classes, and run the plain composition on converted ones).

    ``torch.fx.symbolic_trace`` and ``torch.jit.script`` cannot follow the swapped layers' forwards, which branch
    on their input: revert the model first (``torch.jit.trace``, ``torch.export`` and ``torch.compile`` take it as
    it is).

    Example:
        >>> import torch, fastseg3d
        >>> net = torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1, groups=8), torch.nn.GELU())
        >>> net = fastseg3d.convert_model(net)
        >>> type(net[0]).__name__
        'DepthwiseConv3d'
    """
    for name, value in (("conv", conv), ("attention", attention), ("norm", norm)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    swaps = [(_is_depthwise, DepthwiseConv3d)] if conv else []
    if norm:
        swaps += [(_of_type(torch_cls), cls) for torch_cls, cls in _NORMS]
    monai_sablock = _monai_sablock()
    if attention and monai_sablock is not None:
        from fastseg3d.nn.sablock import SABlock

        is_monai = _of_type(monai_sablock)
        # blocks whose settings the kernel never takes stay MONAI's (the triton backend would refuse them)
        swaps.append((lambda m: is_monai(m) and not SABlock.static_reasons(m), SABlock))
    return _swap(model, swaps)


def revert_model(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_model`: every layer it swapped in becomes its torch (or MONAI) layer again, in
    place."""
    return _swap(model, [(_of_type(cls), torch_cls) for cls, torch_cls in _fused_pairs()])
