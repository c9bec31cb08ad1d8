"""Checkpoint conversion between the official SegFormer3D release and fastseg3d: ``fastseg3d convert``.

The official code (OSUPCVLab/SegFormer3D) saves a plain ``state_dict`` (``pytorch_model.bin`` from
``accelerator.save_state``); its keys are exactly those of :class:`fastseg3d.networks.SegFormer3D`. A fastseg3d
checkpoint wraps the same tensors with what is needed to rebuild the network::

    {"network_weights": state_dict, "model": {"name": "segformer3d", "kwargs": {...}}, "fastseg3d_version": "..."}

Training checkpoints have the same two keys (plus optimizer state etc.), so both convert back.

What the shapes fix and what they do not: ``in_channels``, ``out_channels``, ``embed_dims``, ``depths``,
``sr_ratios`` (the ``sr`` conv kernels), ``mlp_ratio`` (``fc1`` widths), ``patch_kernel_size`` and ``decoder_dim``
are read from the tensors. ``num_heads`` and ``attention_scale`` change no parameter shape, and a conv's stride and
padding are not stored, so those come from arguments, defaulting to the official values: ``num_heads`` (1, 2, 5, 8),
``attention_scale="head_dim"`` (the current official code; the 2024 code that trained the published BraTS weights
scales by ``num_heads``: pass ``attention_scale="num_heads"`` to reproduce them), ``patch_stride`` (4, 2, 2, 2) and
``patch_padding`` = kernel // 2 per axis (the official 3, 1, 1, 1 for the official kernels).

Command line::

    fastseg3d convert --from official-segformer3d pytorch_model.bin segformer3d.pt [--attention-scale num_heads]
    fastseg3d convert --to official-segformer3d checkpoint_best.pt pytorch_model.bin
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import sys
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastseg3d.train.checkpoint import load_error_reason, numpy_array_globals

__all__ = [
    "OFFICIAL_SEGFORMER3D_DEFAULTS",
    "add_arguments",
    "fastseg3d_to_official",
    "infer_segformer3d_config",
    "load_state_dict_file",
    "main",
    "official_to_fastseg3d",
    "run",
]

#: Constructor values of the official SegFormer3D that its ``state_dict`` shapes do not determine.
OFFICIAL_SEGFORMER3D_DEFAULTS: dict[str, Any] = {
    "num_heads": [1, 2, 5, 8],
    "attention_scale": "head_dim",
    "patch_stride": [4, 2, 2, 2],
}

_WRAPPER_KEYS = ("network_weights", "state_dict", "model", "model_state_dict")
_FORMATS = ("official-segformer3d",)
_ENC = "segformer_encoder"
_DEC = "segformer_decoder"


def _atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then one rename: no half-written checkpoint on a crash."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {path}: a file stands where its folder {path.parent} would be") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _torch_load(path: Path, trusted: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package") from e
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals(numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        reason = load_error_reason(e)
        # only a file that the safe loader refused for its objects loads with trusted=True; a corrupt one does not
        hint = "" if trusted or "Unsupported global" not in reason else (
            " If it is a checkpoint you trust that stores objects other than tensors, containers and NumPy arrays, "
            "load it with trusted=True (--trusted).")
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({reason}).{hint}") from e


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Drop DDP's leading ``module.`` and ``torch.compile``'s ``_orig_mod.`` (at any depth: compiled submodules)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key.replace("._orig_mod.", ".")
        while True:
            stripped = re.sub(r"^(module|_orig_mod)\.", "", new)
            if stripped == new:
                break
            new = stripped
        if new in out:
            raise ValueError(f"{source}: keys {key!r} and another both become {new!r} without wrapper prefixes")
        out[new] = value
    return out


def load_state_dict_file(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in a checkpoint file, with wrapper prefixes removed.

    Reads ``.bin``/``.pt``/``.pth`` with ``torch.load(weights_only=True)``, NumPy arrays allowed (``trusted=True``
    allows arbitrary pickled objects: only for files you trust) and ``.safetensors`` when the ``safetensors``
    package is installed. The file may hold the ``state_dict`` itself or a dict wrapping it under
    ``network_weights``, ``state_dict``, ``model`` or ``model_state_dict``. ``module.`` (DistributedDataParallel)
    and ``_orig_mod.`` (``torch.compile``) prefixes are removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, corrupt, or no tensors found; the message names the file.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "w.pt"
        >>> torch.save({"state_dict": {"module.fc.weight": torch.ones(2)}}, f)
        >>> list(load_state_dict_file(f))
        ['fc.weight']
    """
    path = Path(path)
    obj = _torch_load(path, trusted)
    if _is_state_dict(obj):
        return _strip_prefixes(obj, path)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return _strip_prefixes(obj[key], path)
        found = ", ".join(repr(k) for k in list(obj)[:10])
        raise ValueError(f"{path}: no state_dict of tensors found (top-level keys: {found or 'none'}; expected "
                         f"tensors, or a dict of tensors under one of {', '.join(_WRAPPER_KEYS)})")
    raise ValueError(f"{path}: no state_dict found (the file holds a {type(obj).__name__})")


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        # the keys it has show a prefix to strip (a Lightning module's "model.", say)
        found = [k for k in state_dict if k.endswith(key)][:1] or list(state_dict)[:3]
        raise ValueError(f"not a SegFormer3D state_dict: no {key!r} (it has {', '.join(map(repr, found))}"
                         f"{', ...' if len(state_dict) > len(found) else ''})")
    return state_dict[key]


