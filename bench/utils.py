"""Timing, memory, roofline and result rows shared by every benchmark case."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastseg3d
from fastseg3d.backends import tf32_matmul_allowed

ROW_KEYS = (
    "suite", "case", "shape", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "host_ms", "graph_ms",
    "peak_mem_mb", "roofline_pct", "roofline_bound", "bandwidth_pct", "exp_pct", "backend", "device", "driver", "torch",
    "triton", "cuda", "cudnn", "fastseg3d", "commit", "date",
)
# Exponentials (MUFU ex2) per clock per SM: the CUDA C++ Programming Guide's arithmetic-throughput table gives 16
# for compute capability 5.x to 9.0 (H100, H200); newer parts are assumed to match until measured.
MUFU_EX2_PER_CLK_PER_SM = 16
RESULTS = Path(__file__).resolve().parent / "results"
# CUDA errors that leave the process's context unusable (CUDA's "sticky" errors), as CUDA and Triton word them
_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "misaligned address", "illegal instruction",
                       "unspecified launch failure", "hardware stack error", "uncorrectable ECC error")


class DeviceLost(RuntimeError):
    """The GPU's context is lost (see :func:`device_lost`): every later CUDA call of the process fails alike."""


def device_lost(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA error after which the process cannot use the GPU again (an illegal address, a
    device-side assert, ...): a benchmark process ends there, rather than logging each later measurement as
    skipped with the same error, or raising it again from its clean-up."""
    text = str(err)
    return any(phrase in text for phrase in _STICKY_CUDA_ERRORS)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def error_summary(err: BaseException, width: int = 300) -> str:
    """``first_line``, and the exception lines within the message (the first, a chained traceback's root cause,
    and the last): a compile error re-raised from a worker process ("InductorError: SubprocException: An exception
    occurred in a subprocess:") says what broke only further down."""
    lines = [line.strip() for line in str(err).strip().splitlines()[1:]]
    causes = list(dict.fromkeys(line[:width] for line in lines
                                if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)))
    head = first_line(err)
    return f"{head} [... {' | '.join(causes[:1] + causes[1:][-1:])}]" if causes else head


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    commit = os.environ.get("FASTSEG3D_COMMIT") or git_commit()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    driver = "none"
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            driver = "unknown"
    return {
        "device": name,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "fastseg3d": fastseg3d.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def git_commit() -> str:
    """The checkout's short commit, with ``+dirty`` where tracked files outside ``bench/results`` (which the
    benchmarks append to) have uncommitted changes; "unknown" without git. ``gpu_check.sh`` computes the same
    string once and passes it as ``FASTSEG3D_COMMIT``, so that every row of a run carries one commit."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    try:
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)bench/results"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return commit
    return commit + ("+dirty" if status.strip() else "")


def gpu_check_target_args() -> dict[str, list[str]]:
    """``bench/gpu_check.sh``'s target plan (its ``TARGET_ARGS``): case -> the ``bench.run`` arguments it passes."""
    text = (Path(__file__).resolve().parent / "gpu_check.sh").read_text()
    block = text[text.index("  TARGET_ARGS=(") + len("  TARGET_ARGS=("):]
    block = block[:block.index("\n  )")]
    plan = {}
    for line in block.strip().splitlines():
        case, args = line.strip().split("=", 1)
        plan[case.strip("[]")] = args.strip('"').split()
    return plan


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


def host_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, samples: int = 3) -> float | None:
    """Median host (CPU) time to issue one call of ``fn``, in ms, from an idle GPU, without waiting for the GPU to
    finish; None off CUDA. Where it comes near ``median_ms`` the case is launch-bound: the GPU waits for Python. A
    call that synchronises (reads a value back) counts its GPU time too, so this is an upper bound there."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(samples):
        for t in grad_to_none or ():
            t.grad = None
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def show_fallbacks() -> None:
    """Print fastseg3d's notices on stderr, its fallbacks to the reference among them: a case timed under the name
    fastseg3d that ran the reference must not go unseen."""
    log = logging.getLogger("fastseg3d")
    log.setLevel(logging.INFO)
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))


def peak_memory_mb(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float | None:
    """Peak allocated memory during one call of ``fn`` (inputs included), in MiB; None off CUDA. The ``.grad`` of
    ``grad_to_none`` is cleared first, so gradients left by the timing runs are not counted on top of new ones."""
    if device.type != "cuda":
        return None
    for t in grad_to_none or ():
        t.grad = None
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


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense matmul rate in ``dtype`` (TFLOP/s), measured now on square operands: the matrix-unit ceiling of the
    run. fp32 follows the process's TF32 setting, as the kernels measured in the same run do."""
    if device.type != "cuda":
        return None
    n = 4096 if dtype == torch.float32 else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    med, _, _ = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (med * 1e-3) / 1e12


def exp_per_s(device: torch.device) -> float | None:
    """Exponentials per second of the special-function units: ``MUFU_EX2_PER_CLK_PER_SM`` x SMs x the SM clock the
    driver reports (its maximum, so the bound is optimistic and the percentage conservative); None if unknown."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "clock_rate", 0) or _max_sm_clock_khz(device)
    if not clock_khz:
        print("exp ceiling unknown: no SM clock from torch or nvidia-smi", file=sys.stderr)
        return None
    return MUFU_EX2_PER_CLK_PER_SM * props.multi_processor_count * clock_khz * 1e3


def _max_sm_clock_khz(device: torch.device) -> int:
    """The maximum SM clock nvidia-smi reports (kHz), for torch builds whose device properties lack it; 0 if
    unknown."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return int(float(out.stdout.strip().splitlines()[0])) * 1000
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0


class Ceilings:
    """The device's ceilings, measured in this run: copy bandwidth at once, matmul rates per dtype when first
    needed, and the exponential rate from the device properties."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_gbs = copy_bandwidth_gbs(device)
        self.exp_per_s = exp_per_s(device)
        self._tflops: dict[torch.dtype, float | None] = {}

    def tflops(self, dtype: torch.dtype, fma: bool = False) -> float | None:
        """The matmul rate in ``dtype``; ``fma=True``: the fp32 rate, valid as the FMA-pipe rate only while TF32
        is off (otherwise None, rather than a tensor-core rate posing as one)."""
        if fma:
            if tf32_matmul_allowed():
                return None
            dtype = torch.float32
        if dtype not in self._tflops:
            self._tflops[dtype] = matmul_tflops(self.device, dtype)
        return self._tflops[dtype]

    def describe(self) -> str:
        parts = []
        if self.copy_gbs:
            parts.append(f"copy {self.copy_gbs:.0f} GB/s")
        if self.exp_per_s:
            parts.append(f"exp {self.exp_per_s / 1e12:.2f} T/s (at the maximum SM clock)")
        return ", ".join(parts)


def roofline(setup, mode: str, dtype: torch.dtype, ceilings: Ceilings | None, median_ms: float):
    """(percent, bound): the time the binding ceiling allows for the mode's minimum work, as a percentage of the
    measured median, and which ceiling binds ("memory", "matrix", "fma" or "exp"); (None, None) without ceilings."""
    if ceilings is None:
        return None, None
    bounds = {}
    if ceilings.copy_gbs and mode in setup.min_bytes:
        bounds["memory"] = setup.min_bytes[mode] / (ceilings.copy_gbs * 1e9)
    if mode in setup.min_flops:
        rate = ceilings.tflops(dtype, fma=setup.flops_on == "fma")
        if rate:
            bounds[setup.flops_on] = setup.min_flops[mode] / (rate * 1e12)
    exp_seconds = _exp_seconds(setup, mode, ceilings)
    if exp_seconds is not None:
        bounds["exp"] = exp_seconds
    if not bounds:
        return None, None
    bound, seconds = max(bounds.items(), key=lambda kv: kv[1])
    return 100.0 * seconds / (median_ms * 1e-3), bound


def _exp_seconds(setup, mode: str, ceilings: Ceilings) -> float | None:
    """The time the exponential unit needs for the mode's minimum exponentials; None without either."""
    if mode not in setup.min_exps or not ceilings.exp_per_s:
        return None
    return setup.min_exps[mode] / ceilings.exp_per_s


def exp_pct(setup, mode: str, ceilings: Ceilings | None, median_ms: float) -> float | None:
    """The exponential term alone as a percentage of the measured median, as ``bandwidth_pct`` is for the memory
    term: the roofline keeps only the binding ceiling, and attention's exp-unit share would be lost wherever the
    memory or matrix bound is the larger."""
    seconds = None if ceilings is None else _exp_seconds(setup, mode, ceilings)
    return None if seconds is None else 100.0 * seconds / (median_ms * 1e-3)


def bandwidth_pct(setup, mode: str, ceilings: Ceilings | None, median_ms: float) -> float | None:
    """The mode's minimum bytes over the measured median, as a percentage of the copy bandwidth (the memory term
    alone, which targets such as "70% of the copy bandwidth" are stated on, whatever ceiling binds)."""
    if ceilings is None or not ceilings.copy_gbs or mode not in setup.min_bytes:
        return None
    return 100.0 * setup.min_bytes[mode] / (ceilings.copy_gbs * 1e9) / (median_ms * 1e-3)


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({k: row.get(k) for k in ROW_KEYS}) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one a line. A line that is not one (cut by a full disk, merged by hand) is left
    out with a warning naming it: one bad line must not cost a GPU session's whole report."""
    rows = []
    with path.open(errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                print(f"{path}:{number}: not a JSON object, left out: {line.strip()[:60]!r}", file=sys.stderr)
    return rows


_LABEL_KEYS = ("case", "shape", "dtype", "mode", "provider")


def timing_rows(rows: list[dict], source: str) -> list[dict]:
    """The rows a table, plot or target can use: labels (case, shape, dtype, mode, provider) as strings and positive
    finite median, p20 and p80 times (as ``bench.run`` writes them); the others are left out with a warning naming
    ``source``, so that a foreign or damaged row does not cost the rest."""
    out = []
    for r in rows:
        bad = [k for k in _LABEL_KEYS if not isinstance(r.get(k), str)]
        bad += [k for k in ("median_ms", "p20_ms", "p80_ms") if (number(r.get(k)) or 0) <= 0]
        if bad:
            print(f"{source}: a row of {', '.join(str(r.get(k)) for k in _LABEL_KEYS)} left out: no usable "
                  + ", ".join(bad), file=sys.stderr)
        else:
            out.append(r)
    return out


def counterpart(provider: str, providers) -> str | None:
    """The fastseg3d row a peer's row is compared with: the same variant of the fused model where one was measured
    (``plain+cuda-graph`` against ``fastseg3d+cuda-graph``), else plain ``fastseg3d``; None for fastseg3d's own
    rows."""
    if provider == "fastseg3d" or provider.startswith("fastseg3d+"):
        return None
    if provider.startswith("plain+") and "fastseg3d" + provider[len("plain"):] in providers:
        return "fastseg3d" + provider[len("plain"):]
    return "fastseg3d"


def format_table(rows: list[dict]) -> str:
    """One line per (shape, dtype, mode, provider): timings, peak memory, roofline, bandwidth and exponential-unit
    fractions, and for a peer its time and peak memory over its fastseg3d counterpart's (``counterpart``; above 1:
    fastseg3d is faster, or uses less)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    lines = [(f"{'case':<16} {'shape':<28} {'dtype':<9} {'mode':<10} {'provider':<40} {'median ms':>10} "
             f"{'p20':>8} {'p80':>8} {'host ms':>8} {'graph ms':>8} {'peak MB':>9} {'roofline%':>9} {'bound':>6} "
             f"{'bw%':>6} {'exp%':>5} {'fastseg3d x':>11} {'mem x':>6}")]
    for (case, shape, dtype, mode), by_provider in groups.items():
        for provider, r in by_provider.items():
            ours = by_provider.get(counterpart(provider, by_provider) or "")
            peer = ours is not None
            speedup = f"{r['median_ms'] / ours['median_ms']:.2f}" if peer else ""
            peak, our_peak = number(r.get("peak_mem_mb")), number(ours.get("peak_mem_mb")) if peer else None
            mem_x = f"{peak / our_peak:.2f}" if peak is not None and our_peak else ""
            mem = _shown(peak, ".0f")
            host, graph = _shown(number(r.get("host_ms")), ".4f"), _shown(number(r.get("graph_ms")), ".4f")
            roof = _shown(number(r.get("roofline_pct")), ".1f")
            bw = _shown(number(r.get("bandwidth_pct")), ".1f")
            exp = _shown(number(r.get("exp_pct")), ".1f")  # rows older than the key lack it
            bound = r.get("roofline_bound") or "-"
            lines.append(f"{case:<16} {shape:<28} {dtype:<9} {mode:<10} {provider:<40} {r['median_ms']:>10.4f} "
                         f"{r['p20_ms']:>8.4f} {r['p80_ms']:>8.4f} {host:>8} {graph:>8} {mem:>9} {roof:>9} "
                         f"{bound:>6} {bw:>6} {exp:>5} {speedup:>11} {mem_x:>6}")
    return "\n".join(lines)


def number(value) -> float | None:
    """``value`` where it is a finite number, else None (a row from another writer may hold anything)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot_rows(rows: list[dict], path: Path) -> None:
    """One figure per case, a group of bars per (shape, dtype, mode): median time per provider (log scale), each
    peer's time and peak memory over its fastseg3d counterpart's (``counterpart``; above 1: fastseg3d faster, or
    smaller), and, where the case has them, fastseg3d's fractions of its roofline, of the copy bandwidth and of the
    exponential unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows})
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "fastseg3d", p))
    peers = [p for p in providers if counterpart(p, providers) is not None]
    index = {(r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in rows}

    def value(label, provider, key):
        row = index.get((*label, provider))
        return None if row is None else number(row.get(key))

    def ratio(label, provider, key):
        # the counterpart among the providers measured at this label, as the table picks it
        measured = {p for p in providers if (*label, p) in index}
        ours, theirs = value(label, counterpart(provider, measured), key), value(label, provider, key)
        return theirs / ours if ours and theirs is not None else 0.0

    # the fractions some row has: no row of a case without exponentials (or older than the key) has exp_pct
    fractions = [k for k in ("roofline_pct", "bandwidth_pct", "exp_pct") if any(r.get(k) is not None for r in rows)]
    roofline = bool(fractions)
    fig, axes = plt.subplots(3 + roofline, 1, figsize=(max(8, 0.9 * len(labels) * len(providers) / 2),
                                                       4 * (3 + roofline)), sharex=True)
    panels = [
        (axes[0], providers, lambda lb, p: value(lb, p, "median_ms") or 0.0, "median time (ms), lower is better"),
        (axes[1], peers, lambda lb, p: ratio(lb, p, "median_ms"), "peer time / fastseg3d counterpart's"),
        (axes[2], peers, lambda lb, p: ratio(lb, p, "peak_mem_mb"), "peer peak memory / fastseg3d counterpart's"),
    ]
    if roofline:
        panels.append((axes[3], fractions, lambda lb, key: value(lb, "fastseg3d", key) or 0.0,
                       "fastseg3d: % of roofline, copy bandwidth, exp unit"))
    for ax, series, get, ylabel in panels:
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):  # each group centred on its label's tick, whatever the panel's series
            ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(labels))], [get(label, name) for label in labels],
                   width, label=name)
        ax.set_ylabel(ylabel, fontsize=8)
        if series:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    for ax in axes[1:3]:
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[-1].set_xticks(range(len(labels)))
    axes[-1].set_xticklabels(["\n".join(label) for label in labels], fontsize=7)
    meta = rows[0]
    axes[0].set_title(f"{meta['case']} on {meta.get('device')} (torch {meta.get('torch')}, triton "
                      f"{meta.get('triton')})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
