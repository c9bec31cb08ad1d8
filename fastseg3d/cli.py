"""Command line: ``fastseg3d info | demo`` (also ``python -m fastseg3d ...``)."""

from __future__ import annotations

import argparse
import time

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """Run the fused depthwise conv on a synthetic volume and check it against the reference."""
    import fastseg3d
    from fastseg3d.reference import dwconv3d_ref

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    b, c, s = args.batch, args.channels, args.size
    x = torch.randn(b, c, s, s, s, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c, 1, 3, 3, 3, generator=gen) / 27**0.5).to(device, dtype)
    bias = torch.randn(c, generator=gen).to(device, dtype)
    x.requires_grad_(True)

    choice = fastseg3d.info.op_choices(device, dtype)[0]
    print(f"dwconv3d on x={tuple(x.shape)} {args.dtype} channels_last_3d, {device}: {choice[1]} ({choice[2]})")
    start = time.perf_counter()
    y = fastseg3d.ops.dwconv3d(x, w, bias, activation="gelu")
    y.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = dwconv3d_ref(x_ref, w.double(), bias.double(), activation="gelu")
    y_ref.square().mean().backward()
    err_y = ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item()
    err_dx = ((x.grad.double() - x_ref.grad).abs().max() / x_ref.grad.abs().max()).item()
    print(f"forward+backward {elapsed * 1e3:.1f} ms (first call, includes any compilation)")
    print(f"max error relative to the float64 reference: y {err_y:.2e}, dx {err_dx:.2e}")
    ok = err_y < 5e-2 and err_dx < 5e-2
    print("demo OK" if ok else "demo FAILED: the fused result does not match the reference")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastseg3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op takes and why")
    demo = sub.add_parser("demo", help="run the fused depthwise conv on a synthetic volume and check it")
    demo.add_argument("--size", type=int, default=24, help="side of the cubic volume")
    demo.add_argument("--channels", type=int, default=32)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastseg3d.info import main as info_main

        return info_main()
    return _demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
