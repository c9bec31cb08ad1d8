"""One training step captured in a CUDA graph and replayed: ``train.cuda_graph``.

An eager step of a fused network issues a few hundred small kernels from Python, and at SegFormer3D's sizes the GPU
waits for the host (on the H200 the fused eager step took 85.7 ms of host time for 9.8 ms of GPU work). A CUDA
graph records the step's kernels once and replays them from one host call. The benchmarks' ``+cuda-graph``
providers and the trainer's ``train.cuda_graph`` capture the step with :func:`capture_step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = ["capture_step"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def capture_step(step: Callable[[], object], params: list[torch.Tensor], device: torch.device,
                 before_capture: Callable[[], None] | None = None) -> Callable[[], None]:
    """``step`` (forward, loss and backward on fixed input tensors) captured in one CUDA graph, and the graph's
    replay. Three warm-up runs on a side stream first (they compile the Triton kernels and settle the allocator, as
    capture requires), then ``before_capture`` (the trainer undoes what they changed); the parameters' gradients are
    cleared before capture, so the graph writes them (each replay overwrites them) rather than adding to tensors
    allocated outside it. ``step`` enters and leaves autocast itself: the casts autocast caches are freed into the
    graph's pool when it leaves (an autocast around the capture would keep them past it, and must be off). Errors of
    other threads (a DataLoader's pin-memory thread) do not spoil the capture. A step that cannot be captured (it
    reads a value back, or copies host data in) raises ``RuntimeError`` naming the cause, with the stream and the
    allocator restored."""
    if torch.is_autocast_enabled(device.type):
        raise RuntimeError("capture_step: capture outside autocast; the step enters it itself")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    # a pool of our own: after a capture that failed before its end the graph will not name its pool
    # (CUDAGraph::pool() checks that the capture ended), and the allocator must still be told that routing into it
    # ended, and the pool released (the graph releases it only when the capture ended)
    pool = torch.cuda.graph_pool_handle()
    try:
        # a capture stream of the device's own: torch's default one is made once, on the device current at the first
        # capture of the process, and a capture on another device would record nothing of the step's work
        with (torch.cuda.device(device),
              torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device), capture_error_mode="thread_local")):
            step()
    except Exception as err:
        # capture_end raises (the capture was invalidated) before it restores the stream and ends the allocator's
        # routing of that stream's allocations into the pool: undo both and release the pool, so that the process
        # runs on as usual (a routing left open fails every later capture and empty_cache), and report what broke
        # the capture rather than capture_end's own error
        torch.cuda.set_stream(stream)
        try:  # the graph names its pool once capture_end got past ending the routing: it then releases the pool
            graph.pool()
        except Exception:  # noqa: BLE001
            for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
                undo = getattr(torch._C, name, None)
                if undo is not None:
                    with contextlib.suppress(Exception):
                        undo(stream.device_index, pool)
        cause = err
        while cause.__context__ is not None and isinstance(cause.__context__, Exception):
            cause = cause.__context__
        raise RuntimeError(f"CUDA graph capture failed: {_first_line(cause)}") from err
    return graph.replay
