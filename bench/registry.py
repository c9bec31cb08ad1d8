"""The benchmark cases, by name. A case module defines a ``Case`` and registers it here.

Providers named ``torch.compile...`` (or ending in ``+torch.compile...``) are built with :func:`compiled`, so every
case spells the compile modes the same way: ``torch.compile`` (mode "default"), ``torch.compile-max-autotune``
(mode "max-autotune-no-cudagraphs": Triton templates and autotuning, CUDA graphs left to the next one) and
``torch.compile-reduce-overhead`` (mode "reduce-overhead": CUDA graphs, for launch-bound small shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
MODEL_MODES = ("train_step", "infer")
# the fused losses make their gradients in forward: a "bwd" row would time only their scaling, against a real
# backward for the peers, so they are compared on fwd (loss only, under no_grad) and fwd+bwd
LOSS_MODES = ("fwd", "fwd+bwd")
SUITES = ("ops", "model")

COMPILE_MODES = {
    "torch.compile": "default",
    "torch.compile-max-autotune": "max-autotune-no-cudagraphs",
    "torch.compile-reduce-overhead": "reduce-overhead",
}
# The autotuned and CUDA-graph variants cost minutes of compilation per shape: asked for with --providers.
OPTIONAL_COMPILE = ("torch.compile-max-autotune", "torch.compile-reduce-overhead")
# peers that compile under another name (their setup calls torch.compile): Dynamo's cache is reset before each
COMPILED_PEERS = ("flex",)
# the suffix of a model provider whose eager step is captured in a CUDA graph (bench.models.graphed)
CUDA_GRAPH = "+cuda-graph"


class Unavailable(RuntimeError):
    """A provider that cannot run here (a GPU-only peer on a CPU, a package that is not installed): skipped."""


@dataclass
class Setup:
    """What a provider runs for one (shape, dtype): a forward closure, the tensors that get gradients, and the
    minimum work each mode must do (for the roofline): bytes moved, FLOPs and exponentials. ``flops_on`` says
    which pipe the FLOPs run on: "matrix" (the measured matmul rate in the row's dtype) or "fma" (the measured
    fp32 matmul rate without TF32, i.e. the CUDA-core FMA rate, for kernels that accumulate in fp32 FMAs whatever
    their I/O dtype). Model cases give ``runners`` instead: one closure per mode (``train_step``, ``infer``); a
    mode missing from ``runners`` is not measured for that provider. ``backend`` names what a peer runs where that
    can differ from its name, e.g. the convolution algorithm family ATen selects (performance.md: some cuDNN
    versions are disabled for half-precision 3D convs, and "cuDNN" then silently runs a slow native kernel)."""

    forward: Callable[[], torch.Tensor] | None
    grads_of: list[torch.Tensor]
    min_bytes: dict[str, int]
    runners: dict[str, Callable[[], object]] | None = None
    min_flops: dict[str, float] = field(default_factory=dict)
    min_exps: dict[str, float] = field(default_factory=dict)
    flops_on: str = "matrix"
    backend: str | None = None


@dataclass
class Case:
    name: str
    shapes: Callable[[bool], list[tuple[str, dict]]]  # quick -> [(label, spec)]
    providers: Callable[[dict], list[str]]  # spec -> provider names, "fastseg3d" first
    setup: Callable[[dict, torch.dtype, str, torch.device], Setup]
    dtypes: tuple[str, ...] = ("bf16", "fp32")  # the headline dtype first, so a time box always reaches it
    modes: tuple[str, ...] = field(default=MODES)
    suite: str = "ops"
    # spec -> the providers run only when --providers asks for them (by name, glob or "all")
    optional: Callable[[dict], tuple[str, ...]] = lambda spec: ()


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.suite not in SUITES:
        raise ValueError(f"case {case.name!r}: suite must be one of {SUITES}, got {case.suite!r}")
    CASES[case.name] = case
    return case


def compile_variant(provider: str) -> str | None:
    """The ``torch.compile...`` part of a provider name (``"plain+torch.compile"`` -> ``"torch.compile"``)."""
    tail = provider.rsplit("+", 1)[-1]
    return tail if tail in COMPILE_MODES else None


def compiled(fn: Callable, provider: str, device: torch.device) -> Callable:
    """``fn`` compiled in the mode ``provider`` names, with static shapes (each benchmark shape gets its own graph,
    as a fixed-size training run would)."""
    variant = compile_variant(provider)
    if variant is None:
        raise ValueError(f"provider {provider!r} names no torch.compile mode")
    mode = COMPILE_MODES[variant]
    if mode == "reduce-overhead" and device.type != "cuda":
        raise Unavailable("CUDA graphs need a GPU")
    return torch.compile(fn, mode=mode, dynamic=False)


def with_compile(prefix: str, variants=tuple(COMPILE_MODES)) -> list[str]:
    """``prefix+torch.compile...`` provider names (``prefix`` empty: the bare names)."""
    return [f"{prefix}+{v}" if prefix else v for v in variants]


def optional_compile(*prefixes: str) -> Callable[[dict], tuple[str, ...]]:
    """A ``Case.optional`` with the autotuned and CUDA-graph compile variants of each prefix."""
    names = tuple(name for p in prefixes for name in with_compile(p, OPTIONAL_COMPILE))
    return lambda spec: names


def require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Unavailable(f"{what} needs a GPU")


def load_cases() -> dict[str, Case]:
    from bench import (  # noqa: F401  (self-registering)
        attention,
        channel_kl,
        dice_ce,
        dsd_unet,
        dwconv3d,
        group_norm_act,
        kl_distill,
        layer_norm,
        mednext,
        missu,
        mobileutr,
        mobileutrl,
        segformer3d,
        selfreg,
        selfreg_unet,
        unetr,
        upsample_sum,
    )

    return CASES
