"""The largest cubic input that trains at batch 1 within the GPU's memory, fastseg3d against plain.

    python -m bench.largest_cube --model segformer3d [--model missu ...] [--providers fastseg3d,plain]
                                 [--dtype fp32|bf16|fp16] [--max-side 512] [--time-limit 300] [--out DIR]
                                 [--json [PATH]]

For each model (a model case's network at its published configuration, see ``bench/models.py``) and provider, one
training step (forward, loss, backward, as the model cases' ``train_step``) is tried at cube sides that are
multiples of the network's total stride: doubling from 64 until a step fails, then bisecting between the largest
side that trained and the smallest that failed; once a side has trained, the next try is the side its peak memory
predicts to fill the GPU (in proportion to the voxels; from two sides, extended linearly), since tries at large
sides take seconds each. Plain goes first (its search ends lower, and it is the denominator of the fused network's
ratio). Between tries the
gradients, inputs and the allocator's cache are released (``torch.cuda.empty_cache()``). A try fails on CUDA
out-of-memory (or an allocation failure reported by cuBLAS/cuDNN), or on any other error, which is recorded as the
``stop`` reason, since a kernel that refuses a size (an index-width limit, say) bounds what trains just as memory
does. Each search gets an equal share of what is left of ``--time-limit`` when it starts (a try is never
interrupted, so one may overrun its share); a search cut short says so (``converged`` false). On SIGTERM (a
``timeout`` box closing) the search under way stops, its try interrupted, and its row is written with the largest
side that trained so far (``stop`` "terminated").

Rows (one per model and provider) go to ``<out>/largest_cube.jsonl``. Needs a GPU: a CPU has no device memory
limit to find, so the command refuses there.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import utils
from bench.models import NETWORKS, VARIANTS, build, inputs, runners
from bench.registry import load_cases
from bench.run import default_out

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
START_SIDE = 64
_ALLOC_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


DEVICE_LOST = "device lost"


class Terminated(BaseException):
    """SIGTERM arrived: a BaseException, so that the tries' ``except Exception`` does not take it for a failure."""


def _terminate(signum, frame):
    raise Terminated


@dataclass
class Attempt:
    ok: bool
    reason: str = ""
    peak_mem_mb: float | None = None
    step_ms: float | None = None


@dataclass
class Search:
    """The outcome: ``side`` the largest multiple of ``stride`` that trained (None: not even the smallest tried),
    ``failed_side`` the smallest that failed (None: none failed up to ``max_side``) and why (``stop``)."""

    side: int | None
    failed_side: int | None
    stop: str
    converged: bool
    tries: int
    peak_mem_mb: float | None
    step_ms: float | None


