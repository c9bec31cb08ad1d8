"""Where the host's time goes in an eager training step: cProfile over a benchmark network's steps.

    python -m bench.host_profile segformer3d [--variant fastseg3d|plain] [--side 128] [--batch 2] [--dtype bf16]
                                             [--steps 5] [--top 40] [--out FILE]

On the H200 session's host the fused SegFormer3D step took 85.7 ms of host time for 80.9 ms of wall time, and
9.8 ms captured in a CUDA graph: the GPU waits for Python. This runs the benchmark's ``train_step`` (forward, the
benchmark's loss, backward, under autocast to ``--dtype``) three times to warm up (Triton compiles, allocator),
then ``--steps`` times under cProfile, and prints the host and wall milliseconds per step, then the functions that
take the most time of their own and the most time with their callees. On a CPU the step runs the references, and
the profile says little about a GPU host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

from bench.models import NETWORKS, build, inputs, runners
from bench.registry import load_cases

__all__ = ["main", "profile_step"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def profile_step(name: str, variant: str = "fastseg3d", side: int | None = None, batch: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, steps: int = 5, top: int = 40,
                 device: torch.device | None = None) -> str:
    """The report: host and wall milliseconds per step, and the top ``top`` functions by own and cumulative time."""
    load_cases()
    net = NETWORKS[name]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = side or net.sides[0]
    batch = batch or net.batch
    plain = variant == "plain"
    model = build(net, net.cfg, plain, device)
    x, label = inputs(net, batch, side, device)
    step = runners(net, model, plain, variant, x, label, dtype, device)["train_step"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
        model.zero_grad(set_to_none=True)
    sync()
    profiler = cProfile.Profile()
    host = 0.0
    wall = time.perf_counter()
    # cProfile sees one thread: autograd runs a CUDA backward on a device thread of its own unless told not to
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            profiler.enable()
            step()
            profiler.disable()
            host += time.process_time() - start
        sync()
    wall = time.perf_counter() - wall
    lines = [f"{name} {variant} {batch}x{side}^3 {str(dtype).removeprefix('torch.')} on {device}: "
             f"{1e3 * host / steps:.1f} host ms per step (process CPU time, profiler on), "
             f"{1e3 * wall / steps:.1f} wall ms per step, {steps} steps"]
    for key, title in (("tottime", "own time"), ("cumulative", "with callees")):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(top)
        body = text.getvalue()
        lines += [f"--- by {title}", body[body.index("ncalls"):] if "ncalls" in body else body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    load_cases()
    parser = argparse.ArgumentParser(prog="python -m bench.host_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("network", choices=sorted(NETWORKS))
    parser.add_argument("--variant", default="fastseg3d", choices=("fastseg3d", "plain"))
    parser.add_argument("--side", type=int, default=None, help="cube side (default: the benchmark's first)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16/fp16: autocast")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="also write the report there")
    args = parser.parse_args(argv)
    report = profile_step(args.network, args.variant, args.side, args.batch, DTYPES[args.dtype], args.steps,
                          args.top)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
