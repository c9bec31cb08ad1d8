"""Timing, memory, roofline and result rows shared by every benchmark case."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROW_KEYS = (
    "suite", "case", "shape", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "roofline_pct", "device", "torch", "triton", "cuda", "commit", "date",
)
RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("FASTSEG3D_COMMIT", "unknown")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, warmup: int = 25, rep: int = 100):
    """(median, p20, p80) in ms: ``triton.testing.do_bench`` on CUDA, a wall-clock loop on CPU (smoke only)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()
    samples = []
    for _ in range(5):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[1], samples[-2]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory during one call of ``fn`` (inputs included), in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second), measured now, in GB/s."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (med * 1e-3) / 1e9


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({k: row.get(k) for k in ROW_KEYS}) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(rows: list[dict]) -> str:
    """One line per (shape, dtype, mode): each provider's median and its speed-up over ``fastseg3d``."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    lines = [f"{'case':<16} {'shape':<28} {'dtype':<9} {'mode':<8} {'provider':<28} {'median ms':>10} "
             f"{'p20':>8} {'p80':>8} {'peak MB':>9} {'roofline%':>9} {'fastseg3d x':>11}"]
    for (case, shape, dtype, mode), by_provider in groups.items():
        ours = by_provider.get("fastseg3d")
        for provider, r in by_provider.items():
            speedup = f"{r['median_ms'] / ours['median_ms']:.2f}" if ours and provider != "fastseg3d" else ""
            mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
            roof = f"{r['roofline_pct']:.1f}" if r["roofline_pct"] is not None else "-"
            lines.append(f"{case:<16} {shape:<28} {dtype:<9} {mode:<8} {provider:<28} {r['median_ms']:>10.4f} "
                         f"{r['p20_ms']:>8.4f} {r['p80_ms']:>8.4f} {mem:>9} {roof:>9} {speedup:>11}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> None:
    """Grouped bars: median time per provider for every (shape, dtype, mode), one figure per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows})
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "fastseg3d", p))
    index = {(r["shape"], r["dtype"], r["mode"], r["provider"]): r["median_ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) * len(providers) / 2), 5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        xs = [j + i * width for j in range(len(labels))]
        ys = [index.get((*label, provider), 0.0) for label in labels]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(["\n".join(label) for label in labels], fontsize=7)
    ax.set_ylabel("median time (ms), lower is better")
    ax.set_yscale("log")
    meta = rows[0]
    ax.set_title(f"{meta['case']} on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
