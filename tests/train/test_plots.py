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
