"""Swap fastseg3d layers into an existing model, and back, sharing the parameters."""

from __future__ import annotations

from torch import nn

from fastseg3d.nn.dwconv3d import DepthwiseConv3d

__all__ = ["convert_model", "revert_model"]


def _is_depthwise(module: nn.Module) -> bool:
    return type(module) is nn.Conv3d and module.groups == module.in_channels == module.out_channels


def _rebuild(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    # The new module takes over the old one's attributes: the same Parameter objects, buffers and hooks,
    # so state_dict keys, optimizer references and outputs are unchanged.
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _swap(model: nn.Module, match, cls: type[nn.Module], done: dict[int, nn.Module] | None = None) -> nn.Module:
    # ``done`` maps each swapped module to its replacement, so a module registered in several places (tied
    # layers) stays one module
    done = {} if done is None else done
    if match(model):
        if id(model) not in done:
            done[id(model)] = _rebuild(model, cls)
        return done[id(model)]
    # not named_children(), which yields a module registered twice only once
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        if match(child):
            setattr(model, name, _swap(child, match, cls, done))
        elif id(child) not in done:
            done[id(child)] = _swap(child, match, cls, done)
    return model


def convert_model(model: nn.Module) -> nn.Module:
    """Replace every depthwise ``nn.Conv3d`` (groups == in == out channels) of ``model`` by
    :class:`fastseg3d.nn.DepthwiseConv3d`, in place; returns the model. A model that is itself a depthwise
    ``nn.Conv3d`` cannot change class in place: use the returned module. A module registered under several names
    stays one module.

    Example:
        >>> import torch, fastseg3d
        >>> net = torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1, groups=8), torch.nn.GELU())
        >>> net = fastseg3d.convert_model(net)
        >>> type(net[0]).__name__
        'DepthwiseConv3d'
    """
    return _swap(model, _is_depthwise, DepthwiseConv3d)


def revert_model(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_model`: every ``DepthwiseConv3d`` becomes a plain ``nn.Conv3d`` again, in place (a
    model that is itself one is returned as a new ``nn.Conv3d``)."""
    return _swap(model, lambda m: type(m) is DepthwiseConv3d, nn.Conv3d)
