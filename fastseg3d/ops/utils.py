"""Shared helpers of the op layer."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import operator
from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch._library import triton as _torch_triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake

from fastseg3d import backends

__all__ = [
    "EAGER_OPS",
    "EagerOp",
    "FUSED_DTYPES",
    "MAX_GRID_YZ",
    "META_AUTOCAST",
    "autocast_inputs",
    "base_reasons",
    "check_finite_inputs",
    "check_norm_args",
    "check_tensor",
    "check_spatial_shape",
    "eager_op",
    "finite",
    "empty",
    "host_to_device",
    "LAUNCHES",
    "launchable",
    "launch_device",
    "launches",
    "layout_of",
    "no_zero_grads",
    "scaled_grads",
    "unit_grad",
]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions
# True while fastseg3d.profile emulates CUDA autocast on meta tensors (autocast itself acts on CUDA and CPU ones);
# the emulation turns CUDA autocast's flag on, so a model's own autocast regions switch it and set its dtype
META_AUTOCAST: ContextVar[bool] = ContextVar("META_AUTOCAST", default=False)


def finite(value) -> bool:
    """Whether a real number is finite (not NaN or infinite). Comparisons, where ``math.isfinite`` stops
    ``torch.compile(fullgraph=True)`` once the number is a symbolic float (``dynamic=True``, or a value that changed
    between calls)."""
    return -math.inf < value < math.inf


def base_reasons(t: torch.Tensor) -> list[str]:
    """The reasons every fused op shares for not taking ``t``: its device, its dtype and an active transform."""
    device = backends.device_reasons(t.device)
    reasons = device + backends.transform_reasons()
    if t.dtype not in FUSED_DTYPES:
        reasons.append(f"dtype={t.dtype} (fused: float32, float16, bfloat16)")
    elif not device:
        reasons += interpreter_reasons(t.device, t.dtype)
    return reasons


def interpreter_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why Triton's interpreter cannot stand in for a GPU on ``dtype`` tensors on ``device``, a device the kernels
    launch on (no :func:`fastseg3d.backends.device_reasons`; on a CPU that is the interpreter): it holds bf16 as bit
    patterns, multiplies those in ``tl.dot`` and truncates casts, unless that arithmetic has been replaced (the
    interpreter test tier replaces it with a GPU's)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return []
    from triton.runtime import interpreter

    if getattr(interpreter.InterpreterBuilder.create_dot, "__module__", None) != interpreter.__name__:
        return []
    return ["bfloat16 on Triton's interpreter, which multiplies bf16 bit patterns in tl.dot and truncates casts to "
            "bf16 (test bf16 on a GPU; fp32 and fp16 compute as there)"]


def empty(shape, *, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Every buffer a fused op hands to a kernel is allocated here (tests swap in a NaN-filling version)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (host memory) on ``device``, without the wait a blocking copy to a GPU makes for every kernel queued
    before it: the copy goes through pinned memory, which the caching host allocator holds until the copy has run,
    so ``t`` may change after the call. Refused while a CUDA graph captures: each replay would reuse the values of
    the capture (SelfReg's channels, drawn anew every step)."""
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("host data copied in during CUDA graph capture would be replayed as captured (SelfReg "
                           "draws its channels on the host every step): pass them as GPU tensors, or do not capture")
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)  # a pinned t itself would race the copy
    return staged.to(device, non_blocking=True)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an op's 5-D output takes from its input: channels-last when the channel stride is 1."""
    if x.dim() == 5 and x.shape[1] > 1 and x.stride(1) == 1:
        return torch.channels_last_3d
    return torch.contiguous_format


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts conv and matmul inputs to on ``device_type``, None when it is off."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if (device_type == "meta" and not torch.compiler.is_compiling()  # Dynamo cannot trace ContextVar.get
            and META_AUTOCAST.get() and torch.is_autocast_enabled("cuda")):
        return torch.get_autocast_dtype("cuda")
    return None


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating inputs to the autocast dtype when autocast is on, as ATen's conv and attention ops do (on
    ``meta`` tensors, while ``fastseg3d.profile`` emulates CUDA autocast)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def no_zero_grads(ctx) -> None:
    """For an op's ``setup_context``: outputs that receive no gradient reach backward as None, not as zeros.

    Autograd otherwise fills the gradient of every output backward is not given (a loss op's saved gradients,
    attention's log-sum-exp) with zeros of its size: for the fused losses, a buffer and a fill the size of every
    input (DSD at 128^3: about 1 GB a step), exactly what they exist to avoid."""
    ctx.set_materialize_grads(False)


