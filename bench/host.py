"""Host time of fastseg3d's fused ops in a benchmark network's training step, on a machine without a GPU.

Eager PyTorch issues every op from Python, and where kernels are short (SegFormer3D's small stages) the GPU waits
for the host. This runs a network's training step (forward, the benchmark's loss, backward) on CPU tensors with
every Triton launch replaced by a no-op, and times each fused op call from its entry to its return: validation,
backend choice, autograd, launch planning, allocations and the ATen ops its launcher runs (on a GPU those launch
kernels of their own, at about the same host cost), in CPU time of the calling thread (other processes do not
count), with the launchers planning as for an H100 (132 SMs). Triton's own launch path (argument binding, the
driver call) is not included: no kernel runs. The network is the benchmark's small configuration (``--full``: its
full one; for MobileUtr always, whose small one has a head dim the attention kernels do not take) at batch 1 and a
small side, so that the CPU work of the launchers' ATen ops stays small next to their Python.

    python -m bench.host segformer3d                # per fused op: calls, ms and Triton launches per step
    python -m bench.host missu --side 32 --steps 5

Times are this machine's; ratios between runs of one machine compare versions of the code.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch

__all__ = ["host_times"]

# the smallest cubic side each network trains on at batch 1 (SegFormer3D's deepest BatchNorm needs 2^3 voxels)
_SIDES = {"segformer3d": 64, "mobileutr": 32, "mobileutrl": 32, "missu": 32, "dsd_unet": 32, "selfreg_unet": 32}
_FULL = {"mobileutr", "mobileutrl"}  # their small configurations have a head dim the attention kernels do not take


def host_times(name: str, side: int | None = None, steps: int = 10, warmup: int = 3, full: bool = False) -> dict:
    """Per fused op of network ``name``'s training step: ``{"by_op": {op: (calls, seconds, Triton launches)},
    "fused_s": s, "step_s": s, "launches": n}`` per step (``"op (bwd)"``: the op's autograd backward; the totals are
    the steps' medians). Needs ``TRITON_INTERPRET=1`` set before Triton kernels were first imported (``main``
    sees to it)."""
    import triton.runtime.interpreter as interpreter

    import fastseg3d
    from fastseg3d import backends
    from bench.models import NETWORKS, variant_context
    from bench.registry import load_cases
    from bench.sass import SM90_SMS
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops import utils as op_utils

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("bench.host needs TRITON_INTERPRET=1 in the environment (python -m bench.host sets it)")
    load_cases()
    net = NETWORKS[name]
    side = side or _SIDES.get(name, 32)
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    inside = [0]  # ops called by another op's body or backward are part of that op's time
    current = [None]  # the op being timed, whose launches the stub counts
    launched: collections.Counter = collections.Counter()

    def timed(key, fn):
        def run(*args, **kwargs):
            if inside[0]:
                return fn(*args, **kwargs)
            inside[0] += 1
            current[0] = key(args)
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[key(args)] += time.thread_time() - start
                calls[key(args)] += 1
                inside[0] -= 1
                current[0] = None
        return run

    # no launch, and no interpreter check (CUDA tensors skip it): what stays is what a GPU's host runs
    def no_launch(self, *args, **kwargs):
        launched[current[0]] += 1

    patches = [(interpreter.InterpretedFunction, "run", no_launch),
               (backends, "interpreter_active", lambda: True),
               # the launchers plan as for a GPU (their interpreter branches take larger tiles), an H100's
               *((module, "INTERPRET", False) for module in _kernel_modules()),
               (kernel_utils, "sm_count", lambda device: SM90_SMS),
               (op_utils.EagerOp, "__call__", timed(lambda a: a[0].name, op_utils.EagerOp.__call__))]
    for op in op_utils.EAGER_OPS.values():
        if op._function is not None:
            backward = op._function.backward
            patches.append((op._function, "backward",
                            staticmethod(timed(lambda a, n=op.name: n + " (bwd)", backward))))
    # the ops that are not EagerOps (the resize's adjoint) are called through the dispatcher, from their modules'
    # globals, and their autograd formula is read from the op at each backward
    for module, attr, op in _dispatched_ops():
        patches.append((module, attr, timed(lambda a, n=op._qualname: n, op)))
        patches.append((op, "_backward_fn", timed(lambda a, n=op._qualname: n + " (bwd)", op._backward_fn)))
    saved = [(obj, attr, obj.__dict__[attr] if attr in obj.__dict__ else getattr(obj, attr))
             for obj, attr, _ in patches]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # intra-op threads would run outside the timed thread
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        torch.manual_seed(0)
        model = net.build(net.cfg if full or name in _FULL else net.quick_cfg, False).train()
        x = torch.randn(1, net.in_channels, side, side, side)
        label = torch.randint(0, net.out_channels, (1, 1, side, side, side))
        loss = net.loss(False)
        with fastseg3d.backend("triton"), variant_context(False):
            for _ in range(warmup):
                loss(model(x), label).backward()
            seconds.clear()
            calls.clear()
            launched.clear()
            per_step, step_times = [], []
            for _ in range(steps):
                before, start = sum(seconds.values()), time.thread_time()
                loss(model(x), label).backward()
                step_times.append(time.thread_time() - start)
                per_step.append(sum(seconds.values()) - before)
    finally:
        torch.set_num_threads(threads)
        for obj, attr, value in saved:
            setattr(obj, attr, value)
    by_op = {k: (calls[k] / steps, seconds[k] / steps, launched[k] / steps)
             for k in sorted(seconds, key=lambda k: -seconds[k])}
    if launched[None]:  # outside every timed op: a fused op this does not know of
        by_op["(outside the fused ops)"] = (0, 0.0, launched[None] / steps)
    return {"by_op": by_op, "fused_s": statistics.median(per_step), "step_s": statistics.median(step_times),
            "launches": sum(launched.values()) / steps, "side": side}


def _dispatched_ops() -> list:
    """(module, global name, op) of each fused op that is not an ``EagerOp`` (a ``torch.library`` custom op whose
    eager calls go through the dispatcher)."""
    import importlib
    import pkgutil

    from torch._library.custom_ops import CustomOpDef

    from fastseg3d import ops
    from fastseg3d.ops import utils as op_utils

    eager = {op.op for op in op_utils.EAGER_OPS.values()}
    out = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"fastseg3d.ops.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, CustomOpDef) and value._qualname.startswith("fastseg3d::") and value not in eager:
                out.append((module, attr, value))
    return out


def _kernel_modules() -> list:
    """The kernel modules whose launchers read ``INTERPRET``."""
    import importlib
    import pkgutil

    from fastseg3d import kernels

    modules = [importlib.import_module(f"fastseg3d.kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
    return [m for m in modules if hasattr(m, "INTERPRET")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a model case (segformer3d, mobileutr, mobileutrl, missu, dsd_unet, selfreg_unet)")
    parser.add_argument("--side", type=int, help="cubic input side (default: the smallest the network trains on)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="the benchmark's full configuration")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":  # read when kernels are decorated: start again with it set
        os.execvpe(sys.executable, [sys.executable, "-m", "bench.host", *(argv or sys.argv[1:])],
                   {**os.environ, "TRITON_INTERPRET": "1"})
    result = host_times(args.name, args.side, args.steps, full=args.full)
    for op, (n, s, launches) in result["by_op"].items():
        per_call = s / n * 1e6 if n else 0.0
        print(f"{op:48s} {n:5.0f} calls {s * 1e3:8.2f} ms {per_call:8.1f} us/call {launches:5.0f} launches")
    print(f"{args.name}: {result['launches']:.0f} Triton launches a step (their launch path not timed)")
    print(f"{args.name} at 1x{result['side']}^3: fused ops' host time {result['fused_s'] * 1e3:.2f} ms of a "
          f"{result['step_s'] * 1e3:.1f} ms CPU step")


if __name__ == "__main__":
    main()
