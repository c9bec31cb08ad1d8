"""Autocast's weight casts in one launch: ``with autocast_weights(model): out = model(x)``.

Under autocast every Linear and convolution casts its fp32 weight and bias to bf16 (or fp16) as it runs, and backward
casts each of their gradients back: an op, an autograd node and a launch per parameter, each way. A small network at
a large input issues hundreds of them (SegFormer3D: 123 of its 205 parameters, about a third of a training step's
ops), and where its GPU work is a few milliseconds, the time to issue ops is the step's time. Inside this context the
same casts are one multi-tensor copy (``torch._foreach_copy_``) when the block starts and one for the gradients when
backward reaches them, with the values autocast would produce: the same roundings, the gradients accumulated in
the low precision across the parameter's uses and cast once, as autocast's cached casts do.

fastseg3d's networks run their training forward in it; wrap your own model's forward to get the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from fastseg3d import backends
from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.ops.utils import autocast_dtype

__all__ = ["autocast_weights"]

# Layers whose own forward feeds weight and bias to an op autocast runs in low precision and nothing else (a
# subclass's forward may read its weight otherwise, e.g. to standardise it in fp32, so only these exact types)
_CAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, DepthwiseConv3d)


class _CastWeights(torch.autograd.Function):
    """fp32 parameters -> copies in ``dtype`` in one launch; backward: their gradients -> fp32 in one launch."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.set_materialize_grads(False)  # a copy backward does not reach gets no gradient, not zeros
        out = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(out, params)
        # a frozen parameter's copy stays out of the graph, as autocast's cast of it would
        ctx.mark_non_differentiable(*[o for o, p in zip(out, params) if not p.requires_grad])
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if not present:
            return (None,) * (len(grads) + 1)
        if torch.is_grad_enabled():  # create_graph: casts autograd can differentiate again
            cast = [g.float() for g in present]
        else:
            cast = [torch.empty_like(g, dtype=torch.float32) for g in present]
            torch._foreach_copy_(cast, present)
        it = iter(cast)
        return (None, *(None if g is None else next(it) for g in grads))


def autocast_weights(*modules: nn.Module, exclude: Iterable[nn.Module] = ()) -> contextlib.AbstractContextManager:
    """Context manager: the Linear and convolution parameters of ``modules`` cast to the autocast dtype in one launch
    for the block (and their gradients back to fp32 in one), instead of one cast per parameter and use.

    It acts in a training forward (on the modules in training mode, with grad enabled) under autocast on the
    parameters' device with its cast cache on, on the fp32 ``nn.Parameter`` weights and biases of ``nn.Linear``,
    ``nn.Conv*d``, ``nn.ConvTranspose*d`` and :class:`fastseg3d.nn.DepthwiseConv3d` layers (exactly those types: a
    subclass may read its weight otherwise), but for the layers in ``exclude`` (and those inside them). While the
    block runs, those layers' ``weight`` and ``bias`` are the low-precision copies. Elsewhere it does nothing:
    without autocast, in inference, under ``fastseg3d.backend("torch")`` (the plain composition), under
    ``torch.compile`` (which fuses the casts itself), functorch transforms and tracing.

    The values and gradients are autocast's (a parameter's uses in the block are summed in the low precision and
    cast once, as with autocast's cached cast), and the parameters' own gradient accumulators receive them, all
    together once backward has produced the last of them (2 bytes a parameter held until then; DDP cannot start
    reducing them earlier). Every layer in the block should run in it, under the block's autocast state:
    ``exclude`` the others, i.e. a layer the forward does not call (its parameters get no gradient, as under
    autocast, but hooks on them are called with None and DDP sees them as used), a layer that runs under
    ``torch.autocast(enabled=False)`` or another dtype inside the block, or one whose weight the forward reads for
    something else than the layer's own op (it would read the copy).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastseg3d.nn import autocast_weights
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), autocast_weights(model):
        ...     out = model(torch.randn(4, 8))
        >>> out.dtype, model[0].weight.dtype
        (torch.bfloat16, torch.float32)
        >>> out.float().sum().backward()
        >>> model[0].weight.grad.dtype
        torch.float32
    """
    exclude = tuple(exclude)  # read once: an iterator would be spent by the check below
    for module in (*modules, *exclude):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not modules:
        raise TypeError("autocast_weights needs at least one module")
    if torch.compiler.is_compiling():  # Dynamo would run a whole frame eagerly on a graph break in a Python context
        return contextlib.nullcontext()
    return _AutocastWeights(modules, exclude)


class _AutocastWeights:
    def __init__(self, modules: tuple[nn.Module, ...], exclude: tuple[nn.Module, ...]) -> None:
        self.modules, self.exclude = modules, exclude
        self._swapped: list[tuple[dict, str, nn.Parameter]] = []

    def __enter__(self) -> None:
        if not torch.is_grad_enabled() or _traced() or backends.get_backend() == "torch":
            return  # (the plain composition casts as autocast does)
        skip = {id(m) for e in self.exclude for m in e.modules()}
        slots, params, index = [], [], {}
        for m in (m for module in self.modules if module.training for m in module.modules()):
            if type(m) not in _CAST_TYPES or id(m) in skip:
                continue
            for name in ("weight", "bias"):
                p = m._parameters.get(name)
                if type(p) is not nn.Parameter or p.dtype != torch.float32:
                    continue  # absent, already swapped by an enclosing block, a tensor subclass, or not fp32
                if id(p) not in index:  # a shared parameter is cast once
                    index[id(p)] = len(params)
                    params.append(p)
                slots.append((m._parameters, name, index[id(p)]))
        if not params:
            return
        device_type = params[0].device.type
        dtype = autocast_dtype(device_type)
        if (dtype is None or dtype == torch.float32 or any(p.device != params[0].device for p in params)
                or (device_type != "meta" and not torch.is_autocast_cache_enabled())):
            return  # without autocast's cache each use casts (and its gradient is cast back) on its own
        casts = _CastWeights.apply(dtype, *params)
        for parameters, name, i in slots:
            self._swapped.append((parameters, name, params[i]))
            parameters[name] = casts[i]

    def __exit__(self, *exc) -> bool:
        for parameters, name, p in reversed(self._swapped):
            parameters[name] = p
        self._swapped = []
        return False


def _traced() -> bool:
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None)
