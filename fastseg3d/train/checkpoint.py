"""Checkpoints that survive crashes: written to a temporary file in the same folder, then renamed.

The dictionary follows nnU-Net's keys (``network_weights`` unwrapped from DDP and ``torch.compile``,
``optimizer_state``, ``grad_scaler_state``) plus ``scheduler_state``, ``rng_state``, ``step``, ``epoch``,
``best_metric``, ``val_pending`` (written before the epoch's validation, which was due), ``config``, ``model`` (name
and constructor arguments, enough to rebuild the network) and ``fastseg3d_version``.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastseg3d.train.config import SetupError

__all__ = [
    "atomic_save",
    "capture_rng_state",
    "load_checkpoint",
    "load_error_reason",
    "numpy_array_globals",
    "remove_stale_temporaries",
    "restore_rng_state",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``: never a half-written file.
    The file gets the permissions of any file the process creates (the umask's; ``mkstemp``'s would be private to the
    user); a process killed while writing leaves its ``.<name>.*.tmp`` behind, which
    :func:`remove_stale_temporaries` clears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_save` left in ``folder`` for the trainer's ``checkpoint_*.pt``
    when its process was killed while writing (call it only where no other process is saving there); returns
    them."""
    stale = sorted(Path(folder).glob(".checkpoint_*.pt.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def numpy_array_globals() -> list:
    """What unpickling a plain NumPy array needs (checkpoints keep NumPy's RNG state). Rebuilding an array calls no
    user code (object arrays' items still go through the weights-only unpickler), as torch's docs note."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a fastseg3d checkpoint on the CPU with the weights-only unpickler (a downloaded file cannot run code);
    a missing, truncated or foreign file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(numpy_array_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SetupError(f"checkpoint {path} is corrupt or not a torch file ({load_error_reason(err)})") from err
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = (": a plain state_dict, e.g. the official SegFormer3D's pytorch_model.bin, converts with "
                    "fastseg3d convert --from official-segformer3d")
        raise SetupError(f"checkpoint {path} is not a fastseg3d checkpoint (no 'network_weights'){hint}")
    return ckpt


def load_error_reason(err: BaseException) -> str:
    """The line of a ``torch.load`` failure that says what is wrong with the file: the weights-only unpickler puts
    its reason ("Unsupported operand 110" for a corrupt file) after a generic preamble."""
    text = str(err).strip().split("WeightsUnpickler error:", 1)[-1].strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def capture_rng_state(device: torch.device) -> dict:
    """Python, numpy, torch CPU and, when ``device`` (the process's training device) is a GPU, its CUDA generator
    states. Only the training device's: under torchrun rank 0 writes the checkpoint, and its states of the other
    GPUs were seeded and never drawn from, while rank r's own GPU has drawn as rank 0's has (every rank is seeded
    alike and draws in step)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """The states :func:`capture_rng_state` took, the CUDA one into ``device`` (a run resumed on a GPU after one on
    the CPU keeps its seeded CUDA state)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda_state = state.get("cuda")
    if cuda_state is None or device.type != "cuda":
        return
    if isinstance(cuda_state, torch.Tensor):
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
    else:  # older checkpoints held every visible GPU's state: this device's entry
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(cuda_state):
            torch.cuda.set_rng_state(cuda_state[index].cpu(), device)
