"""Command line: ``fastseg3d train | eval | profile | bench | convert | info`` (also ``python -m fastseg3d ...``).

``torchrun --standalone --nproc_per_node=N -m fastseg3d train ...`` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _error(message) -> int:
    """A usage error in one line on stderr; exit code 2, as argparse's."""
    print(f"error: {message}", file=sys.stderr)
    return 2


# what train, eval and profile import (configs, MONAI's losses, metrics, sliding window and transforms): the
# ``train`` extra
_TRAIN_MODULES = ("yaml", "monai")


def _missing_train_modules() -> list[str]:
    missing = []
    for name in _TRAIN_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def _config(load_config, config: str, overrides: list[str]):
    """The resolved config, or None after a one-line error (an unknown key, a bad value or file)."""
    try:
        return load_config(config, overrides)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    from fastseg3d.train import NonFiniteLossError, Trainer, load_config
    from fastseg3d.train.trainer import SetupError

    overrides = list(args.overrides)
    for flag, key in ((args.amp, "train.amp"), (args.device, "device"), (args.seed, "seed"),
                      (args.epochs, "train.epochs"), (args.max_steps, "train.max_steps"), (args.backend, "backend"),
                      (args.val_every, "val.every"), (args.save_every, "checkpoint.save_every")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    for flag, key in ((args.deterministic, "deterministic"), (args.channels_last, "train.channels_last"),
                      (args.cuda_graph, "train.cuda_graph")):
        if flag:
            overrides.append(f"{key}=true")
    cfg = _config(load_config, args.config, overrides)
    if cfg is None:
        return 2
    if args.compile and cfg["train"]["compile"] is False:  # a mode the config names stays
        cfg["train"]["compile"] = True
    try:
        trainer = Trainer(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    except SetupError as err:
        return _error(err)
    if trainer.is_main:
        print(f"run directory: {trainer.run_dir}")
    from fastseg3d.data.msd import InvalidCaseError

    try:
        result = trainer.fit()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        if trainer.owns_process_group:
            _leave(3)
        return 3
    except InvalidCaseError as err:
        # from a DataLoader worker the message carries the worker's traceback: its last line is the case's error
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = lines[-1].split("InvalidCaseError: ", 1)[-1] if lines else ""
        print(f"error: {reason}\nthe run's checkpoints are kept: fix or remove the case, then --resume auto",
              file=sys.stderr)
        if trainer.owns_process_group:
            _leave(2)
        return 2
    if trainer.is_main and result and result["dice"] is not None:
        per_class = ", ".join(f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                              for name, value in zip(_foreground(trainer), result["dice_per_class"]))
        print(f"final validation: mean foreground Dice {result['dice']:.4f} ({per_class})")
        print(f"checkpoints, metrics.jsonl, curves.png and images/ are in {trainer.run_dir}")
    if trainer.owns_process_group:
        _leave(0)
    return 0


def _leave(code: int) -> None:
    """End a torchrun worker whose process group the trainer made, at once. Every rank has passed the last barrier,
    and the checkpoints and metrics are written and closed; tearing the gloo/NCCL process group down
    (``destroy_process_group``, or the interpreter's finalisation without it) can still block on a peer, and CI saw
    a two-rank run hang there after its last line."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _foreground(trainer) -> list[str]:
    names = list(trainer.data.class_names)
    return names if trainer.data.mode == "sigmoid" else names[1:]


def _eval(args: argparse.Namespace) -> int:
    from fastseg3d.data.msd import InvalidCaseError
    from fastseg3d.train.evaluate import evaluate_checkpoint
    from fastseg3d.train.trainer import SetupError, resolve_device

    # the usual mistakes, checked before the checkpoint and the data are loaded
    if not Path(args.checkpoint).is_file():
        return _error(f"checkpoint {args.checkpoint} does not exist")
    if args.data not in (None, "synthetic") and not Path(args.data).is_dir():
        return _error(f"--data {args.data} is not a folder ('synthetic' or a Medical Segmentation Decathlon task "
                      "folder)")
    if args.max_cases is not None and args.max_cases < 1:
        return _error(f"--max-cases must be >= 1, got {args.max_cases}")
    try:
        resolve_device(args.device)
    except SetupError as err:
        return _error(err)
    val = {}
    if args.roi is not None:
        val["roi_size"] = args.roi
    for key in ("overlap", "sw_batch_size", "blend", "max_cases"):
        if getattr(args, key) is not None:
            val[key] = getattr(args, key)
    if args.flip_tta:
        val["flip_tta"] = True
    if args.relabel_small is not None:
        val["relabel_small"] = args.relabel_small
    if args.no_relabel_small:
        val["relabel_small"] = None
    if args.score_empty or args.no_score_empty:
        val["ignore_empty"] = args.no_score_empty
    val["hd95"] = not args.no_hd95
    val["msd"] = args.msd
    out = args.output_dir or Path(args.checkpoint).resolve().parent / "eval"
    try:
        result = evaluate_checkpoint(args.checkpoint, out, data=args.data, label_mode=args.label_mode,
                                     split=args.split, val_overrides=val, save_predictions=args.save_predictions,
                                     device=args.device)
    except SetupError as err:
        return _error(err)
    except InvalidCaseError as err:  # cases load one by one as they are predicted
        return _error(err)
    if args.split == "test":
        n = result["num_cases"]
        print(f"{n} case{'' if n == 1 else 's'} predicted into {result['predictions']}")
        return 0
    names = result["class_names"]
    dice = "n/a" if result["dice"] is None else f"{result['dice']:.4f}"
    print(f"{result['num_cases']} cases: mean Dice {dice}"
          + (f", mean HD95 {result['hd95']:.2f}" if result.get("hd95") is not None else "")
          + (f", mean surface distance {result['msd']:.2f}" if result.get("msd") is not None else ""))
    for i, name in enumerate(names):
        extra = ""
        for key, label in (("hd95_per_class", "HD95"), ("msd_per_class", "MSD")):
            values = result.get(key)
            extra += f"  {label} {values[i]:.2f}" if values and values[i] is not None else ""
        dice = result["dice_per_class"][i]
        print(f"  {name:>12}: Dice {dice:.4f}{extra}" if dice is not None else f"  {name:>12}: Dice n/a")
    print(f"results in {Path(out) / 'eval_metrics.json'}")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _profile(args: argparse.Namespace) -> int:
    import contextlib

    from fastseg3d.backends import backend
    from fastseg3d.train import load_config

    if args.size is not None:
        # --size takes every token up to the next option: the key=value ones among them are overrides
        args.overrides = [*args.overrides, *(t for t in args.size if isinstance(t, str))]
        args.size = [t for t in args.size if isinstance(t, int)]
        if len(args.size) not in (1, 3):
            return _error(f"--size takes D H W or one side, got {args.size}")
    cfg = _config(load_config, args.config, list(args.overrides))
    if cfg is None:
        return 2
    # the config's backend, as training applies it: backend=torch counts the plain compositions (the references and
    # plain norm chains that the benchmarks' plain networks run)
    try:
        with backend(cfg["backend"]) if cfg["backend"] else contextlib.nullcontext():
            return _profile_config(args, cfg)
    except ValueError as err:  # a setup the network or the backend rejects (e.g. a size its strides do not divide)
        return _error(err)
    except RuntimeError as err:  # a network that takes one input size (MONAI's UNETR) fails in its ops at others
        return _error(f"the network cannot run a training step at this size (--size, data.spatial_size or the "
                      f"--max-memory search): {str(err).strip().splitlines()[0]}")


def _size_token(token: str) -> int | str:
    """A value of profile's ``--size``, or a key=value override written after it."""
    if "=" in token:
        return token
    try:
        side = int(token)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{token!r} is neither a side (an integer) nor a key=value override"
                                         ) from None
    if side < 1:
        raise argparse.ArgumentTypeError(f"a side must be a positive integer, got {side}")
    return side


def _positive_int(token: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{token!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_gib(token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{token!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number of GiB, got {token}")
    return value


def _profile_config(args: argparse.Namespace, cfg: dict) -> int:
    import copy

    import torch

    from fastseg3d.profile import activation_memory, largest_cube, training_memory, write_traffic
    from fastseg3d.train.builders import build_model, build_objective, data_channels, output_mode

    data, tcfg = cfg["data"], cfg["train"]
    mode = output_mode(data["label_mode"])
    channels = data_channels(cfg)
    model = build_model(cfg["model"], *(channels or (None, None)))
    amp = args.dtype or tcfg["amp"]
    dtype = {"none": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    batch = args.batch
    if batch is None:
        batch = int(data["batch_size"]) * (int(data["num_samples"]) if data["name"] == "msd" else 1)
    size = tuple(args.size * 3 if len(args.size or ()) == 1 else args.size or data["spatial_size"])
    own_channels = channels is None
    if own_channels:  # an MSD config without its folder: the network's own channel counts
        in_channels = next(m.in_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        with torch.no_grad():
            logits = copy.deepcopy(model).to("meta").eval()(torch.empty(1, in_channels, *size, device="meta"))
        channels = (in_channels, logits.shape[1])
    step = _train_step(model, build_objective(cfg, mode, channels[1]), mode, channels[1])
    opt = cfg["optimizer"]
    # Adam keeps a third state per parameter, the running maximum of exp_avg_sq, with amsgrad
    states = {"adamw": 2, "adam": 2, "sgd": 1 if opt["momentum"] else 0}[opt["name"]] + (
        opt["name"] != "sgd" and bool(opt["amsgrad"]))
    shape = (batch, channels[0], *size)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg['name']}: {cfg['model']['name']}, {n_params:,} parameters, {channels[0]} -> {channels[1]} channels; "
          f"a training step on {'x'.join(map(str, shape))}, {'fp32' if dtype == torch.float32 else amp + ' autocast'}"
          + (f"; backend {cfg['backend']}" if cfg["backend"] else ""))
    if own_channels:
        print("  (data.root is not set: the network's own channel counts)")
    report = training_memory(step, shape, dtype, states)
    saved = activation_memory(step, shape, dtype)
    network = activation_memory(model, shape, dtype)
    parts = ", ".join(f"{name} {_size(v)}" for name, v in network.items() if name != "total" and v)
    print(f"  saved by the network    {_size(saved['model']):>11}  ({parts})")
    print(f"  saved by the loss       {_size(saved.get('objective', 0)):>11}  ({cfg['loss']['name']}"
          + (f" + {cfg['loss']['distill']}" if cfg["loss"]["distill"] != "none" else "") + ")")
    print(f"  parameters and buffers  {_size(report['parameters']):>11}")
    print(f"  gradients               {_size(report['gradients']):>11}")
    print(f"  optimizer state         {_size(report['optimizer']):>11}  ({opt['name']}"
          + (", amsgrad" if opt["name"] != "sgd" and opt["amsgrad"] else "") + ")")
    print(f"  at least                {_size(report['total']):>11}  (backward's transient buffers, the allocator's "
          "slack and the CUDA context come on top)")
    for phase, t in write_traffic(step, shape, dtype).items():
        top = sorted(t["by_op"].items(), key=lambda kv: -kv[1][1])[:3]
        print(f"  {phase + ' writes':<24}{_size(t['bytes']):>11}  in {t['ops']} ops; most: "
              + ", ".join(f"{name} x{count} {_size(nbytes)}" for name, (count, nbytes) in top))
    if tcfg["activation_checkpointing"]:
        print("  train.activation_checkpointing is on: not modelled, these are the counts without it")
    if args.max_memory is not None:
        # sides in steps the network takes (a deeper U-Net's stride is 64 or more)
        multiple = math.lcm(32, _input_stride(model))
        side = largest_cube(step, batch, channels[0], int(args.max_memory * 2**30), dtype, states,
                            multiple=multiple, start=max(64, multiple))
        print(f"  largest cube at batch {batch} whose estimate fits {args.max_memory:g} GiB: "
              + (f"{side}^3" if side else "none"))
    return 0


def _input_stride(model) -> int:
    """What every input side of ``model`` must be a multiple of: the ``total_stride`` (per axis: their least common
    multiple, for a cube) or ``divisor`` of its first module that has one, else 1."""
    for m in model.modules():
        stride = getattr(m, "total_stride", None) or getattr(m, "divisor", None)
        if stride:
            return math.lcm(*stride) if isinstance(stride, (tuple, list)) else int(stride)
    return 1


def _train_step(model, objective, mode: str, num_classes: int):
    """The network and its training loss as one module (children ``model`` and ``objective``) whose forward takes
    the input and makes a target of its size: what the memory count runs."""
    import torch

    class TrainStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.objective = model, objective

        def forward(self, x):
            b, _, *spatial = x.shape
            if mode == "softmax":
                target = torch.zeros(b, 1, *spatial, dtype=torch.long, device=x.device)
            else:
                target = torch.zeros(b, num_classes, *spatial, device=x.device)
            return self.objective(self.model(x), target)[0]

    return TrainStep()


def _bench(rest: list[str]) -> int:
    # The suite lives in the source tree's bench/ (not installed): run it from there.
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        print("error: the benchmark suite ships with the source tree (bench/); run from a clone of the repository",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    return bench_main(rest, prog="fastseg3d bench")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    from fastseg3d.train.inference import BLENDS  # (numpy and torch only; MONAI where it is used)

    parser = argparse.ArgumentParser(prog="fastseg3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op takes and why")

    train = sub.add_parser("train", help="train a network from a YAML config",
                           description="Train from a YAML config; trailing key=value pairs override it "
                                       "(e.g. optimizer.lr=3e-4 data.batch_size=4).")
    train.add_argument("--config", required=True, help="a YAML file, or a name in configs/ (e.g. quickstart)")
    train.add_argument("--output-dir", default=None, help="run directory (default: runs/<name>)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", default=None, help="'auto' (the run directory's latest checkpoint) or a path")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run directory that holds a run, removing its checkpoints, "
                            "metrics.jsonl, curves.png, images/ and tb/ (without it, or --resume, such a directory "
                            "is an error)")
    train.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    train.add_argument("--device", default=None, help="auto, cpu, cuda")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--deterministic", action="store_true")
    train.add_argument("--backend", choices=["auto", "triton", "torch"], default=None,
                       help="the fused ops' backend policy (FASTSEG3D_BACKEND for this run)")
    train.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    train.add_argument("--val-every", type=int, default=None, help="epochs between validations (0: never)")
    train.add_argument("--save-every", type=int, default=None, help="epochs between checkpoint_latest.pt writes")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the network in mode default (other modes by the override "
                            "train.compile=reduce-overhead, max-autotune, ...)")
    train.add_argument("--cuda-graph", action="store_true",
                       help="train.cuda_graph=true: capture the training step in a CUDA graph and replay it")
    train.add_argument("overrides", nargs="*", help="config overrides section.key=value")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (sliding window, Dice, HD95, NIfTI predictions)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="'synthetic' or an MSD task folder (default: the run's data)")
    ev.add_argument("--split", choices=["val", "all", "test"], default="val",
                    help="val: the run's validation split; all: every labelled case of an MSD folder; test: its "
                         "unlabelled cases (dataset.json's test list, else imagesTs/), predicted into NIfTI files")
    ev.add_argument("--label-mode", choices=["labels", "brats_regions"], default=None,
                    help="default: the run's (needed for converted checkpoints, which have no data config but "
                         "for BraTS SegFormer3D weights)")
    ev.add_argument("--output-dir", default=None, help="default: <checkpoint folder>/eval")
    ev.add_argument("--roi", type=int, nargs=3, default=None, help="sliding-window roi (default: the run's)")
    ev.add_argument("--overlap", type=float, default=None,
                    help="sliding-window overlap, a fraction of the roi in [0, 1) (default: the run's)")
    ev.add_argument("--sw-batch-size", type=int, default=None,
                    help="windows per network call (default: the run's)")
    ev.add_argument("--blend", choices=BLENDS, default=None,
                    help="how overlapping windows combine (default: the run's)")
    ev.add_argument("--flip-tta", action="store_true", help="average over the 8 flips of the spatial axes")
    relabel = ev.add_mutually_exclusive_group()
    relabel.add_argument("--relabel-small", type=int, nargs=3, metavar=("CLASS", "INTO", "MIN_VOXELS"),
                         default=None,
                         help="a case predicting fewer than MIN_VOXELS of channel CLASS gets them as INTO (BraTS "
                              "post-processing: 3 2 500 for MSD labels, 2 0 500 for TC/WT/ET regions)")
    relabel.add_argument("--no-relabel-small", action="store_true",
                         help="no post-processing, even where the run's val.relabel_small sets it")
    empty = ev.add_mutually_exclusive_group()
    empty.add_argument("--score-empty", action="store_true",
                       help="classes empty on a side scored as BraTS does: Dice 1 and distance 0 when both sides are "
                            "empty, else Dice 0 and the volume's diagonal")
    empty.add_argument("--no-score-empty", action="store_true",
                       help="such classes have no Dice or distance (MONAI's defaults), even where the run's "
                            "val.ignore_empty is false")
    ev.add_argument("--no-hd95", action="store_true", help="skip HD95")
    ev.add_argument("--msd", action="store_true",
                    help="the mean surface distance too (as DSD reports; in mm where the data has a voxel size)")
    ev.add_argument("--max-cases", type=int, default=None, help="score only the first N cases of the split")
    ev.add_argument("--save-predictions", action="store_true", help="write predictions as NIfTI")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda")

    prof = sub.add_parser("profile", help="the memory a config's training step needs, counted on the meta device",
                          description="The activations a training step of the config's network saves for backward "
                                      "(fused layers as on a GPU), its parameters, gradients and optimizer state, "
                                      "and the bytes its forward and backward write, counted on the meta device: "
                                      "no GPU needed, any size. Trailing key=value pairs override the config; "
                                      "backend=torch counts the plain compositions instead of the fused layers.")
    prof.add_argument("--config", required=True, help="a YAML file, or a name in configs/ (e.g. segformer3d_brats)")
    prof.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                      help="fp32, or the autocast dtype (default: the config's train.amp)")
    prof.add_argument("--batch", type=_positive_int, default=None,
                      help="default: data.batch_size (times data.num_samples for MSD crops)")
    prof.add_argument("--size", type=_size_token, nargs="+", default=None,
                      help="D H W, or one side (default: data.spatial_size)")
    prof.add_argument("--max-memory", type=_positive_gib, default=None,
                      help="GiB: also search the largest cube side whose estimate fits")
    prof.add_argument("overrides", nargs="*", help="config overrides section.key=value")

    from fastseg3d import convert

    convert.add_arguments(sub.add_parser("convert", help="convert checkpoints to and from the official layouts"))
    sub.add_parser("bench", help="the benchmark suite: fastseg3d bench ops|model [--case NAME] [--dtype ...] "
                                 "[--json [PATH]] (see bench/README.md)")

    # key=value overrides may come anywhere after the subcommand, between options too (argparse alone takes them
    # as one run of positionals)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fastseg3d.backends import environment_error

    if environment_error():
        return _error(environment_error())
    if args.command == "info":
        from fastseg3d.info import main as info_main

        return info_main()
    missing = _missing_train_modules() if args.command in ("train", "eval", "profile") else []
    if missing:
        return _error(f"fastseg3d {args.command} needs the training extra ({', '.join(missing)} not importable): "
                      "pip install 'fastseg3d[train]'")
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "profile":
        return _profile(args)
    return convert.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
