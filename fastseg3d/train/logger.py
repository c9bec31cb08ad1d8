"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard events when installed, a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

__all__ = ["MetricsLogger", "progress_bar"]


def _jsonable(value):
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Appends rows to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard (``run_dir/tb``) if available.

    ``truncate_after(step)`` drops rows beyond a resumed checkpoint's step, so a resumed run's file reads as if the
    run had never stopped.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = tensorboard
        self.purge_step: int | None = None
        self.writer = None
        self._writer_ready = False

    def _tb(self):
        """The TensorBoard writer, opened at the first row (after a resume has set ``purge_step``)."""
        if not self._writer_ready and self.tensorboard:
            self._writer_ready = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the jsonl file is the record
                return None
            kwargs = {} if self.purge_step is None else {"purge_step": self.purge_step}
            self.writer = SummaryWriter(str(self.path.parent / "tb"), **kwargs)
        return self.writer

    def rows(self) -> list[dict]:
        """The rows written so far."""
        if not self.path.is_file():
            return []
        rows = []
        # a crash can leave bytes that are not UTF-8: decoded as U+FFFD, their line fails to parse as a cut one does
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the crash being resumed from
                continue
        return rows

    def truncate_after(self, step: int) -> None:
        self.purge_step = step + 1
        if not self.path.is_file():
            return
        keep = [row for row in self.rows() if row.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        row = _jsonable(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb() is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])
                elif isinstance(value, list) and key.endswith("per_class"):
                    for i, v in enumerate(value):
                        if v is not None:
                            self.writer.add_scalar(f"{row['split']}/{key}/{i}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, mode: str | bool = "auto", desc: str = ""):
    """A tqdm bar: always (``True``), never (``False``) or on a terminal outside CI (``"auto"``); else ``None``."""
    if mode not in ("auto", True, False):
        raise ValueError(f"train.progress must be auto, true or false, got {mode!r}")
    show = mode is True or (mode == "auto" and sys.stderr.isatty() and not os.environ.get("CI"))
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
