"""``fastseg3d info``: versions, the device, and which implementation each op takes and why."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from fastseg3d import backends

__all__ = ["collect", "main", "op_choices"]


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def _probe_cases(device: torch.device, dtype: torch.dtype):
    """One representative call per op: (name, unsupported reasons)."""
    from fastseg3d.ops.dwconv3d import dwconv3d_unsupported_reasons
    from fastseg3d.ops.utils import interpreter_reasons

    with torch.device("meta"):
        x = torch.empty(2, 32, 32, 32, 32, dtype=dtype)
        w = torch.empty(32, 1, 3, 3, 3, dtype=dtype)
    # The reasons depend on the device, dtype and configuration, not on data: probe with meta shapes, real device.
    device_reasons = backends.device_reasons(device) or interpreter_reasons(device, dtype)
    shape_reasons = dwconv3d_unsupported_reasons(x, w, x.shape)
    yield "dwconv3d", device_reasons + shape_reasons
    yield "dwconv3d_tokens", device_reasons + shape_reasons

    from fastseg3d.ops.attention import attention_unsupported_reasons

    with torch.device("meta"):
        q = torch.empty(2, 32768, 1, 32, dtype=dtype)  # SegFormer3D stage 1 at a 128^3 input
        kv = torch.empty(2, 512, 2, 1, 32, dtype=dtype)
    yield "attention", device_reasons + attention_unsupported_reasons(q, kv[:, :, 0], kv[:, :, 1])

    from fastseg3d.ops.channel_kl import channel_kl_unsupported_reasons
    from fastseg3d.ops.kl_distill import kl_distill_unsupported_reasons
    from fastseg3d.ops.selfreg import selfreg_inter_unsupported_reasons, selfreg_intra_unsupported_reasons

    with torch.device("meta"):
        logits = torch.empty(2, 14, 32, 32, 32, dtype=dtype)
        feat = torch.empty(2, 32, 32, 32, 32, dtype=dtype)
    yield "kl_distill", device_reasons + kl_distill_unsupported_reasons(logits, [logits])
    yield "channel_kl", device_reasons + channel_kl_unsupported_reasons(feat)
    yield "selfreg_inter", device_reasons + selfreg_inter_unsupported_reasons(feat, [feat])
    yield "selfreg_intra", device_reasons + selfreg_intra_unsupported_reasons(feat)

    from fastseg3d.ops.group_norm_act import group_norm_act_unsupported_reasons

    yield "group_norm_act", device_reasons + group_norm_act_unsupported_reasons(feat)

    from fastseg3d.ops.layer_norm import add_layer_norm_unsupported_reasons, layer_norm_unsupported_reasons

    with torch.device("meta"):
        tokens = torch.empty(2, 32768, 32, dtype=dtype)  # SegFormer3D stage 1 at a 128^3 input
    yield "layer_norm", device_reasons + layer_norm_unsupported_reasons(tokens, out_dtype=dtype)
    yield "add_layer_norm", device_reasons + add_layer_norm_unsupported_reasons(tokens, tokens, out_dtype=dtype)

    from fastseg3d.ops.upsample_sum import upsample_sum_unsupported_reasons

    with torch.device("meta"):  # SegFormer3D's decoder at a 128^3 input
        parts = [torch.empty(2, 256, s, s, s, dtype=dtype) for s in (32, 16, 8, 4)]
    yield "upsample_sum", device_reasons + upsample_sum_unsupported_reasons(parts, (32, 32, 32))


def op_choices(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16
               ) -> list[tuple[str, str, str]]:
    """(op, implementation, why) for each op on ``device`` (a device or its name; default: cuda if available, else
    cpu)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return [(name, *backends.decide(name, reasons)) for name, reasons in _probe_cases(device, dtype)]


def _extension() -> str:
    """Whether the optional compiled extension ``fastseg3d._C`` is built (``FASTSEG3D_BUILD_CUDA=1``)."""
    import importlib.util

    if importlib.util.find_spec("fastseg3d._C") is None:
        return "not built (optional; csrc/ holds no sources yet, every op runs on Triton or its reference)"
    return "built (fastseg3d._C)"


def collect() -> dict:
    from fastseg3d import __version__

    cuda = torch.cuda.is_available()
    return {
        "fastseg3d": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "n/a",
        "monai": _version("monai"),
        "cuda extension": _extension(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "backend policy": backends.get_backend(),
        "TRITON_INTERPRET": "1" if backends.interpreter_active() else "0",
        "check_finite": "on" if backends.checking_finite() else "off",
    }


def main() -> int:
    error = backends.environment_error()
    if error:  # a bad FASTSEG3D_* value: one line, as `fastseg3d info` says it
        print(f"error: {error}", file=sys.stderr)
        return 2
    info = collect()
    width = max(map(len, info))
    print("fastseg3d environment")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    print("ops (bf16 input on the default device)")
    for name, choice, why in op_choices():
        print(f"  {name:<16} {choice:<7} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
