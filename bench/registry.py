"""The benchmark cases, by name. A case module defines a ``Case`` and registers it here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Setup:
    """What a provider runs for one (shape, dtype): a forward closure, the tensors that get gradients, and the
    minimum bytes each mode must move (for the roofline)."""

    forward: Callable[[], torch.Tensor]
    grads_of: list[torch.Tensor]
    min_bytes: dict[str, int]


@dataclass
class Case:
    name: str
    shapes: Callable[[bool], list[tuple[str, dict]]]  # quick -> [(label, spec)]
    providers: Callable[[dict], list[str]]  # spec -> provider names, "fastseg3d" first
    setup: Callable[[dict, torch.dtype, str, torch.device], Setup]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] = field(default=MODES)


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    CASES[case.name] = case
    return case


def load_cases() -> dict[str, Case]:
    from bench import attention, channel_kl, dwconv3d, kl_distill, selfreg  # noqa: F401  (each registers itself)

    return CASES
