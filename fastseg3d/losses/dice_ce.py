"""Dice + cross-entropy on softmax logits that keeps only the logits and the label for backward.

MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` leaves autograd the fp32 softmax, the fp32 log-softmax of its
cross-entropy and the one-hot label: 12 bytes per logit, six times the logits of a bf16 network. DSD's five
supervised heads at 2 x 2 x 128^3 hold 480 MiB that way, a quarter of what the whole training step saves.
Here the forward pass keeps the logits as they come (2 bytes per logit in bf16, and a head below the label's
resolution is kept at its own resolution), the label and two (B, K) coefficient tables; backward recomputes the
softmax, and the gradient is a closed form:

``dL/dz = p * (g - sum_c p_c g_c) + lambda_ce * (p - y) / (B * voxels)``, ``g = lambda_dice * (a_bk * y + b_bk)``

with ``y`` the one-hot label and ``a``, ``b`` the derivative of the mean Dice term with respect to the
probabilities (zero for the background when it is left out). The value is the reference's
(:func:`fastseg3d.reference.dice_ce.dice_ce_ref`, MONAI's composition) up to rounding. Transient memory, in
compute-dtype maps of the upsampled logits: forward peaks at one map (the probabilities, formed in place), a bool
one-hot label (a quarter map) and two (B, 1, voxels) maps at most; backward at two maps (the probabilities and the
gradient) and two (B, 1, voxels) maps. A label that is not int64 is converted to int64 in each pass (8 bytes per
voxel), as the gathers and scatters need. The composition's forward peaks at three to four maps and keeps three.

Under ``fastseg3d.backend("torch")`` the reference runs instead: the plain composition that the benchmarks' plain
networks use.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.ops.upsample_sum import upsample_adjoint
from fastseg3d.reference.dice_ce import dice_ce_ref, upsampled_logits

__all__ = ["DiceCELoss", "dice_ce"]


def _probabilities(logits: torch.Tensor, size, labels: torch.Tensor | None = None):
    """The softmax over the classes of the logits upsampled to ``size``, in the compute dtype and formed in place
    in one fresh map; given ``labels``, also the log-probability of each voxel's label, (B, 1, *size)."""
    z = upsampled_logits(logits, size)
    top = z.amax(1, keepdim=True)
    z = z - top if z is logits else z.sub_(top)
    del top
    at_label = z.gather(1, labels) if labels is not None else None
    total = z.exp_().sum(1, keepdim=True)
    p = z.div_(total)
    return p if labels is None else (p, at_label.sub_(total.log_()))


class _DiceCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, include_background, lambda_dice, lambda_ce, smooth_nr, smooth_dr, squared_pred,
                batch, reduction):
        labels = target.long()
        p, log_p_label = _probabilities(logits, target.shape[2:], labels)
        ce = -(log_p_label.sum() if reduction == "sum" else log_p_label.mean())
        # the sums over voxels (and the batch): tables (B, K), or (1, K) with batch
        dims = (0, *range(2, p.dim())) if batch else tuple(range(2, p.dim()))
        predicted = (torch.linalg.vector_norm(p, dim=dims) ** 2 if squared_pred else p.sum(dims)).view(-1, p.shape[1])
        elsewhere = torch.ones(p.shape, dtype=torch.bool, device=p.device).scatter_(1, labels, False)
        intersection = p.masked_fill_(elsewhere, 0.0).sum(dims).view(-1, p.shape[1])
        # the one-hot label's voxel count per class, summed in p's map as MONAI sums its fp32 one-hot (a bool map's
        # sum would convert it to int64 first)
        ground = p.fill_(1.0).masked_fill_(elsewhere, 0.0).sum(dims).view(-1, p.shape[1])
        del p
        denominator = ground + predicted + smooth_dr
        ratio = (2.0 * intersection + smooth_nr) / denominator
        first = 0 if include_background else 1
        terms = 1.0 - ratio[:, first:]
        dice = terms.sum() if reduction == "sum" else terms.mean()
        # dDice/dp_bkv = a_bk * y_bkv + b_bk (times 2 p_bkv with squared_pred), Dice's weight folded in; zero for
        # a left-out background
        scale = (lambda_dice / (1 if reduction == "sum" else terms.numel())) / denominator
        a, b = -2.0 * scale, ratio * scale
        if first:
            a[:, 0] = 0.0
            b[:, 0] = 0.0
        ctx.save_for_backward(logits, target, a, b)
        ctx.lambda_ce, ctx.squared_pred, ctx.ce_sum = lambda_ce, squared_pred, reduction == "sum"
        return lambda_dice * dice + lambda_ce * ce

    @staticmethod
    def backward(ctx, grad):
        utils.refuse_double_backward(grad)
        with torch.no_grad():
            return _DiceCE._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        logits, target, a, b = ctx.saved_tensors
        size = list(target.shape[2:])
        labels = target.long()
        p = _probabilities(logits, size)
        # g = dDice/dp: b everywhere (2 b p with squared_pred), plus a at each voxel's label
        tail = (...,) + (None,) * (p.dim() - 2)
        flat = labels.flatten(2)
        if ctx.squared_pred:
            g = torch.mul(p, 2.0 * b[tail])
            at_label = a[..., None].expand(flat.shape[0], -1, flat.shape[2]).gather(1, flat)
            g.scatter_add_(1, labels, at_label.view(labels.shape))
        else:
            g = b[tail].expand(p.shape).clone()
            at_label = (a + b)[..., None].expand(flat.shape[0], -1, flat.shape[2]).gather(1, flat)
            g.scatter_(1, labels, at_label.view(labels.shape))
        # through the softmax: p * (g - sum_c p_c g_c)
        g.mul_(p)
        g.addcmul_(p, g.sum(1, keepdim=True), value=-1.0)
        # the cross-entropy's lambda_ce * (p - y), over B * voxels for its mean
        ce_scale = ctx.lambda_ce if ctx.ce_sum else ctx.lambda_ce / labels.numel()
        g.add_(p, alpha=ce_scale)
        del p
        g.scatter_(1, labels, g.gather(1, labels) - ce_scale)
        g.mul_(grad)
        if list(logits.shape[2:]) != size:
            g = upsample_adjoint(g, list(logits.shape))
        return g.to(logits.dtype), *(None,) * 9


