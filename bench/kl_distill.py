"""case=kl_distill: DSD's temperature-scaled KL self-distillation (T = 3) against the eager PyTorch composition
(F.interpolate, log_softmax, softmax, sum, mean per pair) and torch.compile of it.

Shapes: B=2, K=14 classes at 128^3, the six DSD pairs with heads kept at their native resolution and upsampled in
the loss: decoder teacher (dec1) at full resolution with students at 1/2, 1/4 and 1/8; encoder teacher (enc4) at
1/8 with students at 1/1, 1/2 and 1/4. Also one pair (a 1/2-resolution student against a full-resolution teacher).
"""

from __future__ import annotations

import torch

from bench.registry import Case, Setup, register
from fastseg3d.ops.kl_distill import kl_distill_multi
from fastseg3d.reference.kl_distill import kl_distill_ref

_T = 3.0


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, k, s = (1, 3, 8) if quick else (2, 14, 128)
    return [
        (f"{b}x{k}x{s}^3 dsd 6 pairs", dict(b=b, k=k, s=s, groups=[(1, (2, 4, 8)), (8, (1, 2, 4))])),
        (f"{b}x{k}x{s}^3 pair s/2", dict(b=b, k=k, s=s, groups=[(1, (2,))])),
    ]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile"]


def _eager(groups):
    total = 0.0
    for teacher, students in groups:
        for student in students:
            total = total + kl_distill_ref(student, teacher, _T)
    return total


_compiled = None


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    global _compiled
    b, k, s = spec["b"], spec["k"], spec["s"]

    def logits(f):
        return torch.randn(b, k, s // f, s // f, s // f, device=device, dtype=dtype, requires_grad=True)

    groups = [(logits(tf), [logits(f) for f in sfs]) for tf, sfs in spec["groups"]]
    leaves = [t for teacher, students in groups for t in (teacher, *students)]
    if provider == "fastseg3d":
        def fwd():
            return sum(kl_distill_multi(students, teacher, _T) for teacher, students in groups)
    else:
        if provider == "torch.compile" and _compiled is None:
            _compiled = torch.compile(_eager)
        fn = _eager if provider == "torch" else _compiled

        def fwd():
            return fn(groups)
    nbytes = sum(t.numel() * t.element_size() for t in leaves)
    # fwd reads every input once; the fused backward writes one gradient per input (computed in forward).
    return Setup(fwd, leaves, {"fwd": nbytes, "bwd": nbytes, "fwd+bwd": 2 * nbytes})


CASE = register(Case(name="kl_distill", shapes=_shapes, providers=_providers, setup=_setup))