def unit_grad(grad_out: torch.Tensor) -> bool:
    """Whether a loss's incoming gradient is exactly 1 everywhere, read back from its device; False while tracing
    (compile, fake and meta tensors), during CUDA-graph capture and when a graph of the gradient is being built."""
    return (not grad_out.requires_grad and grad_out.device.type in ("cuda", "cpu") and not _tracing(grad_out)
            and bool((grad_out == 1).all()))


def scaled_grads(ctx, grad_out: torch.Tensor | None, saved, dtypes) -> list[torch.Tensor | None]:
    """The input gradients of a loss whose forward already made them (``saved``, one per input, an empty tensor
    where it made none): ``grad_out * saved[i]`` in ``dtypes[i]``, None for an empty one and for no ``grad_out``
    (see :func:`no_zero_grads`). ``grad_out`` is the loss's incoming gradient, 0-d, or one per input for a loss
    with a value per input.

    A loss is usually backpropagated with exactly 1 (``loss.backward()``, or a sum the loss is a term of): then each
    saved gradient already in its input's dtype is returned as it is, which spares a pass over it and a copy the size
    of the input (the memory roofline of forward + backward is otherwise at most half reached). Checking for 1 reads
    ``grad_out`` back (:func:`unit_grad`), once a call whatever the number of inputs. Only the first backward
    through ``ctx``'s node hands them over: a retained graph's later backwards get copies (two
    ``torch.autograd.grad`` calls would otherwise return one tensor twice). A saved gradient that was changed in
    place in between (a ``.grad`` it became, accumulated into by the second ``backward``, zeroed or clipped) makes
    autograd raise at the next backward, as for any saved tensor. An fp16 input's gradient is saved in fp32 (see
    :func:`fastseg3d.reference._grad_dtype.saved_grad_dtype`), so a loss scale such as GradScaler's 2^16, which fp16
    cannot even represent, is applied in fp32 before the cast. A double backward raises.
    """
    if grad_out is None:
        return [None] * len(saved)
    refuse_double_backward(grad_out)
    unit = None  # read back only where a saved gradient could be handed over as it is
    handed_over = getattr(ctx, "grads_handed_over", False)
    out = []
    for i, (g, dtype) in enumerate(zip(saved, dtypes)):
        if not g.numel():
            out.append(None)
            continue
        if g.dtype == dtype:
            unit = unit_grad(grad_out) if unit is None else unit
            if unit:
                out.append(g.clone() if handed_over else g)
                ctx.grads_handed_over = True
                continue
        out.append(((grad_out[i] if grad_out.dim() else grad_out) * g).to(dtype))
    return out


def refuse_double_backward(grad_out: torch.Tensor) -> None:
    """For a loss's backward that forms its gradient from saved tensors: under ``create_graph=True`` that gradient
    would be a constant of the new graph, and a second derivative through it would silently come out as 0."""
    if torch.is_grad_enabled() and not _tracing(grad_out):
        raise NotImplementedError(
            "fastseg3d's fused losses have no double backward (backward(create_graph=True)); run them under "
            "fastseg3d.backend('torch')"
        )


def _tracing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or is_fake(t):
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launchable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on ``device`` right now (CUDA, or CPU under the interpreter).

    Op bodies branch on this before any launch: ``meta`` tensors and other devices take the reference or fake path.
    """
    return backends.HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and backends.interpreter_active()))


# op name -> the function that makes its Triton launches (see ``launches``)
LAUNCHES: dict[str, Callable] = {}


def launches(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` makes the Triton launches of the op ``name`` and returns its outputs, from the op's own
    arguments. The op's body calls it once the case is launchable; ``bench.sass`` calls it on ``meta`` tensors
    (where the body returns shapes only) to compile, for sm_90, every launch a network makes."""

    def register(fn: Callable) -> Callable:
        LAUNCHES[name] = fn
        return fn

    return register


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context to launch kernels on ``t``'s GPU in: Triton launches on the current CUDA device and its stream,
    not on the tensors' device, so tensors on ``cuda:1`` while ``cuda:0`` is current need a device guard (nothing
    to do when the device is current, as on one GPU)."""
    if t.device.type != "cuda" or t.device.index is None or torch.compiler.is_compiling() or is_fake(t):
        return contextlib.nullcontext()  # traced launches get Inductor's device guard
    if t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_spatial_shape(spatial_shape, n_tokens: int) -> tuple[int, int, int]:
    """(D, H, W) of tokens in C order: three positive ints (any integer type) whose product is ``n_tokens``."""
    try:
        d, h, w = (operator.index(s) for s in spatial_shape)
    except (TypeError, ValueError):
        raise ValueError(f"spatial_shape must be 3 positive ints (D, H, W), got {spatial_shape!r}") from None
    if min(d, h, w) <= 0 or any(isinstance(s, bool) for s in spatial_shape):
        raise ValueError(f"spatial_shape must be 3 positive ints (D, H, W), got {spatial_shape!r}")
    if d * h * w != n_tokens:
        raise ValueError(f"spatial_shape {(d, h, w)} has {d * h * w} voxels but x has N={n_tokens} tokens")
    return d, h, w


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_finite_inputs(op: str, names, args) -> None:
    """Under :func:`fastseg3d.check_finite`: ``ValueError`` naming ``op`` and the first floating-point tensor among
    ``args`` (or inside a list of them) that holds a NaN or an infinity; ``names`` are the arguments' names. Not
    while compiling, on fake tensors or during CUDA-graph capture: the check reads values back."""
    if torch.compiler.is_compiling():
        return
    for name, a in zip(names, args):
        items = [(name, a)] if isinstance(a, torch.Tensor) else (
            [(f"{name}[{i}]", t) for i, t in enumerate(a)] if isinstance(a, (list, tuple)) else [])
        for label, t in items:
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" and t.numel()
                    and not _tracing(t) and not bool(torch.isfinite(t).all())):
                raise ValueError(f"{op}: {label} holds NaN or infinite values (fastseg3d.check_finite is on)")


def check_norm_args(x: torch.Tensor, weight, bias, eps, channels: int, what: str) -> None:
    """A norm's affine parameters (None, or floating (channels,) tensors on x's device; ``what`` names the axis
    they scale in the error) and its eps (a finite number >= 0)."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(p, name)
        if tuple(p.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) for {what}, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if p.device != x.device:
            raise TypeError(f"{name} is on {p.device} but x is on {x.device}; pass tensors on one device")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not finite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


