"""Memory accounting on the ``meta`` device: what a training step saves for backward, at any size, for free.

``fastseg3d profile --config NAME [--dtype bf16] [--max-memory GIB]`` prints it for a training config.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastseg3d.ops.utils import META_AUTOCAST

__all__ = ["activation_memory", "largest_cube", "training_memory", "write_traffic"]

_T = torch.Tensor
# CUDA autocast's cast policies (ATen's autocast_mode.h), by the Python functions that reach those ATen ops. Autocast
# casts above autograd, so what an op saves for backward is its cast input: the emulation casts at the same level.
_LOWER = {
    F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, torch.convolution, torch.prelu, F.prelu, F.scaled_dot_product_attention,
    torch.matmul, torch.mm, torch.mv, torch.bmm, torch.addmm, torch.addmv, torch.addr, torch.addbmm, torch.baddbmm,
    torch.einsum, torch.chain_matmul, torch.linalg.multi_dot, torch.linalg.vecdot,
    _T.matmul, _T.__matmul__, _T.__rmatmul__, _T.mm, _T.mv, _T.bmm, _T.addmm, _T.addmv, _T.addr, _T.addbmm,
    _T.baddbmm,
}
_FP32 = {
    torch.acos, torch.asin, torch.cosh, torch.erfinv, torch.exp, torch.expm1, torch.log, torch.log10, torch.log2,
    torch.log1p, torch.reciprocal, torch.rsqrt, torch.sinh, torch.tan, torch.pow, F.softplus,
    _T.acos, _T.asin, _T.cosh, _T.erfinv, _T.exp, _T.expm1, _T.log, _T.log10, _T.log2, _T.log1p, _T.reciprocal,
    _T.rsqrt, _T.sinh, _T.tan, _T.pow, _T.__pow__, _T.__rpow__,
    F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.cosine_similarity, torch.cosine_similarity,
    F.poisson_nll_loss, F.cosine_embedding_loss, F.nll_loss, F.cross_entropy, F.hinge_embedding_loss, F.kl_div,
    F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.mse_loss, F.margin_ranking_loss, F.multilabel_margin_loss,
    F.soft_margin_loss, F.triplet_margin_loss, F.multi_margin_loss, F.binary_cross_entropy_with_logits,
    torch.dist, F.pdist, torch.cdist, torch.renorm, torch.logsumexp, _T.logsumexp,
    F.normalize,  # its norm is fp32 under autocast, and so is the quotient
}
# computed in fp32 (an fp32 dtype argument) when no dtype is given: the input is not cast, the output is fp32
_FP32_OUT = {
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, _T.softmax, _T.log_softmax, torch.sum, _T.sum,
    torch.prod, _T.prod, torch.cumsum, _T.cumsum, torch.cumprod, _T.cumprod, torch.linalg.vector_norm,
    torch.linalg.matrix_norm, torch.linalg.norm, torch.norm, _T.norm,
}
_PROMOTE = {
    torch.addcdiv, torch.addcmul, _T.addcdiv, _T.addcmul, torch.atan2, _T.atan2, F.bilinear, torch.cross,
    torch.dot, _T.dot, torch.vdot, torch.tensordot, F.grid_sample, torch.scatter_add, _T.scatter_add,
}


def _cast(x, dtype: torch.dtype):
    """``x`` with every meta floating tensor in it (also inside lists and tuples) cast to ``dtype``, fp64 kept."""
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta" and x.is_floating_point() and x.dtype not in (dtype, torch.float64):
            return x.to(dtype)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _floating(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "meta" and a.is_floating_point():
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _floating(a)
    return out


class _MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts on ``meta`` tensors, which ``torch.autocast`` leaves as they are.

    A function is seen once, at the Python surface: a composite function outside the lists above runs as it is,
    and the ops it calls inside are not cast (ATen's autocast would see those). It casts while CUDA autocast's flag
    is on, to its dtype, so a model's ``torch.autocast("cuda", enabled=False)`` regions run uncast, as on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _floating(list(args) + list(kwargs.values()))
        if torch.is_autocast_enabled("cuda") and any(t.dtype != torch.float64 for t in tensors):
            if func in _LOWER:
                dtype = torch.get_autocast_dtype("cuda")
                args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
            # F.interpolate hands its arguments on as keywords, so its mode is in kwargs.
            elif func in _FP32 or (func is F.interpolate and kwargs.get("mode", "nearest") != "area"):
                args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
            elif (func in _FP32_OUT and kwargs.get("dtype") is None and tensors[0].dtype != torch.float64
                  and not any(isinstance(a, torch.dtype) for a in args)):
                kwargs = {**kwargs, "dtype": torch.float32}
            elif func in _PROMOTE:
                widest = torch.float32 if any(t.dtype == torch.float32 for t in tensors) else tensors[0].dtype
                args, kwargs = _cast(args, widest), {k: _cast(v, widest) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _autocast_on_meta(dtype: torch.dtype):
    if dtype == torch.float32:
        yield
        return
    # CUDA autocast's flag and dtype as torch.autocast("cuda") sets them, which it refuses to do without CUDA; its
    # casts act on CUDA tensors only, so the flag changes nothing on meta ones but what the emulation reads
    state = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    token = META_AUTOCAST.set(True)  # fastseg3d's fused ops cast as ATen's conv and attention do
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with _MetaAutocast():
            yield
    finally:
        torch.set_autocast_enabled("cuda", state[0])
        torch.set_autocast_dtype("cuda", state[1])
        META_AUTOCAST.reset(token)


def _check(input_shape: Sequence[int], dtype: torch.dtype) -> tuple[int, ...]:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1 or any(isinstance(s, bool) for s in input_shape):
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    return shape


def _training_forward() -> contextlib.ExitStack:
    """Grad mode on whatever the caller's mode (under ``torch.no_grad()`` nothing would be saved for backward)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _tensor_leaves(out) -> list[torch.Tensor]:
    """The tensors in a model's output: a tensor, or tuples (NamedTuples too), lists, dicts and dataclasses of them."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, tuple):
        out = list(out)
    if isinstance(out, (list, dict)):
        values = out.values() if isinstance(out, dict) else out
        return [t for v in values for t in _tensor_leaves(v)]
    return [out] if isinstance(out, torch.Tensor) else []


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` in training mode on the ``meta`` device, a copy (a ``torch.compile``d model: its eager module)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: count what the eager module saves
    with _training_forward():  # parameters made under inference_mode could not be saved for backward
        try:
            clone = copy.deepcopy(model)
        except RuntimeError as err:  # e.g. torch.nn.utils.weight_norm's computed weight after a forward
            raise TypeError(f"the model cannot be copied to the meta device for counting ({err}); modules holding "
                            "non-leaf tensors, such as torch.nn.utils.weight_norm's, can use "
                            "torch.nn.utils.parametrizations instead") from err
        return clone.to("meta").train()


def activation_memory(
    model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> dict[str, int]:
    """Bytes of activations a training forward of ``model`` saves for backward, in total and per top-level module.

    The model is copied to the ``meta`` device (nothing is allocated, any input size works), run once in training
    mode on an fp32 input of ``input_shape``, and every tensor saved for backward is counted once per storage (also
    those of a graph the forward builds and drops before it returns: an overcount for such forwards); then the
    step's backward runs there too, from unit gradients of the outputs (a backward that fails on ``meta`` tensors is
    warned about, and the forward's count returned). The copy keeps
    the model's hooks, which fastseg3d's distillation wrappers need: a hook of the caller's that stores outputs gets
    ``meta`` tensors, and one that reads values (``.item()``) fails; remove such hooks first. Parameters are not
    counted. Fused fastseg3d ops take their fused path on ``meta`` tensors, so the count is what the fused network
    saves on a GPU. ``F.scaled_dot_product_attention`` on ``meta`` tensors (the references' and plain layers'
    attention) saves what its math backend saves, the fp32 N x M probabilities among it, where a GPU's flash or
    efficient backend saves only the output and the log-sum-exp: counts of such models are upper bounds. With
    ``dtype`` float16 or bfloat16 the forward runs as under CUDA autocast to that dtype: ``torch.autocast`` does not
    act on ``meta`` tensors, so its casts are applied here, by the policy of ATen's autocast lists (matrix products
    and convolutions in ``dtype``; normalisations, softmax, losses, interpolation, exp/log/pow in float32; the rest
    in the dtype it is given). The model's own ``torch.autocast("cuda", enabled=False)`` regions run uncast, as on a
    GPU; a region that turns CUDA autocast on (or changes its dtype) acts only where CUDA is available: elsewhere
    torch disables it and it runs uncast.

    Returns:
        ``{"total": bytes, "<child name>": bytes, ...}`` with one entry per direct child of ``model`` that saves
        something (and ``"(top)"`` for tensors saved outside any child). A container child such as an
        ``nn.ModuleList`` gets what the modules inside it save when ``model`` calls them.

    Raises:
        ValueError: ``dtype`` is not float32, float16 or bfloat16, or ``input_shape`` not positive ints.

    Example:
        >>> from fastseg3d.networks import SegFormer3D
        >>> from fastseg3d.profile import activation_memory
        >>> report = activation_memory(SegFormer3D(), (2, 4, 128, 128, 128))
        >>> report["total"] > 0
        True
    """
    input_shape = _check(input_shape, dtype)
    meta_model = _meta_copy(model)
    param_storages = {p.untyped_storage()._cdata for p in meta_model.parameters()}
    param_storages |= {b.untyped_storage()._cdata for b in meta_model.buffers()}
    seen: set[int] = set()
    # the counted storages stay referenced: a freed one's address may be reused by a new storage (meta: no memory)
    counted: list = []
    report: dict[str, int] = {"total": 0}
    current = ["(top)"]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            counted.append(storage)
            report["total"] += storage.nbytes()
            report[current[-1]] = report.get(current[-1], 0) + storage.nbytes()
        return t

    handles = []

    def leave(module, args, out) -> None:  # returns None: a forward hook's return value replaces the output
        current.pop()

    def enter(module, args) -> None:
        current.append(names[module])

    names: dict[nn.Module, str] = {}
    # attribution only: fastseg3d's recomputes need not run these hooked modules plainly (see nn.recompute.has_hooks)
    leave.fastseg3d_passive = enter.fastseg3d_passive = True

    def attribute(module: nn.Module, name: str) -> None:
        # A container (ModuleList, ModuleDict) is never called: its parent calls the modules inside, so those are
        # hooked instead, under the container's top-level name.
        if type(module).forward is not nn.Module.forward:
            names[module] = name
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        else:
            for child in module.children():
                attribute(child, name)

    for name, child in meta_model.named_children():
        attribute(child, name)
    try:
        with _training_forward(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with _autocast_on_meta(dtype):
                out = meta_model(torch.empty(input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    _meta_backward(out)
    return report


def _meta_backward(out) -> None:
    """The training step's backward on the meta device, from unit gradients of every output that needs one: it
    checks that the step runs there (it saves nothing more). A backward that fails is warned about, not raised:
    the forward's count stands."""
    outputs = [t for t in _tensor_leaves(out) if t.requires_grad]
    if not outputs:
        return
    try:
        with _training_forward():
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    except Exception as err:  # noqa: BLE001  (a model's own op without a meta backward)
        first_line = str(err).split("\n", 1)[0]
        warnings.warn(f"activation_memory: the backward on the meta device failed ({type(err).__name__}: "
                      f"{first_line}); the count is the forward's", stacklevel=3)