def _check_tensors(logits, target) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dim() not in (4, 5) or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, K, H, W) or (B, K, D, H, W) with K >= 2 classes, got shape "
                         f"{tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if target.device != logits.device:
        raise TypeError(f"target is on {target.device} and logits on {logits.device}: one device")
    if target.dim() != logits.dim() or target.shape[0] != logits.shape[0] or target.shape[1] != 1:
        raise ValueError(f"target must be a class map (B, 1, *spatial) for logits of shape {tuple(logits.shape)}, "
                         f"got shape {tuple(target.shape)}")
    for n, m in zip(logits.shape[2:], target.shape[2:]):
        if n <= 0 or m < n or m % n:
            raise ValueError(f"logits {tuple(logits.shape[2:])} must have the target's spatial shape "
                             f"{tuple(target.shape[2:])} or divide it per axis (they are upsampled to it)")


def _check_labels(logits, target) -> None:
    """Every label a class index in [0, K): a value outside would index past the one-hot map (a bare indexing
    error on a CPU, a device-side assert that ends the process on a GPU). Reading the labels is free of a sync on
    a CPU, so it is done there always, on a GPU under :func:`fastseg3d.check_finite`."""
    if target.numel() == 0 or not (
            target.device.type == "cpu" or (target.device.type == "cuda" and backends.checking_finite())):
        return
    # no value to read while tracing (compile, fake tensors, CUDA-graph capture, make_fx) or under a torch.func
    # transform
    if utils._tracing(target) or backends.transform_reasons() or get_proxy_mode() is not None:
        return
    k = logits.shape[1]
    if target.is_floating_point() and not bool(torch.isfinite(target).all()):
        raise ValueError("target holds NaN or infinite labels")
    low, high = (float(v) for v in target.aminmax())
    if low < 0 or high >= k:
        raise ValueError(f"target holds labels from {low:g} to {high:g}; the {k} classes of logits take labels 0 to "
                         f"{k - 1}")


def _check_settings(include_background, lambda_dice, lambda_ce, smooth_nr, smooth_dr) -> tuple:
    """The weights and smoothing terms as floats (finite, >= 0). Under torch.compile they pass as they are: with
    dynamic shapes they may be symbolic, and a module's are checked when it is made."""
    if not isinstance(include_background, bool):
        raise ValueError(f"include_background must be a bool, got {include_background!r}")
    settings = (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce), ("smooth_nr", smooth_nr),
                ("smooth_dr", smooth_dr))
    if torch.compiler.is_compiling():
        return tuple(value for _, value in settings)
    for name, value in settings:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return tuple(float(value) for _, value in settings)