EAGER_OPS: dict[str, EagerOp] = {}  # every fused op by name


class EagerOp:
    """A ``torch.library`` op (a ``triton_op`` in the ``fastseg3d::`` namespace) that eager code calls directly.

    The dispatcher, autograd wrapper and compile guards of a Python custom op cost about 100 us of host time per
    call, forward and backward (measured on a CI core, torch 2.13), more than the kernels of SegFormer3D's small
    stages take on a GPU, so the GPU of a fused network could wait for Python. Eager calls on plain tensors therefore
    run the op's body, and its autograd formulas through a plain ``autograd.Function``, with no dispatcher in
    between (under the profiler they are recorded under the op's name). Everything that observes or transforms
    ops calls ``torch.ops.fastseg3d.<name>``, which runs the same body and formulas: ``torch.compile`` and
    export, ``torch.jit.trace``, fake tensors, dispatch and function modes, functorch transforms (though the public
    functions run the references there: ``backends.transform_reasons``) and tensor subclasses. An ``autograd.Function``
    sees only top-level tensors, so tensor-list arguments (the multi-student losses) reach it flattened, and their
    gradients are flattened back from the lists the op's backward returns.
    """

    def __init__(self, name: str, fn: Callable, mutates_args: tuple[str, ...] = ()) -> None:
        schema = torch._C.parse_schema(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        self.name = name
        self._arg_names = tuple(inspect.signature(fn).parameters)
        # positions of the Tensor[] arguments, which the autograd.Function takes flattened
        self._lists = tuple(i for i, a in enumerate(schema.arguments) if str(a.type) == "List[Tensor]")
        for a in schema.arguments:
            if "Tensor" in str(a.type) and str(a.type) not in ("Tensor", "Optional[Tensor]", "List[Tensor]"):
                raise TypeError(f"{name}: an EagerOp takes tensors, optional tensors and lists of tensors, not "
                                f"{a.type} ({a.name})")
        EAGER_OPS[name] = self
        self.op = torch.library.triton_op(name, mutates_args=mutates_args)(_plain_tensor_body(fn))
        self._fn = fn
        self._function: type[torch.autograd.Function] | None = None
        self._apply: Callable | None = None

    def _run(self, *args):
        if _WRAP_STATE is None:
            with _direct_triton_launches():
                return self._fn(*args)
        previous = getattr(_WRAP_STATE, "value", _WRAP_DEFAULT)
        _WRAP_STATE.value = False
        try:
            return self._fn(*args)
        finally:
            _WRAP_STATE.value = previous

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)

        # forward(ctx, ...) rather than a setup_context staticmethod: apply() would bind the arguments to the
        # signature with inspect on every call (~40 us)
        if self._lists:
            lists = self._lists

            def forward(ctx, lengths, *flat):
                args, at = [], 0
                for i in range(len(flat) - sum(lengths) + len(lengths)):
                    if i in lists:
                        n = lengths[lists.index(i)]
                        args.append(list(flat[at:at + n]))
                        at += n
                    else:
                        args.append(flat[at])
                        at += 1
                output = self._run(*args)
                setup_context(ctx, args, output)
                ctx.eager_lengths = lengths
                return output

            def flat_backward(ctx, *grads):
                out = backward(ctx, *grads)
                flat = [None]  # the lengths
                for i, g in enumerate(out):
                    if i in lists:
                        flat.extend(g if g is not None else [None] * ctx.eager_lengths[lists.index(i)])
                    else:
                        flat.append(g)
                return tuple(flat)
        else:
            def forward(ctx, *args):
                output = self._run(*args)
                setup_context(ctx, args, output)
                return output

            flat_backward = backward

        # the graph node is named after the op (e.g. dwconv3d_eagerBackward) in profiles and anomaly reports
        Function = type(self.name.split("::")[-1] + "_eager", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(flat_backward)})
        self._function = Function
        # autograd's own apply, without Function.apply's Python checks for functorch (_eager_grad has made them):
        # ~3.5 us a call
        self._apply = super(torch.autograd.Function, Function).apply

    def __call__(self, *args):
        grad = _eager_grad(args, self._lists)
        if backends.checking_finite() and not torch._C._are_functorch_transforms_active():
            check_finite_inputs(self.name, self._arg_names, args)  # skips compile, fake and meta tensors
        if grad is None:
            return self.op(*args)
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(self.name):
                return self._call(args, grad)
        return self._call(args, grad)

    def _call(self, args, grad: bool):
        if grad and torch.is_grad_enabled():
            if self._function is None:
                return self.op(*args)  # no autograd formula: the dispatcher's error says so
            if self._lists:
                flat = []
                for i, a in enumerate(args):
                    if i in self._lists:
                        flat.extend(a)
                    else:
                        flat.append(a)
                return self._apply(tuple(len(args[i]) for i in self._lists), *flat)
            return self._apply(*args)
        return self._run(*args)


