"""From a config to the objects of a run: datasets, network, objective, optimizer and schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastseg3d.train.config import SetupError, find_split_file

__all__ = [
    "MODELS",
    "DataBundle",
    "Objective",
    "build_data",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_scheduler",
    "data_channels",
    "enable_activation_checkpointing",
    "model_kwargs",
    "output_mode",
]


def _models() -> dict:
    from fastseg3d import networks

    return {
        "segformer3d": networks.SegFormer3D,
        "mobileutr": networks.MobileUtr,
        "mobileutr_l": networks.MobileUtrL,
        "missu": networks.MISSU,
        "unet": networks.UNet,
        "dsd_unet": networks.dsd_unet,
        "selfreg_unet": networks.selfreg_unet,
    }


MODELS = ("segformer3d", "mobileutr", "mobileutr_l", "missu", "unet", "dsd_unet", "selfreg_unet")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "warmup_cosine", "warmup_cosine_restarts", "poly", "step")

_REGIONS = ("TC", "WT", "ET")  # BraTS' regions (sigmoid outputs) in the order of the released models
# The distillation loss each network's training output is made for.
_DISTILL_FOR = {"dsd_unet": "dsd", "selfreg_unet": "selfreg", "missu": "missu"}


@dataclass
class DataBundle:
    """Training and validation datasets and what the network needs to know about them."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    in_channels: int
    out_channels: int
    mode: str  # "softmax" (label maps) or "sigmoid" (multi-label regions)
    class_names: tuple[str, ...]
    collate: Any = None


def build_data(cfg: Mapping, *, training: bool = True) -> DataBundle:
    """The datasets of ``cfg["data"]``: the embedded synthetic volumes or a Medical Segmentation Decathlon folder.

    With ``training`` (the default) the sizes a run needs are checked here, before any epoch: at least one optimizer
    step of training cases (``data.batch_size`` x ``train.grad_accumulation``) and, unless ``val.every`` is 0, at
    least one validation case. ``training=False`` (evaluation) skips those checks.

    Raises:
        ValueError: a bad data config, or (``training``) too few cases; the message names the keys to change.
    """
    data = cfg["data"]
    label_mode = data["label_mode"]
    mode = output_mode(label_mode)
    if data["name"] == "synthetic":
        from fastseg3d.data.synthetic import CLASS_NAMES, SyntheticSegmentation

        # the synthetic volumes are drawn whole and augmented by their own generator (a recipe tried on them keeps
        # its MSD settings)
        ignored = [key for key, default in (("crop_ratio", [1.0, 1.0]), ("augment", None), ("preprocess", None),
                                            ("split_file", None)) if data[key] != default]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            warnings.warn(f"{', '.join('data.' + k for k in ignored)} {verb} to data.name=msd; the synthetic "
                          "volumes have their own normalisation, augmentation and train/val sets", stacklevel=2)

        common = dict(spatial_size=data["spatial_size"], in_channels=data["in_channels"], label_mode=label_mode,
                      cache=bool(data["cache"]))
        try:
            train = SyntheticSegmentation(data["num_train"], seed=data["train_seed"], augment=True, **common)
            val = SyntheticSegmentation(data["num_val"], seed=data["val_seed"], augment=False, **common)
        except ValueError as err:  # its arguments are the data section's keys of the same names
            raise ValueError(f"data.{err}") from None
        if training:
            _check_split_sizes(cfg, len(train), len(val), f"data.num_train={len(train)}, data.num_val={len(val)}",
                               "raise data.num_train", "raise data.num_val")
        names = CLASS_NAMES if mode == "softmax" else _REGIONS
        return DataBundle(train, val, data["in_channels"], train.num_classes, mode, tuple(names))
    if data["name"] == "msd":
        if not data["root"]:
            raise SetupError("data.root must name a Medical Segmentation Decathlon task folder for data.name=msd")
        from monai.data import list_data_collate

        from fastseg3d.data.msd import build_msd_datasets, build_transforms, infer_modality, load_msd_datalist

        if data["crop_ratio"] is not None and not sum(data["crop_ratio"]) > 0:
            raise SetupError(f"data.crop_ratio={data['crop_ratio']}: foreground and background both 0 (null: crops "
                             "centred anywhere)")
        for key in ("augment", "preprocess"):
            if data[key] is not None:
                try:
                    build_transforms(data[key], f"data.{key}")
                except ValueError as err:
                    raise SetupError(str(err)) from err

        props, _ = load_msd_datalist(data["root"])
        modality = data["modality"] or infer_modality(props)
        train, val, props = build_msd_datasets(
            data["root"], modality=modality, spatial_size=data["spatial_size"], pixdim=data["pixdim"],
            label_mode=label_mode, num_samples=data["num_samples"], val_frac=data["val_frac"], seed=data["split_seed"],
            cache=data["cache"], flip_prob=data["flip_prob"], intensity_jitter=data["intensity_jitter"],
            crop_ratio=data["crop_ratio"], augment=data["augment"], preprocess=data["preprocess"],
            split_file=find_split_file(data["split_file"]) if data["split_file"] else None,
            fold=data["fold"], split_sides=("train", "val") if training else ("val",))
        if training:
            counts = (f"data.root={data['root']} lists {len(train) + len(val)} case(s) in dataset.json: {len(train)} "
                      f"for training, {len(val)} for validation ("
                      + (f"data.split_file={data['split_file']}, data.fold={data['fold']})" if data["split_file"]
                         else f"data.val_frac={data['val_frac']})"))
            more_train, more_val = (("list more training cases in data.split_file", "list a validation case in "
                                     "data.split_file") if data["split_file"] else
                                    ("add cases to dataset.json or lower data.val_frac",
                                     "add cases to dataset.json (2 or more)"))
            _check_split_sizes(cfg, len(train), len(val), counts, more_train, more_val)
        in_channels, names = _msd_channels(props, mode)
        return DataBundle(train, val, in_channels, len(names), mode, names, collate=list_data_collate)
    raise SetupError(f"data.name must be 'synthetic' or 'msd', got {data['name']!r}")


