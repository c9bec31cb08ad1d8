"""Training configuration: one YAML file per experiment, defaults for every key, ``key=value`` overrides.

A config is a nested dictionary with the sections below (every key has a default, so a YAML file states only what
differs). ``load_config`` merges a file over :data:`DEFAULTS`, applies command-line overrides such as
``optimizer.lr=3e-4`` or ``data.spatial_size=[96,96,96]`` (values parsed as YAML), and rejects unknown keys, so a typo
fails at once instead of being ignored for a whole run. Values are checked against their default's type (a boolean
takes YAML's true/false only, a list its length and element type; :data:`_TYPES` gives the types of the keys whose
default is null) and against the value ranges of :data:`_RANGES`. The sizes and spacings of :data:`_PER_AXIS` take a
single number for all three axes (``data.spatial_size=96``). The resolved config is saved in the run directory.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "SetupError", "find_config", "load_config", "merge", "parse_overrides", "save_config"]


class SetupError(ValueError):
    """A run cannot start as asked, for a mistake seen before training starts: a config that does not fit the data
    or itself, a run folder that holds another run, a checkpoint or data folder that does not exist, a device torch
    does not see. The command line reports it in one line."""


DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    # Deterministic algorithms and no cuDNN benchmarking: a resumed run then reproduces an uninterrupted one.
    "deterministic": False,
    "device": "auto",
    "backend": None,  # auto | triton | torch; None keeps FASTSEG3D_BACKEND
    "output_dir": None,
    "model": {
        # segformer3d | mobileutr | mobileutr_l | missu | unet | dsd_unet | selfreg_unet, or a dotted path to any
        # network (monai.networks.nets.MedNeXt); kwargs go to its constructor
        "name": "segformer3d",
        "kwargs": {},
        # swap fastseg3d's depthwise convs and attention into the network (fastseg3d.convert_model with its
        # defaults: the norms stay torch's), e.g. into a MONAI network
        "convert": False,
        # train a MONAI network (UNETR, DynUNet, SwinUNETR, VNet) or the UNet with dual self-distillation or
        # SelfReg: null | dsd | selfreg, wrapped with the layers of fastseg3d.distill.presets (loss.distill to match)
        "wrap": None,
    },
    "data": {
        "name": "synthetic",  # synthetic | msd
        "label_mode": "labels",  # labels (softmax over classes) | brats_regions (sigmoid over TC, WT, ET)
        "spatial_size": [64, 64, 64],  # synthetic volumes / training crops
        "batch_size": 2,
        "num_workers": 0,
        # synthetic
        "in_channels": 4,
        "num_train": 48,
        "num_val": 4,
        "train_seed": 1,
        "val_seed": 2,
        # msd (Medical Segmentation Decathlon task folder)
        "root": None,
        "modality": None,  # MRI | CT; None reads it from dataset.json
        "pixdim": None,
        "num_samples": 1,
        "val_frac": 0.2,
        # the MSD train/val split's own seed, apart from the run's: runs with other seeds validate on the same cases
        "split_seed": 0,
        # a JSON file of case names, {"train": [...], "val": [...]} or nnU-Net's splits_final.json (data.fold picks
        # the fold), in place of the seeded split (a published model's own split); a bare name is one of the
        # recipes' published splits (configs/splits: segformer3d_brats, dsd_unet)
        "split_file": None,
        "fold": 0,
        "cache": False,
        "flip_prob": 0.5,
        "intensity_jitter": 0.1,
        # MSD training crops centred on foreground and background voxels in this ratio; null: anywhere
        "crop_ratio": [1.0, 1.0],
        # MSD training augmentation: null (flips with flip_prob, intensity jitter) or a list of MONAI dictionary
        # transforms as a bundle writes them, [{_target_: RandFlipd, keys: [image, label], prob: 0.3}, ...]
        "augment": None,
        # MSD intensity normalisation and crop: null (the modality's: CT window or MRI z-score, then the foreground
        # crop) or a list of MONAI dictionary transforms in their place, run on whole volumes for training,
        # validation and prediction (SegFormer3D's official per-slice min-max and fixed box: segformer3d_brats)
        "preprocess": None,
    },
    "loss": {
        "name": "dice_ce",  # dice | dice_ce
        "include_background": True,
        "lambda_dice": 1.0,
        "lambda_ce": 1.0,
        # MONAI's further DiceLoss/DiceCELoss arguments for the segmentation terms (batch, squared_pred, reduction,
        # smooth_nr, smooth_dr, ...), e.g. a published recipe's Dice form
        "dice_kwargs": {},
        # none | dsd | selfreg | missu: the method's distillation loss, on the network's training output
        "distill": "none",
        "distill_kwargs": {},
    },
    "optimizer": {
        "name": "adamw",  # adamw | adam | sgd
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "betas": [0.9, 0.999],
        "momentum": 0.9,
        "nesterov": False,
        "amsgrad": False,
    },
    "scheduler": {
        # constant | warmup_cosine (one cosine from the peak) | warmup_cosine_restarts | poly | step
        "name": "warmup_cosine",
        "interval": "step",  # step | epoch: when the schedule advances
        "warmup": 0,  # in intervals; linear from lr / warmup to lr
        "min_lr": 0.0,
        "restart_period": 400,  # warmup_cosine_restarts: intervals per cosine cycle (T_0)
        "power": 0.9,  # poly
        "step_size": 100,  # step: intervals between decays
        "gamma": 0.5,  # step
    },
    "train": {
        "epochs": 10,  # passes over the training set
        "max_steps": None,  # stop early after this many optimizer steps
        "amp": "none",  # none | bf16 | fp16 (fp16 uses a gradient scaler)
        "grad_clip": None,  # max gradient norm
        "grad_accumulation": 1,
        "compile": False,  # false | true (mode "default") | a torch.compile mode, e.g. reduce-overhead
        "cuda_graph": False,  # capture the eager step (forward, loss, backward) in a CUDA graph and replay it
        "channels_last": False,
        "activation_checkpointing": False,
        "sync_batchnorm": True,  # under DDP on CUDA
        "dist_timeout_minutes": 120,  # collective timeout under DDP (rank 0 validates while the others wait)
        "log_every": 10,  # steps between train rows in metrics.jsonl
        "progress": "auto",  # auto (a bar on a terminal outside CI) | true | false
    },
    "val": {
        "every": 1,  # epochs between validations (0: never)
        "roi_size": None,  # sliding-window roi; None: data.spatial_size
        "overlap": 0.5,
        "sw_batch_size": 1,
        "blend": "gaussian",  # gaussian | constant | first
        "flip_tta": False,
        # [class, into, min_voxels]: in a case predicting fewer than min_voxels of channel `class`, those voxels
        # become channel `into` (TransBTS/MISSU: enhancing tumour under 500 voxels -> non-enhancing); null: off
        "relabel_small": None,
        # a class absent from a case's label has no Dice, one absent from either side no distance (MONAI's
        # defaults); false: scored as BraTS does (Dice 1 and distance 0 when both sides are empty, else Dice 0 and
        # the volume's diagonal)
        "ignore_empty": True,
        "hd95": False,
        "msd": False,  # mean surface distance (MONAI's SurfaceDistanceMetric), as DSD reports
        "max_cases": None,
        "num_images": 2,  # validation cases drawn as orthogonal slices (PNG)
    },
    "checkpoint": {
        "save_every": 1,  # epochs between checkpoint_latest.pt writes
        # a new best after this epoch is also written to checkpoint_best_after.pt, which then holds the best model
        # as of the last epoch that improved on every earlier one (SegFormer3D's post-cutoff folder, epoch 400)
        "best_after_epoch": None,
    },
}


_FREE_FORM = ("model.kwargs", "loss.dice_kwargs", "loss.distill_kwargs")
# Keys that take null or a list of anything (checked when the run is set up)
_FREE_LISTS = ("data.augment", "data.preprocess")


class _Replace(dict):
    """A mapping given whole on the command line (``model.kwargs={...}``): it replaces the section."""


def merge(base: Mapping, update: Mapping, path: str = "") -> dict:
    """Recursive merge of ``update`` over ``base``; unknown keys raise ``KeyError`` naming the dotted path.

    Free-form sections (``model.kwargs``, ``loss.dice_kwargs``, ``loss.distill_kwargs``) take any keys.
    """
    out = copy.deepcopy(dict(base))
    free = path.rstrip(".") in _FREE_FORM
    for key, value in update.items():
        dotted = f"{path}{key}"
        if key not in out and not free:
            raise KeyError(f"unknown config key {dotted!r}; known keys here: {sorted(out)}")
        if dotted in _FREE_LISTS and not free:
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"config key {dotted!r} must be null or a list, got {value!r}")
            out[key] = copy.deepcopy(list(value) if value is not None else None)
        elif free or (isinstance(value, _Replace) and dotted in _FREE_FORM):
            out[key] = copy.deepcopy(dict(value) if isinstance(value, _Replace) else value)
        elif isinstance(out[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {dotted!r} must be a mapping, got {value!r}")
            out[key] = merge(out[key], value, dotted + ".")
        else:
            out[key] = _typed(out[key], value, dotted)
    return out


# The values a key takes when its default does not show them, as prototypes checked like defaults (None: null).
_TYPES: dict[str, tuple[Any, ...]] = {
    "backend": (None, ""),
    "model.wrap": (None, ""),
    "output_dir": (None, ""),
    "data.root": (None, ""),
    "data.split_file": (None, ""),
    "data.modality": (None, ""),
    "data.pixdim": (None, [1.0, 1.0, 1.0]),
    "data.crop_ratio": (None, [1.0, 1.0]),
    "train.max_steps": (None, 1),
    "train.grad_clip": (None, 1.0),
    "train.progress": ("auto", True),
    "train.compile": (False, "default"),
    "val.roi_size": (None, [1, 1, 1]),
    "val.max_cases": (None, 1),
    "val.relabel_small": (None, [0, 0, 1]),
    "checkpoint.best_after_epoch": (None, 1),
}
# One value per spatial axis: a single number stands for all three.
_PER_AXIS = ("data.spatial_size", "data.pixdim", "val.roi_size")
# Intervals of the numbers (each element of a list) that a key takes.
_RANGES: dict[str, str] = {
    "seed": "[0, 1e19)",  # the seeds within torch's 64 bits
    "data.train_seed": "[0, 1e19)",
    "data.val_seed": "[0, 1e19)",
    "data.spatial_size": "[1, inf)",
    "data.batch_size": "[1, inf)",
    "data.num_workers": "[0, inf)",
    "data.in_channels": "[1, inf)",
    "data.num_train": "[1, inf)",
    "data.num_val": "[1, inf)",
    "data.pixdim": "(0, inf)",
    "data.num_samples": "[1, inf)",
    "data.val_frac": "(0, 1)",
    "data.split_seed": "[0, 1e19)",
    "data.fold": "[0, inf)",
    "data.flip_prob": "[0, 1]",
    "data.intensity_jitter": "[0, inf)",
    "data.crop_ratio": "[0, inf)",
    "loss.lambda_dice": "[0, inf)",
    "loss.lambda_ce": "[0, inf)",
    "optimizer.lr": "(0, inf)",
    "optimizer.weight_decay": "[0, inf)",
    "optimizer.betas": "[0, 1)",
    "optimizer.momentum": "[0, inf)",
    "scheduler.warmup": "[0, inf)",
    "scheduler.min_lr": "[0, inf)",
    "scheduler.restart_period": "[1, inf)",
    "scheduler.power": "[0, inf)",
    "scheduler.step_size": "[1, inf)",
    "scheduler.gamma": "(0, inf)",
    "train.epochs": "[1, inf)",
    "train.max_steps": "[1, inf)",
    "train.grad_clip": "(0, inf]",
    "train.grad_accumulation": "[1, inf)",
    "train.dist_timeout_minutes": "(0, inf)",
    "train.log_every": "[1, inf)",
    "val.every": "[0, inf)",
    "val.roi_size": "[1, inf)",
    "val.overlap": "[0, 1)",
    "val.sw_batch_size": "[1, inf)",
    "val.max_cases": "[1, inf)",
    "val.relabel_small": "[0, inf)",
    "val.num_images": "[0, inf)",
    "checkpoint.save_every": "[1, inf)",
    "checkpoint.best_after_epoch": "[0, inf)",
}
_MISMATCH = object()


def _choices() -> dict[str, tuple]:
    """The values each enumerated key takes (the lists live with the code that acts on them)."""
    from fastseg3d.backends import BACKENDS
    from fastseg3d.train.builders import MODELS, OPTIMIZERS, SCHEDULERS
    from fastseg3d.train.inference import BLENDS
    from fastseg3d.train.trainer import _AMP, _COMPILE_MODES

    return {
        "backend": (None, "", *BACKENDS),
        "model.name": MODELS,
        "model.wrap": (None, "dsd", "selfreg"),
        "data.name": ("synthetic", "msd"),
        "data.label_mode": ("labels", "brats_regions"),
        "loss.name": ("dice", "dice_ce"),
        "loss.distill": ("none", "dsd", "selfreg", "missu"),
        "optimizer.name": OPTIMIZERS,
        "scheduler.name": SCHEDULERS,
        "scheduler.interval": ("step", "epoch"),
        "train.amp": tuple(_AMP),
        "train.compile": (False, True, *_COMPILE_MODES),
        "train.progress": ("auto", True, False),
        "val.blend": BLENDS,
    }


def check_choices(cfg: Mapping) -> None:
    """``ValueError`` naming the key whose value is none of those it takes (see :func:`_choices`)."""
    for dotted, allowed in _choices().items():
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part, _MISMATCH) if isinstance(node, Mapping) else _MISMATCH
        if dotted == "backend" and isinstance(node, str):  # read as fastseg3d.backend() reads it
            node = node.strip().lower()
        if dotted == "model.name" and isinstance(node, str) and "." in node:
            continue  # a dotted path to a network, imported when the run is set up
        # True == 1 and False == 0 in a tuple's `in`: compare types too
        if node is not _MISMATCH and not any(node == a and type(node) is type(a) for a in allowed):
            shown = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else repr(a)
                              for a in allowed if a != "")
            if dotted == "model.name":
                shown += " or a dotted path to a network (monai.networks.nets.MedNeXt)"
            raise ValueError(f"config key {dotted!r} must be one of {shown}, got {node!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(proto: Any, dotted: str) -> str:
    if proto is None:
        return "null"
    if isinstance(proto, bool):
        return "true or false"
    if isinstance(proto, int):
        return "an integer"
    if isinstance(proto, float):
        return "a number"
    if isinstance(proto, str):
        return "a string"
    kind = "integers" if isinstance(proto[0], int) else "numbers"
    return f"a list of {len(proto)} {kind}" + (f" (or {_describe(proto[0], dotted)} for all)" if dotted in _PER_AXIS
                                               else "")


def _converted(proto: Any, value: Any, dotted: str) -> Any:
    """``value`` as the type of ``proto`` (integers from integral floats, floats from integers, lists from tuples),
    or ``_MISMATCH``."""
    if proto is None:
        return None if value is None else _MISMATCH
    if isinstance(proto, bool):
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(proto, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if isinstance(proto, float):
        return float(value) if _is_number(value) else _MISMATCH
    if isinstance(proto, str):
        return value if isinstance(value, str) else _MISMATCH
    if dotted in _PER_AXIS and _is_number(value):
        value = [value] * len(proto)
    if not isinstance(value, (list, tuple)) or len(value) != len(proto):
        return _MISMATCH
    items = [_converted(p, v, dotted) for p, v in zip(proto, value)]
    return _MISMATCH if any(item is _MISMATCH for item in items) else items


def _in_range(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(", "))
    above = value >= low if interval[0] == "[" else value > low
    return above and (value <= high if interval[-1] == "]" else value < high)


def _typed(default: Any, value: Any, dotted: str) -> Any:
    """``value`` checked against the type of ``default`` (or the key's :data:`_TYPES`) and the key's
    :data:`_RANGES`; ``ValueError`` naming the key when it does not fit."""
    protos = _TYPES.get(dotted, (default,))
    for proto in protos:
        converted = _converted(proto, value, dotted)
        if converted is not _MISMATCH:
            break
    else:
        kinds = " or ".join(_describe(proto, dotted) for proto in protos)
        raise ValueError(f"config key {dotted!r} must be {kinds}, got {value!r}")
    interval = _RANGES.get(dotted)
    numbers = converted if isinstance(converted, list) else [converted]
    if interval and any(_is_number(x) and not _in_range(x, interval) for x in numbers):
        low, high = interval[1:-1].split(", ")
        bounds = f"{'>=' if interval[0] == '[' else '>'} {low}" if high == "inf" else f"in {interval}"
        what = "values" if isinstance(converted, list) else "value"
        raise ValueError(f"config key {dotted!r} {what} must be {bounds}, got {value!r}")
    return copy.deepcopy(converted)


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a dependency
        raise ImportError('reading configs needs PyYAML: pip install "fastseg3d[train]"') from err
    return yaml


def _yaml_error(err) -> str:
    """PyYAML's error on one line, as the CLI prints errors: the problem and where (its message quotes the
    surrounding lines)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem:
        return " ".join(str(err).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _loader():
    """PyYAML's safe loader with YAML 1.2 floats and booleans: "1e-4" is a number, not the string YAML 1.1 makes of
    it, and only true/false are booleans (YAML 1.1's yes/no/on/off are strings, which a boolean key refuses by
    name, rather than a silent ``train.amp=no`` read as False)."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of two equal keys: a section or key written twice is a mistake to name
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark, f"the key {key!r} is given twice",
                            key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = {
        k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:bool"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
        list("-+0123456789."))
    return Loader


def parse_overrides(items: Sequence[str]) -> dict:
    """``["optimizer.lr=3e-4", "train.amp=bf16"]`` -> nested dict; values are parsed as YAML.

    A dotted key sets one value (``model.kwargs.depths=[1,1,1,1]``); a mapping replaces a free-form section
    (``model.kwargs``, ``loss.dice_kwargs``, ``loss.distill_kwargs``) whole (``model.kwargs={channels: [8, 16, 32]}``)
    and sets the keys it names in any other (``optimizer={lr: 0.1}`` keeps the optimizer's name).
    """
    yaml = _yaml()
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            value = yaml.load(raw, Loader=_loader()) if raw else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: its value is not valid YAML ({_yaml_error(err)})") from None
        if isinstance(value, dict):
            value = _Replace(value)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # an earlier override set a value where this one needs a section
                raise ValueError(f"override {item!r} conflicts with the earlier override of "
                                 f"{'.'.join(parts[:i + 1])!r}")
        node[parts[-1]] = value
    return out


def _recipe_folders() -> tuple[Path, Path]:
    # the repository's configs/ in a source checkout, fastseg3d/configs in an installed wheel
    package = Path(__file__).resolve().parents[1]
    return package.parent / "configs", package / "configs"


def find_split_file(name: str | os.PathLike) -> Path:
    """A split file's path as given, or a bare name (``segformer3d_brats``, no folder) looked up among the recipes'
    published splits (``<recipes>/splits/<name>.json``); anything else is returned as given (a path that does not
    exist is the loader's error, never a published split of the same name)."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    for folder in _recipe_folders():
        for candidate in (folder / "splits" / path.name, folder / "splits" / f"{path.name}.json"):
            if candidate.is_file():
                return candidate
    return path


def find_config(name: str | os.PathLike) -> Path:
    """A config path as given, or a bare name (``quickstart``) looked up among the recipes: the repository's
    ``configs/`` in a source checkout, ``fastseg3d/configs`` in an installed wheel."""
    path = Path(name)
    if path.is_file():
        return path
    places = _recipe_folders()
    for folder in places:
        for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"config {str(name)!r} not found (nor as <recipes>/{path.name}[.yaml] in "
                            f"{' or '.join(str(f) for f in places)})")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the YAML file (if any), then the overrides."""
    yaml = _yaml()
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        file = find_config(path)
        try:
            loaded = yaml.load(file.read_text(), Loader=_loader()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {file} is not valid YAML: {_yaml_error(err)}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"config {file} is not a text file ({err.reason} at byte {err.start})") from err
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config {file} must hold a mapping at the top level")
        cfg = merge(cfg, loaded)
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    check_choices(cfg)
    return cfg


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    yaml = _yaml()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    os.replace(tmp, path)
