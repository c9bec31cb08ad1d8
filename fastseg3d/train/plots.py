"""Training curves and slice previews as PNG files (like nnU-Net's ``progress.png``).

matplotlib is imported inside the functions and used through its object API on an Agg canvas, so importing this
module needs no matplotlib, and plotting neither changes the process-wide backend (a notebook's inline backend
stays) nor opens windows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastseg3d.train.inference import _atomic_path

__all__ = ["plot_curves", "plot_slices"]


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, out_png: str | os.PathLike) -> Path:
    with _atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(out_png)


def _number(value: Any) -> float:
    """A float, NaN for None/missing/non-numeric, so gaps show as breaks in the line."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # blank, or the last line of a run that is still writing or was killed mid-line
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                class_names: Sequence[str] | None = None) -> Path:
    """Loss and validation Dice against the step, from a run's ``metrics.jsonl``.

    Each line is a JSON object with ``step``, ``epoch``, ``split`` (``"train"`` or ``"val"``) and ``loss``;
    validation lines also carry ``dice`` and ``dice_per_class`` (``None`` entries allowed). Left panel: train loss
    (raw, and a running mean when there are many points) and val loss; right panel: val mean Dice and per-class Dice.
    Lines that do not parse (e.g. one being written) are skipped. The PNG is replaced atomically.

    Args:
        metrics_jsonl: the log file.
        out_png: where to write the figure (parent folders are created).
        class_names: legend names for ``dice_per_class``; default ``class 0``, ``class 1``, ...

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); log = d / "metrics.jsonl"
        >>> _ = log.write_text('{"step": 1, "epoch": 0, "split": "train", "loss": 0.9}\\n')
        >>> plot_curves(log, d / "progress.png").stat().st_size > 0
        True
    """
    records = _read_jsonl(Path(metrics_jsonl))
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    fig, axes = _figure(1, 2, (12, 4.5))
    ax_loss, ax_dice = axes[0]

    if train:
        steps = np.array([_number(r["step"]) for r in train])
        loss = np.array([_number(r.get("loss")) for r in train])
        window = len(loss) // 50
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=0.8, label="train loss")
        finite = np.isfinite(loss)
        if window > 1 and finite.sum() > window:
            ax_loss.plot(steps[finite][window - 1:], _running_mean(loss[finite], window), color="tab:blue",
                         label=f"train loss (mean of {window})")
    if val:
        steps = np.array([_number(r["step"]) for r in val])
        loss = np.array([_number(r.get("loss")) for r in val])
        if np.isfinite(loss).any():
            ax_loss.plot(steps, loss, "o-", color="tab:orange", ms=3, label="val loss")
        ax_dice.plot(steps, [_number(r.get("dice")) for r in val], "o-", color="black", lw=2, ms=3, zorder=3,
                     label="val mean Dice")
        rows = [list(r.get("dice_per_class") or []) for r in val]
        for k in range(max(map(len, rows))):
            per_class = [_number(row[k]) if k < len(row) else math.nan for row in rows]
            name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
            ax_dice.plot(steps, per_class, ".-", lw=1, label=name)

    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_dice.set(xlabel="step", ylabel="Dice", title="validation Dice")
    for ax, has_data in ((ax_loss, bool(train or val)), (ax_dice, bool(val))):
        if has_data:
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out_png)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _centre(label: np.ndarray | None, pred: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Foreground centroid of the label, else of the prediction, else the volume centre."""
    for volume in (label, pred):
        if volume is not None and (volume > 0).any():
            return tuple(round(c.mean()) for c in np.nonzero(volume > 0))
    return tuple(s // 2 for s in shape)


def plot_slices(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None,
    pred: torch.Tensor | np.ndarray | None,
    out_png: str | os.PathLike,
    title: str = "",
) -> Path:
    """Three orthogonal slices through a case: image channel 0, ground truth over it, prediction over it.

    The slices pass through the label's foreground centroid (else the prediction's, else the volume centre). Label
    values share colours between the two overlay columns; 0 is transparent. Rows are spatial axes 0, 1 and 2 of the
    array: this module does not know the orientation, so they are not named axial/coronal/sagittal.

    Args:
        image: ``(C, D, H, W)`` or ``(D, H, W)``.
        label, pred: integer ``(D, H, W)`` volumes (e.g. from
            :func:`fastseg3d.train.inference.labels_from_prediction`), or ``None`` to leave the column empty.
        out_png: where to write the PNG (atomically; parent folders are created).
        title: figure title (e.g. case id and Dice).

    Example:
        >>> import tempfile
        >>> lab = np.zeros((8, 9, 10), np.int64); lab[2:5, 3:6, 4:7] = 1
        >>> out = plot_slices(np.random.rand(1, 8, 9, 10), lab, lab, Path(tempfile.mkdtemp()) / "case.png")
        >>> out.stat().st_size > 0
        True
    """
    volume = _numpy(image).astype(np.float32)
    if volume.ndim == 4:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"image must be (C, D, H, W) or (D, H, W), got shape {_numpy(image).shape}")
    overlays = [None if v is None else _numpy(v) for v in (label, pred)]
    for name, v in zip(("label", "pred"), overlays):
        if v is not None and v.shape != volume.shape:
            raise ValueError(f"{name} shape {v.shape} differs from the image's spatial shape {volume.shape}")
    centre = _centre(overlays[0], overlays[1], volume.shape)
    finite = volume[np.isfinite(volume)]
    low, high = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    top = max((int(v.max()) for v in overlays if v is not None and v.size), default=0)
    # A qualitative map with vmax = its colour count gives label k colour k, the same in both overlay columns.
    colours = 10 if top < 10 else 20

    fig, axes = _figure(3, 3, (10, 10))
    for axis in range(3):
        cut = [slice(None)] * 3
        cut[axis] = centre[axis]
        for col, (heading, overlay) in enumerate(zip(("image", "label", "prediction"), [None, *overlays])):
            ax = axes[axis][col]
            ax.imshow(volume[tuple(cut)], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if overlay is not None:
                part = overlay[tuple(cut)]
                ax.imshow(np.ma.masked_where(part <= 0, part), cmap=f"tab{colours}", vmin=0, vmax=colours,
                          alpha=0.5, interpolation="nearest")
            ax.set_title(f"{heading}, axis {axis} = {centre[axis]}", fontsize="small")
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)
