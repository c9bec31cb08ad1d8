"""Training curves and slice previews: PNG files are written, atomically, from tiny inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastseg3d.train.plots import plot_curves, plot_slices

_PNG = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == _PNG
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_plot_curves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": s // 10, "split": "train", "loss": 1.0 / (1 + s)}) for s in range(120)]
    lines += [json.dumps({"step": s, "epoch": s // 10, "split": "val", "loss": 0.5, "dice": 0.1 * k,
                          "dice_per_class": [0.1 * k, None, 0.2]}) for k, s in enumerate((40, 80, 120))]
    lines.insert(5, "")
    lines.append('{"step": 121, "split": "tra')  # a line still being written
    log.write_text("\n".join(lines))
    out_dir = tmp_path / "out"
    out = plot_curves(log, out_dir / "progress.png", class_names=["TC", "WT", "ET"])
    _assert_png(out)
    # overwriting an existing plot goes through the same rename
    _assert_png(plot_curves(log, out))


def test_plot_curves_without_validation_or_records(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("")
    _assert_png(plot_curves(log, tmp_path / "a" / "empty.png"))
    log.write_text(json.dumps({"step": 1, "epoch": 0, "split": "train", "loss": 2.0}) + "\n")
    _assert_png(plot_curves(log, tmp_path / "b" / "train_only.png"))
    with pytest.raises(FileNotFoundError):
        plot_curves(tmp_path / "missing.jsonl", tmp_path / "c.png")


def test_plot_slices(tmp_path):
    image = torch.randn(4, 16, 20, 12)
    label = torch.zeros(16, 20, 12, dtype=torch.long)
    label[3:8, 10:15, 2:6] = 1
    label[4:6, 11:13, 3:5] = 3
    pred = label.roll(1, 0)
    _assert_png(plot_slices(image, label, pred, tmp_path / "with" / "case.png", title="case 1 — Dice 0.9"))
    _assert_png(plot_slices(image.numpy()[0], None, pred.numpy(), tmp_path / "nolabel" / "case.png"))
    _assert_png(plot_slices(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), int), None, tmp_path / "blank" / "case.png"))
    with pytest.raises(ValueError, match="shape"):
        plot_slices(image, label[:-1], None, tmp_path / "bad.png")


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_curves and plot_slices draw, kept instead of written."""
    from pathlib import Path

    from fastseg3d.train import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, out_png: drawn.append(fig) or Path(out_png))
    return drawn


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_curves_draws_and_names_the_lines(tmp_path, figures):
    """The loss panel: raw train loss, its running mean over len // 50 rows, val loss; the Dice panel: mean Dice and
    one line per class named by class_names (else "class k"). A row without a step (not a metrics row) is left out."""
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": 0, "split": "train", "loss": 1.0 / (1 + s)}) for s in range(1, 121)]
    lines += [json.dumps({"split": "train", "loss": 5.0})]  # no step
    lines += [json.dumps({"step": s, "epoch": 0, "split": "val", "loss": 0.5, "dice": 0.5,
                          "dice_per_class": [0.4, 0.6]}) for s in (60, 120)]
    log.write_text("\n".join(lines) + "\n")
    plot_curves(log, tmp_path / "a.png", class_names=["TC", "WT"])
    plot_curves(log, tmp_path / "b.png")
    (ax_loss, ax_dice), (_, ax_default) = (fig.axes for fig in figures)
    assert _labels(ax_loss) == ["train loss", "train loss (mean of 2)", "val loss"]
    assert len(ax_loss.get_lines()[0].get_xdata()) == 120  # the row without a step is not drawn
    assert _labels(ax_dice) == ["val mean Dice", "TC", "WT"]
    assert _labels(ax_default) == ["val mean Dice", "class 0", "class 1"]


def test_plot_slices_centres_windows_and_colours(tmp_path, figures):
    """The slices pass through the label's foreground centroid (not the prediction's), show the image's channel 0
    between its 0.5 and 99.5 percentiles, overlay labels with background transparent (tab20 from label 10 up), and
    carry the title."""
    g = np.random.default_rng(0)
    image = np.stack([g.normal(size=(12, 10, 8)), np.full((12, 10, 8), 100.0)]).astype(np.float32)
    label = np.zeros((12, 10, 8), np.int64)
    label[2:5, 6:9, 1:4] = 1  # centroid (3, 7, 2)
    pred = np.zeros_like(label)
    pred[8:11, 1:4, 5:8] = 2  # centroid (9, 2, 6)
    plot_slices(image, label, pred, tmp_path / "a.png", title="case 7")
    fig = figures[-1]
    assert fig.get_suptitle() == "case 7"
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_title() for ax in axes[:, 0]] == ["image, axis 0 = 3", "image, axis 1 = 7", "image, axis 2 = 2"]
    shown = axes[0, 0].get_images()[0]
    np.testing.assert_array_equal(shown.get_array(), image[0][3])
    assert shown.get_clim() == pytest.approx(tuple(np.percentile(image[0], (0.5, 99.5))))
    overlay = axes[0, 1].get_images()[1]
    assert overlay.get_cmap().name == "tab10"
    np.testing.assert_array_equal(np.ma.getmaskarray(overlay.get_array()), label[3] == 0)
    label[3, 7, 2] = 10
    plot_slices(image, label, None, tmp_path / "b.png")
    assert np.array(figures[-1].axes).reshape(3, 3)[0, 1].get_images()[1].get_cmap().name == "tab20"