def eager_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], EagerOp]:
    """Decorator: register ``fn`` as the op ``name`` (see :class:`EagerOp`), writing in place the arguments named in
    ``mutates_args``."""
    return lambda fn: EagerOp(name, fn, mutates_args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_NO_DISPATCH = torch.Tensor.__torch_dispatch__


def _plain(a):
    """``a`` as a plain tensor where it is an instance of a subclass that only overrides ``__torch_function__``
    (MONAI's MetaTensor), else ``a``; tensor lists element-wise."""
    if isinstance(a, torch.Tensor):
        t = type(a)
        return a if t in _PLAIN_TENSORS or t.__torch_dispatch__ is not _NO_DISPATCH else a.as_subclass(torch.Tensor)
    if isinstance(a, list):
        return [_plain(t) for t in a]
    return a


def _plain_tensor_body(fn: Callable) -> Callable:
    """The dispatcher's body of an op: ``fn`` on its arguments with the tensors of ``__torch_function__`` subclasses
    as plain tensors (aliases of the same memory). Such a subclass reaches the body as itself, and its Python
    overrides (MetaTensor's ``new_empty``) would run inside the op and the kernels' launches (Triton's interpreter
    copies arguments with ``new_empty``); the subclass's ``__torch_function__`` still wraps the op's outputs.
    Subclasses that dispatch (fake and functional tensors) are the tracing machinery's and stay as they are."""

    def body(*args):
        return fn(*(_plain(a) for a in args))

    body.__name__, body.__qualname__, body.__module__ = fn.__name__, fn.__qualname__, fn.__module__
    body.__signature__ = inspect.signature(fn, eval_str=True)  # infer_schema reads strings in body's globals
    return body


def _eager_grad(args, lists: tuple[int, ...] = ()) -> bool | None:
    """None where the call must go through the dispatcher (a tensor subclass, fake tensor or functorch wrapper left
    over from a finished transform among ``args``, or in the tensor lists at positions ``lists``, or compile, a
    dispatch or function mode, a functorch transform or jit tracing active); otherwise whether one of those tensors
    requires a gradient (one pass over them)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack() or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None):
        return None
    grad = False
    for a in (*args, *(t for i in lists for t in args[i])) if lists else args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSORS or _functorch_wrapped(a):
                return None
            grad = grad or a.requires_grad
    return grad


# the thread-local flag set_wrap_triton_enabled sets (set directly, without its generator, on every eager call)
_WRAP_STATE = getattr(_torch_triton, "wrap_triton_enabled", None)
_WRAP_DEFAULT = getattr(_torch_triton, "wrap_triton_enabled_default", True)


def _direct_triton_launches() -> contextlib.AbstractContextManager:
    """Launch kernels wrapped in ``torch.library.wrap_triton`` directly, as ``triton_op`` does for eager tensors
    (otherwise each launch goes through a higher-order op, about a millisecond)."""
    return set_wrap_triton_enabled(False)
