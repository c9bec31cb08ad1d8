"""``fastseg3d eval``: a checkpoint on a dataset, with sliding-window inference, Dice and HD95, NIfTI predictions."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from fastseg3d.train.builders import build_data, build_model
from fastseg3d.train.checkpoint import load_checkpoint
from fastseg3d.train.config import SetupError
from fastseg3d.train.trainer import resolve_device

__all__ = ["evaluate_checkpoint"]

logger = logging.getLogger("fastseg3d")


def _eval_dataset(cfg: dict, split: str):
    """The validation split of the run's data, every labelled case of an MSD folder (``split="all"``) or its
    unlabelled test cases (``split="test"``)."""
    cfg = copy.deepcopy(cfg)
    cfg["data"]["augment"] = None  # training's augmentation: nothing evaluation runs
    if split != "val":
        cfg["data"]["split_file"] = None  # only the validation cases need the run's split
    data = build_data(cfg, training=False)
    if split == "val":
        return data, data.val
    if split not in ("all", "test"):
        raise SetupError(f"split must be 'val', 'all' or 'test', got {split!r}")
    if cfg["data"]["name"] != "msd":
        raise SetupError(f"split='{split}' needs an MSD folder (--data DIR); synthetic data has only its validation "
                         "set")
    from monai.data import Dataset

    from fastseg3d.data.msd import (
        infer_modality,
        load_msd_datalist,
        load_msd_test_list,
        msd_transforms,
        num_input_channels,
        num_output_channels,
    )

    dcfg = cfg["data"]
    props, cases = load_msd_datalist(dcfg["root"])
    if split == "test":
        cases = load_msd_test_list(dcfg["root"])
    transform = msd_transforms("predict" if split == "test" else "val",
                               modality=dcfg["modality"] or infer_modality(props),
                               spatial_size=dcfg["spatial_size"], pixdim=dcfg["pixdim"],
                               num_classes=num_output_channels(props, "labels"), label_mode=dcfg["label_mode"],
                               in_channels=num_input_channels(props), preprocess=dcfg["preprocess"])
    return data, Dataset(cases, transform)


def _to_input_grid(volume: torch.Tensor, image, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the spatial transforms (reorientation, resampling, cropping) that ``image`` went through, so that the
    prediction ``volume`` (C, *spatial: a label map or binary channels) lies voxel for voxel on the input file's
    grid, with the file's affine."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    meta = {k: v for k, v in image.meta.items() if k != "affine"}  # given once (MONAI warns of a second)
    pred = MetaTensor(volume.float(), affine=image.affine, meta=meta)
    pred.applied_operations = list(image.applied_operations)
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(
        {"pred": pred, "image": image})["pred"]
    return inverted.round().long(), inverted.affine


def _file_target(path: str, num_classes: int, label_mode: str) -> tuple[torch.Tensor, list[float]]:
    """The label file as the metrics take it, (1, K, *file grid), and its voxel size in mm."""
    import nibabel as nib
    import numpy as np

    from fastseg3d.data.msd import ConvertMSDBratsRegionsd
    from fastseg3d.train.inference import to_onehot

    file = nib.load(path)
    array = np.asarray(file.dataobj)
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):  # (X, Y, Z, 1) files, which loading squeezes too
        array = array.reshape(array.shape[:3])
    label = torch.as_tensor(array).round().long()[None]
    if label_mode == "brats_regions":
        target = ConvertMSDBratsRegionsd("label")({"label": label})["label"][None]
    else:
        target = to_onehot(label[None], num_classes, "softmax")
    return target, [float(z) for z in file.header.get_zooms()[:3]]


def _image_file(image) -> str | None:
    """The NIfTI file a case's prediction lies on (the first of per-modality files), None where there is none."""
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    return str(image) if isinstance(image, (str, os.PathLike)) and str(image).endswith((".nii", ".nii.gz")) else None


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    data: str | None = None,
    label_mode: str | None = None,
    split: str = "val",
    val_overrides: dict | None = None,
    save_predictions: bool = False,
    device: str = "auto",
) -> dict:
    """Evaluate ``checkpoint`` and write ``eval_metrics.json`` (mean and per case) and, optionally, predictions.

    Args:
        checkpoint: a training checkpoint (or a converted one: ``network_weights``, ``model`` and ``config``).
        output_dir: where results go (``predictions/<case>.nii.gz``: for an MSD folder on the input file's grid,
            with its affine; the spatial transforms are inverted with MONAI's ``Invertd``).
        data: ``"synthetic"`` or an MSD task folder; ``None`` keeps the checkpoint's data.
        label_mode: ``"labels"`` or ``"brats_regions"``; ``None`` keeps the checkpoint's (a converted checkpoint has
            no data config: give it here).
        split: ``"val"`` (the run's validation split), ``"all"`` (every labelled case of the MSD folder) or
            ``"test"`` (its unlabelled cases: ``dataset.json``'s ``test`` list, else ``imagesTs/``; predictions
            only, always saved, and no metrics).
        val_overrides: keys of the ``val`` config section (``roi_size``, ``overlap``, ``flip_tta``, ``hd95``,
            ``msd``, ``relabel_small``, ...).
        save_predictions: write the predicted label maps as NIfTI.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        the mean metrics (``dice``, ``dice_per_class``, ``hd95``, ``hd95_per_class``, ``msd``, ``msd_per_class``,
        ``num_cases``, ``class_names``, ``ignore_empty`` (how a class absent from a label was scored) and
        ``grid``: ``"label files"`` for MSD data, whose predictions are taken back to each label file's grid and
        voxel size to be scored, past the reorientation, resampling and foreground crop (which follows the image and
        may leave labelled voxels out), ``"network input"`` for the synthetic volumes); for
        ``split="test"`` ``num_cases``, ``predictions`` (the folder) and ``class_names``, also written as
        ``predictions.json`` in place of ``eval_metrics.json``.
    """
    from fastseg3d.train.config import DEFAULTS, merge
    from fastseg3d.train.inference import (
        MetricAccumulator,
        check_relabel,
        check_window,
        labels_from_prediction,
        predict_case,
        save_prediction_nifti,
    )

    ckpt = load_checkpoint(checkpoint)
    model_cfg = ckpt.get("model")
    if not (isinstance(model_cfg, dict) and isinstance(model_cfg.get("name"), str)
            and isinstance(model_cfg.get("kwargs"), dict)):
        raise SetupError(f"checkpoint {checkpoint} does not say which network it holds (no 'model' with a name and "
                         "kwargs)")
    cfg = merge(DEFAULTS, ckpt.get("config") or {})
    cfg = copy.deepcopy(cfg)
    if data is not None:
        if data == "synthetic":
            cfg["data"]["name"] = "synthetic"
        else:
            cfg["data"].update(name="msd", root=str(data))
    if label_mode is not None:
        cfg["data"]["label_mode"] = label_mode
    cfg["data"]["cache"] = False  # evaluation reads each case once; caching would load the training set too
    try:  # the settings and the data folder, before any case is loaded: a mistake is one line on the command line
        cfg["val"] = merge(cfg["val"], val_overrides or {}, "val.")
        bundle, dataset = _eval_dataset(cfg, split)
    except SetupError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise SetupError(str(err)) from err
    kwargs = ckpt["model"]["kwargs"]
    described = f"the data ({cfg['data']['name']}, label_mode={cfg['data']['label_mode']})"
    if kwargs.get("out_channels") not in (None, bundle.out_channels):
        raise SetupError(f"checkpoint {checkpoint} predicts {kwargs['out_channels']} channels but {described} has "
                         f"{bundle.out_channels}")
    if kwargs.get("in_channels") not in (None, bundle.in_channels):
        raise SetupError(f"checkpoint {checkpoint} takes {kwargs['in_channels']} input channels but {described} has "
                         f"{bundle.in_channels}")
    dev = resolve_device(device)
    model = build_model(ckpt["model"])
    try:
        model.load_state_dict(ckpt["network_weights"])
    except RuntimeError as err:
        raise SetupError(f"checkpoint {checkpoint} does not fit model {ckpt['model']['name']}: "
                         f"{' '.join(str(err).split())[:400]}") from None
    vcfg = cfg["val"]
    roi = vcfg["roi_size"] or cfg["data"]["spatial_size"]
    try:  # on the CPU model, before it takes GPU memory
        check_relabel(vcfg["relabel_small"], bundle.out_channels, "val.relabel_small")
        check_window(model, bundle.in_channels, roi, "roi" if vcfg["roi_size"] else "the checkpoint's crop size "
                     "(data.spatial_size; --roi sets the window)", vcfg["blend"])
    except ValueError as err:
        raise SetupError(str(err)) from None
    model = model.to(dev).eval()
    regions = bundle.class_names if bundle.mode == "sigmoid" else None
    acc = MetricAccumulator(include_background=bundle.mode == "sigmoid", hd95=bool(vcfg["hd95"]),
                            msd=bool(vcfg["msd"]), ignore_empty=bool(vcfg["ignore_empty"]))
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, a read-only place
        raise SetupError(f"cannot write the results to {out}: {err.strerror or err}") from None
    cases = []
    # MSD predictions go back to each label file's grid to be scored: the network's grid is resampled (data.pixdim)
    # and cropped to the image's foreground, which can leave labelled voxels out
    on_file_grid = cfg["data"]["name"] == "msd"
    n = len(dataset) if vcfg["max_cases"] is None else min(len(dataset), int(vcfg["max_cases"]))
    for i in range(n):
        item = dataset[i]
        case = predict_case(model, item, roi, vcfg, bundle.mode, bundle.out_channels, dev)
        pred = case["pred"]
        name = item.get("name") or Path(str(item["image"].meta.get("filename_or_obj", f"case_{i}"))).name.split(".")[0]
        if split == "test":
            row = {}
        elif on_file_grid:
            # scored where the label file lies, as published results are, not on the resampled grid
            target, spacing = _file_target(dataset.data[i]["label"], bundle.out_channels, cfg["data"]["label_mode"])
            row = acc.update(_to_input_grid(pred[0].cpu(), item["image"], dataset.transform)[0][None].float(),
                             target, spacing=spacing)
        else:
            row = acc.update(pred, case["target"], spacing=case["spacing"])
        cases.append({"case": name, **row})
        if save_predictions or split == "test":
            labels = labels_from_prediction(pred, bundle.mode, regions=regions).cpu()
            affine = like = None
            if getattr(item["image"], "applied_operations", None) is not None:
                labels, affine = _to_input_grid(labels[None], item["image"], dataset.transform)
                labels = labels[0]
                like = _image_file(dataset.data[i]["image"]) if on_file_grid else None
            save_prediction_nifti(labels, affine, out / "predictions" / f"{name}.nii.gz", like=like)
        logger.info("%s: %s", name, "predicted" if split == "test" else f"dice {row['dice']}")
    if split == "test":
        result = {"num_cases": len(cases), "predictions": str(out / "predictions")}
    elif not cases:
        raise SetupError(f"no case to evaluate in split {split!r} (val.max_cases={vcfg['max_cases']})")
    else:
        result = acc.aggregate()
        result["grid"] = "label files" if on_file_grid else "network input"
        result["ignore_empty"] = bool(vcfg["ignore_empty"])
    result["class_names"] = [c for c in bundle.class_names][0 if bundle.mode == "sigmoid" else 1:]
    target = out / ("predictions.json" if split == "test" else "eval_metrics.json")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, "mean": result, "cases": cases},
                              indent=2))
    os.replace(tmp, target)
    return result
