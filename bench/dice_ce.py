"""case=dice_ce: the segmentation loss on label maps, :func:`fastseg3d.losses.dice_ce` (which keeps only the logits
for backward), against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` on fp32 copies of the logits, as
training under autocast runs it, eager and compiled.

Shapes: one DSD head at 128^3, B=2, 14 classes (BTCV's), at the label's resolution and at half of it (a
deep-supervision head upsampled inside the loss; MONAI gets it through ``F.interpolate``). Peak memory is the row's
headline: MONAI's loss keeps an fp32 softmax, log-softmax and one-hot label for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.registry import MODES, Case, Setup, Unavailable, compiled, optional_compile, register
from fastseg3d.losses import dice_ce


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, k, s = (1, 3, 8) if quick else (2, 14, 128)
    return [(f"{b}x{k}@{s}^3 head", {"b": b, "k": k, "s": s, "factor": 1}),
            (f"{b}x{k}@{s // 2}^3 head to {s}^3", {"b": b, "k": k, "s": s, "factor": 2})]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, k, s, f = spec["b"], spec["k"], spec["s"], spec["factor"]
    logits = torch.randn(b, k, s // f, s // f, s // f, device=device, dtype=dtype).mul_(2).requires_grad_()
    target = torch.randint(0, k, (b, 1, s, s, s), device=device)
    if provider == "fastseg3d":
        def fwd():
            return dice_ce(logits, target)
    else:
        try:
            from monai.losses import DiceCELoss
        except ImportError as e:
            raise Unavailable("MONAI is not installed") from e
        loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def eager(z, t):
            z = z.float()
            if f > 1:
                z = F.interpolate(z, size=(s, s, s), mode="trilinear", align_corners=False)
            return loss(z, t)

        fn = eager if provider == "torch" else compiled(eager, provider, device)

        def fwd():
            return fn(logits, target)
    nbytes = logits.numel() * logits.element_size()
    labels = target.numel() * target.element_size()
    # forward reads the logits and the labels; backward reads both again and writes the logits' gradient
    return Setup(fwd, [logits], {"fwd": nbytes + labels, "bwd": 2 * nbytes + labels,
                                 "fwd+bwd": 3 * nbytes + 2 * labels})


CASE = register(Case(name="dice_ce", shapes=_shapes, providers=_providers, setup=_setup, modes=MODES,
                     optional=optional_compile("")))
