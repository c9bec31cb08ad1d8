"""The training loop: one process or many (``torchrun``), checkpoints that survive crashes, exact resume.

:class:`Trainer` follows nnU-Net's shape (build, then ``fit`` = epochs of ``train_step`` with validation and
checkpoints) with the conventions of MONAI and SegFormer3D's YAML experiments. In deterministic mode a run that is
stopped and resumed with ``resume="auto"`` reproduces the uninterrupted run's losses: checkpoints hold the model,
optimizer, schedule, gradient scaler and every RNG state, the data order is a function of (seed, epoch), and the
synthetic data's augmentation is a function of (case, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastseg3d.train.builders import (
    build_data,
    build_model,
    build_objective,
    build_optimizer,
    build_scheduler,
    enable_activation_checkpointing,
    model_kwargs,
)
from fastseg3d.train.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    unwrap_model,
)
from fastseg3d.train.config import DEFAULTS, SetupError, save_config
from fastseg3d.train.logger import MetricsLogger, progress_bar

__all__ = ["NonFiniteLossError", "SetupError", "Trainer", "resolve_device", "seed_everything"]

logger = logging.getLogger("fastseg3d")

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclasses.dataclass
class _StepGraph:
    """A captured training step: its input tensors, its replay, and the loss and terms each replay rewrites."""

    image: torch.Tensor
    label: torch.Tensor
    replay: Callable[[], None]
    loss: torch.Tensor
    terms: dict
    grads: list  # (parameter, the gradient the graph writes)

    def fits(self, image: torch.Tensor, label: torch.Tensor) -> bool:
        return (image.shape == self.image.shape and label.shape == self.label.shape and image.dtype == self.image.dtype
                and label.dtype == self.label.dtype)


def _check_cuda_graph(trainer: Trainer) -> None:
    """``SetupError`` where ``train.cuda_graph`` cannot work: off CUDA, with gradient accumulation (each replay
    overwrites the gradients), with ``train.compile`` (its CUDA-graph modes capture the compiled step themselves),
    under torchrun (DDP's gradient all-reduce runs outside the graph), with activation checkpointing (it reads the
    CUDA generator's state back), with SelfReg's loss (its channel subsets, drawn on the host each step, would be
    replayed as the capture drew them)."""
    tcfg = trainer.cfg["train"]
    if trainer.cfg["loss"]["distill"] == "selfreg":
        raise SetupError("train.cuda_graph cannot replay SelfReg's loss, whose channel subsets are drawn on the host "
                         "every step: train it eagerly")
    if tcfg["activation_checkpointing"]:
        raise SetupError("train.cuda_graph and train.activation_checkpointing exclude each other (the recompute "
                         "reads the CUDA generator's state, which a capture does not allow)")
    if trainer.device.type != "cuda":
        raise SetupError(f"train.cuda_graph needs a CUDA device, the run is on {trainer.device}")
    if trainer.accum > 1:
        raise SetupError("train.cuda_graph replays a step that overwrites the gradients, which cannot accumulate "
                         "over micro-batches: use train.grad_accumulation=1")
    if trainer.compile_mode is not None:
        raise SetupError(f"train.cuda_graph and train.compile={tcfg['compile']} exclude each other "
                         "(train.compile=reduce-overhead captures the compiled step in CUDA graphs)")
    if trainer.distributed:
        raise SetupError("train.cuda_graph runs in one process (under torchrun DDP's gradient all-reduce would run "
                         "outside the graph)")


def _compile_mode(value: bool | str) -> str | None:
    """``train.compile`` as a ``torch.compile`` mode (None: eager)."""
    if value is False:
        return None
    mode = "default" if value is True else value
    if mode not in _COMPILE_MODES:
        raise SetupError(f"train.compile must be true, false or one of {', '.join(_COMPILE_MODES)}, got {value!r}")
    return mode


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; ``auto`` and ``cuda`` take the local rank's GPU (the
    only choice under torchrun, where a fixed ``cuda:N`` would put every rank on one GPU)."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SetupError(f"device={name!r} is not auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("device=cuda was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif world > 1:
            raise SetupError(f"device={name!r} names one GPU for all {world} processes; under torchrun use "
                             "device=cuda (or auto): each process takes its local rank's GPU")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def _seed_worker(worker_id: int, rank: int) -> None:
    """Distinct random streams per worker and per rank (torch shares one base seed across ranks), including
    MONAI's random transforms, which carry generators of their own."""
    info = torch.utils.data.get_worker_info()
    seed = (info.seed + rank * 1_000_003) % 2**32
    torch.manual_seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)


