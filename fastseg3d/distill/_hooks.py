"""Capturing named intermediate features of a backbone with forward hooks, only while a wrapper asks for them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FeatureTap", "INPUT_SUFFIX", "check_wrapper_args", "example_input_shapes"]

INPUT_SUFFIX = ":input"


def check_wrapper_args(backbone, encoder_layers, decoder_layers, *extra_layers: str) -> list[str]:
    """The argument checks DSD and SelfReg share: a module and non-empty, distinct lists of layer names.

    Returns all the layer names, encoder first, in order."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    for name, layers in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of layer names, got {layers!r}")
    layers = [*encoder_layers, *decoder_layers, *extra_layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"a layer is named twice among the wrapper's layers: {layers}")
    return layers


def _positive_ints(value, n: int) -> tuple[int, ...] | None:
    """``value`` (an int or a sequence of n ints, e.g. a size or stride attribute) as n positive ints, or None."""
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        values = tuple(value)
    else:
        values = (value,) * n
    try:
        if len(values) != n or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
            return None
    except (TypeError, ValueError):
        return None
    return tuple(int(v) for v in values)


def example_input_shapes(backbone: nn.Module, max_side: int = 1024) -> list[tuple[int, ...]]:
    """Input shapes (1, C, *spatial) to try, in order, for a dry run of ``backbone`` when none is given.

    C is the backbone's ``in_channels`` attribute, else the input channels of its first convolution (in
    ``modules()`` order), whose type also gives the spatial dimensions (else a ``spatial_dims`` attribute). The
    spatial size is the backbone's own where it records one: an ``img_size`` attribute, or ``feat_size`` times
    ``patch_size`` (MONAI's UNETR), for networks built for one size. Otherwise it is twice the per-axis product of
    the strides of every convolution and pooling layer (a multiple of what a U-Net's down-sampling path needs,
    doubled so that instance normalisation sees more than one voxel at the bottleneck), then that doubled, up to
    ``max_side`` per axis. Empty when nothing gives the channels or the spatial dimensions.
    """
    def is_conv(m):  # transposed convolutions up-sample: their stride is no constraint on the input
        return isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)

    first = next((m for m in backbone.modules() if is_conv(m)), None)
    in_channels = getattr(backbone, "in_channels", None)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        in_channels = first.in_channels if first is not None else None
    dims = len(first.kernel_size) if first is not None else getattr(backbone, "spatial_dims", None)
    if in_channels is None or dims not in (1, 2, 3):
        return []
    fixed = _positive_ints(getattr(backbone, "img_size", None), dims)
    if fixed is None:
        feat = _positive_ints(getattr(backbone, "feat_size", None), dims)
        patch = _positive_ints(getattr(backbone, "patch_size", None), dims)
        if feat is not None and patch is not None:
            fixed = tuple(f * p for f, p in zip(feat, patch))
    if fixed is not None:
        return [(1, in_channels, *fixed)]
    stride = [1] * dims
    for m in backbone.modules():
        layer = None
        if is_conv(m) and len(m.kernel_size) == dims:
            layer = m.stride
        elif isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
            kind = type(m).__name__
            if kind.endswith(f"{dims}d"):
                layer = m.stride if m.stride is not None else m.kernel_size
        step = _positive_ints(layer, dims) if layer is not None else None
        if step is not None:
            stride = [a * b for a, b in zip(stride, step)]
    shapes, side = [], [2 * s for s in stride]
    while max(side) <= max_side:
        shapes.append((1, in_channels, *side))
        side = [2 * s for s in side]
    return shapes


class LayerError(RuntimeError):
    """A tapped layer that the forward did not call exactly once, or whose output it changed in place afterwards:
    no other input size mends that."""


class LayerTypeError(TypeError):
    """A tapped layer whose output holds no tensor."""


def _first_tensor(value, spec: str) -> torch.Tensor:
    # Modules such as MONAI's ViT return (tokens, hidden states); the first element is the feature.
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise LayerTypeError(f"layer {spec!r} produced {type(value).__name__}, not a tensor")
    return value


class _Capture:
    """A hook that stores one layer's feature in a shared dict while ``state["on"]`` is set.

    A class rather than a closure so that wrapped models can be deep-copied and pickled.
    """

    def __init__(self, store: dict, state: dict, spec: str, use_input: bool) -> None:
        self.store, self.state, self.spec, self.use_input = store, state, spec, use_input

    def __call__(self, module, args, output=None):
        if self.state["on"]:
            if self.spec in self.store:  # a second call: its feature would silently replace the first
                self.state["repeated"].add(self.spec)
            t = _first_tensor(args if self.use_input else output, self.spec)
            # the version counter says whether the forward changes the tensor in place after this (an inplace
            # activation after a norm): the stored tensor would then not be the layer's output
            # (inference tensors have no counter; Dynamo does not trace it)
            version = None if torch.compiler.is_compiling() or t.is_inference() else t._version
            self.store[self.spec] = (t, version)