def training_memory(
    model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32, optimizer_states: int = 2
) -> dict[str, int]:
    """Bytes a training step of ``model`` holds at least: the activations saved for backward (as
    :func:`activation_memory` counts them), the parameters and buffers, the parameters' gradients and
    ``optimizer_states`` tensors per trainable parameter (2 for Adam and AdamW, 1 for SGD with momentum).

    Backward's transient buffers, the allocator's slack and the CUDA context come on top: a lower bound.

    Returns:
        ``{"activations", "parameters", "gradients", "optimizer", "total"}`` in bytes.

    Example:
        >>> from fastseg3d.networks import SegFormer3D
        >>> from fastseg3d.profile import training_memory
        >>> report = training_memory(SegFormer3D(), (2, 4, 128, 128, 128), torch.bfloat16)
        >>> report["total"] == sum(v for k, v in report.items() if k != "total")
        True
    """
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int) or optimizer_states < 0:
        raise ValueError(f"optimizer_states must be an int >= 0, got {optimizer_states!r}")
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    report = {
        "activations": activation_memory(model, input_shape, dtype)["total"],
        "parameters": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        "gradients": trainable,
        "optimizer": optimizer_states * trainable,
    }
    report["total"] = sum(report.values())
    return report


# allocations: the op that fills the buffer (an out= variant, copy_) counts the bytes
_ALLOCATIONS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::empty_permuted",
                          "aten::new_empty", "aten::new_empty_strided"})