def _compact(values: list) -> Any:
    """One value for all when they agree (the constructor accepts both forms), else the list."""
    return values[0] if all(v == values[0] for v in values) else values


def infer_segformer3d_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """:class:`~fastseg3d.networks.SegFormer3D` constructor kwargs for an official-format ``state_dict``.

    Shapes give ``in_channels``, ``out_channels``, ``embed_dims``, ``depths``, ``sr_ratios``, ``mlp_ratio``,
    ``patch_kernel_size`` and ``decoder_dim``. The rest cannot be read from a ``state_dict`` and come from
    ``overrides``, else :data:`OFFICIAL_SEGFORMER3D_DEFAULTS`; ``patch_padding`` defaults to kernel // 2 per axis.
    ``overrides`` may also replace inferred values (a wrong one then fails the shape check when loading).
    Lists, not tuples, so the kwargs read back from JSON/YAML unchanged.

    Warns when ``num_heads`` is defaulted for non-default ``embed_dims``: the official defaults then may not be what
    the checkpoint was trained with, and the outputs would differ.

    Example:
        >>> from fastseg3d.networks import SegFormer3D
        >>> cfg = infer_segformer3d_config(SegFormer3D(out_channels=2).state_dict())
        >>> cfg["out_channels"], cfg["embed_dims"], cfg["sr_ratios"]
        (2, [32, 64, 160, 256], [4, 2, 1, 1])
    """
    from fastseg3d.networks import SegFormer3D

    defaults = inspect.signature(SegFormer3D).parameters
    allowed = set(defaults)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown SegFormer3D arguments {unknown}; allowed: {sorted(allowed)}")
    embed_dims, depths, sr_ratios, mlp_ratios, kernels = [], [], [], [], []
    for s in range(1, 5):
        patch = _require(state_dict, f"{_ENC}.embed_{s}.patch_embeddings.weight")
        if patch.dim() != 5:
            raise ValueError(f"{_ENC}.embed_{s}.patch_embeddings.weight must be a Conv3d weight, got shape "
                             f"{tuple(patch.shape)}")
        dim = patch.shape[0]
        embed_dims.append(dim)
        kernels.append(_compact(list(patch.shape[2:])))
        blocks = sorted({int(m.group(1)) for k in state_dict
                         if (m := re.match(rf"{_ENC}\.tf_block{s}\.(\d+)\.", k))})
        if blocks != list(range(len(blocks))):
            raise ValueError(f"not a SegFormer3D state_dict: stage {s} has transformer blocks {blocks}")
        depths.append(len(blocks))
        if not blocks:  # a stage of depth 0 (patch embedding and norm only) stores neither ratio: the defaults
            sr_ratios.append(defaults["sr_ratios"].default[s - 1])
            mlp_ratios.append(defaults["mlp_ratio"].default)
            continue
        srs, ratios = set(), set()
        for i in blocks:
            sr = state_dict.get(f"{_ENC}.tf_block{s}.{i}.attention.sr.weight")
            if sr is not None and len(set(sr.shape[2:])) != 1:
                raise ValueError(f"stage {s} block {i}: anisotropic spatial reduction {tuple(sr.shape[2:])} is not "
                                 "supported by SegFormer3D")
            srs.add(1 if sr is None else int(sr.shape[2]))
            hidden = _require(state_dict, f"{_ENC}.tf_block{s}.{i}.mlp.fc1.weight").shape[0]
            if hidden % dim:
                raise ValueError(f"stage {s} block {i}: Mix-FFN width {hidden} is not a multiple of {dim}")
            ratios.add(hidden // dim)
        if len(srs) != 1 or len(ratios) != 1:
            raise ValueError(f"stage {s}: blocks differ in sr ratio {sorted(srs)} or mlp ratio {sorted(ratios)}; "
                             "SegFormer3D uses one per stage")
        sr_ratios.append(srs.pop())
        mlp_ratios.append(ratios.pop())

    config: dict[str, Any] = {
        "in_channels": int(_require(state_dict, f"{_ENC}.embed_1.patch_embeddings.weight").shape[1]),
        "out_channels": int(_require(state_dict, f"{_DEC}.linear_pred.weight").shape[0]),
        "embed_dims": embed_dims,
        "depths": depths,
        "num_heads": list(OFFICIAL_SEGFORMER3D_DEFAULTS["num_heads"]),
        "sr_ratios": sr_ratios,
        "mlp_ratio": _compact(mlp_ratios),
        "patch_kernel_size": kernels,
        "patch_stride": list(OFFICIAL_SEGFORMER3D_DEFAULTS["patch_stride"]),
        "patch_padding": [k // 2 if isinstance(k, int) else [v // 2 for v in k] for k in kernels],
        "decoder_dim": int(_require(state_dict, f"{_DEC}.linear_c1.proj.weight").shape[0]),
        "attention_scale": OFFICIAL_SEGFORMER3D_DEFAULTS["attention_scale"],
    }
    if "num_heads" not in overrides and embed_dims != [32, 64, 160, 256]:
        warnings.warn(f"num_heads cannot be read from a state_dict; using the official {config['num_heads']} for "
                      f"embed_dims {embed_dims}. Pass num_heads (fastseg3d convert: --num-heads H H H H) if the "
                      "checkpoint was trained with others.",
                      stacklevel=2)
    if "attention_scale" not in overrides and (config["in_channels"], config["out_channels"]) == (4, 3) \
            and embed_dims == [32, 64, 160, 256]:
        warnings.warn("the released BraTS weights were trained by the 2024 code, which scales attention by "
                      "num_heads ** -0.5: pass attention_scale='num_heads' (fastseg3d convert: --attention-scale "
                      "num_heads) to reproduce them; converting with the current code's head_dim ** -0.5.",
                      stacklevel=2)
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    return config


def _check_against(config: dict[str, Any], state_dict: Mapping[str, torch.Tensor], source: Path) -> list[str]:
    """Key order of ``SegFormer3D(**config)``; ValueError listing missing/unexpected keys and shape mismatches."""
    from fastseg3d.networks import SegFormer3D

    try:
        # On the meta device: shapes without allocating or initialising 4.5 M parameters.
        with torch.device("meta"):
            expected = SegFormer3D(**config).state_dict()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: cannot build SegFormer3D({config}): {e}") from e
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def listing(name: str, items: list[str]) -> str:
            shown = "\n  ".join(items[:20])
            more = f"\n  ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n{name} ({len(items)}):\n  {shown}{more}" if items else ""

        raise ValueError(f"{source}: the state_dict does not fit SegFormer3D({config})"
                         + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                         + listing("shape mismatches", mismatched))
    return list(expected)


def _tensor_out(t: torch.Tensor, key: str, source: Path) -> torch.Tensor:
    """A state_dict tensor as written: dense, on the CPU, contiguous; a tensor without values to write is refused."""
    if t.is_meta or t.layout != torch.strided:
        what = "a meta tensor (no values)" if t.is_meta else f"a {t.layout} tensor"
        raise ValueError(f"{source}: {key} is {what}; a checkpoint holds dense weights")
    return t.detach().cpu().contiguous()


def _refuse_same_file(in_path: Path, out_path: str | os.PathLike) -> None:
    """Writing over the input would lose what the output does not keep (a training checkpoint's optimizer state
    and model metadata, or the official file)."""
    out = Path(out_path)
    if out.exists() and in_path.exists() and os.path.samefile(in_path, out):
        raise ValueError(f"{out} is the input file: write the converted checkpoint to another path")


def official_to_fastseg3d(in_path: str | os.PathLike, out_path: str | os.PathLike, *, trusted: bool = False,
                          **overrides: Any) -> dict[str, Any]:
    """Convert an official SegFormer3D ``state_dict`` file into a fastseg3d checkpoint; returns the model kwargs.

    The configuration is inferred from the shapes (:func:`infer_segformer3d_config`; ``overrides`` supply what
    shapes cannot, e.g. ``num_heads``, ``attention_scale="num_heads"``), every key and shape is checked against
    ``SegFormer3D(**config)`` (a ``ValueError`` lists missing/unexpected keys and shape mismatches), and
    ``{"network_weights", "model": {"name": "segformer3d", "kwargs"}, "fastseg3d_version"}`` is written atomically,
    with ``"config"``, the ``segformer3d_brats`` recipe, for a BraTS network (4 inputs, 3 outputs), so evaluation
    prepares the cases as the release did. Tensors are stored unchanged (dtype included).
    """
    import fastseg3d

    in_path = Path(in_path)
    _refuse_same_file(in_path, out_path)
    state_dict = load_state_dict_file(in_path, trusted=trusted)
    try:
        config = infer_segformer3d_config(state_dict, **overrides)
    except ValueError as e:
        raise ValueError(f"{in_path}: {e}") from e
    keys = _check_against(config, state_dict, in_path)
    checkpoint = {
        "network_weights": {k: _tensor_out(state_dict[k], k, in_path) for k in keys},
        "model": {"name": "segformer3d", "kwargs": config},
        "fastseg3d_version": fastseg3d.__version__,
    }
    if config["in_channels"] == 4 and config["out_channels"] == 3:
        # The released weights are BraTS's: `fastseg3d eval --data <Task01_BrainTumour>` then prepares the cases as
        # the release did (per-slice min-max, fixed box, swapped axes) and scores TC/WT/ET.
        try:
            from fastseg3d.train.config import load_config

            checkpoint["config"] = load_config("segformer3d_brats")
        except ImportError:  # the training extra (PyYAML) is not installed: weights only
            pass
    _atomic_torch_save(checkpoint, out_path)
    return config


def fastseg3d_to_official(in_path: str | os.PathLike, out_path: str | os.PathLike, *,
                          trusted: bool = False) -> dict[str, Any]:
    """Write the plain ``state_dict`` of a fastseg3d SegFormer3D checkpoint, as the official ``pytorch_model.bin``.

    ``in_path`` is a converted checkpoint or a training checkpoint (``network_weights`` and ``model`` keys; the
    optimizer state etc. are dropped). The model name must be ``segformer3d``; a checkpoint without ``model``
    metadata is accepted if its weights have the SegFormer3D structure. Keys and shapes are checked against
    ``SegFormer3D(**kwargs)`` before writing. Returns the model kwargs (without metadata, those the weights
    determine).
    """
    in_path = Path(in_path)
    _refuse_same_file(in_path, out_path)
    checkpoint = _torch_load(in_path, trusted)
    if not isinstance(checkpoint, Mapping) or not _is_state_dict(checkpoint.get("network_weights")):
        raise ValueError(f"{in_path}: not a fastseg3d checkpoint (no 'network_weights' state_dict)")
    state_dict = _strip_prefixes(checkpoint["network_weights"], in_path)
    model = checkpoint.get("model")
    if isinstance(model, Mapping):
        name = str(model.get("name", ""))
        if name.lower() != "segformer3d":
            raise ValueError(f"{in_path}: holds a {name or 'unnamed'} model; only segformer3d converts to the "
                             "official SegFormer3D format")
        kwargs = model.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{in_path}: model.kwargs must be a mapping of SegFormer3D arguments, got "
                             f"{type(kwargs).__name__}")
        config = check = dict(kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # num_heads does not matter for the weights written here
            try:
                config = infer_segformer3d_config(state_dict)
            except ValueError as e:
                raise ValueError(f"{in_path}: no model metadata and {e}") from e
        # what the weights do not store (the heads, the patch strides and paddings) is unknown: the structure is
        # checked with values that fit any widths and kernels (one head, non-overlapping patches), and only what
        # the weights do say is returned
        for key in ("num_heads", "patch_stride", "patch_padding", "attention_scale"):
            del config[key]
        check = {**config, "num_heads": [1] * 4, "patch_stride": config["patch_kernel_size"], "patch_padding": [0] * 4}
    keys = _check_against(check, state_dict, in_path)
    _atomic_torch_save({k: _tensor_out(state_dict[k], k, in_path) for k in keys}, out_path)
    return config


def _per_stage(text: str) -> int | list[int]:
    """``4`` -> 4, ``2,4,4`` -> [2, 4, 4] (an anisotropic stage)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an int or three comma-separated ints, got {text!r}") from e
    if len(values) == 1:
        return values[0]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected an int or three comma-separated ints, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``convert`` arguments to ``parser`` (the ``fastseg3d convert`` subparser, or a standalone one)."""
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=_FORMATS,
                           help="convert a checkpoint in this format into a fastseg3d checkpoint")
    direction.add_argument("--to", dest="to_format", choices=_FORMATS,
                           help="convert a fastseg3d (or fastseg3d training) checkpoint into this format")
    parser.add_argument("input", type=Path, help="checkpoint to read")
    parser.add_argument("output", type=Path, help="file to write (atomically)")
    official = parser.add_argument_group("with --from official-segformer3d (not stored in the weights)")
    official.add_argument("--num-heads", type=int, nargs=4, metavar="H",
                          help="attention heads per stage (default: the official 1 2 5 8)")
    official.add_argument("--attention-scale", choices=("head_dim", "num_heads"),
                          help="'num_heads' reproduces the published 2024 weights; default 'head_dim' "
                               "(current official code)")
    official.add_argument("--patch-stride", type=_per_stage, nargs=4, metavar="S",
                          help="patch-embedding stride per stage, an int or d,h,w (default: 4 2 2 2)")
    official.add_argument("--patch-padding", type=_per_stage, nargs=4, metavar="P",
                          help="patch-embedding padding per stage, an int or d,h,w (default: kernel // 2)")
    parser.add_argument("--trusted", action="store_true",
                        help="allow pickled non-tensor objects in the input (only for files you trust)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``convert`` command; 0 on success, 1 on a conversion error (message on stderr)."""
    overrides = {name: getattr(args, name) for name in ("num_heads", "attention_scale", "patch_stride",
                                                        "patch_padding") if getattr(args, name) is not None}
    try:
        if args.from_format:
            config = official_to_fastseg3d(args.input, args.output, trusted=args.trusted, **overrides)
        else:
            if overrides:
                raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in overrides)} only apply with --from")
            config = fastseg3d_to_official(args.input, args.output, trusted=args.trusted)
    except (ValueError, OSError) as e:  # OSError: a missing, unreadable or unwritable path, a folder for a file
        hint = (" (the heads are not stored in the weights: pass --num-heads H H H H)"
                if args.from_format and "divisible by num_heads" in str(e) and "num_heads" not in overrides else "")
        print(f"fastseg3d convert: error: {e}{hint}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} (SegFormer3D {config})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m fastseg3d.convert --from official-segformer3d IN OUT``.

    A leading ``convert`` in ``argv`` is skipped, so ``main(["convert", "--to", ...])`` reads like the CLI.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="fastseg3d convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