def _check_split_sizes(cfg: Mapping, num_train: int, num_val: int, counts: str, more_train: str,
                       more_val: str) -> None:
    """Too few cases fail here, not after an epoch without a batch or at a validation without cases; ``counts``
    says where the numbers come from, ``more_train`` and ``more_val`` how to get more cases."""
    batch, accum = int(cfg["data"]["batch_size"]), int(cfg["train"]["grad_accumulation"])
    if num_train < batch * accum:
        keys = "data.batch_size" + (" or train.grad_accumulation" if accum > 1 else "")
        step = f"data.batch_size={batch}" + (f" x train.grad_accumulation={accum}" if accum > 1 else "")
        raise SetupError(f"{counts}; one optimizer step needs {step} training cases: lower {keys}, or {more_train}")
    every = int(cfg["val"]["every"])
    if num_val == 0 and every > 0:
        raise SetupError(f"{counts}; val.every={every} needs at least one validation case: {more_val}, or set "
                         "val.every=0 to train without validation")


def output_mode(label_mode: str) -> str:
    """The network's output activation for ``data.label_mode``: "softmax" (labels) or "sigmoid" (BraTS regions).

    Raises:
        ValueError: any other label mode.
    """
    if label_mode not in ("labels", "brats_regions"):
        raise SetupError(f"data.label_mode must be 'labels' or 'brats_regions', got {label_mode!r}")
    return "softmax" if label_mode == "labels" else "sigmoid"


def _msd_channels(props: Mapping, mode: str) -> tuple[int, tuple[str, ...]]:
    """(input channels, class names) of an MSD task's ``dataset.json`` properties."""
    from fastseg3d.data.msd import label_names, num_input_channels

    return num_input_channels(props), label_names(props) if mode == "softmax" else _REGIONS


def data_channels(cfg: Mapping) -> tuple[int, int] | None:
    """(input channels, output channels) that ``cfg["data"]`` gives a network, without building its datasets; None
    for an MSD config whose ``root`` is not set."""
    data = cfg["data"]
    mode = output_mode(data["label_mode"])
    if data["name"] == "synthetic":
        from fastseg3d.data.synthetic import CLASS_NAMES

        return data["in_channels"], len(CLASS_NAMES) if mode == "softmax" else len(_REGIONS)
    if not data["root"]:
        return None
    from fastseg3d.data.msd import load_msd_datalist

    in_channels, names = _msd_channels(load_msd_datalist(data["root"])[0], mode)
    return in_channels, len(names)