def _absolute_root(cfg: Mapping) -> Mapping:
    """``cfg`` with ``data.root`` made absolute, so that the saved config and checkpoints find the data from any
    directory (``fastseg3d eval --checkpoint`` elsewhere)."""
    root = cfg["data"]["root"]
    return {**cfg, "data": {**cfg["data"], "root": os.path.abspath(root)}} if root else cfg


def _flatten(cfg: Mapping, prefix: str = "") -> dict:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_UNSET = object()


def _changed(old: Mapping, new: Mapping, prefix: str = "") -> dict[str, tuple]:
    """The dotted keys whose values differ between two configs, in order: ``{key: (old, new)}`` (``_UNSET`` where a
    config lacks the key)."""
    old, new = _flatten(old, prefix), _flatten(new, prefix)
    return {key: (old.get(key, _UNSET), new.get(key, _UNSET)) for key in sorted(old.keys() | new.keys())
            if old.get(key, _UNSET) != new.get(key, _UNSET)}


def _remove_run(run_dir: Path) -> None:
    """What a run writes into its folder; anything else there (an ``eval/`` folder, notes) stays."""
    import shutil

    for pattern in ("checkpoint_*.pt", ".checkpoint_*.tmp", "metrics.jsonl*", "curves.png"):
        for path in run_dir.glob(pattern):
            path.unlink()
    for folder in ("images", "tb"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def _world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


# the optimizer settings a resumed run takes from its config (the state's moments do not depend on them)
_RESUME_SETTINGS = ("lr", "initial_lr", "weight_decay", "betas", "eps", "momentum", "dampening", "nesterov")


class Trainer:
    """Builds a run from a resolved config and trains it.

    Args:
        cfg: a resolved config (:func:`fastseg3d.train.config.load_config`).
        output_dir: the run directory (default ``cfg["output_dir"]`` or ``runs/<name>``).
        resume: ``None`` (start fresh), ``"auto"`` (``checkpoint_latest.pt`` of the run directory if it exists) or a
            checkpoint path.
        overwrite: start over in a run directory that holds a run (checkpoints or ``metrics.jsonl``), removing
            what that run wrote; without it (or ``resume``) such a directory raises :class:`SetupError`.

    Example:
        >>> from fastseg3d.train import Trainer, load_config
        >>> cfg = load_config("quickstart", ["train.epochs=1", "train.max_steps=1"])  # doctest: +SKIP
        >>> Trainer(cfg, "runs/try").fit()  # doctest: +SKIP
    """

    def __init__(self, cfg: Mapping, output_dir: str | os.PathLike | None = None, resume: str | None = None,
                 overwrite: bool = False) -> None:
        self.cfg = cfg = _absolute_root(cfg)
        self.rank, self.local_rank, self.world = _world()
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg["device"], self.local_rank, self.world)
        self.compile_mode = _compile_mode(cfg["train"]["compile"])  # checked before anything is built
        self.run_dir = Path(output_dir or cfg["output_dir"] or Path("runs") / cfg["name"])
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise SetupError(f"the run directory {self.run_dir} is a file (--output-dir or output_dir names a folder)")
        resume_path = self._check_start(resume, overwrite)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # a process group that the caller made stays the caller's (the CLI ends only its own workers at once)
        self.owns_process_group = self.distributed and not dist.is_initialized()
        if self.owns_process_group:
            # Validation runs on rank 0 while the others wait at a barrier: allow it the time it needs.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=float(cfg["train"]["dist_timeout_minutes"])))

        seed_everything(int(cfg["seed"]), bool(cfg["deterministic"]))
        try:  # a data folder or setting the run cannot use is a mistake to report in one line, as eval does
            self.data = build_data(cfg)
        except SetupError:
            raise
        except (ValueError, FileNotFoundError) as err:
            raise SetupError(str(err)) from err
        self.model = build_model(cfg["model"], self.data.in_channels, self.data.out_channels)
        from fastseg3d.train.inference import check_relabel, check_window

        vcfg = cfg["val"]
        try:  # found now, not in the first step or after the first epoch
            batch = int(cfg["data"]["batch_size"])
            check_window(self.model, self.data.in_channels, cfg["data"]["spatial_size"], "data.spatial_size",
                         train_batch=batch // self.world if batch % self.world == 0 else None)
            if int(vcfg["every"]) > 0:
                check_relabel(vcfg["relabel_small"], self.data.out_channels, "val.relabel_small")
                if vcfg["roi_size"] or vcfg["blend"] == "first":  # else the windows are the crops checked above
                    check_window(self.model, self.data.in_channels, vcfg["roi_size"] or cfg["data"]["spatial_size"],
                                 "val.roi_size" if vcfg["roi_size"] else "data.spatial_size (val.roi_size unset)",
                                 vcfg["blend"])
        except ValueError as err:
            raise SetupError(str(err)) from None
        self.model = self.model.to(self.device)
        self.objective = build_objective(cfg, self.data.mode, self.data.out_channels).to(self.device)
        tcfg = cfg["train"]
        if tcfg["amp"] not in _AMP:
            raise SetupError(f"train.amp must be none, bf16 or fp16, got {tcfg['amp']!r}")
        self.amp_dtype = _AMP[tcfg["amp"]]
        self.memory_format = torch.channels_last_3d if tcfg["channels_last"] else torch.contiguous_format
        if tcfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        if tcfg["activation_checkpointing"]:
            n = enable_activation_checkpointing(self.model)
            logger.info("activation checkpointing on %d blocks", n)
        self.optimizer = build_optimizer(self.model.parameters(), cfg["optimizer"])
        for key in ("train.grad_accumulation", "train.log_every", "checkpoint.save_every"):
            section, name = key.split(".")
            if int(cfg[section][name]) < 1:
                raise SetupError(f"{key} must be >= 1, got {cfg[section][name]!r}")
        self.accum = int(tcfg["grad_accumulation"])
        if self.accum > 1 and self.compile_mode in _CUDA_GRAPH_MODES:
            # the graphs' outputs are freed at the next step, the parameters' gradients included, which the next
            # micro-batch's backward would accumulate into
            raise SetupError(f"train.compile={tcfg['compile']} replays CUDA graphs, which cannot accumulate "
                             "gradients over micro-batches: use train.grad_accumulation=1, or "
                             "train.compile=max-autotune-no-cudagraphs")
        self.cuda_graph = bool(tcfg["cuda_graph"])
        if self.cuda_graph:
            _check_cuda_graph(self)
        self._graph: _StepGraph | None = None
        self._loss_ok: torch.Tensor | None = None  # the step's losses so far all finite (on the device)
        self.train_loader = self._loader()
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise SetupError(f"the training set gives {len(self.train_loader)} batches per epoch and process, fewer "
                             f"than train.grad_accumulation={self.accum}")
        self.epochs = int(tcfg["epochs"])
        self.max_steps = tcfg["max_steps"]
        total_steps = self.epochs * self.steps_per_epoch
        if self.max_steps is not None:
            total_steps = min(total_steps, int(self.max_steps))
        # Per epoch, the schedule spans the epochs the run reaches, a last one cut short by train.max_steps included.
        total = total_steps if cfg["scheduler"]["interval"] == "step" else -(-total_steps // self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg["scheduler"], total)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tcfg["amp"] == "fp16")

        net = self.model
        if self.distributed:
            if self.device.type == "cuda" and tcfg["sync_batchnorm"]:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
                self.model = net
            # DSD's encoder teacher head has no loss term once its KL gradients are detached: it gets no gradient
            lcfg = cfg["loss"]
            unused = lcfg["distill"] == "dsd" and bool(lcfg["distill_kwargs"].get("detach_teacher"))
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        if self.compile_mode is not None:
            net = torch.compile(net, mode=self.compile_mode)
        self.net = net

        self.step = 0
        self.start_epoch = 0
        self.best_metric = -math.inf
        self.val_pending = False  # the resumed checkpoint's epoch still needs its validation
        self.metrics = MetricsLogger(self.run_dir) if self.is_main else None
        if resume_path is not None:
            self._resume(resume_path)
        elif resume == "auto" and self.metrics is not None:
            self.metrics.truncate_after(0)  # the rows of a run that never wrote a checkpoint: every row is past step 0
        if self.is_main:
            # Only now that the network is built and the checkpoint loaded: a start or resume that fails leaves the
            # folder's run (and its config.yaml) as it was.
            if overwrite:
                _remove_run(self.run_dir)
            for tmp in remove_stale_temporaries(self.run_dir):
                logger.info("removed %s, a checkpoint a killed process was writing", tmp.name)
            save_config(cfg, self.run_dir / "config.yaml")

    def _check_start(self, resume: str | None, overwrite: bool) -> Path | None:
        """The checkpoint to resume from, after checks for the usual mistakes, before anything is built, written or
        waited for: under torchrun every process makes them and stops at once."""
        if resume is not None and overwrite:
            raise SetupError("resume and overwrite exclude each other")
        data = self.cfg["data"]
        if data["name"] == "msd":
            if not data["root"]:
                raise SetupError("data.name=msd needs data.root=<a Medical Segmentation Decathlon task folder>")
            if not os.path.isfile(os.path.join(data["root"], "dataset.json")):
                problem = "has no dataset.json" if os.path.isdir(data["root"]) else "does not exist"
                raise SetupError(f"data.root={data['root']} {problem}; it must be a Medical Segmentation Decathlon "
                                 "task folder")
        if resume == "auto":
            path = self.run_dir / "checkpoint_latest.pt"
            if path.is_file():
                return path
            logger.info("resume=auto: no %s yet, starting fresh", path)
            return None
        if resume is not None:
            if not Path(resume).is_file():
                raise SetupError(f"resume checkpoint {resume} does not exist")
            return Path(resume)
        held = sorted(p.name for p in self.run_dir.glob("checkpoint_*.pt"))
        held += ["metrics.jsonl"] if (self.run_dir / "metrics.jsonl").is_file() else []
        if held and not overwrite:
            raise SetupError(f"{self.run_dir} holds a run ({', '.join(held)}): pass --resume auto to continue it, "
                             "--overwrite to start over (removing its checkpoints, metrics and images), or another "
                             "--output-dir")
        return None

    # ----------------------------------------------------------------------------------------------- data
    def _loader(self) -> torch.utils.data.DataLoader:
        dcfg = self.cfg["data"]
        # One sampler path for one process and many: the permutation is a function of (seed, epoch), and rank r
        # takes every world-th index, so N processes see exactly the global batches one process would.
        self.sampler = torch.utils.data.DistributedSampler(
            self.data.train, num_replicas=self.world, rank=self.rank, shuffle=True, seed=int(self.cfg["seed"]),
            drop_last=True)
        batch = int(dcfg["batch_size"])
        if batch % self.world:
            raise SetupError(f"data.batch_size={batch} (global) must be divisible by the {self.world} processes")
        worker_init = functools.partial(_seed_worker, rank=self.rank)
        return torch.utils.data.DataLoader(
            self.data.train, batch_size=batch // self.world, sampler=self.sampler, drop_last=True,
            num_workers=int(dcfg["num_workers"]), collate_fn=self.data.collate, worker_init_fn=worker_init,
            pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _to_device(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        image = image.as_tensor() if hasattr(image, "as_tensor") else image  # MONAI MetaTensor -> Tensor
        label = label.as_tensor() if hasattr(label, "as_tensor") else label
        if self.memory_format is not torch.contiguous_format:
            image = image.contiguous(memory_format=self.memory_format)
        return image, label

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, epoch: int, val_pending: bool = False) -> dict:
        return {
            "network_weights": unwrap_model(self.model).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "grad_scaler_state": self.scaler.state_dict(),
            "rng_state": capture_rng_state(self.device),
            "step": self.step,
            "epoch": epoch,
            "best_metric": self.best_metric,
            "val_pending": val_pending,
            "config": dict(self.cfg),
            "model": {"name": self.cfg["model"]["name"], "kwargs": self._model_kwargs(),
                      "convert": bool(self.cfg["model"]["convert"]), "wrap": self.cfg["model"]["wrap"]},
            "fastseg3d_version": _version(),
        }

    def _model_kwargs(self) -> dict:
        """The constructor's arguments, the data's channels included where it takes them (as build_model gave)."""
        return model_kwargs(self.cfg["model"], self.data.in_channels, self.data.out_channels)

    def save(self, kind: str, epoch: int, val_pending: bool = False) -> Path:
        path = self.run_dir / f"checkpoint_{kind}.pt"
        if self.is_main:
            atomic_save(self._checkpoint(epoch, val_pending), path)
        return path

    def _compare_config(self, saved: Mapping, path: Path) -> None:
        """Log where this config differs from the checkpoint's: resume is exact only with the same config, though a
        longer or shorter run (``train.epochs``, ``train.max_steps``) is an expected change."""
        defaults = _flatten(DEFAULTS)
        # a key added to fastseg3d after the checkpoint was written, at its default, is no change
        changed = {key: values for key, values in _changed(saved, self.cfg).items()
                   if not (values[0] is _UNSET and key in defaults and values[1] == defaults[key])}

        def describe(keys):
            return ", ".join(f"{key} " + " -> ".join("unset" if v is _UNSET else repr(v) for v in changed[key])
                             for key in keys)

        length = [key for key in changed if key in ("train.epochs", "train.max_steps")]
        others = [key for key in changed if key not in length]
        if length:
            logger.info("resuming %s with %s", path, describe(length))
        if others:
            logger.warning("the config differs from that of %s in %s; resume is exact only with the checkpoint's "
                           "config", path, describe(others))

    def _resume(self, path: Path) -> None:
        """Load the checkpoint's state. The optimizer's hyperparameters (learning rate, weight decay, momenta) are
        the config's: the checkpoint gives the optimizer's moments and the schedule's position, and a config that
        changes them (a lower learning rate to go on with, say) is what runs, as its ``config.yaml`` says."""
        ckpt = load_checkpoint(path)
        saved = ckpt.get("config") or {}
        if self.is_main and saved:
            self._compare_config(saved, path)
        saved_optimizer = saved.get("optimizer", {}).get("name")
        if saved_optimizer and saved_optimizer != self.cfg["optimizer"]["name"]:
            raise SetupError(f"{path} holds the state of optimizer.name={saved_optimizer}, not "
                             f"{self.cfg['optimizer']['name']}: resume with the checkpoint's optimizer, or start a "
                             "new run")
        try:
            unwrap_model(self.model).load_state_dict(ckpt["network_weights"])
        except RuntimeError as err:
            keys = list(_changed(saved.get("model", {}), self.cfg["model"], "model."))
            raise SetupError(f"{path} holds weights of another network than this config builds"
                             + (f" (it differs in {', '.join(keys)})" if keys else "")
                             + f": {' '.join(str(err).split())[:400]}") from None
        config_groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError) as err:
            raise SetupError(f"{path}'s optimizer state does not fit this config's optimizer: {err}") from None
        for group, config in zip(self.optimizer.param_groups, config_groups):
            # a setting that changes what the state holds (amsgrad's maxima) cannot change on resume
            fixed = sorted(k for k in config if k not in _RESUME_SETTINGS and k in group and group[k] != config[k])
            if fixed:
                raise SetupError(f"{path}'s optimizer state was made with " + ", ".join(
                    f"{k}={group[k]!r}" for k in fixed) + ": resume with those, or start a new run")
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        for i, (group, config) in enumerate(zip(self.optimizer.param_groups, config_groups)):
            group.update({k: config[k] for k in _RESUME_SETTINGS if k in config and k not in ("lr", "initial_lr")})
            self.scheduler.base_lrs[i] = group["initial_lr"] = config["initial_lr"]
            group["lr"] = config["initial_lr"] * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch)
        self.scaler.load_state_dict(ckpt["grad_scaler_state"])
        restore_rng_state(ckpt["rng_state"], self.device)
        self.step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_metric = float(ckpt["best_metric"])
        best = self.run_dir / "checkpoint_best.pt"
        if best.is_file():
            # A latest checkpoint older than the best one must not let a worse model replace it.
            self.best_metric = max(self.best_metric, float(load_checkpoint(best)["best_metric"]))
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
            # Checkpoints are written before their epoch's validation: its val row says whether it finished (and
            # val.every=0 is the way to resume past a validation that keeps failing).
            self.val_pending = bool(ckpt.get("val_pending")) and int(self.cfg["val"]["every"]) > 0 and not any(
                row.get("split") == "val" and row.get("step") == self.step and row.get("epoch") == int(ckpt["epoch"])
                for row in self.metrics.rows())
        logger.info("resumed from %s at epoch %d, step %d", path, self.start_epoch, self.step)

    # ----------------------------------------------------------------------------------------------- steps
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, image: torch.Tensor, label: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
        """Forward, loss and :meth:`backward` of one micro-batch: the loss and the terms logged beside it. A
        subclass may override it (nnU-Net's ``train_step``), calling :meth:`backward` on its loss in place of
        ``loss.backward()``; the optimizer step, clipping, schedule and the check of the losses stay
        :meth:`train_epoch`'s."""
        with self._autocast():
            output = self.net(image)
        loss, terms = self.objective(output, label)
        self.backward(loss)
        return loss, terms

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of a micro-batch's ``loss`` as the loop's optimizer step expects it: divided by
        ``train.grad_accumulation`` (the step takes the mean over its micro-batches), scaled by fp16's gradient
        scaler (which the step unscales), and noted for the non-finite-loss stop."""
        self._note_finite(loss)
        self.scaler.scale(loss / self.accum).backward()

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Records on the device whether ``loss`` is finite; :meth:`_check_step` reads it back once an optimizer step
        (reading every micro-batch's loss back would stall the GPU before each backward). Not while a CUDA graph
        captures the step: each replay's loss is noted."""
        if loss.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def _graphed_step(self, image: torch.Tensor, label: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
        """``train.cuda_graph``: :meth:`train_step` captured in a CUDA graph at the first batch (three warm-up
        runs of it first, on that batch, whose effects on buffers and random generators are undone), then replayed
        on each batch copied into the graph's inputs; a batch of another shape runs eagerly."""
        if self._graph is None:
            self._capture(image, label, epoch)
        graph = self._graph
        if not graph.fits(image, label):
            # eagerly, into the graph's gradients (an eager backward adds to them): zeroed where they are
            for p, g in graph.grads:
                p.grad = g
            self.optimizer.zero_grad(set_to_none=False)
            return self.train_step(image, label, epoch)
        graph.image.copy_(image)
        graph.label.copy_(label)
        graph.replay()
        for p, g in graph.grads:  # the optimizer reads what the replay wrote, even if a hook set .grad to None
            p.grad = g
        self._note_finite(graph.loss)
        return graph.loss, graph.terms

    def _capture(self, image: torch.Tensor, label: torch.Tensor, epoch: int) -> None:
        from fastseg3d.train.cuda_graph import capture_step

        inputs = image.clone(), label.clone()  # the graph's inputs, in the batch's memory format
        outputs: list = []
        # the warm-up runs are not training steps: the buffers they update (BatchNorm's running statistics) and the
        # random numbers they draw (dropout) are put back, so that the replays train as the eager loop does
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        rng = capture_rng_state(self.device)

        def undo_warm_up() -> None:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            restore_rng_state(rng, self.device)

        def step() -> tuple:
            outputs[:] = self.train_step(*inputs, epoch)
            return tuple(outputs)

        params = list(self.model.parameters())
        try:
            replay = capture_step(step, params, self.device, undo_warm_up)
        except RuntimeError as err:
            raise RuntimeError(f"train.cuda_graph: the training step could not be captured ({err}); train without "
                               "train.cuda_graph") from err
        self._graph = _StepGraph(*inputs, replay, *outputs, [(p, p.grad) for p in params if p.grad is not None])
        logger.info("train.cuda_graph: the training step is captured")

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (every process); a hook for subclasses."""

    def on_epoch_end(self, epoch: int, result: dict) -> None:
        """Called after each epoch, its checkpoint and its validation (every process; ``result`` is the
        validation's on the main process when one ran, else {}); a hook for subclasses."""

    def train_epoch(self, epoch: int) -> bool:
        """One pass over the training set; returns False when ``max_steps`` stopped it."""
        self.net.train()
        self.sampler.set_epoch(epoch)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        transform = getattr(self.data.train, "transform", None)
        if hasattr(transform, "set_random_state"):
            # Augmentation in the main process as a function of (seed, epoch, rank), so a resumed run repeats it;
            # workers are reseeded from torch's generator, whose state checkpoints keep.
            transform.set_random_state(seed=(int(self.cfg["seed"]) * 100_003 + epoch * 1_009 + self.rank) % 2**32)
        tcfg = self.cfg["train"]
        bar = progress_bar(self.steps_per_epoch, tcfg["progress"], f"epoch {epoch}") if self.is_main else None
        sums: dict[str, torch.Tensor] = {}  # on the device: read back when logged
        count = 0
        micro = 0
        start = time.perf_counter()
        for batch in self.train_loader:
            image, label = self._to_device(batch)
            if self.compile_mode in _CUDA_GRAPH_MODES:
                # a new iteration: the graphs' outputs of the last one (read by then) may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            last_micro = micro == self.accum - 1
            sync = self.net.no_sync() if self.distributed and not last_micro else contextlib.nullcontext()
            with sync:
                loss, terms = self._graphed_step(image, label, epoch) if self.cuda_graph else self.train_step(
                    image, label, epoch)
            for key, value in {"loss": loss, **terms}.items():
                # a new tensor (a graph's outputs are overwritten by its next replay)
                sums[key] = sums.get(key, 0) + torch.as_tensor(value).detach().to(self.device, torch.float32)
            count += 1
            micro += 1
            if not last_micro:
                continue
            micro = 0
            norm = None
            if tcfg["grad_clip"] or not self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
                limit = float(tcfg["grad_clip"]) if tcfg["grad_clip"] else math.inf
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
            # Without a scaler nothing else stops an infinite gradient from poisoning the weights.
            self._check_step(epoch, None if self.scaler.is_enabled() else norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self._graph is None:  # a captured step's replay overwrites the gradients it holds
                self.optimizer.zero_grad(set_to_none=True)
            if self.cfg["scheduler"]["interval"] == "step":
                self._schedule()
            self.step += 1
            if bar is not None:
                bar.update(1)
            if self.step % int(tcfg["log_every"]) == 0:
                self._log_train(epoch, sums, count, start, bar)
                sums, count, start = {}, 0, time.perf_counter()
            if self.max_steps is not None and self.step >= int(self.max_steps):
                break
        if micro:
            # Fewer micro-batches than an accumulation left at the epoch's end: dropped, as drop_last drops a batch
            # (their losses still checked).
            self._check_step(epoch)
            self.optimizer.zero_grad(set_to_none=True)
        if count:
            self._log_train(epoch, sums, count, start, bar)  # the epoch's tail, so every epoch has a train row
        if bar is not None:
            bar.close()
        if self.cfg["scheduler"]["interval"] == "epoch":
            self._schedule()
        return self.max_steps is None or self.step < int(self.max_steps)

    def _schedule(self) -> None:
        if getattr(self.scheduler, "_step_count", 1) != 1:  # PyTorch checks the order at the first step only
            self.scheduler.step()
            return
        with warnings.catch_warnings():  # (which resets the once-only warnings: not at every step)
            # fp16's GradScaler skips the optimizer's step while it lowers its scale (the first steps of a run), after
            # which the schedule steps on as in PyTorch's AMP recipe; PyTorch warns of it as of a misordered loop
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    def _check_step(self, epoch: int, norm: torch.Tensor | None = None) -> None:
        """Before an optimizer step: raise :class:`NonFiniteLossError` when a loss of its micro-batches (or
        ``norm``, the gradient norm) was not finite, on every rank together (a lone rank raising would hang the
        others). One read-back a step."""
        flags = [torch.ones((), device=self.device) if self._loss_ok is None else self._loss_ok.float()]
        self._loss_ok = None
        if norm is not None:
            flags.append(torch.isfinite(norm).float())
        ok = torch.stack([f.reshape(()).to(self.device) for f in flags])
        if self.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        loss_ok, *norm_ok = ok.tolist()
        if loss_ok == 1.0 and all(v == 1.0 for v in norm_ok):
            return
        what = "loss" if loss_ok != 1.0 else "gradient norm"
        latest = self.run_dir / "checkpoint_latest.pt"
        kept = f"the last good checkpoint is {latest}" if latest.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite {what} at epoch {epoch}, step {self.step + 1}; stopped, {kept}")

    def _log_train(self, epoch: int, sums: dict, count: int, start: float, bar=None) -> None:
        """The mean loss and terms since the last row (every rank: their means over ranks are one all-reduce, and
        the values' one read-back), written by the main process, shown on its progress bar."""
        keys = list(sums)
        values = torch.stack([sums[k].reshape(()) for k in keys])
        if self.distributed:
            dist.all_reduce(values)
            values /= self.world
        row = {k: v / count for k, v in zip(keys, values.tolist())}
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if self.metrics is None:
            return
        self.metrics.log({"step": self.step, "epoch": epoch, "split": "train", **row,
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "seconds_per_step": (time.perf_counter() - start) * self.accum / count})

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """Sliding-window inference over the validation set (main process); loss, Dice (and HD95) per class."""
        # The latest checkpoint holds the RNG states from before validation: whatever validation draws must not
        # reach the training that follows, or a resumed run would differ from an uninterrupted one.
        rng = capture_rng_state(self.device)
        try:
            return self._validate(epoch)
        finally:
            restore_rng_state(rng, self.device)

    def _validate(self, epoch: int) -> dict:
        from fastseg3d.train.inference import MetricAccumulator, labels_from_prediction, predict_case
        from fastseg3d.train.plots import plot_slices

        vcfg = self.cfg["val"]
        model = unwrap_model(self.model)
        model.eval()
        roi = vcfg["roi_size"] or self.cfg["data"]["spatial_size"]
        # Mean foreground Dice: the background label is left out; every BraTS region is foreground.
        acc = MetricAccumulator(include_background=self.data.mode == "sigmoid", hd95=bool(vcfg["hd95"]),
                                msd=bool(vcfg["msd"]), ignore_empty=bool(vcfg["ignore_empty"]))
        regions = self.data.class_names if self.data.mode == "sigmoid" else None
        n = len(self.data.val) if vcfg["max_cases"] is None else min(len(self.data.val), int(vcfg["max_cases"]))
        for i in range(n):
            item = self.data.val[i]
            with self._autocast():
                case = predict_case(model, item, roi, vcfg, self.data.mode, self.data.out_channels, self.device)
            acc.update(case["pred"], case["target"], spacing=case["spacing"],
                       loss=float(self.objective.segmentation(case["logits"], case["label"])))
            if i < int(vcfg["num_images"]):
                plot_slices(case["image"][0].cpu(),
                            labels_from_prediction(case["target"], self.data.mode, regions=regions).cpu(),
                            labels_from_prediction(case["pred"], self.data.mode, regions=regions).cpu(),
                            self.run_dir / "images" / f"val_{i}.png",
                            title=f"{item.get('name', i)}: epoch {epoch}, step {self.step}")
        model.train()
        return acc.aggregate()

    # ----------------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train for ``train.epochs`` (or ``train.max_steps``); returns the last validation result (or {})."""
        from fastseg3d.backends import backend

        policy = backend(self.cfg["backend"]) if self.cfg["backend"] else contextlib.nullcontext()
        with policy:
            return self._fit()

    def _fit(self) -> dict:
        last: dict = {}
        vcfg, ccfg = self.cfg["val"], self.cfg["checkpoint"]
        epoch = self.start_epoch - 1
        done = self.start_epoch >= self.epochs or (self.max_steps is not None and self.step >= int(self.max_steps))
        if done and not self.val_pending:
            logger.info("the run had already finished (epoch %d, step %d): nothing left to train; its final "
                        "checkpoint is written again", epoch, self.step)
        try:
            if self.val_pending:
                # The checkpoint resumed from was written before its epoch's validation, which did not finish. Only
                # the main process validates, with no collective, so the others wait in the next epoch's first one.
                last = self._validation(epoch)
            for epoch in range(self.start_epoch, self.epochs):
                if self.max_steps is not None and self.step >= int(self.max_steps):
                    epoch -= 1  # a run resumed after reaching max_steps has nothing left to train
                    break
                self.on_epoch_start(epoch)
                more = self.train_epoch(epoch)
                final = not more or epoch == self.epochs - 1
                val_due = int(vcfg["every"]) > 0 and ((epoch + 1) % int(vcfg["every"]) == 0 or final)
                if (epoch + 1) % int(ccfg["save_every"]) == 0 or final:
                    # Before validation, so that a crash in it (a bad case, the sliding window out of memory) keeps
                    # the epoch's training; a run resumed from it validates first when the validation did not end.
                    self.save("latest", epoch, val_pending=val_due)
                result = self._validation(epoch) if val_due and self.is_main else {}
                last = result or last
                if self.distributed:
                    dist.barrier()
                self.on_epoch_end(epoch, result)
                if not more:
                    break
            self.save("final", epoch)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self._graph = None  # its memory pool, a training step's activations and gradients
        return last

    def _validation(self, epoch: int) -> dict:
        """Validate, keep the best checkpoint, then log the val row and draw the curves (main process)."""
        from fastseg3d.train.plots import plot_curves

        result = self.validate(epoch)
        if result["dice"] is not None and result["dice"] > self.best_metric:
            self.best_metric = result["dice"]
            self.save("best", epoch)
            after = self.cfg["checkpoint"]["best_after_epoch"]
            if after is not None and epoch > int(after):  # a new best after the cutoff: also kept apart
                self.save("best_after", epoch)
        # The row after the best checkpoint: a resumed run takes the row as the sign that this validation is done.
        self.metrics.log({"step": self.step, "epoch": epoch, "split": "val", **result})
        logger.info("epoch %d step %d: val loss %.4f, dice %s", epoch, self.step, result["loss"],
                    "n/a" if result["dice"] is None else f"{result['dice']:.4f}")
        names = self.data.class_names[0 if self.data.mode == "sigmoid" else 1:]
        plot_curves(self.metrics.path, self.run_dir / "curves.png", class_names=list(names))
        return result


def _version() -> str:
    from fastseg3d import __version__

    return __version__
