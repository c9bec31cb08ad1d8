"""case=selfreg: SelfReg-UNet's regularisers on a 3-D U-Net at 128^3 against the eager PyTorch composition
(adaptive average pooling, channel indexing, F.mse_loss per pair; F.normalize, sort, indexing, F.mse_loss per map)
and torch.compile of it (the autotuned and CUDA-graph modes optional).

Shapes: a (2, 32, 128^3) final feature F_final supervising seven blocks (the 3-D analogue of SelfReg's UNet:
encoder 64@64^3, 128@32^3, 256@16^3, 256@8^3; decoder 128@16^3, 64@32^3, 32@64^3) with k = 32 random channel
pairs each ("inter"), and the intra-feature term on the same seven blocks ("intra").
"""

from __future__ import annotations

import torch

from bench.registry import LOSS_MODES, Case, Setup, compiled, optional_compile, register
from fastseg3d.ops.selfreg import random_channel_pairs, selfreg_inter_multi, selfreg_intra
from fastseg3d.reference.selfreg import selfreg_inter_ref, selfreg_intra_ref

_BLOCKS = [(64, 2), (128, 4), (256, 8), (256, 16), (128, 8), (64, 4), (32, 2)]  # (channels, downsampling)


def _shapes(quick: bool) -> list[tuple[str, dict]]:
    b, c, s, scale = (1, 8, 16, 8) if quick else (2, 32, 128, 1)
    blocks = [(max(2, ch // scale), f) for ch, f in _BLOCKS]
    return [
        (f"{b}x{c}x{s}^3 inter 7 pairs", {"term": "inter", "b": b, "c": c, "s": s, "blocks": blocks}),
        (f"{b}x{s}^3 intra 7 blocks", {"term": "intra", "b": b, "c": c, "s": s, "blocks": blocks}),
    ]


def _providers(spec: dict) -> list[str]:
    return ["fastseg3d", "torch", "torch.compile", "torch.compile-max-autotune", "torch.compile-reduce-overhead"]


def _eager_inter(blocks, final, cs, ct):
    return torch.stack([selfreg_inter_ref(x, final, a, b) for x, a, b in zip(blocks, cs, ct)]).mean()


def _eager_intra(blocks):
    return torch.stack([selfreg_intra_ref(x) for x in blocks]).mean()


def _setup(spec: dict, dtype: torch.dtype, provider: str, device: torch.device) -> Setup:
    b, c, s = spec["b"], spec["c"], spec["s"]
    blocks = [torch.randn(b, ch, s // f, s // f, s // f, device=device, dtype=dtype, requires_grad=True)
              for ch, f in spec["blocks"]]
    nbytes = sum(x.numel() * x.element_size() for x in blocks)
    if spec["term"] == "inter":
        final = torch.randn(b, c, s, s, s, device=device, dtype=dtype)
        pairs = [random_channel_pairs(x.shape[1], c, generator=torch.Generator().manual_seed(i))
                 for i, x in enumerate(blocks)]
        cs = [p[0].to(device) for p in pairs]
        ct = [p[1].to(device) for p in pairs]
        if provider == "fastseg3d":
            def fwd():
                return selfreg_inter_multi(blocks, final, cs, ct).mean()
        else:
            fn = _eager_inter if provider == "torch" else compiled(_eager_inter, provider, device)

            def fwd():
                return fn(blocks, final, cs, ct)
        # fwd reads the blocks and the final feature once; the fused backward writes the block gradients.
        tbytes = final.numel() * final.element_size()
        return Setup(fwd, blocks, {"fwd": nbytes + tbytes, "fwd+bwd": 2 * nbytes + tbytes})
    if provider == "fastseg3d":
        def fwd():
            return torch.stack([selfreg_intra(x) for x in blocks]).mean()
    else:
        fn = _eager_intra if provider == "torch" else compiled(_eager_intra, provider, device)

        def fwd():
            return fn(blocks)
    # the statistics pass and the loss pass each read the blocks; the gradients are written once
    return Setup(fwd, blocks, {"fwd": 2 * nbytes, "fwd+bwd": 3 * nbytes})


CASE = register(Case(name="selfreg", shapes=_shapes, providers=_providers, setup=_setup, modes=LOSS_MODES,
                     optional=optional_compile("")))
