"""case=kl_distill: DSD's temperature-scaled KL self-distillation (T = 3) against the eager PyTorch composition
(F.interpolate, log_softmax, softmax, sum, mean per pair), torch.compile of it (the autotuned and CUDA-graph modes
optional), and Liger-Kernel's KL divergence where ``liger_kernel`` is installed.

Shapes: B=2, K=14 classes at 128^3, DSD's six pairs (two groups of three students and a teacher) as
``fastseg3d.networks.dsd_unet`` produces them at that input:

* deconv heads (``head_mode="deconv"``, as published): all eight heads at the full 128^3;
* interp heads (``head_mode="interp"``): each head at its feature's resolution, upsampled in the loss. The decoder
  heads sit on the bottleneck and the decoder stages above full resolution, 1/16, 1/8, 1/4 and 1/2 (sides 8, 16,
  32, 64), the teacher (dec1) at 1/2; the encoder heads are at 1/1, 1/2, 1/4 and the teacher (enc4) at 1/8 (sides
  128, 64, 32, 16). Every pair is computed over the label's 128^3 voxels, as ``DSDLoss`` does.

Also one pair (a 1/2-resolution student against a full-resolution teacher).

Liger's ``LigerKLDIVLoss`` is a 2-D (rows, classes) loss on log-probabilities with no softmax, temperature or
resampling inside, so its provider upsamples and divides by T in eager PyTorch, takes the fp32 log-softmax of both,
moves the classes last as a (B * voxels, K) view, and calls it with ``reduction="batchmean", log_target=True``
(the mean over voxels of the class-summed KL), times T^2. Its backward gives no gradient to the target, so the
teachers get none in that provider (the others differentiate both sides, as DSD's loss does).
"""

from __future__ import annotations

import importlib.util

import torch

from bench.registry import LOSS_MODES, Case, Setup, compiled, optional_compile, register, require_cuda
from fastseg3d.ops.kl_distill import kl_distill_multi
from fastseg3d.reference.kl_distill import kl_distill_ref

_T = 3.0


# (teacher's downsampling factor, students' factors) per group, decoder group first
DSD_GROUPS = {
    "deconv": [(1, (1, 1, 1)), (1, (1, 1, 1))],
    "interp": [(2, (16, 8, 4)), (8, (1, 2, 4))],
}


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, k, s = (1, 3, 16) if quick else (2, 14, 128)  # 16: the 1/16 decoder head keeps one voxel
    return [
        (f"{b}x{k}x{s}^3 dsd 6 pairs deconv heads", {"b": b, "k": k, "s": s, "groups": DSD_GROUPS["deconv"]}),
        (f"{b}x{k}x{s}^3 dsd 6 pairs interp heads", {"b": b, "k": k, "s": s, "groups": DSD_GROUPS["interp"]}),
        (f"{b}x{k}x{s}^3 pair s/2", {"b": b, "k": k, "s": s, "groups": [(1, (2,))]}),
    ]


def _providers(spec: dict) -> list[str]:
    providers = ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]
    if importlib.util.find_spec("liger_kernel") is not None:
        providers.append("liger")
    return providers


def _eager(groups, size):
    # every pair at the label's resolution ``size``, as DSDLoss computes them
    total = 0.0
    for teacher, students in groups:
        for student in students:
            total = total + kl_distill_ref(student, teacher, _T, size=size)
    return total


def liger_loss(kl: torch.nn.Module):
    """The kl_distill loss on ``kl``, a (rows, classes) KL on log-probabilities with ``reduction="batchmean"`` and
    ``log_target=True`` (``LigerKLDIVLoss``; ``torch.nn.KLDivLoss`` has the same contract, which the CPU test uses)."""
    def rows(logits, size):
        x = logits.float()
        if tuple(x.shape[2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
        return torch.log_softmax(x / _T, dim=1).movedim(1, -1).reshape(-1, x.shape[1])

    def loss(groups, size):
        total = 0.0
        for teacher, students in groups:
            for student in students:
                total = total + _T * _T * kl(rows(student, size), rows(teacher, size))
        return total
    return loss


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, k, s = spec["b"], spec["k"], spec["s"]

    def logits(f):
        return torch.randn(b, k, s // f, s // f, s // f, device=device, dtype=dtype, requires_grad=True)

    groups = [(logits(tf), [logits(f) for f in sfs]) for tf, sfs in spec["groups"]]
    size = (s, s, s)
    leaves = [t for teacher, students in groups for t in (teacher, *students)]
    if provider == "fastseg3d":
        def fwd():
            return sum(kl_distill_multi(students, teacher, _T, size=size) for teacher, students in groups)
    else:
        if provider == "liger":
            require_cuda(device, "Liger-Kernel's Triton KL")
            from liger_kernel.transformers import LigerKLDIVLoss

            fn = liger_loss(LigerKLDIVLoss(reduction="batchmean", log_target=True))
        else:
            fn = _eager if provider == "torch" else compiled(_eager, provider, device)

        def fwd():
            return fn(groups, size)
    nbytes = sum(t.numel() * t.element_size() for t in leaves)
    # fwd reads every input once; the fused backward writes one gradient per input (computed in forward).
    return Setup(fwd, leaves, {"fwd": nbytes, "fwd+bwd": 2 * nbytes})


CASE = register(Case(name="kl_distill", shapes=_shapes, providers=_providers, setup=_setup, modes=LOSS_MODES,
                     optional=optional_compile("")))