def _check_forms(squared_pred, batch, reduction) -> None:
    for name, value in (("squared_pred", squared_pred), ("batch", batch)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    *,
    squared_pred: bool = False,
    batch: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` of ``logits`` (B, K, *spatial), K >= 2, against the
    class map ``target`` (B, 1, *spatial_t), keeping only the logits for backward. As in MONAI's: the Dice term per
    (batch, class) pair (per class over the whole batch with ``batch``), the probabilities squared in its
    denominator with ``squared_pred``, and both terms averaged (``reduction="mean"``) or summed (``"sum"``).

    ``spatial_t`` is ``spatial`` or a multiple of it per axis: smaller logits (a deep-supervision head) are
    upsampled ((bi/tri)linear, ``align_corners=False``) to the label's resolution inside the loss, as
    ``F.interpolate`` would, and kept at their own resolution. fp16/bf16 logits are computed in fp32 (fp64 stays
    fp64); the loss is a 0-d tensor in that dtype and the gradient comes back in the logits' dtype.

    Example:
        >>> import torch
        >>> from fastseg3d.losses import dice_ce
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> label = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> dice_ce(logits, label).backward()
    """
    _check_tensors(logits, target)
    _check_labels(logits, target)
    lambda_dice, lambda_ce, smooth_nr, smooth_dr = _check_settings(include_background, lambda_dice, lambda_ce,
                                                                   smooth_nr, smooth_dr)
    _check_forms(squared_pred, batch, reduction)
    # an empty batch's mean is NaN, as in MONAI's composition
    if backends.get_backend() == "torch" or logits.shape[0] == 0 or backends.transform_reasons():
        return dice_ce_ref(logits, target, include_background, lambda_dice, lambda_ce, smooth_nr, smooth_dr,
                           squared_pred=squared_pred, batch=batch, reduction=reduction)
    return _DiceCE.apply(logits, target, include_background, lambda_dice, lambda_ce, smooth_nr, smooth_dr,
                         squared_pred, batch, reduction)


# the settings of MONAI's DiceCELoss under which it is dice_ce (the others at their defaults)
_FUSED_SETTINGS = {"to_onehot_y": True, "softmax": True, "sigmoid": False, "other_act": None, "jaccard": False,
                   "weight": None, "label_smoothing": 0.0}


class DiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss``, with its constructor, defaults and values: on label maps with a softmax
    (``to_onehot_y=True, softmax=True``, which is how MONAI's segmentation recipes call it) it computes
    :func:`dice_ce`, which leaves autograd a sixth of MONAI's memory with bf16 logits; every other setting runs
    MONAI's own ``DiceCELoss`` (``monai`` must be installed for those).

    The fused case: ``to_onehot_y=True, softmax=True``, ``reduction`` "mean" or "sum", and MONAI's defaults for
    ``sigmoid``, ``other_act``, ``jaccard``, ``weight`` and ``label_smoothing``; the arguments it reads are
    ``include_background`` (class 0 in the Dice term; the cross-entropy always covers every class), ``smooth_nr``,
    ``smooth_dr`` (added to the Dice numerator and denominator), ``squared_pred`` (the probabilities squared in the
    denominator), ``batch`` (one Dice term per class over the whole batch), ``reduction`` (both terms averaged or
    summed), ``lambda_dice`` and ``lambda_ce`` (the terms' weights). It takes the logits (B, K, *spatial),
    K >= 2, and a class map (B, 1, *spatial_t): unlike MONAI's, logits smaller than the label by integer factors
    per axis (a deep-supervision head) are upsampled inside. ``fused`` says whether it runs, ``composition`` holds
    MONAI's loss otherwise.

    Example:
        >>> import torch
        >>> from fastseg3d.losses import DiceCELoss
        >>> loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        >>> loss = loss_fn(torch.randn(1, 4, 16, 16, 16), torch.randint(0, 4, (1, 1, 16, 16, 16)))
    """

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act=None, squared_pred: bool = False, jaccard: bool = False,
                 reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 weight: torch.Tensor | None = None, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        # MONAI's switches are bools: a number there is most likely an older positional call's weight
        for name, value in (("to_onehot_y", to_onehot_y), ("sigmoid", sigmoid), ("softmax", softmax),
                            ("squared_pred", squared_pred), ("jaccard", jaccard), ("batch", batch)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r} (DiceCELoss takes MONAI's signature; pass "
                                "lambda_dice, lambda_ce, smooth_nr and smooth_dr by keyword)")
        self.include_background = include_background
        self.lambda_dice, self.lambda_ce, self.smooth_nr, self.smooth_dr = _check_settings(
            include_background, lambda_dice, lambda_ce, smooth_nr, smooth_dr)
        settings = {"to_onehot_y": to_onehot_y, "softmax": softmax, "sigmoid": sigmoid, "other_act": other_act,
                    "jaccard": jaccard, "weight": weight, "label_smoothing": label_smoothing, "reduction": reduction}
        unfused = [name for name, value in settings.items()
                   if name != "reduction" and not (value is _FUSED_SETTINGS[name] or (
                       isinstance(value, (bool, int, float, str)) and value == _FUSED_SETTINGS[name]))]
        if reduction not in ("mean", "sum"):
            unfused.append("reduction")
        self.squared_pred, self.batch, self.reduction = squared_pred, batch, reduction
        self.fused = not unfused
        if self.fused:
            _check_forms(squared_pred, batch, reduction)
        self.composition = None
        if unfused:
            try:
                from monai.losses import DiceCELoss as MONAIDiceCELoss
            except ImportError as e:
                given = ", ".join(f"{name}={settings[name]!r}" for name in unfused)
                raise ValueError(
                    f"DiceCELoss({given}) is MONAI's composition, and monai is not installed (pip install monai); "
                    "fastseg3d computes the label-map case, to_onehot_y=True and softmax=True with MONAI's "
                    "defaults for the other settings") from e
            self.composition = MONAIDiceCELoss(
                include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid, softmax=softmax,
                other_act=other_act, squared_pred=squared_pred, jaccard=jaccard, reduction=reduction,
                smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, weight=weight, lambda_dice=lambda_dice,
                lambda_ce=lambda_ce, label_smoothing=label_smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.composition is not None:
            return self.composition(input, target)
        return dice_ce(input, target, self.include_background, self.lambda_dice, self.lambda_ce, self.smooth_nr,
                       self.smooth_dr, squared_pred=self.squared_pred, batch=self.batch, reduction=self.reduction)
