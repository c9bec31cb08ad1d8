"""The benchmark cases, by name. A case module defines a ``Case`` and registers it here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
MODEL_MODES = ("train_step", "infer")


@dataclass
class Setup:
    """What a provider runs for one (shape, dtype): a forward closure, the tensors that get gradients, and the
    minimum bytes each mode must move (for the roofline). Model cases give ``runners`` instead: one closure per
    mode (``train_step``, ``infer``)."""

    forward: Callable[[], torch.Tensor] | None
    grads_of: list[torch.Tensor]
    min_bytes: dict[str, int]
    runners: dict[str, Callable[[], object]] | None = None


@dataclass
class Case:
    name: str
    shapes: Callable[[bool], list[tuple[str, dict]]]  # quick -> [(label, spec)]
    providers: Callable[[dict], list[str]]  # spec -> provider names, "fastseg3d" first
    setup: Callable[[dict, torch.dtype, str, torch.device], Setup]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] = field(default=MODES)
    suite: str = "ops"


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    CASES[case.name] = case
    return case


def load_cases() -> dict[str, Case]:
    from bench import attention, channel_kl, dwconv3d, kl_distill, segformer3d, selfreg  # noqa: F401  (self-registering)

    return CASES
