"""Whole-volume inference, segmentation metrics and prediction export for validation and ``fastseg3d eval``.

Prediction goes logits -> :func:`to_prediction` (one-hot or thresholded, what MONAI's metrics expect) ->
:func:`segmentation_metrics` / :class:`MetricAccumulator`, and -> :func:`labels_from_prediction` ->
:func:`save_prediction_nifti` for a label volume on disk. Two modes name the label encodings:

* ``"softmax"``: mutually exclusive classes; labels are one integer channel ``(B, 1, *spatial)`` with values
  ``0..K-1`` (class 0 = background) and the network has K output channels.
* ``"sigmoid"``: overlapping binary regions (BraTS TC/WT/ET); labels are already ``(B, K, *spatial)`` binary.

MONAI and nibabel are imported where they are used, so importing this module needs neither.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MetricAccumulator",
    "check_relabel",
    "check_window",
    "labels_from_prediction",
    "predict_case",
    "relabel_small_class",
    "save_prediction_nifti",
    "segmentation_metrics",
    "sliding_window_predict",
    "to_onehot",
    "to_prediction",
]

_MODES = ("softmax", "sigmoid")
_BRATS_REGIONS = ("TC", "WT", "ET")


def check_window(model: torch.nn.Module, in_channels: int, roi_size: Sequence[int], name: str,
                 blend: str = "gaussian", train_batch: int | None = None) -> None:
    """Raise a ``ValueError`` naming the setting ``name`` when ``model`` (in eval) refuses a ``(1, in_channels,
    *roi_size)`` window, the input :func:`sliding_window_predict` gives it, or, for ``blend="first"``, returns
    logits of another size, or, with ``train_batch``, when in training it refuses a batch of that many crops of
    ``roi_size`` (BatchNorm needs more than one value a channel), before a run gets to its first step or
    validation: the forwards run on a ``meta`` copy (no memory, no time)."""
    try:
        meta = copy.deepcopy(model).to("meta").eval()
    except RuntimeError:  # a module that cannot be copied (weight_norm's computed weight): its first window tells
        return
    out = _meta_forward(meta, 1, in_channels, roi_size, f"{name}={list(roi_size)}: the network cannot take "
                                                        f"windows of that size")
    if out is None:
        return
    if blend == "first":
        got = tuple(_first_output(out).shape[2:])
        if got != tuple(roi_size):
            raise ValueError(f"{name}={list(roi_size)}: blend 'first' needs logits the size of the window, the "
                             f"network gives {list(got)}")
    if train_batch is not None:
        _meta_forward(meta.train(), train_batch, in_channels, roi_size,
                      f"{name}={list(roi_size)} in batches of {train_batch} (per process): the network cannot "
                      f"train on that")


def _meta_forward(meta: torch.nn.Module, batch: int, in_channels: int, size: Sequence[int], message: str):
    """``meta``'s output for a (batch, in_channels, *size) meta input; None where the meta device cannot tell."""
    try:
        with torch.no_grad():
            return meta(torch.empty(batch, in_channels, *size, device="meta"))
    except NotImplementedError:  # an op without a meta kernel: the first step or window tells
        return None
    except (ValueError, RuntimeError) as err:
        # torch's and MONAI's networks refuse a size with a RuntimeError (a concat of mismatched skips, a kernel
        # larger than its input); one about the meta device itself (a value read back) says nothing of the size
        if isinstance(err, RuntimeError) and "meta" in str(err).lower():
            return None
        raise ValueError(f"{message} ({' '.join(str(err).split())[:300]})") from None


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    Readers (TensorBoard, a plot viewer, a second process resuming) never see a half-written file. The temporary
    name keeps the full suffix (``.nii.gz``, ``.png``) because writers pick the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _first_output(output: Any) -> torch.Tensor:
    """The logits in a model output: the tensor itself, else the first element / value / dataclass field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_output(output[0])
    if isinstance(output, dict) and output:
        return _first_output(next(iter(output.values())))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = dataclasses.fields(output)
        if fields:
            return _first_output(getattr(output, fields[0].name))
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; pass logits_fn")


BLENDS = ("gaussian", "constant", "first")  # sliding_window_predict's ways of joining windows


def sliding_window_predict(
    model: Callable[[torch.Tensor], Any],
    image: torch.Tensor,
    roi_size: Sequence[int] | int,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    blend: str = "gaussian",
    flip_tta: bool = False,
    mode: str | None = None,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits for a whole volume from windows of ``roi_size`` (MONAI ``sliding_window_inference``).

    Runs under ``torch.no_grad``; putting the model in eval mode is the caller's job. A ``roi_size`` larger than the
    image pads it (MONAI crops the result back). With ``flip_tta`` the predictions are averaged over the identity and
    the 7 non-empty combinations of flips of the spatial axes (flip the input, predict, flip the output back): 8 full
    sliding-window passes. With a ``mode`` it is the probabilities that are averaged, as TransBTS (MISSU's
    evaluation) and nnU-Net do, and their logits that come back: the log of the mean softmax (``"softmax"``) or the
    logit of the mean sigmoid (``"sigmoid"``), finite (probabilities clamped at 1e-7 from 0 and 1), which
    :func:`to_prediction` reads as it reads logits; without one the logits are averaged.

    Args:
        model: called on ``(sw_batch_size, C, *roi_size)`` windows.
        image: ``(B, C, *spatial)``; a MONAI ``MetaTensor`` is read as a plain tensor.
        roi_size: window size per spatial axis (an int for all axes).
        overlap: fraction of the window shared by neighbours (SegFormer3D validates with 0.5).
        sw_batch_size: windows per model call.
        blend: ``"gaussian"`` (weights fall off towards window borders), ``"constant"`` (plain average) or
            ``"first"``: no blending, each voxel from the first window along each axis that covers it (the windows
            are MONAI's), as TransBTS and MISSU stitch their eight fixed 128^3 crops of a BraTS volume (overlap
            0.125 places the windows there).
        flip_tta: average over the 8 flips of the spatial axes.
        mode: ``"softmax"`` or ``"sigmoid"``: average the flips' probabilities, not their logits.
        logits_fn: extracts the logits tensor from the model's output; default: the output if it is a tensor,
            else its first element (tuple/list), first value (dict) or first field (dataclass).

    Returns:
        ``(B, K, *spatial)`` logits, a plain tensor on the image's device.

    Example:
        >>> net = torch.nn.Conv3d(1, 2, 1)
        >>> sliding_window_predict(net, torch.randn(1, 1, 20, 23, 17), 16).shape
        torch.Size([1, 2, 20, 23, 17])
    """
    from monai.inferers import sliding_window_inference

    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(map(repr, BLENDS))}, got {blend!r}")
    if image.dim() < 3:
        raise ValueError(f"image must be (B, C, *spatial), got shape {tuple(image.shape)}")
    if mode is not None:
        _check_mode(mode)
    extract = logits_fn or _first_output
    # Plain tensors: MetaTensor bookkeeping on every window costs time and is not needed for logits.
    image = image.as_subclass(torch.Tensor)
    spatial = range(2, image.dim())
    flips = [()]
    if flip_tta:
        flips += [dims for r in range(1, len(spatial) + 1) for dims in itertools.combinations(spatial, r)]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return extract(model(window))

    total = None
    with torch.no_grad():
        for dims in flips:
            x = image.flip(dims) if dims else image
            if blend == "first":
                out = _first_window_inference(x, roi_size, sw_batch_size, predictor, overlap)
            else:
                out = sliding_window_inference(x, roi_size, sw_batch_size, predictor, overlap=overlap, mode=blend)
                out = out.as_subclass(torch.Tensor)
            out = out.flip(dims) if dims else out
            if len(flips) > 1 and mode is not None:
                out = out.float().softmax(1) if mode == "softmax" else out.float().sigmoid()
            total = out if total is None else total.add_(out)
    if len(flips) == 1:
        return total
    total /= len(flips)
    if mode is None:
        return total
    # finite logits of the mean probabilities: log(p) for the softmax, log(p / (1 - p)) for the sigmoid
    return total.clamp_(1e-7).log_() if mode == "softmax" else torch.logit(total, eps=1e-7)