def _attached(backbone: nn.Module, state: dict) -> bool:
    """Whether any capture hook of the tap with ``state`` is on ``backbone``."""
    return any(isinstance(hook, _Capture) and hook.state is state
               for module in backbone.modules()
               for hooks in (module._forward_hooks, module._forward_pre_hooks) for hook in hooks.values())


def _meta_clone(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` on the ``meta`` device in eval mode, without its hooks: for shape-only runs that
    allocate nothing, whose forward must neither run the user's hooks (a logging hook would log, a NaN guard would
    fail on meta tensors) nor touch the backbone."""
    # Seeding deepcopy's memo with meta stand-ins copies the modules but none of the weights. (functional_call
    # would avoid the copy but mishandles DynUNet, whose blocks are reachable under two names.)
    memo = {}
    for p in backbone.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in backbone.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    for module in backbone.modules():  # empty hook dicts in the copy: no hook (nor the object it is bound to) copied
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    try:
        clone = copy.deepcopy(backbone, memo)
    except Exception as e:  # a tensor that is no parameter or buffer (old-style weight_norm's weight), a lock, ...
        raise TypeError(
            f"the wrapper derives its heads' shapes from a copy of the backbone on the meta device, and "
            f"{type(backbone).__name__} cannot be copied ({type(e).__name__}: {e}): an attribute that is neither a "
            "parameter nor a buffer and cannot be copied, such as the weight torch.nn.utils.weight_norm computes "
            "(use torch.nn.utils.parametrizations.weight_norm)"
        ) from e
    return clone.eval()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _remove_captures(backbone: nn.Module, state: dict | None = None) -> None:
    """Remove the capture hooks of one tap (``state``), or of every tap, from ``backbone``'s modules.

    Found by type and state rather than through handles, which would still point at the original's modules in a
    deep copy of the wrapper."""
    for module in backbone.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            stale = [key for key, hook in hooks.items()
                     if isinstance(hook, _Capture) and (state is None or hook.state is state)]
            for key in stale:
                del hooks[key]


class FeatureTap:
    """Hooks on ``backbone`` layers named by ``specs``; :meth:`run` returns the output and the captured features.

    A spec is a submodule name as in ``named_modules()`` (``"encoder.0"``, ``"decoder5"``): the module's output,
    or its first tensor when the output is a tuple or list. With the suffix ``":input"`` (``"decoder5:input"``) it
    is the module's first positional input instead (a forward pre-hook), for features that no submodule returns,
    such as UNETR's bottleneck volume. Outside :meth:`run` the hooks store nothing, so evaluation keeps no
    features alive. :meth:`run` raises :class:`LayerError` for a layer the forward did not call, called more than
    once, or whose output it changed in place afterwards. The names are checked when the tap is made;
    :meth:`attach` puts its hooks on, replacing those of an earlier tap, so wrapping twice does not stack them, and
    a wrapper whose construction fails leaves the backbone as it was; :meth:`remove` takes this tap's off.
    """

    def __init__(self, backbone: nn.Module, specs: Sequence[str]) -> None:
        self.store: dict[str, tuple[torch.Tensor, int | None]] = {}  # spec -> (feature, its version when stored)
        self.state = {"on": False, "repeated": set()}
        self.specs = tuple(specs)
        for spec in self.specs:
            self._module(backbone, spec)

    def _module(self, backbone: nn.Module, spec) -> nn.Module:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"layer names must be non-empty strings, got {spec!r}")
        name = spec[: -len(INPUT_SUFFIX)] if spec.endswith(INPUT_SUFFIX) else spec
        try:
            return backbone.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the backbone has no submodule {name!r} (layer {spec!r})") from None

    def attach(self, backbone: nn.Module) -> None:
        """Put this tap's hooks on ``backbone``, taking off those of any other tap."""
        _remove_captures(backbone)
        for spec in self.specs:
            use_input = spec.endswith(INPUT_SUFFIX)
            hook = _Capture(self.store, self.state, spec, use_input)
            module = self._module(backbone, spec)
            if use_input:
                module.register_forward_pre_hook(hook)
            else:
                module.register_forward_hook(hook)

    def remove(self, backbone: nn.Module) -> None:
        """Take this tap's hooks off ``backbone``."""
        _remove_captures(backbone, self.state)

    def run(self, backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``backbone(x)`` and the features of every spec, in spec order."""
        self.store.clear()
        self.state["repeated"] = set()
        self.state["on"] = True
        try:
            output = backbone(x)
        except BaseException:
            self.store.clear()  # a failed step (an OOM, say) must not keep the features and their graphs
            raise
        finally:
            self.state["on"] = False
        stored = dict(self.store)  # the hooks hold self.store itself
        self.store.clear()
        missing = [s for s in self.specs if s not in stored]
        if missing:
            if not _attached(backbone, self.state):
                raise LayerError(
                    "this wrapper's feature hooks are no longer on the backbone: unwrap() took them off, or another "
                    "wrapper of the same backbone replaced them; wrap the backbone again to train with this loss"
                )
            raise LayerError(f"the backbone's forward did not call the hooked layers {missing}")
        repeated = [s for s in self.specs if s in self.state["repeated"]]
        if repeated:
            raise LayerError(f"the hooked layers {repeated} run more than once in the backbone's forward (a module "
                             "reused): which call's output is the feature is ambiguous; tap a module that runs once")
        changed = [s for s in self.specs if stored[s][1] is not None and stored[s][0]._version != stored[s][1]]
        if changed:
            raise LayerError(f"the backbone's forward changes the output of the hooked layers {changed} in place "
                             "after they return it (an inplace activation or += after them): the captured feature "
                             "would not be the layer's output; tap the module that makes the final value")
        features = [stored[s][0] for s in self.specs]
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the backbone must return one logits tensor in training, got {type(output).__name__} "
                "(turn off the backbone's own deep supervision)"
            )
        return output, features

    def dry_run(
        self, backbone: nn.Module, input_shape: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output and features for an input of ``input_shape``, from a copy of the backbone on the ``meta``
        device: shapes only, nothing allocated, the backbone untouched. The copy runs in eval mode, so that
        normalisation layers accept the smallest valid input.

        ``input_shape=None`` derives one from the backbone (see :func:`example_input_shapes`) and raises a
        ``ValueError`` asking for ``input_shape`` when none of the candidates runs; a backbone that cannot be
        copied raises ``TypeError``."""
        if input_shape is not None and (
            not isinstance(input_shape, (tuple, list, torch.Size))
            or len(input_shape) < 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_shape)
        ):
            raise ValueError(f"input_shape must be the full shape of an example input (B, C, *spatial), got "
                             f"{input_shape!r}")
        clone = _meta_clone(backbone)
        tap = FeatureTap(clone, self.specs)
        tap.attach(clone)
        dtype = param_dtype_device(backbone)[0]

        def run(shape):
            with torch.no_grad():
                return tap.run(clone, torch.empty(tuple(shape), device="meta", dtype=dtype))

        if input_shape is not None:
            return _in_eval(run, input_shape)
        candidates = example_input_shapes(backbone)
        error = None
        for shape in candidates:
            try:
                return _in_eval(run, shape)
            except (LayerError, LayerTypeError):  # the layers, not the size: no other candidate mends it
                raise
            except Exception as e:  # whatever a guessed size breaks, the next candidate may run
                error = e
        tried = ", ".join(str(c) for c in candidates) or "none (no convolution found)"
        raise ValueError(
            f"could not derive an example input for {type(backbone).__name__} (tried {tried}"
            + (f"; the last one failed with {type(error).__name__}: {error}" if error is not None else "")
            + "): pass input_shape=(B, C, *spatial), the shape of an input the network accepts"
        ) from error


def _in_eval(run, shape):
    """``run(shape)`` with a layer error saying that the run was the eval-mode one that sizes the heads."""
    try:
        return run(shape)
    except LayerError as e:
        raise LayerError(f"{e} (in the eval-mode run of a meta copy that sizes the wrapper's heads: a layer must "
                         "run once in eval as in training)") from None


def param_dtype_device(backbone: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the backbone's first floating-point parameter (the defaults without one): where
    the wrapper's example input and heads go."""
    for p in backbone.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


class NoDataParallel:
    """Mixin for the wrappers: ``nn.DataParallel``'s replicas would share one tap (its store and switch) across
    their threads, so replicating is refused with a pointer to DDP, under which each process has its own."""

    def _replicate_for_data_parallel(self):
        raise RuntimeError(f"{type(self).__name__} cannot run under nn.DataParallel (its replicas would share the "
                           "feature hooks across threads): use DistributedDataParallel")
