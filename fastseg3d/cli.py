"""Command line: ``fastseg3d train | eval | bench | convert | info`` (also ``python -m fastseg3d ...``).

``torchrun --standalone --nproc_per_node=N -m fastseg3d train ...`` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from fastseg3d.train import NonFiniteLossError, Trainer, load_config

    overrides = list(args.overrides)
    for flag, key in ((args.amp, "train.amp"), (args.device, "device"), (args.seed, "seed"),
                      (args.epochs, "train.epochs"), (args.max_steps, "train.max_steps")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.deterministic:
        overrides.append("deterministic=true")
    if args.compile:
        overrides.append("train.compile=true")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, args.output_dir, resume=args.resume)
    if trainer.is_main:
        print(f"run directory: {trainer.run_dir}")
    import torch.distributed as dist

    try:
        result = trainer.fit()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        if dist.is_initialized():
            # Every rank stopped at the same step, but tearing the process group down after an interrupted step
            # can still block on a peer (seen on CI): leave at once, the run directory is already closed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        return 3
    if dist.is_initialized():
        dist.destroy_process_group()
    if trainer.is_main and result and result["dice"] is not None:
        per_class = ", ".join(f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                              for name, value in zip(_foreground(trainer), result["dice_per_class"]))
        print(f"final validation: mean foreground Dice {result['dice']:.4f} ({per_class})")
        print(f"checkpoints, metrics.jsonl, curves.png and images/ are in {trainer.run_dir}")
    return 0


def _foreground(trainer) -> list[str]:
    names = list(trainer.data.class_names)
    return names if trainer.data.mode == "sigmoid" else names[1:]


def _eval(args: argparse.Namespace) -> int:
    from fastseg3d.train.evaluate import evaluate_checkpoint

    val = {}
    if args.roi is not None:
        val["roi_size"] = args.roi
    for key in ("overlap", "sw_batch_size", "blend", "max_cases"):
        if getattr(args, key) is not None:
            val[key] = getattr(args, key)
    if args.flip_tta:
        val["flip_tta"] = True
    val["hd95"] = not args.no_hd95
    out = args.output_dir or Path(args.checkpoint).resolve().parent / "eval"
    result = evaluate_checkpoint(args.checkpoint, out, data=args.data, label_mode=args.label_mode, split=args.split,
                                 val_overrides=val,
                                 save_predictions=args.save_predictions, device=args.device)
    names = result["class_names"]
    dice = "n/a" if result["dice"] is None else f"{result['dice']:.4f}"
    print(f"{result['num_cases']} cases: mean Dice {dice}"
          + (f", mean HD95 {result['hd95']:.2f}" if result.get("hd95") is not None else ""))
    for i, name in enumerate(names):
        hd = result.get("hd95_per_class")
        extra = f"  HD95 {hd[i]:.2f}" if hd and hd[i] is not None else ""
        dice = result["dice_per_class"][i]
        print(f"  {name:>12}: Dice {dice:.4f}{extra}" if dice is not None else f"  {name:>12}: Dice n/a")
    print(f"results in {Path(out) / 'eval_metrics.json'}")
    return 0


def _bench(rest: list[str]) -> int:
    # The suite lives in the source tree's bench/ (not installed): run it from there.
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        print("error: the benchmark suite ships with the source tree (bench/); run from a clone of the repository",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastseg3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op takes and why")

    train = sub.add_parser("train", help="train a network from a YAML config",
                           description="Train from a YAML config; trailing key=value pairs override it "
                                       "(e.g. optimizer.lr=3e-4 data.batch_size=4).")
    train.add_argument("--config", required=True, help="a YAML file, or a name in configs/ (e.g. quickstart)")
    train.add_argument("--output-dir", default=None, help="run directory (default: runs/<name>)")
    train.add_argument("--resume", default=None, help="'auto' (the run directory's latest checkpoint) or a path")
    train.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    train.add_argument("--device", default=None, help="auto, cpu, cuda")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--deterministic", action="store_true")
    train.add_argument("--compile", action="store_true", help="torch.compile the network")
    train.add_argument("overrides", nargs="*", help="config overrides section.key=value")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (sliding window, Dice, HD95, NIfTI predictions)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="'synthetic' or an MSD task folder (default: the run's data)")
    ev.add_argument("--split", choices=["val", "all"], default="val")
    ev.add_argument("--label-mode", choices=["labels", "brats_regions"], default=None,
                    help="default: the run's (needed for converted checkpoints, which have no data config)")
    ev.add_argument("--output-dir", default=None, help="default: <checkpoint folder>/eval")
    ev.add_argument("--roi", type=int, nargs=3, default=None, help="sliding-window roi (default: the run's)")
    ev.add_argument("--overlap", type=float, default=None)
    ev.add_argument("--sw-batch-size", type=int, default=None)
    ev.add_argument("--blend", choices=["gaussian", "constant"], default=None)
    ev.add_argument("--flip-tta", action="store_true", help="average over the 8 flips of the spatial axes")
    ev.add_argument("--no-hd95", action="store_true", help="skip HD95 (Dice only)")
    ev.add_argument("--max-cases", type=int, default=None)
    ev.add_argument("--save-predictions", action="store_true", help="write predictions as NIfTI")
    ev.add_argument("--device", default="auto")

    from fastseg3d import convert

    convert.add_arguments(sub.add_parser("convert", help="convert checkpoints to and from the official layouts"))
    sub.add_parser("bench", help="the benchmark suite: fastseg3d bench ops|model [--case NAME] [--dtype ...] "
                                 "[--json PATH] (see bench/README.md)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "info":
        from fastseg3d.info import main as info_main

        return info_main()
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    return convert.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