def _first_window_inference(image: torch.Tensor, roi_size, sw_batch_size: int, predictor, overlap: float
                            ) -> torch.Tensor:
    """Logits from MONAI's windows (its roi fall-back, zero padding of an image smaller than the window, scan
    intervals and starts), each voxel taken from the first window along each axis that covers it."""
    from monai.data.utils import dense_patch_slices
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    n = image.dim() - 2
    shape = tuple(image.shape[2:])
    if not isinstance(roi_size, int) and len(roi_size) != n:  # fall_back_tuple's own error names no argument
        raise ValueError(f"roi_size {tuple(roi_size)} must have one size per spatial axis of the image ({n})")
    roi = fall_back_tuple(roi_size, shape)
    overlaps = ensure_tuple_rep(overlap, n)
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap!r}")
    pads = [max(r - s, 0) for r, s in zip(roi, shape)]
    if any(pads):
        image = F.pad(image, [p for d in reversed(range(n)) for p in (pads[d] // 2, pads[d] - pads[d] // 2)])
    size = tuple(image.shape[2:])
    interval = [r if r == s else max(int(r * (1 - o)), 1) for r, s, o in zip(roi, size, overlaps)]
    owned = []  # per axis: (window start, first voxel it gives, end), in scan order
    for axis in range(n):
        starts = sorted({w[axis].start for w in dense_patch_slices(size, roi, interval)})
        ends = [start + roi[axis] for start in starts]
        owned.append(list(zip(starts, [0, *ends[:-1]], ends)))
    # (image, window) pairs, sw_batch_size of them a model call, as MONAI batches them
    pairs = [(b, w) for b in range(image.shape[0]) for w in itertools.product(*owned)]
    out = None
    for first in range(0, len(pairs), sw_batch_size):
        chunk = pairs[first:first + sw_batch_size]
        crops = [image[(slice(b, b + 1), slice(None), *(slice(st, st + r) for (st, _, _), r in zip(w, roi)))]
                 for b, w in chunk]
        logits = predictor(torch.cat(crops)).as_subclass(torch.Tensor)
        if tuple(logits.shape[2:]) != tuple(roi):
            raise ValueError(f"blend='first' needs the model's output the size of its window {tuple(roi)}, got "
                             f"{tuple(logits.shape[2:])}")
        if out is None:
            out = logits.new_empty((image.shape[0], logits.shape[1], *size))
        for (b, w), part in zip(chunk, logits):
            dst = (b, slice(None), *(slice(lo, hi) for _, lo, hi in w))
            src = (slice(None), *(slice(lo - st, hi - st) for st, lo, hi in w))
            out[dst] = part[src]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape))
    return out[(slice(None), slice(None), *crop)]


def to_prediction(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Binary prediction from ``(B, K, *spatial)`` logits, float, in the layout MONAI's metrics expect.

    ``"softmax"``: one-hot of the argmax over channels. ``"sigmoid"``: ``sigmoid(logits) > 0.5``, computed as
    ``logits > 0`` (the same set, without rounding at low precision).

    Example:
        >>> to_prediction(torch.tensor([[[2.0], [-1.0]]]), "softmax").squeeze(-1)
        tensor([[1., 0.]])
    """
    _check_mode(mode)
    if mode == "sigmoid":
        return (logits > 0).float()
    return F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).float()


def check_relabel(spec: Sequence[int] | None, num_classes: int, name: str = "relabel") -> tuple[int, int, int] | None:
    """``(source, into, min_voxels)`` from a ``[source, into, min_voxels]`` setting (``None`` passes through), or a
    ``ValueError`` naming the setting ``name`` when the channels are not two different ones of ``num_classes`` or
    ``min_voxels`` is below 1."""
    if spec is None:
        return None
    if isinstance(spec, (str, bytes)) or len(spec) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in spec):
        raise ValueError(f"{name} must be [class, into, min_voxels] (three integers), got {spec!r}")
    source, into, min_voxels = spec
    if not (0 <= source < num_classes and 0 <= into < num_classes) or source == into:
        raise ValueError(f"{name}={list(spec)}: class and into must be two different channels of the "
                         f"{num_classes} the network predicts")
    if min_voxels < 1:
        raise ValueError(f"{name}={list(spec)}: min_voxels must be >= 1")
    return source, into, min_voxels


def relabel_small_class(pred: torch.Tensor, source: int, into: int, min_voxels: int) -> torch.Tensor:
    """Move channel ``source`` of a binary prediction into channel ``into`` in every case where fewer than
    ``min_voxels`` voxels are predicted ``source``.

    BraTS post-processing (TransBTS's and MISSU's inference): a case with a few hundred enhancing-tumour voxels is
    more often a false positive than a small tumour, and an empty enhancing tumour scores Dice 1 when the label
    has none (scored so with ``ignore_empty=False``; under MONAI's default the empty case has no Dice and the
    rule can only cost), so those voxels become non-enhancing tumour. One rule serves both label encodings:

    * ``"softmax"`` one-hot classes (MSD Task01: 2 non-enhancing, 3 enhancing): ``source=3, into=2``;
    * ``"sigmoid"`` BraTS regions (TC, WT, ET): ``source=2`` (ET), ``into=0`` (TC); the voxels stay tumour core.

    Args:
        pred: binary ``(B, K, *spatial)`` from :func:`to_prediction`.
        source, into: channel indices, different.
        min_voxels: a case keeps ``source`` when it predicts at least this many voxels of it.

    Returns:
        a new tensor of ``pred``'s shape and dtype.

    Example:
        >>> p = torch.zeros(2, 4, 8, 8, 8); p[:, 0] = 1
        >>> p[0, 3, :2], p[0, 0, :2] = 1, 0           # case 0: 128 voxels of class 3
        >>> p[1, 3, :1, :1], p[1, 0, :1, :1] = 1, 0   # case 1: 8 voxels of class 3
        >>> q = relabel_small_class(p, 3, 2, 100)
        >>> q[:, 3].sum((1, 2, 3)).tolist(), q[:, 2].sum((1, 2, 3)).tolist()
        ([128.0, 0.0], [0.0, 8.0])
    """
    if pred.dim() < 3:
        raise ValueError(f"pred must be (B, K, *spatial), got shape {tuple(pred.shape)}")
    source, into, min_voxels = check_relabel([source, into, min_voxels], pred.shape[1])
    small = (pred[:, source] > 0.5).flatten(1).sum(1) < min_voxels
    moved = pred[:, source] * small.view((-1,) + (1,) * (pred.dim() - 2)).to(pred.dtype)
    out = pred.clone()
    out[:, into] = torch.maximum(pred[:, into], moved)
    out[:, source] = pred[:, source] - moved
    return out


def to_onehot(label: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """Ground truth in the layout of :func:`to_prediction`.

    ``"softmax"``: ``(B, 1, *spatial)`` class indices (any dtype holding integers) -> ``(B, K, *spatial)`` one-hot.
    ``"sigmoid"``: the label already has one binary channel per region; returned as float.

    Example:
        >>> to_onehot(torch.tensor([[[0, 2]]]), 3, "softmax")[0, :, 1]
        tensor([0., 0., 1.])
    """
    _check_mode(mode)
    if mode == "sigmoid":
        if label.shape[1] != num_classes:
            raise ValueError(f"sigmoid labels need {num_classes} channels, got shape {tuple(label.shape)}")
        return label.float()
    if label.dim() < 3 or label.shape[1] != 1:
        raise ValueError(f"softmax labels must be (B, 1, *spatial) class indices, got shape {tuple(label.shape)}")
    return F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()


def _per_case(
    pred: torch.Tensor, target: torch.Tensor, include_background: bool, hd95: bool, spacing: Any, msd: bool = False,
    ignore_empty: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(cases, classes) Dice, HD95 and mean surface distance as float64 arrays (None: not asked for); NaN where a
    value is undefined. With ``ignore_empty=False`` a class empty on a side is scored as the BraTS challenge does:
    Dice 1 and distance 0 when both sides are empty, else Dice 0 and the volume's diagonal as the distance."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    if pred.shape != target.shape or pred.dim() < 3:
        raise ValueError(f"pred and target must both be (B, K, *spatial), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    # ignore_empty: an empty ground-truth class has no Dice (NaN), whatever was predicted; else 1 for an empty
    # prediction and 0 for any voxel predicted (the BraTS challenge's scoring)
    dice = compute_dice(pred, target, include_background=include_background, ignore_empty=ignore_empty)
    dice = dice.double().cpu().numpy()
    if not ignore_empty and (hd95 or msd):
        first = 0 if include_background else 1
        pred_empty = (pred[:, first:].flatten(2) == 0).all(-1).cpu().numpy()
        target_empty = (target[:, first:].flatten(2) == 0).all(-1).cpu().numpy()
        sizes = np.asarray(pred.shape[2:], np.float64)
        steps = np.asarray(1.0 if spacing is None else spacing, np.float64)
        if steps.ndim > 1 or steps.size not in (1, sizes.size):
            raise ValueError(f"spacing must be one number or one per spatial axis ({sizes.size}), got {spacing!r}")
        steps = np.broadcast_to(steps, sizes.shape)
        # BraTS's penalty: 373.13 mm, the diagonal of its 240 x 240 x 155 volumes at 1 mm
        diagonal = float(np.sqrt(((sizes * steps) ** 2).sum()))
    distances = []
    for wanted, compute, kwargs in ((hd95, compute_hausdorff_distance, {"percentile": 95}),
                                    (msd, compute_average_surface_distance, {})):
        if not wanted:
            distances.append(None)
            continue
        with warnings.catch_warnings():
            # Empty classes are expected (NaN below), and MONAI 1.6 warns about its own deprecated argument.
            warnings.filterwarnings("ignore", message=".*is all 0.*")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy.*")
            d = compute(pred, target, include_background=include_background, spacing=spacing, **kwargs)
        d = d.double().cpu().numpy()
        d[~np.isfinite(d)] = np.nan
        if not ignore_empty:
            d = np.where(pred_empty & target_empty, 0.0, np.where(pred_empty | target_empty, diagonal, d))
        distances.append(d)
    return dice, *distances


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean ignoring NaN, NaN where all are NaN (``np.nanmean`` without its empty-slice warning)."""
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _to_json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _summary(dice: np.ndarray, hd: np.ndarray | None, msd: np.ndarray | None = None) -> dict[str, Any]:
    """Per class: mean over cases; overall: mean over classes; NaN -> None throughout (JSON-serialisable)."""
    out: dict[str, Any] = {}
    for name, values in (("dice", dice), ("hd95", hd), ("msd", msd)):
        if values is None:
            out[name], out[f"{name}_per_class"] = None, None
            continue
        per_class = _nanmean(values, axis=0)
        out[name] = _to_json(float(_nanmean(per_class)))
        out[f"{name}_per_class"] = [_to_json(float(v)) for v in per_class]
    return out


def segmentation_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool,
    hd95: bool = True,
    spacing: float | Sequence[float] | None = None,
    msd: bool = False,
    ignore_empty: bool = True,
) -> dict[str, Any]:
    """Dice, 95th-percentile Hausdorff distance and mean surface distance per class (MONAI ``compute_dice`` /
    ``compute_hausdorff_distance`` / ``compute_average_surface_distance``, what ``DiceMetric``,
    ``HausdorffDistanceMetric(percentile=95)`` and ``SurfaceDistanceMetric()`` compute; DSD reports the last).

    Args:
        pred, target: binary ``(B, K, *spatial)`` (from :func:`to_prediction` and :func:`to_onehot`).
        include_background: keep channel 0. For ``"softmax"`` with ``False``, the per-class lists are for classes
            ``1..K-1``; for ``"sigmoid"`` regions pass ``True`` (every channel is a foreground region).
        hd95: compute HD95 (a distance transform per class and case, the expensive part); with ``False`` the
            ``hd95`` entries are ``None``.
        spacing: voxel size per spatial axis (or one for all) so HD95 is in physical units; default voxels.
        msd: compute the mean surface distance (MONAI's default, from the prediction's surface to the label's), in
            the same units; with ``False`` the ``msd`` entries are ``None``.
        ignore_empty: a class absent from a case's ground truth has no Dice, and a class absent from either side no
            distance (MONAI's defaults); with ``False`` such classes are scored as the BraTS challenge scores them:
            Dice 1 and distances 0 when both sides are empty, else Dice 0 and the volume's diagonal (in
            ``spacing``'s units; BraTS's 373.13 mm) as the distance (the case where post-processing such as
            :func:`relabel_small_class` pays).

    Returns:
        ``{"dice", "dice_per_class", "hd95", "hd95_per_class", "msd", "msd_per_class"}``. Per class: mean over
        the batch; overall: mean over classes. Undefined values are ``None``: Dice of a class absent from the
        ground truth, a distance of a class absent from the ground truth or the prediction (a missed class still
        counts through its Dice of 0), and a mean over nothing but undefined values.

    Example:
        >>> t = torch.zeros(1, 2, 4, 4, 4); t[:, 1, :2] = 1; t[:, 0] = 1 - t[:, 1]
        >>> segmentation_metrics(t, t, include_background=False, hd95=False)["dice_per_class"]
        [1.0]
    """
    return _summary(*_per_case(pred, target, include_background, hd95, spacing, msd, ignore_empty))


class MetricAccumulator:
    """Collects :func:`segmentation_metrics` case by case; :meth:`aggregate` gives means over all cases.

    Per class the mean is over the cases where the value is defined (MONAI's ``mean_batch`` reduction), then the
    overall value is the mean over classes, as SegFormer3D reports mean Dice over TC/WT/ET. Extra scalars passed to
    :meth:`update` (e.g. ``loss=...``) are averaged over cases under the same names.

    Example:
        >>> acc = MetricAccumulator(include_background=False, hd95=False)
        >>> t = torch.zeros(1, 2, 4, 4, 4); t[:, 1, :2] = 1; t[:, 0] = 1 - t[:, 1]
        >>> _ = acc.update(t, t, loss=0.5)
        >>> acc.aggregate()["dice"], acc.aggregate()["loss"], len(acc)
        (1.0, 0.5, 1)
    """

    def __init__(self, *, include_background: bool, hd95: bool = True,
                 spacing: float | Sequence[float] | None = None, msd: bool = False, ignore_empty: bool = True) -> None:
        self.include_background = include_background
        self.ignore_empty = ignore_empty
        self.hd95 = hd95
        self.msd = msd
        self.spacing = spacing
        self.reset()

    def reset(self) -> None:
        self._dice: list[np.ndarray] = []
        self._hd: list[np.ndarray] = []
        self._msd: list[np.ndarray] = []
        self._scalars: dict[str, list[tuple[float, int]]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._dice)

    def update(self, pred: torch.Tensor, target: torch.Tensor, *, spacing: float | Sequence[float] | None = None,
               **scalars: float) -> dict[str, Any]:
        """Add the ``B`` cases of one batch; returns their metrics. ``spacing`` overrides the constructor's for
        this batch (cases resampled differently); each scalar counts once per case of the batch."""
        dice, hd, msd = _per_case(pred, target, self.include_background, self.hd95,
                                  self.spacing if spacing is None else spacing, self.msd, self.ignore_empty)
        if self._dice and dice.shape[1] != self._dice[0].shape[1]:  # else a numpy error at aggregate()
            raise ValueError(f"pred has {pred.shape[1]} channels where the earlier updates had other counts: one "
                             "accumulator scores one set of classes")
        self._dice.append(dice)
        if hd is not None:
            self._hd.append(hd)
        if msd is not None:
            self._msd.append(msd)
        for name, value in scalars.items():
            self._scalars.setdefault(name, []).append((float(value), len(dice)))
        return _summary(dice, hd, msd)

    def aggregate(self) -> dict[str, Any]:
        """Means over all cases so far: the keys of :func:`segmentation_metrics`, ``num_cases`` and the scalars."""
        if not self._dice:
            raise ValueError("MetricAccumulator.aggregate() before any update()")
        out = _summary(np.concatenate(self._dice), np.concatenate(self._hd) if self._hd else None,
                       np.concatenate(self._msd) if self._msd else None)
        out["num_cases"] = len(self)
        for name, pairs in self._scalars.items():
            out[name] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        return out


def _region_channels(regions: str | Sequence[str] | None) -> tuple[int, int, int] | None:
    """Channel indices of (TC, WT, ET) if ``regions`` names the BraTS regions, else None."""
    if regions is None:
        return None
    names = _BRATS_REGIONS if isinstance(regions, str) and regions.lower() == "brats" else regions
    if isinstance(names, str):
        raise TypeError(f"regions must be 'brats' or a sequence of channel names, got {regions!r}")
    upper = [str(n).upper() for n in names]
    if sorted(upper) != sorted(_BRATS_REGIONS):
        return None
    return tuple(upper.index(r) for r in _BRATS_REGIONS)


def labels_from_prediction(pred: torch.Tensor, mode: str, *,
                           regions: str | Sequence[str] | None = None) -> torch.Tensor:
    """One integer label volume ``(*spatial)`` from a one-case prediction ``(K, *spatial)``, or ``(1, K, D, H, W)``
    in 3-D (a 4-D tensor is read as ``(K, D, H, W)``: a batched 2-D prediction ``(1, K, H, W)`` is passed as
    ``pred[0]``).

    * ``"softmax"``: argmax over channels (logits or one-hot).
    * ``"sigmoid"`` with BraTS regions (``regions="brats"``, the SegFormer3D channel order TC, WT, ET, or channel
      names that are a permutation of those): the MSD Task01 coding 0 background, 1 edema (WT minus TC),
      2 non-enhancing tumour (TC minus ET), 3 enhancing tumour (ET). Each voxel gets its innermost predicted region,
      so ET wins even where the network did not also predict TC/WT.
    * ``"sigmoid"`` otherwise: 1 + the index of the first positive channel, 0 where none is; overlapping regions
      keep the lowest channel.

    For ``"sigmoid"``, ``pred`` is the binary output of :func:`to_prediction` (positive means > 0.5).

    Returns:
        ``int64`` tensor on ``pred``'s device.

    Example:
        >>> tc, wt, et = torch.tensor([0, 1, 1, 1]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 1, 0])
        >>> labels_from_prediction(torch.stack([tc, wt, et]).float(), "sigmoid", regions="brats")
        tensor([1, 2, 3, 2])
    """
    _check_mode(mode)
    if pred.dim() == 5:
        if pred.shape[0] != 1:
            raise ValueError(f"one case at a time: got a batch of {pred.shape[0]}")
        pred = pred[0]
    if mode == "softmax":
        return pred.argmax(0)
    positive = pred > 0.5
    channels = _region_channels(regions)
    if channels is not None:
        if pred.shape[0] != 3:
            raise ValueError(f"BraTS regions need 3 channels, got shape {tuple(pred.shape)}")
        tc, wt, et = (positive[c] for c in channels)
        labels = torch.zeros(pred.shape[1:], dtype=torch.int64, device=pred.device)
        labels[wt] = 1
        labels[tc] = 2
        labels[et] = 3
        return labels
    # argmax returns the first maximal index, i.e. the first positive channel.
    return torch.where(positive.any(0), positive.to(torch.uint8).argmax(0) + 1, 0)


def save_prediction_nifti(
    labels: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray | None, path: str | os.PathLike,
    *, like: str | os.PathLike | None = None,
) -> Path:
    """Write a label volume as NIfTI (``.nii`` or ``.nii.gz``), atomically.

    The data are stored as ``uint8`` when the labels fit, else ``int16``; ``affine`` (4x4 voxel-to-world, e.g. the
    ``affine`` of the MONAI-loaded image; ``None`` for identity) is written as both sform and qform, so readers that
    prefer either place the labels on the image. ``like``, the NIfTI image the labels lie on voxel for voxel (same
    grid), gives its sform and qform and their codes in place of ``affine``: where a file's two disagree, MONAI's
    loader may take the qform, and viewers the sform. Parent folders are created.

    Example:
        >>> import tempfile
        >>> out = save_prediction_nifti(np.zeros((4, 5, 6), np.int64), np.eye(4), tempfile.mkdtemp() + "/p.nii.gz")
        >>> out.name
        'p.nii.gz'
    """
    import nibabel as nib

    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a (D, H, W) volume, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must hold integers")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint8).max:
        dtype = np.uint8
    elif np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
        dtype = np.int16
    else:
        raise ValueError(f"label values {low}..{high} do not fit int16")
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: the file name must end with .nii or .nii.gz")
    image = nib.Nifti1Image(labels.astype(dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if like is not None:
        header = nib.load(str(like)).header
        if tuple(header.get_data_shape()[:3]) != labels.shape:
            raise ValueError(f"labels of shape {labels.shape} do not lie on {like} (shape "
                             f"{tuple(header.get_data_shape())})")
        sform, scode = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
        if scode or qcode:  # else (an ANALYZE-style header) ``affine`` stands
            image.set_sform(sform, code=int(scode))
            image.set_qform(qform, code=int(qcode))
    image.header.set_xyzt_units("mm")
    with _atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path


def predict_case(model, item: dict, roi_size, val_cfg: dict, mode: str, num_classes: int,
                 device: torch.device) -> dict[str, Any]:
    """One validation or evaluation case (a dataset item with ``image`` (C, *spatial) and, unless it is to be
    predicted only, ``label``), predicted with :func:`sliding_window_predict` under the ``val`` config's settings;
    ``val.relabel_small`` (``[class, into, min_voxels]``) post-processes it with :func:`relabel_small_class`.

    Returns ``image`` and ``label`` (batched, on ``device``), fp32 ``logits``, the binary ``pred`` and ``target``
    channels that :class:`MetricAccumulator` takes, and ``spacing``: the voxel size of a MONAI ``MetaTensor`` image
    (so HD95 comes in millimetres), else ``None`` (voxels). ``label`` and ``target`` are None without a label.
    """
    image = torch.as_tensor(item["image"])[None].to(device)
    label = torch.as_tensor(item["label"])[None].to(device) if "label" in item else None
    logits = sliding_window_predict(model, image, roi_size, overlap=val_cfg["overlap"],
                                    sw_batch_size=val_cfg["sw_batch_size"], blend=val_cfg["blend"],
                                    flip_tta=val_cfg["flip_tta"], mode=mode).float()
    pred = to_prediction(logits, mode)
    relabel = check_relabel(val_cfg.get("relabel_small"), num_classes, "val.relabel_small")
    if relabel is not None:
        pred = relabel_small_class(pred, *relabel)
    return {
        "image": image,
        "label": label,
        "logits": logits,
        "pred": pred,
        "target": None if label is None else to_onehot(label, num_classes, mode),
        "spacing": _voxel_spacing(item["image"]),
    }


def _voxel_spacing(image: Any) -> list[float] | None:
    """The voxel size along the axes of a MONAI ``MetaTensor`` as it is now, None for a plain tensor.

    ``Transposed`` moves the axes but leaves the affine (MONAI documents it), so the affine's spacing is permuted
    as each recorded transpose permuted the axes."""
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None:
        return None
    spacing = [float(v) for v in pixdim[:3]]
    for op in getattr(image, "applied_operations", None) or ():
        if op.get("class") == "Transposed":
            spacing = [spacing[i - 1] for i in op["extra_info"]["indices"][1:]]
    return spacing