def search(attempt: Callable[[int], Attempt], stride: int, max_side: int, deadline: float | None = None,
           capacity_mb: float | None = None) -> Search:
    """Largest side (a multiple of ``stride``, at most ``max_side``) for which ``attempt`` succeeds, assuming that
    success is monotone in the side: doubling from ``START_SIDE``, then bisection. With
    ``capacity_mb`` (the device's memory), once a side has trained the next try is the side predicted to fill it
    (at most four times the side, and inside the bisection's bracket), since each try at a large side costs
    seconds: from one side, its peak in proportion to the voxels (the fixed part of the peak, weights and
    workspaces, makes that prediction fall short of the limit, so it usually trains); from two, their peaks
    extended linearly. The search then usually ends with the predicted side and its neighbour."""
    k_max = max_side // stride
    if k_max < 1:
        raise ValueError(f"max_side {max_side} is below the stride {stride}")
    good, bad = 0, None  # largest good and smallest bad multiple of the stride
    best, stop, tries = Attempt(False), "", 0
    fits: list[tuple[float, float]] = []  # (voxels, peak MB) of the sides that trained

    def run(k: int) -> bool:
        nonlocal good, bad, best, stop, tries
        tries += 1
        a = attempt(k * stride)
        if a.ok:
            good, best = k, a
            if a.peak_mem_mb is not None:
                fits.append((float(k * stride) ** 3, a.peak_mem_mb))
        else:
            bad, stop = k, a.reason
        return a.ok

    def predicted() -> int | None:
        """The multiple of the stride whose predicted peak fills ``capacity_mb`` (None: no prediction)."""
        if capacity_mb is None or not fits:
            return None
        if len(fits) == 1:
            v1, m1 = fits[0]
            return int((v1 * capacity_mb / m1) ** (1 / 3) // stride) if m1 > 0 else None
        (v0, m0), (v1, m1) = fits[-2], fits[-1]
        if v1 <= v0 or m1 <= m0:
            return None
        voxels = v1 + (capacity_mb - m1) * (v1 - v0) / (m1 - m0)
        return int(voxels ** (1 / 3) // stride) if voxels > 0 else None

    def timed_out() -> bool:
        return deadline is not None and time.monotonic() > deadline

    k = min(k_max, max(1, math.ceil(START_SIDE / stride)))
    cut = "time-limit"
    try:
        while bad is None and not timed_out():
            if not run(k) or k == k_max:
                break
            guess = predicted()
            k = min(k_max, 2 * k if guess is None else max(k + 1, min(guess, 4 * k)))
        # (when the start side fails, the bisection runs between 0 and it)
        while bad is not None and bad - good > 1 and not timed_out():
            guess = predicted()
            if guess is not None and guess == good:  # the prediction is on the edge: its neighbour decides
                guess += 1
            run(guess if guess is not None and good < guess < bad else (good + bad) // 2)
    except Terminated:
        cut = "terminated"
    except utils.DeviceLost as lost:  # the GPU is unusable from here: the search ends where it stands
        cut = f"{DEVICE_LOST} at {lost}"
    converged = (bad is None and good == k_max) or (bad is not None and bad - good == 1)
    if bad is None:
        stop = "max-side" if good == k_max else cut
    elif not converged:
        stop = f"{cut} (last failure: {stop})"
    return Search(side=good * stride or None, failed_side=bad * stride if bad is not None else None, stop=stop,
                  converged=converged, tries=tries, peak_mem_mb=best.peak_mem_mb, step_ms=best.step_ms)


def _attempt_fn(net, model, plain: bool, provider: str, dtype: torch.dtype, device: torch.device):
    def attempt(side: int) -> Attempt:
        result = Attempt(False)
        try:
            x, label = inputs(net, 1, side, device)
            step = runners(net, model, plain, provider, x, label, dtype, device)["train_step"]
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            result = Attempt(True, "", torch.cuda.max_memory_allocated(device) / 2**20,
                             (time.perf_counter() - start) * 1e3)
        except torch.OutOfMemoryError:
            result = Attempt(False, "out of memory")
        except Exception as err:  # noqa: BLE001  (any failure bounds the trainable size; its reason is kept)
            if utils.device_lost(err):
                # no clean-up (each CUDA call would raise this again) and no further try in this process
                print(f"  {net.name} {provider} {side}^3: {utils.first_line(err)}", file=sys.stderr)
                raise utils.DeviceLost(f"{side}^3: {utils.first_line(err)}") from None
            text = str(err)
            result = Attempt(False, "out of memory" if any(f in text for f in _ALLOC_FAILURES)
                             else utils.first_line(err))
        finally:
            # the failed step's tensors die with the exception frame, before the cache is emptied
            x = label = step = None
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  {net.name} {provider} {side}^3: {'ok' if result.ok else result.reason}", file=sys.stderr)
        return result
    return attempt


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status (2: no GPU; 1: the GPU's context was
    lost, and the searches after it were not run)."""
    load_cases()
    parser = argparse.ArgumentParser(prog="python -m bench.largest_cube", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, choices=sorted(NETWORKS), help="repeatable")
    parser.add_argument("--providers", default="plain,fastseg3d", help="comma list of plain, fastseg3d")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16/fp16: autocast")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--time-limit", type=float, default=300.0, metavar="SECONDS",
                        help="for the whole run: each (model, provider) search gets an equal share of what is left")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print JSON lines instead of the table; with PATH, write the rows there as a JSON array")
    args = parser.parse_args(argv)
    utils.show_fallbacks()
    providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in providers if p not in VARIANTS]
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; choose from {VARIANTS}")
    if not torch.cuda.is_available():
        print("largest_cube needs a CUDA device: on a CPU there is no device-memory limit to find (no meaningful "
              "out-of-memory), so nothing was measured", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    env = utils.environment(device)
    out = args.out or default_out(env["device"], device)
    total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
    run_end = time.monotonic() + args.time_limit
    searches_left = len(args.model) * len(providers)
    signal.signal(signal.SIGTERM, _terminate)
    rows = []
    status = 0
    try:
        for name, provider in [(n, p) for n in args.model for p in providers]:
            net = NETWORKS[name]
            stride = net.stride(net.build(net.cfg, False))
            plain = provider == "plain"
            start = time.monotonic()
            deadline = start + max(0.0, run_end - start) / searches_left
            searches_left -= 1
            model = build(net, net.cfg, plain, device)
            # the CUDA context and the allocator's fragmentation take their share: plain SegFormer3D's largest
            # side peaked at 94% of the H200's memory
            found = search(_attempt_fn(net, model, plain, provider, DTYPES[args.dtype], device), stride,
                           args.max_side, deadline, capacity_mb=0.95 * total_mb)
            row = {"suite": "model", "case": "largest_cube", "model": name, "provider": provider,
                   "dtype": args.dtype, "batch": 1, "stride": stride, **asdict(found),
                   "voxels": found.side**3 if found.side else None, "search_s": time.monotonic() - start,
                   "gpu_total_mb": total_mb, **env}
            rows.append(row)
            path = out / "largest_cube.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if DEVICE_LOST in found.stop:
                print("the GPU's context is lost: the searches left are not run", file=sys.stderr)
                status = 1
                break
            del model
            gc.collect()
            torch.cuda.empty_cache()
            if found.stop.startswith("terminated"):
                break
    except Terminated:  # between searches (building a model, writing a row): the rows on disk stand
        pass
    if args.json == "-":
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    if args.json not in (None, "-"):
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return status


def format_table(rows: list[dict]) -> str:
    """One line per (model, provider): the largest side that trained, its peak memory and step time."""
    header = (f"{'model':<14} {'provider':<10} {'dtype':<6} {'side':>5} {'voxels':>12} {'peak MB':>9} "
              f"{'step ms':>9} {'fails at':>8} {'tries':>5}  stop")
    lines = [header]
    for r in rows:
        side = r["side"] or 0
        peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        step = f"{r['step_ms']:.0f}" if r["step_ms"] is not None else "-"
        failed = r["failed_side"] or "-"
        lines.append(f"{r['model']:<14} {r['provider']:<10} {r['dtype']:<6} {side:>5} {side**3:>12} {peak:>9} "
                     f"{step:>9} {failed:>8} {r['tries']:>5}  {r['stop']}{'' if r['converged'] else ' (unfinished)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