def _network(name: str):
    """The constructor ``model.name`` names: one of :data:`MODELS`, or a dotted path to any callable."""
    if name in MODELS:
        return _models()[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise SetupError(f"model.name must be one of {MODELS} or a dotted path to a network, got {name!r}")
    import importlib

    try:
        ctor = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise SetupError(f"model.name={name}: cannot import it ({err})") from err
    if not callable(ctor):
        raise SetupError(f"model.name={name} is not a class or function")
    return ctor


def _takes(ctor, key: str) -> bool:
    import inspect

    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_kwargs(model_cfg: Mapping, in_channels: int | None = None, out_channels: int | None = None) -> dict:
    """``model_cfg["kwargs"]`` with the data's channels where the constructor takes them (a channel count the
    kwargs give must be the data's)."""
    name = model_cfg["name"]
    ctor = _network(name)
    kwargs = dict(model_cfg.get("kwargs") or {})
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value is None or not (name in MODELS or _takes(ctor, key)):
            continue
        if key in kwargs and kwargs[key] != value:
            raise SetupError(f"model.kwargs.{key}={kwargs[key]} but the data has {value}")
        kwargs[key] = value
    return kwargs


def build_model(model_cfg: Mapping, in_channels: int | None = None, out_channels: int | None = None) -> nn.Module:
    """The network ``model_cfg["name"]`` (one of :data:`MODELS`, or a dotted path such as
    ``monai.networks.nets.MedNeXt``) with :func:`model_kwargs`. With ``model_cfg["convert"]`` fastseg3d's fused
    layers are swapped in (:func:`fastseg3d.convert_model`); with ``model_cfg["wrap"]`` (``"dsd"``, ``"selfreg"``)
    the network is wrapped in :class:`fastseg3d.distill.DSD` / :class:`~fastseg3d.distill.SelfReg` with the layers
    of its preset (:func:`fastseg3d.distill.presets.layers_for`)."""
    name = model_cfg["name"]
    ctor = _network(name)
    kwargs = model_kwargs(model_cfg, in_channels, out_channels)
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    try:
        model = ctor(**kwargs)
    except (TypeError, ValueError) as err:  # an unknown or ill-typed argument, a value the network refuses
        raise SetupError(f"model.name={name} with model.kwargs {kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise SetupError(f"model.name={name} made a {type(model).__name__}, not a torch.nn.Module")
    if model_cfg.get("convert"):
        import fastseg3d

        fastseg3d.convert_model(model)
    wrap = model_cfg.get("wrap")
    if wrap:
        model = _wrap(model, wrap, name, out_channels if out_channels is not None else kwargs.get("out_channels"))
    return model


def _wrap(model: nn.Module, method: str, name: str, num_classes: int | None) -> nn.Module:
    from fastseg3d.distill import DSD, SelfReg, presets

    if name in _DISTILL_FOR:
        raise SetupError(f"model.wrap={method}: model.name={name} is already built for loss.distill="
                         f"{_DISTILL_FOR[name]!r}")
    try:
        layers = presets.layers_for(model, method)
        if method == "dsd":
            if num_classes is None:
                raise ValueError("DSD's heads need the network's output channels (model.kwargs.out_channels)")
            return DSD(model, num_classes=num_classes, **layers)
        return SelfReg(model, **layers)
    except (TypeError, ValueError) as err:
        raise SetupError(f"model.wrap={method} on model.name={name}: {err}") from err


def _setup(cls, key: str, *args, **kwargs):
    """``cls(*args, **kwargs)``, where a refused argument is a ``SetupError`` naming the config key that gave it."""
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise SetupError(f"{key}: {cls.__name__} refuses {kwargs}: {err}") from err


class Objective(nn.Module):
    """Segmentation loss plus the method's distillation loss, on whatever the network returns in training.

    ``forward(output, target) -> (loss, terms)`` where ``terms`` maps each part's name to a detached scalar for
    logging. In eval every network returns logits and the objective is the segmentation loss alone.

    Under autocast only the logits that MONAI's segmentation losses read are cast to fp32 (those losses compute in
    their input's dtype); fastseg3d's DiceCE (the loss on label maps) and the fused distillation losses take
    logits, features and heads as they are, compute in fp32 and keep each gradient in its input's dtype. (DSD's
    nine outputs at 2 x 14 x 128^3 are about 2 GB in fp32: no head is copied, and no gradient is saved in fp32.)
    """

    def __init__(self, loss_cfg: Mapping, mode: str, num_classes: int) -> None:
        super().__init__()
        from monai.losses import DiceCELoss as MONAIDiceCELoss
        from monai.losses import DiceLoss

        from fastseg3d.losses import DiceCELoss

        name, distill = loss_cfg["name"], loss_cfg["distill"]
        if mode == "sigmoid" and not loss_cfg["include_background"]:
            raise SetupError("loss.include_background=false with sigmoid regions would drop the first region (TC): "
                             "every region is foreground, keep it true")
        dice_kwargs = dict(loss_cfg["dice_kwargs"] or {})
        named = sorted(set(dice_kwargs) & {"include_background", "lambda_dice", "lambda_ce", "to_onehot_y", "softmax",
                                            "sigmoid"})
        if named:
            raise SetupError(f"loss.dice_kwargs cannot set {', '.join(named)}: loss.name, loss.include_background, "
                             "loss.lambda_dice, loss.lambda_ce and data.label_mode say those")
        common = dict(include_background=loss_cfg["include_background"], sigmoid=True, **dice_kwargs)
        if name not in ("dice", "dice_ce"):
            raise SetupError(f"loss.name must be 'dice' or 'dice_ce', got {name!r}")
        if mode == "softmax":
            # MONAI's DiceCE (Dice alone: lambda_ce = 0) on label maps, keeping only the logits and the label for
            # backward; it takes half-precision logits as they are, where MONAI's losses compute in their input's
            # dtype
            dice_only = name == "dice"
            self.segmentation = _setup(DiceCELoss, "loss.dice_kwargs", loss_cfg["include_background"],
                                       to_onehot_y=True, softmax=True,
                                       lambda_dice=1.0 if dice_only else loss_cfg["lambda_dice"],
                                       lambda_ce=0.0 if dice_only else loss_cfg["lambda_ce"], **dice_kwargs)
        elif name == "dice":
            self.segmentation = _setup(DiceLoss, "loss.dice_kwargs", **common)
        else:
            self.segmentation = _setup(MONAIDiceCELoss, "loss.dice_kwargs", **common,
                                       lambda_dice=loss_cfg["lambda_dice"], lambda_ce=loss_cfg["lambda_ce"])
        kwargs = dict(loss_cfg["distill_kwargs"] or {})
        self.distill_name = distill
        if distill == "none":
            self.distill = None
            if kwargs:  # a recipe's settings with its distillation switched off (an ablation): said, not an error
                warnings.warn(f"loss.distill_kwargs ({', '.join(sorted(kwargs))}) apply to a distillation loss; "
                              "loss.distill=none takes none", stacklevel=2)
        elif distill == "dsd":
            from fastseg3d.losses import DSDLoss

            if mode != "softmax":
                raise SetupError("loss.distill=dsd needs label maps (data.label_mode=labels): DSD's KL is a softmax")
            # its segmentation terms are the same loss as self.segmentation (Dice alone for loss.name=dice)
            seg = self.segmentation
            self.distill = _setup(DSDLoss, "loss.dice_kwargs and loss.distill_kwargs", num_classes,
                                  include_background=loss_cfg["include_background"], lambda_dice=seg.lambda_dice,
                                  lambda_ce=seg.lambda_ce, dice_ce_kwargs=dice_kwargs, **kwargs)
        elif distill == "selfreg":
            from fastseg3d.losses import SelfRegLoss

            # The channel draws use torch's global generator, whose state checkpoints save and restore.
            self.distill = SelfRegLoss(include_segmentation=False, **kwargs)
        elif distill == "missu":
            from fastseg3d.losses import MISSUDistillLoss

            self.distill = MISSUDistillLoss(**kwargs)
        else:
            raise SetupError(f"loss.distill must be none, dsd, selfreg or missu, got {distill!r}")

    @staticmethod
    def logits(output) -> torch.Tensor:
        """The main logits of a network's output (a tensor, or the first element of a training tuple)."""
        return output if isinstance(output, torch.Tensor) else output[0]

    def _segmentation(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from fastseg3d.losses import DiceCELoss
        from fastseg3d.losses._common import full_precision

        # MONAI's composition (a setting the fused loss does not take) computes in its input's dtype: fp32 it
        lean = isinstance(self.segmentation, DiceCELoss) and self.segmentation.fused
        return self.segmentation(logits if lean else full_precision(logits), target)

    def forward(self, output, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(output, torch.Tensor) or self.distill is None:
            loss = self._segmentation(self.logits(output), target)
            return loss, {"segmentation": loss.detach()}
        if self.distill_name == "dsd":
            terms = self.distill.terms(output, target)  # its DiceCE terms cast the logits they read
            loss = terms["dice_ce"] + self.distill.kl_weight * (terms["kl_decoder"] + terms["kl_encoder"])
            return loss, {k: v.detach() for k, v in terms.items()}
        seg = self._segmentation(self.logits(output), target)
        if self.distill_name == "selfreg":
            kd = self.distill(output)
        else:
            pairs = output[1]
            kd = self.distill([s for s, _ in pairs], [t for _, t in pairs])
        return seg + kd, {"segmentation": seg.detach(), "distill": kd.detach()}


def build_objective(cfg: Mapping, mode: str, num_classes: int) -> Objective:
    """The objective of ``cfg["loss"]`` for a network with ``num_classes`` outputs (``mode``: "softmax" or
    "sigmoid"); checks that the distillation loss fits the network's training output."""
    distill, model = cfg["loss"]["distill"], cfg["model"]["name"]
    expected = cfg["model"].get("wrap") or _DISTILL_FOR.get(model, "none")
    if distill != expected and not (model == "missu" and distill == "none"):
        wrapped = f" with model.wrap={expected}" if cfg["model"].get("wrap") else ""
        raise SetupError(f"loss.distill={distill!r} does not fit model.name={model!r}{wrapped} (its training output "
                         f"is made for loss.distill={expected!r})")
    return Objective(cfg["loss"], mode, num_classes)


def build_optimizer(params, opt_cfg: Mapping) -> torch.optim.Optimizer:
    name, lr, wd = opt_cfg["name"], float(opt_cfg["lr"]), float(opt_cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(opt_cfg["betas"]),
                                 amsgrad=opt_cfg["amsgrad"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=tuple(opt_cfg["betas"]),
                                amsgrad=opt_cfg["amsgrad"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=opt_cfg["momentum"],
                               nesterov=opt_cfg["nesterov"])
    raise SetupError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def schedule_factor(sched_cfg: Mapping, base_lr: float, total: int):
    """The multiplier of the base learning rate after ``t`` intervals (``total`` intervals in the run)."""
    name = sched_cfg["name"]
    warmup = int(sched_cfg["warmup"])
    floor = float(sched_cfg["min_lr"]) / base_lr if base_lr > 0 else 0.0
    if name not in SCHEDULERS:
        raise SetupError(f"scheduler.name must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    if name in ("warmup_cosine", "warmup_cosine_restarts") and float(sched_cfg["min_lr"]) > base_lr:
        # the cosine would climb from the learning rate to the floor
        raise SetupError(f"scheduler.min_lr ({sched_cfg['min_lr']}) must not exceed optimizer.lr ({base_lr}) "
                         f"for the {name} schedule")

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        s = t - warmup
        if name == "constant":
            return 1.0
        if name == "warmup_cosine":
            span = max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
        if name == "warmup_cosine_restarts":
            period = int(sched_cfg["restart_period"])
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s % period) / period))
        if name == "poly":
            return max(0.0, 1 - t / max(1, total)) ** float(sched_cfg["power"])
        return float(sched_cfg["gamma"]) ** (s // int(sched_cfg["step_size"]))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Mapping, total: int):
    """A ``LambdaLR`` over ``total`` intervals (steps or epochs, as ``sched_cfg["interval"]`` says)."""
    if sched_cfg["interval"] not in ("step", "epoch"):
        raise SetupError(f"scheduler.interval must be 'step' or 'epoch', got {sched_cfg['interval']!r}")
    factor = schedule_factor(sched_cfg, optimizer.param_groups[0]["lr"], total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute, in backward, the activations of every outermost block of ``model``; returns how many.

    A block is a module whose class name ends in ``Block`` (the transformer and conv blocks of fastseg3d's
    networks). Non-reentrant checkpointing, so hooks and autocast behave as without it. The recompute runs with the
    parameter tensors the forward ran with: under :func:`fastseg3d.nn.autocast_weights` those are low-precision
    copies swapped in for the network's forward, gone by the time backward recomputes the block.
    """
    from torch.utils.checkpoint import checkpoint

    count = 0

    def checkpointed(block: nn.Module, forward):
        def run(*args, **kwargs):
            slots = [(m._parameters, name, t) for m in block.modules() for name, t in m._parameters.items()]

            def again(*a, **k):
                current = [(params, name, params[name]) for params, name, _ in slots]
                for params, name, t in slots:
                    params[name] = t
                try:
                    return forward(*a, **k)
                finally:
                    for params, name, t in current:
                        params[name] = t

            return checkpoint(again, *args, use_reentrant=False, **kwargs)

        return run

    def wrap(module: nn.Module) -> None:
        nonlocal count
        for child in module.children():
            kind = type(child).__name__.lstrip("_")
            if kind.endswith("Block"):
                child.forward = checkpointed(child, child.forward)
                count += 1
            else:
                wrap(child)

    wrap(model)
    return count