class _Writes(TorchDispatchMode):
    """Per op name: how many ops wrote memory, and how many bytes (outputs that are not views of an input, and the
    tensors in-place and out= ops write; allocations write nothing). In backward the name carries the autograd node
    that ran it."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if func._schema.is_mutable:  # what it writes in place (a foreach op returns nothing) and its new outputs
            written = _written_arguments(func, args, kwargs)
            seen = {t.untyped_storage()._cdata for t in written}
            written += [t for t in pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in seen]
        else:
            written = [t for t in pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs]
        if written and func._schema.name not in _ALLOCATIONS:
            name = func._schema.name
            node = torch._C._current_autograd_node()
            if node is not None:
                name = f"{name} ({node.name()})"
            entry = self.by_op.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += sum(t.numel() * t.element_size() for t in written)
        return out


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op's schema marks as written (``Tensor(a!)``, also in lists), positional or keyword."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        written += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


def write_traffic(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> dict:
    """The ops a training step of ``model`` runs that write memory, forward and backward, and the bytes they write,
    counted on the ``meta`` device as :func:`activation_memory` runs the step (fused fastseg3d ops as on a GPU,
    each one op however many kernels it launches). Views and allocations are left out; an in-place or out= op
    counts the tensor it writes.
    Backward starts from the sum of ``model``'s floating-point outputs (an output itself when a scalar; tuples,
    dicts and dataclasses of tensors too).

    Bytes written are a floor on a step's memory traffic (each is usually read at least once more), and the op
    count a floor on its launches: ops that write much next to what they compute (casts, zero fills, elementwise
    chains) are what fusion removes.

    Returns:
        ``{"forward": {"ops": n, "bytes": b, "by_op": {name: (count, bytes)}}, "backward": {...}}``; in backward,
        names carry the autograd node that ran the op, e.g. ``"aten::gelu_backward (GeluBackward0)"``.

    Example:
        >>> from fastseg3d.networks import SegFormer3D
        >>> from fastseg3d.profile import write_traffic
        >>> traffic = write_traffic(SegFormer3D(), (2, 4, 128, 128, 128), torch.bfloat16)
        >>> traffic["backward"]["ops"] > traffic["forward"]["ops"] > 0
        True
    """
    input_shape = _check(input_shape, dtype)
    meta_model = _meta_copy(model)
    forward, backward = _Writes(), _Writes()
    with _training_forward(), _autocast_on_meta(dtype):
        x = torch.empty(input_shape, device="meta")
        with forward:
            out = meta_model(x)
        leaves = [t for t in _tensor_leaves(out) if t.is_floating_point() and t.requires_grad]
        if not leaves:
            raise ValueError("the model's output has no floating-point tensor that requires grad: no backward to run")
        loss = sum(t if t.dim() == 0 else t.float().sum() for t in leaves)
        with backward:
            loss.backward()
    return {name: {"ops": sum(c for c, _ in log.by_op.values()), "bytes": sum(b for _, b in log.by_op.values()),
                   "by_op": {k: tuple(v) for k, v in log.by_op.items()}}
            for name, log in (("forward", forward), ("backward", backward))}


def largest_cube(
    model: nn.Module, batch: int, in_channels: int, budget: int, dtype: torch.dtype = torch.float32,
    optimizer_states: int = 2, multiple: int = 32, start: int = 64, max_side: int = 4096,
) -> int:
    """The largest cube side (a multiple of ``multiple``, at most ``max_side``) whose :func:`training_memory` at
    ``batch`` fits in ``budget`` bytes; 0 when none does. From ``start`` it doubles, then bisects (the count grows
    with the side); below ``start`` it steps down by ``multiple``. A side the network refuses (its ``ValueError``:
    not a multiple of its stride, a one-voxel bottleneck) counts as not fitting, and a refused ``start`` moves up
    to the first side it takes (up to four times ``start`` or eight sides, else its error is raised; 0 where
    ``max_side`` comes first). Pass the network's stride
    (or a multiple of it) as ``multiple`` for an exact answer, as ``fastseg3d profile --max-memory`` does."""
    for name, value, low in (("batch", batch, 1), ("in_channels", in_channels, 1), ("budget", budget, 0),
                             ("multiple", multiple, 1), ("start", start, 1), ("max_side", max_side, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    refusals = []

    def fits(side: int) -> bool | None:
        """Whether ``side`` fits; None where the network refuses it."""
        try:
            return training_memory(model, (batch, in_channels, side, side, side), dtype,
                                   optimizer_states)["total"] <= budget
        except ValueError as e:
            refusals.append(e)
            return None

    top = max_side // multiple * multiple
    start = min(max(start // multiple, 1) * multiple, top)
    if start <= 0:
        return 0
    ok, first = fits(start), start
    # the smallest sides may be too small for the network (a one-voxel bottleneck) or off its stride; refused up to
    # four times the start (eight sides at most), the input is the caller's mistake (its channels, say): the start
    # side's error says so; refused up to max_side, no side fits
    while ok is None and start + multiple <= min(top, 4 * first) and start < first + 8 * multiple:
        start += multiple
        ok = fits(start)
    if ok is None:
        if start + multiple > top:
            return 0
        raise refusals[0]
    if not ok:
        return next((side for side in range(start - multiple, 0, -multiple) if fits(side)), 0)
    good, bad = start, None
    while bad is None:
        side = min(2 * good, top)
        if side <= good:
            return good
        if fits(side):
            good = side
        else:
            bad = side
    while bad - good > multiple:
        mid = (good + bad) // 2 // multiple * multiple
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good
