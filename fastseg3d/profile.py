"""Memory accounting on the ``meta`` device: what a training step saves for backward, at any size, for free."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["activation_memory"]


def activation_memory(
    model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> dict[str, int]:
    """Bytes of activations a training forward of ``model`` saves for backward, in total and per top-level module.

    The model is copied to the ``meta`` device (nothing is allocated, any input size works), run once in training
    mode on an input of ``input_shape`` (under ``dtype`` autocast when ``dtype`` is not float32), and every tensor
    saved for backward is counted once per storage. Parameters are not counted. Fused fastseg3d ops take their fused
    path on ``meta`` tensors, so the count is what the fused network saves on a GPU.

    Returns:
        ``{"total": bytes, "<child name>": bytes, ...}`` with one entry per direct child of ``model`` (and
        ``"(top)"`` for tensors saved outside any child).

    Example:
        >>> from fastseg3d.networks import SegFormer3D
        >>> from fastseg3d.profile import activation_memory
        >>> report = activation_memory(SegFormer3D(), (2, 4, 128, 128, 128))
        >>> report["total"] > 0
        True
    """
    meta_model = copy.deepcopy(model).to("meta").train()
    param_storages = {p.untyped_storage()._cdata for p in meta_model.parameters()}
    param_storages |= {b.untyped_storage()._cdata for b in meta_model.buffers()}
    seen: set[int] = set()
    report: dict[str, int] = {"total": 0}
    current = ["(top)"]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            report["total"] += storage.nbytes()
            report[current[0]] = report.get(current[0], 0) + storage.nbytes()
        return t

    handles = []
    for name, child in meta_model.named_children():
        handles.append(child.register_forward_pre_hook(lambda m, args, name=name: current.__setitem__(0, name)))
        handles.append(child.register_forward_hook(lambda m, args, out: current.__setitem__(0, "(top)")))
    x = torch.empty(tuple(input_shape), device="meta", requires_grad=False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                meta_model(x)
    finally:
        for h in handles:
            h.remove()
    return report
