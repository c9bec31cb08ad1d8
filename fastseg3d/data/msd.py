"""Medical Segmentation Decathlon (MSD) task folders as MONAI datasets: datalist, split, transforms, checks.

A task folder is the MSD layout ``TaskXX_Name/{dataset.json, imagesTr/, labelsTr/}``; ``dataset.json`` lists the
training cases with paths relative to its own folder (``"./imagesTr/x.nii.gz"``) and declares ``labels``
(``{"0": "background", ...}``) and ``modality`` (``{"0": "FLAIR", ...}``). The nnU-Net v2 spelling of the same is
read too: ``channel_names`` for ``modality`` and ``labels`` as ``{"background": 0, ...}`` (its region labels, lists
of label values, are rejected). Multi-modal tasks (BraTS, Prostate) store the modalities as the last axis of a
4-D NIfTI, which :func:`msd_transforms` moves to the channel axis; a case with another number of channels than
``dataset.json`` declares is an error.

Only :func:`load_msd_datalist`, :func:`split_cases` and the ``dataset.json`` readers (:func:`infer_modality`,
:func:`label_names`, :func:`num_input_channels`, :func:`num_output_channels`) work without MONAI; everything
that builds transforms or datasets imports MONAI when called and raises ``ImportError`` naming
``pip install "fastseg3d[monai]"`` when it is missing. :class:`CheckCased` and :class:`ConvertMSDBratsRegionsd`
subclass MONAI's ``MapTransform``, so they are defined on first access (and stay picklable for DataLoader workers).

Example:
    >>> from monai.data import DataLoader, list_data_collate  # doctest: +SKIP
    >>> train_ds, val_ds, props = build_msd_datasets(  # doctest: +SKIP
    ...     "Task01_BrainTumour", spatial_size=(96, 96, 96), label_mode="brats_regions", num_samples=2)
    >>> loader = DataLoader(train_ds, batch_size=2, shuffle=True, collate_fn=list_data_collate)  # doctest: +SKIP
    >>> next(iter(loader))["image"].shape  # 2 cases x 2 crops  # doctest: +SKIP
    torch.Size([4, 4, 96, 96, 96])
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from monai.data import Dataset
    from monai.transforms import Compose

__all__ = [
    "BRATS_REGIONS",
    "LABEL_MODES",
    "MODALITIES",
    "CheckCased",  # noqa: F822 (defined on first access by the module __getattr__, as it needs MONAI)
    "ConvertMSDBratsRegionsd",  # noqa: F822
    "InvalidCaseError",
    "MinMaxPerSliced",  # noqa: F822
    "build_msd_datasets",
    "build_transforms",
    "infer_modality",
    "label_names",
    "load_msd_datalist",
    "load_msd_test_list",
    "msd_transforms",
    "num_input_channels",
    "num_output_channels",
    "split_cases",
    "split_from_file",
]

MODALITIES = ("CT", "MRI")
LABEL_MODES = ("labels", "brats_regions")
# Output channels of label_mode="brats_regions", built from the MSD BraTS coding (1 edema, 2 non-enhancing
# core, 3 enhancing); MONAI's ConvertToMultiChannelBasedOnBratsClassesd assumes the BraTS 1/2/4 coding instead.
BRATS_REGIONS = ("TC", "WT", "ET")
_BRATS_NUM_CLASSES = 4
# Where dataset.json names the image channels: MSD's key, then nnU-Net v2's key for the same {"0": "CT", ...}.
_CHANNEL_KEYS = ("modality", "channel_names")

_MONAI_HINT = 'pip install "fastseg3d[monai]"'


class InvalidCaseError(ValueError):
    """A case whose image or label cannot be trained on; the message names both files."""


def _require_monai() -> None:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as err:
        raise ImportError(f"fastseg3d.data.msd needs MONAI and nibabel: {_MONAI_HINT}") from err


def _case_name(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]


def load_msd_datalist(root: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Read an MSD task folder's ``dataset.json`` and check that every listed training file exists.

    Args:
        root: the task folder (the one holding ``dataset.json``, ``imagesTr/`` and ``labelsTr/``).

    Returns:
        ``(properties, cases)``: ``properties`` is every key of the json but ``training`` (``labels``,
        ``modality``, ``name``, ``numTraining``, ``test``, ...), as written; ``cases`` is one
        ``{"image": abs path, "label": abs path, "name": file stem}`` per training entry, in the json's order,
        with the json's relative paths resolved against the json's folder (as MONAI's
        ``load_decathlon_datalist`` does).

    Raises:
        FileNotFoundError: the folder, ``dataset.json``, or a listed image or label file is missing.
        ValueError: ``dataset.json`` is not valid JSON, has no usable ``training`` list, or its ``labels``,
            ``modality`` or ``channel_names`` cannot be read (see :func:`label_names`, :func:`num_input_channels`).

    Example:
        >>> props, cases = load_msd_datalist("Task09_Spleen")  # doctest: +SKIP
        >>> cases[0]["name"], props["labels"]  # doctest: +SKIP
        ('spleen_19', {'0': 'background', '1': 'spleen'})
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MSD task folder not found: {root}")
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MSD task folder has no dataset.json: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list) or not meta["training"]:
        raise ValueError(f"{path} has no non-empty 'training' list of {{'image': ..., 'label': ...}} entries")
    # Now rather than when the first case loads, and with the file's path in the message.
    label_names(meta, where=path)
    _channel_names(meta, where=path)

    cases = []
    for i, entry in enumerate(meta["training"]):
        well_formed = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("image", "label"))
        if not well_formed:
            raise ValueError(f"{path}: training entry {i} is not an {{'image': str, 'label': str}} object: {entry!r}")
        case = {key: os.path.normpath(os.path.join(root, entry[key])) for key in ("image", "label")}
        for key, file in case.items():
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{key} file of training entry {i} listed in {path} is missing: {file}")
        case["name"] = _case_name(case["image"])
        cases.append(case)
    properties = {key: value for key, value in meta.items() if key != "training"}
    return properties, cases


def _images_ts(folder: str) -> tuple[list[str], list[str]]:
    """The NIfTI files of ``imagesTs/`` (hidden files, such as the ``._*`` copies macOS tools leave, skipped) and
    their case names. nnU-Net's single-channel ``{case}_0000`` files are case ``{case}``; its one file per channel
    of a multi-channel case is refused: a case is one (4-D, channels last) file, as in the Decathlon."""
    names = sorted(n for n in os.listdir(folder) if n.endswith((".nii.gz", ".nii")) and not n.startswith("."))
    stems = [_case_name(n) for n in names]
    channels: dict[str, set[str]] = {}
    for stem in stems:
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        if match is None:
            return [os.path.join(folder, n) for n in names], stems
        channels.setdefault(match[1], set()).add(match[2])
    counts = {len(found) for found in channels.values()}
    if (len(channels) > 1 and len(counts) == 1 and min(counts) > 1
            and all(found == {f"{c:04d}" for c in range(len(found))} for found in channels.values())):
        raise ValueError(f"{folder} holds one file per channel ({{case}}_0000, {{case}}_0001, ..., as nnU-Net v2 "
                         "writes them): give each case as one file with its channels on the last axis, as the "
                         "Decathlon does")
    if all(found == {"0000"} for found in channels.values()):
        stems = [stem[:-5] for stem in stems]
    return [os.path.join(folder, n) for n in names], stems


def load_msd_test_list(root: str | os.PathLike) -> list[dict[str, str]]:
    """The unlabelled cases of an MSD task folder: ``dataset.json``'s ``test`` list (paths, or
    ``{"image": path}`` entries, relative to the folder), or, where it has none, every NIfTI in ``imagesTs/``
    (hidden files skipped; nnU-Net's single-channel ``{case}_0000`` files named ``{case}``). One
    ``{"image": abs path, "name": case name}`` per case.

    Raises:
        FileNotFoundError: a listed file is missing. ValueError: the folder lists no test case, or ``imagesTs/``
            holds one file per channel (nnU-Net v2's multi-channel layout).
    """
    root = os.path.abspath(os.fspath(root))
    path = os.path.join(root, "dataset.json")
    with open(path, encoding="utf-8") as f:
        listed = json.load(f).get("test") or []
    images, names = [], []
    for i, entry in enumerate(listed):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise ValueError(f"{path}: test entry {i} is not a path or an {{'image': str}} object: {entry!r}")
        images.append(os.path.normpath(os.path.join(root, image)))
        names.append(_case_name(images[-1]))
    if not listed:
        folder = os.path.join(root, "imagesTs")
        if os.path.isdir(folder):
            images, names = _images_ts(folder)
    if not images:
        raise ValueError(f"{path} lists no test cases and {os.path.join(root, 'imagesTs')} holds no NIfTI files")
    for i, image in enumerate(images):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file of test entry {i} listed in {path} is missing: {image}")
    return [{"image": image, "name": name} for image, name in zip(images, names)]


def split_cases(cases: Sequence[Any], val_frac: float = 0.2, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split cases into (train, val) by a seeded shuffle; both keep the input order.

    ``round(len(cases) * val_frac)`` cases go to validation, clamped so that each side has at least one case
    when there are two or more. The split depends only on ``len(cases)``, ``val_frac`` and ``seed`` (Python's
    ``random.Random(seed)``, not the global RNG), so it is the same on every machine and run.

    Example:
        >>> split_cases(list("abcde"), val_frac=0.4, seed=0)
        (['a', 'd', 'e'], ['b', 'c'])
    """
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    n = len(cases)
    n_val = min(max(round(n * val_frac), 1), n - 1) if n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [case for i, case in enumerate(cases) if i not in val_idx]
    val = [case for i, case in enumerate(cases) if i in val_idx]
    return train, val


def split_from_file(cases: Sequence[Mapping[str, Any]], path: str | os.PathLike, fold: int = 0,
                    required: Sequence[str] = ("train", "val")) -> tuple[list[Any], list[Any]]:
    """Split ``cases`` (entries with a ``"name"``) into (train, val) as a JSON file lists their names: ``{"train":
    [...], "val": [...]}``, or nnU-Net's ``splits_final.json`` (a list of such folds; ``fold`` picks one). A name
    may carry its ``.nii.gz``; cases the file lists on neither side are left out. ``ValueError`` naming the file
    for a name no case has, a name on both sides, or an empty side, on the ``required`` sides (evaluation asks
    for ``("val",)``: a folder holding the validation cases only will do, the training side keeps what it has)."""
    try:
        with open(path) as f:
            split = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"split file {path}: {err}") from err
    if isinstance(split, list):
        if not 0 <= fold < len(split):
            raise ValueError(f"split file {path} holds {len(split)} fold(s); fold {fold} is not among them")
        split = split[fold]
    elif fold != 0:
        raise ValueError(f"split file {path} holds one split, not folds; fold {fold} is not among them")
    if not (isinstance(split, Mapping) and all(isinstance(split.get(k), list) for k in ("train", "val"))):
        raise ValueError(f"split file {path} must hold {{\"train\": [names], \"val\": [names]}} or a list of them")
    by_name = {case["name"]: case for case in cases}
    sides = []
    for side in ("train", "val"):
        names = [_case_name(str(n)) for n in split[side]]
        missing = [n for n in names if n not in by_name]
        if side not in required:
            names = [n for n in names if n in by_name]
        elif missing:
            raise ValueError(f"split file {path}: {side} names {len(missing)} case(s) dataset.json does not list, "
                             f"e.g. {missing[:3]} (training: data.split_file=null for the seeded split; evaluation: "
                             "--split all scores every labelled case)")
        elif not names:
            raise ValueError(f"split file {path}: no {side} cases")
        sides.append(set(names))
    both = sides[0] & sides[1]
    if both:
        raise ValueError(f"split file {path}: {len(both)} case(s) on both sides, e.g. {sorted(both)[:3]}")
    # dataset.json's order on each side, as split_cases keeps it
    return [c for c in cases if c["name"] in sides[0]], [c for c in cases if c["name"] in sides[1]]


def _indexed(mapping: Mapping, what: str) -> list[Any]:
    """The values of a ``{"0": ..., "1": ...}`` mapping in index order; the keys must be exactly 0..N-1."""
    try:
        by_index = {int(k): v for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{what} keys must be integers 0..N-1, got {list(mapping)}") from None
    if sorted(by_index) != list(range(len(mapping))):
        raise ValueError(f"{what} keys must be 0..N-1, got {list(mapping)}")
    return [by_index[i] for i in range(len(mapping))]


def _channel_names(properties: Mapping[str, Any], where: str = "dataset.json") -> tuple[str, ...] | None:
    """The image channels ``dataset.json`` declares, in channel order; ``None`` when it declares none."""
    for key in _CHANNEL_KEYS:
        if key not in properties:
            continue
        names = properties[key]
        if isinstance(names, str):
            return (names,)
        if not isinstance(names, Mapping) or not names:
            raise ValueError(f"{where}: {key!r} must map channel indices to names, like {{'0': 'CT'}}, got {names!r}")
        return tuple(str(name) for name in _indexed(names, f"{where}: {key!r}"))
    return None


def infer_modality(properties: Mapping[str, Any]) -> str:
    """``"CT"`` when a channel of ``dataset.json`` is named CT (MSD Liver, Lung, Pancreas, ...), else ``"MRI"``.

    The channels are read from ``modality`` or, when it is absent, from nnU-Net v2's ``channel_names``.

    Example:
        >>> infer_modality({"modality": {"0": "CT"}}), infer_modality({"modality": {"0": "T2", "1": "ADC"}})
        ('CT', 'MRI')
        >>> infer_modality({"channel_names": {"0": "CT"}})
        'CT'
    """
    names = _channel_names(properties) or ()
    return "CT" if any(name.strip().upper() == "CT" for name in names) else "MRI"


def num_input_channels(properties: Mapping[str, Any]) -> int:
    """Image channels of the task: the entries of ``modality`` (or ``channel_names``), 1 when neither is given.

    Example:
        >>> num_input_channels({"modality": {"0": "FLAIR", "1": "T1w"}}), num_input_channels({})
        (2, 1)
    """
    names = _channel_names(properties)
    return 1 if names is None else len(names)


def label_names(properties: Mapping[str, Any], where: str = "dataset.json") -> tuple[str, ...]:
    """Class names in label-value order, from ``labels`` as MSD writes it or as nnU-Net v2 does.

    MSD maps values to names (``{"0": "background", "1": "edema"}``), nnU-Net v2 names to values
    (``{"background": 0, "edema": 1}``); either way the values must be 0..N-1. nnU-Net v2's regions (a name mapped
    to a list of values) and its ``ignore`` label are rejected: fastseg3d trains one class per label value (BraTS'
    nested regions are ``data.label_mode: brats_regions``).

    Args:
        properties: ``dataset.json``'s content.
        where: how errors name the file.

    Raises:
        ValueError: ``labels`` is missing or in neither form, or has regions or an ``ignore`` label.

    Example:
        >>> label_names({"labels": {"0": "background", "1": "spleen"}})
        ('background', 'spleen')
        >>> label_names({"labels": {"background": 0, "edema": 1, "enhancing": 2}})
        ('background', 'edema', 'enhancing')
    """
    labels = properties.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{where} has no 'labels' mapping like {{'0': 'background', '1': ...}} "
                         "(or nnU-Net v2's {'background': 0, ...})")
    regions = {name: value for name, value in labels.items() if isinstance(value, (list, tuple))}
    if regions:
        raise ValueError(f"{where}: 'labels' has nnU-Net v2 regions (lists of label values) {regions}, which "
                         "fastseg3d does not train: map each name to one label value (for BraTS' nested TC/WT/ET, "
                         "use the label values with data.label_mode: brats_regions)")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in labels.values()):
        if "ignore" in labels:
            raise ValueError(f"{where}: 'labels' has nnU-Net v2's 'ignore' label (unannotated voxels), which "
                             "fastseg3d does not support: annotate those voxels or relabel them as background")
        if sorted(labels.values()) != list(range(len(labels))):
            raise ValueError(f"{where}: 'labels' values must be 0..N-1, each once, got {dict(labels)}")
        by_value = {value: name for name, value in labels.items()}
        return tuple(str(by_value[i]) for i in range(len(labels)))
    return tuple(str(name) for name in _indexed(labels, f"{where}: 'labels'"))


def _num_classes(properties: Mapping[str, Any]) -> int:
    return len(label_names(properties))


def num_output_channels(properties: Mapping[str, Any], label_mode: str = "labels") -> int:
    """Channels a network needs for this task: the number of classes in ``labels``, or 3 for ``brats_regions``.

    Example:
        >>> num_output_channels({"labels": {"0": "background", "1": "spleen"}})
        2
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    num_classes = _num_classes(properties)
    return len(BRATS_REGIONS) if label_mode == "brats_regions" else num_classes


def _is_positive(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def _is_nonzero(x: torch.Tensor) -> torch.Tensor:
    return x != 0


def _find_case_error(err: BaseException) -> InvalidCaseError | None:
    while err is not None:
        if isinstance(err, InvalidCaseError):
            return err
        err = err.__cause__
    return None


def _load_error(err: BaseException, case: Any) -> InvalidCaseError | None:
    """A case's files that could not be read (truncated or corrupt NIfTI): MONAI's wrapped error, with its root cause,
    under the files' names."""
    if not isinstance(case, dict) or "LoadImage" not in str(err):
        return None
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    files = " and ".join(str(case[k]) for k in ("image", "label") if k in case)
    detail = str(root).splitlines()[0] if str(root) else ""
    return InvalidCaseError(f"cannot read {files}: {type(root).__name__}" + (f": {detail}" if detail else ""))


@functools.cache
def _monai_classes() -> dict[str, type]:
    """Define the MONAI subclasses once MONAI is known to be importable (module ``__getattr__`` serves them)."""
    _require_monai()
    from monai.transforms import Compose, MapTransform

    class CheckCased(MapTransform):
        """Reject a loaded, channel-first case that would train silently wrong; the error names both files.

        Raises :class:`InvalidCaseError` (a ``ValueError``) when the image is not a (C, D, H, W) volume, when
        it has other than ``num_channels`` channels (the ones ``dataset.json`` declares; ``None``: any), when
        the label is not one channel of the image's spatial shape, when the label file's affine places it
        elsewhere than the image (voxel size, orientation or origin differing by more than 1e-3, relative or in
        mm), when a label value is not an integer in ``0..num_classes-1``, or when the image has NaN or inf. Put
        it right after ``EnsureChannelFirstd`` and before any resampling, so the shapes, affines and values are
        the files' own.

        Example:
            >>> check = CheckCased(num_classes=4)  # doctest: +SKIP
            >>> check({"image": image, "label": label})  # returns its input unchanged when the case is valid
        """

        def __init__(
            self, num_classes: int, image_key: str = "image", label_key: str = "label", num_channels: int | None = None
        ) -> None:
            super().__init__((image_key, label_key))
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}")
            if num_channels is not None and num_channels < 1:
                raise ValueError(f"num_channels must be >= 1, got {num_channels}")
            self.num_classes = num_classes
            self.num_channels = num_channels
            self.image_key = image_key
            self.label_key = label_key

        def _source(self, data: Mapping[str, Any]) -> str:
            files = []
            for key in (k for k in (self.image_key, self.label_key) if k in data):
                meta = getattr(data[key], "meta", {})
                files.append(f"{key} {meta.get('filename_or_obj', data.get('name', '<in memory>'))}")
            return ", ".join(files)

        def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
            image = torch.as_tensor(data[self.image_key])
            if image.ndim != 4:
                raise InvalidCaseError(
                    f"{self._source(data)}: image must be a channel-first 3-D volume, got shape {tuple(image.shape)}"
                )
            if self.num_channels is not None and image.shape[0] != self.num_channels:
                raise InvalidCaseError(
                    f"{self._source(data)}: image has {image.shape[0]} channel(s) but dataset.json declares "
                    f"{self.num_channels} ('modality' or 'channel_names'; MSD stores the channels of a multi-modal "
                    "image as the last axis of a 4-D NIfTI)"
                )
            if not torch.isfinite(image).all():
                raise InvalidCaseError(f"{self._source(data)}: image has NaN or inf values")
            if self.label_key not in data:  # an unlabelled case, to predict
                return dict(data)
            label = torch.as_tensor(data[self.label_key])
            if label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
                raise InvalidCaseError(
                    f"{self._source(data)}: label shape {tuple(label.shape)} does not match image shape "
                    f"{tuple(image.shape)} (expected (1, *{tuple(image.shape[1:])}))"
                )
            affines = [getattr(data[key], "affine", None) for key in (self.image_key, self.label_key)]
            if all(a is not None for a in affines):
                image_affine, label_affine = (torch.as_tensor(a, dtype=torch.float64) for a in affines)
                if not torch.allclose(label_affine, image_affine, rtol=1e-3, atol=1e-3):
                    raise InvalidCaseError(
                        f"{self._source(data)}: the label file's affine {label_affine[:3].tolist()} places it "
                        f"elsewhere than the image's {image_affine[:3].tolist()} (voxel size, orientation or "
                        "origin): the label would be misaligned; fix the label file's header"
                    )
            values = torch.unique(label)
            bad = values[(values < 0) | (values > self.num_classes - 1) | (values != values.round())]
            if bad.numel():
                raise InvalidCaseError(
                    f"{self._source(data)}: label values {bad[:8].tolist()} are outside the declared classes "
                    f"0..{self.num_classes - 1}"
                )
            return dict(data)

    class ConvertMSDBratsRegionsd(MapTransform):
        """MSD BraTS label (1, D, H, W) with 1 edema, 2 non-enhancing core, 3 enhancing -> float (3, D, H, W) regions.

        Channels are :data:`BRATS_REGIONS`: TC = 2 or 3, WT = 1, 2 or 3, ET = 3 (nested, so train them with a
        sigmoid, e.g. ``DiceLoss(sigmoid=True)``). The MetaTensor's affine and meta are kept.

        Example:
            >>> ConvertMSDBratsRegionsd("label")({"label": torch.tensor([[[[0, 1, 2, 3]]]])})["label"][:, 0, 0]
            tensor([[0., 0., 1., 1.],
                    [0., 1., 1., 1.],
                    [0., 0., 0., 1.]])
        """

        def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(data)
            for key in self.key_iterator(out):
                label = torch.as_tensor(out[key])
                core = (label == 2) | (label == 3)
                whole = core | (label == 1)
                out[key] = torch.cat([core, whole, label == 3], dim=0).float()
            return out

    class _PerVolume(MapTransform):
        """A dictionary transform applying ``volume`` to each key's channel-first (C, D, H, W) image."""

        def volume(self, image: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError

        def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(data)
            for key in self.key_iterator(out):
                image = out[key]
                if image.ndim != 4:
                    raise ValueError(f"{key} must be a channel-first (C, D, H, W) volume, got shape "
                                     f"{tuple(image.shape)}")
                out[key] = self.volume(image)
            return out

    class MinMaxPerSliced(_PerVolume):
        """Scale each slice of each channel to [0, 1] by its own minimum and maximum (a constant slice becomes 0).

        SegFormer3D's BraTS preprocessing, which fits scikit-learn's ``MinMaxScaler`` to each modality reshaped to
        (H * W, D): every index of the last axis (an axial slice of the BraTS files) is scaled on its own. Put it
        after ``Orientationd``: for volumes whose last axis stays the axial one (BraTS), reorienting first gives
        the same values.

        Args:
            keys: the images to scale.
            axis: the spatial axis whose slices are scaled apart (0, 1 or 2; default the last).

        Example:
            >>> x = torch.tensor([[[[1.0, 5.0], [3.0, 5.0]]]])  # (C, D, H, W) = (1, 1, 2, 2): slices along W
            >>> MinMaxPerSliced("image")({"image": x})["image"][0, 0]
            tensor([[0., 0.],
                    [1., 0.]])
        """

        def __init__(self, keys: Any, axis: int = -1, allow_missing_keys: bool = False) -> None:
            super().__init__(keys, allow_missing_keys)
            if axis not in (-3, -2, -1, 0, 1, 2) or isinstance(axis, bool):
                raise ValueError(f"axis must be a spatial axis, 0, 1 or 2 (or -3..-1), got {axis!r}")
            self.axis = axis % 3

        def volume(self, image: torch.Tensor) -> torch.Tensor:
            reduce = tuple(d for d in (1, 2, 3) if d != self.axis + 1)
            low = image.amin(dim=reduce, keepdim=True)
            span = image.amax(dim=reduce, keepdim=True) - low
            return (image - low) / torch.where(span > 0, span, torch.ones_like(span))

    class NormalizeOverBraind(_PerVolume):
        """Z-score each channel over one mask shared by all channels, the voxels where the channels' sum is
        positive (TransBTS's and MISSU's brain mask for BraTS), leaving the voxels outside it as they are.

        Unlike ``NormalizeIntensityd(nonzero=True, channel_wise=True)``, which takes each channel's own nonzero
        voxels, a brain voxel that is 0 in one modality is normalised with that modality's brain voxels (and
        counts in its mean and standard deviation). The standard deviation is the population one (numpy's, as the
        release computes it); a channel constant over the mask is only centred.

        Args:
            keys: the images to normalise, channel-first (C, D, H, W).

        Example:
            >>> x = torch.tensor([[[[0.0, 2.0, 4.0]]], [[[0.0, 0.0, 3.0]]]])  # (C, D, H, W) = (2, 1, 1, 3)
            >>> NormalizeOverBraind("image")({"image": x})["image"][:, 0, 0]
            tensor([[ 0., -1.,  1.],
                    [ 0., -1.,  1.]])
        """

        def volume(self, image: torch.Tensor) -> torch.Tensor:
            mask = image.sum(dim=0, keepdim=True) > 0
            n = mask.sum()
            if not n:
                return image
            inside = torch.where(mask, image, torch.zeros_like(image))
            mean = inside.sum(dim=(1, 2, 3), keepdim=True) / n
            centred = torch.where(mask, image - mean, torch.zeros_like(image))
            std = (centred.square().sum(dim=(1, 2, 3), keepdim=True) / n).sqrt()
            return torch.where(mask, centred / torch.where(std > 0, std, torch.ones_like(std)), image)

    class _Pipeline(Compose):
        """The MSD Compose: errors of :class:`CheckCased` come out as themselves and one crop as a dict.

        MONAI wraps every transform error in ``RuntimeError("applying transform ...")``, which hides the file
        name; and RandCropByPosNegLabeld returns a list even for one sample, which the default collate would
        batch wrongly. Both are undone here, and nothing else changes.
        """

        def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                out = super().__call__(input_, *args, **kwargs)
            except RuntimeError as err:
                case_error = _find_case_error(err) or _load_error(err, input_)
                if case_error is None:
                    raise
                raise case_error from None
            single = isinstance(out, list) and len(out) == 1 and not isinstance(input_, list)
            return out[0] if single else out

    classes = {"CheckCased": CheckCased, "ConvertMSDBratsRegionsd": ConvertMSDBratsRegionsd,
               "MinMaxPerSliced": MinMaxPerSliced, "NormalizeOverBraind": NormalizeOverBraind, "_Pipeline": _Pipeline}
    for name, cls in classes.items():
        # Make pickle find them through this module's __getattr__ (DataLoader workers under spawn pickle them).
        cls.__qualname__ = name
        cls.__module__ = __name__
    return classes


def __getattr__(name: str) -> type:
    if name in ("CheckCased", "ConvertMSDBratsRegionsd", "MinMaxPerSliced", "NormalizeOverBraind", "_Pipeline"):
        return _monai_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def msd_transforms(
    mode: str,
    *,
    modality: str = "MRI",
    spatial_size: Sequence[int] = (96, 96, 96),
    pixdim: Sequence[float] | float | None = None,
    num_classes: int,
    in_channels: int | None = None,
    label_mode: str = "labels",
    ct_range: tuple[float, float] = (-175.0, 250.0),
    num_samples: int = 1,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    crop_ratio: Sequence[float] | None = (1.0, 1.0),
    augment: Sequence[Mapping[str, Any]] | None = None,
    preprocess: Sequence[Mapping[str, Any]] | None = None,
) -> Compose:
    """MONAI dictionary transforms (keys ``image``, ``label``) from an MSD datalist entry to a training sample.

    Load (nibabel) -> channel first -> :class:`CheckCased` -> RAS -> optional resampling to ``pixdim``
    (bilinear image, nearest label) -> intensity normalisation (CT: HU window ``ct_range`` to [0, 1], clipped;
    MRI: z-score of the nonzero voxels per channel) -> crop to the image's foreground, or in place of those two
    the transforms ``preprocess`` describes; then for ``"train"``:
    pad to ``spatial_size``, ``num_samples`` random crops of ``spatial_size`` (centred on foreground and
    background voxels in the ratio ``crop_ratio``, or anywhere when it is ``None``), then the augmentation: by
    default a flip along each axis with ``flip_prob``, intensity scale and shift of ``intensity_jitter`` (each with
    probability 0.5), or the transforms ``augment`` describes; ``"val"`` is deterministic and keeps the whole
    volume.

    Output (a dict for ``"val"`` and for ``num_samples=1``, else a list of ``num_samples`` dicts, which
    ``monai.data.list_data_collate`` flattens into the batch): ``"image"`` float32 MetaTensor (C, D, H, W),
    ``"label"`` int64 (1, D, H, W) for ``label_mode="labels"`` or float32 (3, D, H, W) TC/WT/ET for
    ``"brats_regions"``, and the entry's other keys (``"name"``). ``image.affine`` maps the returned voxels to
    world space (it includes the reorientation, resampling and foreground crop, so a prediction saved with it
    overlays the input scan); ``image.meta["original_affine"]`` is the file's own affine, and
    ``monai.transforms.Invertd`` can map a prediction back onto the file's grid.

    Args:
        mode: ``"train"``, ``"val"`` or ``"predict"`` (``"val"`` for cases without a label: keys ``image`` only).
        modality: ``"CT"`` or ``"MRI"`` (see :func:`infer_modality`).
        spatial_size: training crop size; volumes smaller than it are zero-padded first.
        pixdim: target voxel spacing in mm, or ``None`` to keep the files' spacing.
        num_classes: classes in the label files (``len(dataset.json["labels"])``); labels outside
            ``0..num_classes-1`` are an error. ``"brats_regions"`` needs the 4-class MSD BraTS coding.
        in_channels: image channels (:func:`num_input_channels`); an image with another number is an error.
            ``None`` takes any number.
        label_mode: ``"labels"`` (class indices) or ``"brats_regions"`` (see :class:`ConvertMSDBratsRegionsd`).
        ct_range: HU window mapped to [0, 1] for CT.
        num_samples: random crops per volume in ``"train"`` mode.
        flip_prob: probability of a flip along each spatial axis in ``"train"`` mode.
        intensity_jitter: relative scale and absolute shift range of the intensity augmentation.
        crop_ratio: ``(pos, neg)`` of ``RandCropByPosNegLabeld`` (``(1, 0)``: every crop centred on foreground),
            or ``None`` for crops centred anywhere (``RandSpatialCropSamplesd``).
        augment: instead of the default flips and intensity jitter, MONAI dictionary transforms as a MONAI bundle
            writes them (see :func:`build_transforms`), e.g. ``[{"_target_": "RandRotate90d", "keys": ["image",
            "label"], "prob": 0.1}]``; they run on the crops, the label still holding class indices.
        preprocess: instead of the normalisation and foreground crop, transforms written as ``augment`` is, run in
            every mode on the whole volume (in ``"predict"`` mode without a label: their ``label`` keys may be
            missing); e.g. SegFormer3D's official preprocessing: :class:`MinMaxPerSliced`, ``SpatialCropd`` to a
            fixed box, ``Transposed`` (spatial transforms MONAI can invert, so predictions still map back onto
            the files' grid).

    Example:
        >>> tf = msd_transforms("train", modality="CT", spatial_size=(64, 64, 64), num_classes=2)  # doctest: +SKIP
        >>> sample = tf({"image": "img.nii.gz", "label": "seg.nii.gz"})  # doctest: +SKIP
        >>> sample["image"].shape, sample["label"].dtype  # doctest: +SKIP
        (torch.Size([1, 64, 64, 64]), torch.int64)
    """
    if mode not in ("train", "val", "predict"):
        raise ValueError(f"mode must be 'train', 'val' or 'predict', got {mode!r}")
    modality = str(modality).upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if label_mode == "brats_regions" and num_classes != _BRATS_NUM_CLASSES:
        raise ValueError(
            "label_mode='brats_regions' needs the MSD BraTS coding (0 background, 1 edema, 2 non-enhancing core, "
            f"3 enhancing), i.e. num_classes=4, got num_classes={num_classes}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}")
    spatial_size = tuple(int(s) for s in spatial_size)
    if len(spatial_size) != 3 or min(spatial_size) < 1:
        raise ValueError(f"spatial_size must be 3 positive ints, got {spatial_size}")
    if in_channels is not None and in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (or None), got {in_channels}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not ct_range[0] < ct_range[1]:
        raise ValueError(f"ct_range must be (low, high) with low < high, got {ct_range}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if intensity_jitter < 0:
        raise ValueError(f"intensity_jitter must be >= 0, got {intensity_jitter}")
    if crop_ratio is not None and (len(crop_ratio) != 2 or min(crop_ratio) < 0 or sum(crop_ratio) <= 0):
        raise ValueError(f"crop_ratio must be (pos, neg) >= 0, not both 0, or None, got {crop_ratio}")

    _require_monai()
    classes = _monai_classes()
    from monai import transforms as T

    keys = ("image",) if mode == "predict" else ("image", "label")
    tf: list = [
        T.LoadImaged(keys, reader="NibabelReader", image_only=True),
        T.EnsureChannelFirstd(keys),
        classes["CheckCased"](num_classes, num_channels=in_channels),
        # labels=None is the nibabel RAS convention in MONAI 1.5 and the new default in 1.6 (silences a warning).
        T.Orientationd(keys, axcodes="RAS", labels=None),
    ]
    if pixdim is not None:
        tf.append(T.Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")[:len(keys)]))
    if preprocess is not None:
        built = build_transforms(preprocess, "preprocess")
        tf += _allow_missing_label(built) if mode == "predict" else built
    else:
        if modality == "CT":
            tf.append(
                T.ScaleIntensityRanged("image", a_min=ct_range[0], a_max=ct_range[1], b_min=0.0, b_max=1.0,
                                       clip=True)
            )
            crop_select = _is_positive  # the window maps air to 0
        else:
            tf.append(T.NormalizeIntensityd("image", nonzero=True, channel_wise=True))
            # Half of the normalised voxels are negative, so image > 0 would crop into the anatomy; the zeros that
            # nonzero=True left untouched are the background.
            crop_select = _is_nonzero
        tf.append(T.CropForegroundd(keys, source_key="image", select_fn=crop_select, allow_smaller=True))
    if mode == "train":
        tf += [
            T.SpatialPadd(keys, spatial_size=spatial_size),
            T.RandSpatialCropSamplesd(keys, roi_size=spatial_size, num_samples=num_samples, random_size=False)
            if crop_ratio is None else T.RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=spatial_size, pos=crop_ratio[0], neg=crop_ratio[1],
                num_samples=num_samples
            ),
        ]
        if augment is None:
            tf += [
                *(T.RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)),
                T.RandScaleIntensityd("image", factors=intensity_jitter, prob=0.5),
                T.RandShiftIntensityd("image", offsets=intensity_jitter, prob=0.5),
            ]
        else:
            tf += build_transforms(augment)
    tf.append(T.EnsureTyped("image", dtype=torch.float32, track_meta=True))
    if mode != "predict":
        if label_mode == "brats_regions":
            tf.append(classes["ConvertMSDBratsRegionsd"]("label"))
        tf.append(T.EnsureTyped("label", dtype=torch.int64 if label_mode == "labels" else torch.float32,
                                track_meta=True))
    return classes["_Pipeline"](tf)


def _allow_missing_label(transforms: list) -> list:
    """The transforms (and those nested in ``Compose``/``OneOf``...) told to skip keys a case lacks: a case to
    predict has no label."""
    from monai.transforms import MapTransform

    def walk(t: Any) -> None:
        if isinstance(t, MapTransform):
            t.allow_missing_keys = True
        for inner in getattr(t, "transforms", ()) or ():
            walk(inner)

    for t in transforms:
        walk(t)
    return transforms


def build_transforms(specs: Sequence[Mapping[str, Any]], where: str = "augment") -> list:
    """The transforms a list of specs describes, as a MONAI bundle writes them: ``{"_target_": name, **kwargs}``,
    ``name`` a transform of ``monai.transforms`` or a dotted path to any callable (``"mypkg.MyTransformd"``); a
    value that is itself such a spec (or a list of them) is built first, so ``OneOf`` and ``Compose`` take
    their transforms the same way. ``ValueError`` naming the spec (``where[i]``) that cannot be built."""
    import importlib

    from monai import transforms as T

    def build(node: Any, at: str) -> Any:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if not isinstance(target, str) or not target:
                raise ValueError(f"{at} must name its transform in '_target_', got {dict(node)!r}")
            module, _, name = target.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module) if module else T, name)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"{at}: no transform {target!r} (a name in monai.transforms or a dotted path)"
                                 ) from err
            kwargs = {k: build(v, f"{at}.{k}") for k, v in node.items() if k != "_target_"}
            try:
                return cls(**kwargs)
            except Exception as err:
                raise ValueError(f"{at}: {target}({kwargs}) failed: {err}") from err
        if isinstance(node, (list, tuple)):
            return [build(v, f"{at}[{i}]") for i, v in enumerate(node)]
        return node

    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"{where} must be a list of transforms, got {specs!r}")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}[{i}] must be a mapping with '_target_', got {spec!r}")
        out.append(build(spec, f"{where}[{i}]"))
    return out


def build_msd_datasets(
    root: str | os.PathLike,
    *,
    modality: str | None = None,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | float | None = None,
    label_mode: str = "labels",
    num_samples: int = 1,
    val_frac: float = 0.2,
    seed: int = 0,
    cache: bool = False,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    crop_ratio: Sequence[float] | None = (1.0, 1.0),
    augment: Sequence[Mapping[str, Any]] | None = None,
    preprocess: Sequence[Mapping[str, Any]] | None = None,
    split_file: str | os.PathLike | None = None,
    fold: int = 0,
    split_sides: Sequence[str] = ("train", "val"),
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Train and val datasets of an MSD task folder, split by :func:`split_cases` (or by ``split_file`` and
    ``fold``: :func:`split_from_file`), with :func:`msd_transforms`.

    ``num_classes`` comes from ``dataset.json``'s ``labels``, the image channels every case must have from
    :func:`num_input_channels` and ``modality`` (when ``None``) from :func:`infer_modality`; the network needs
    :func:`num_output_channels` outputs. With ``num_samples > 1`` a training item is a list of crops, so load it
    with ``monai.data.DataLoader(train_ds, batch_size=B, collate_fn=monai.data.list_data_collate)``, which gives
    batches of ``B * num_samples`` crops (it also collates the ``num_samples=1`` dicts). Validation items are
    whole volumes of different sizes: use ``batch_size=1``. ``cache=True`` uses ``monai.data.CacheDataset``,
    which keeps every case after its last deterministic transform in memory.

    Returns:
        ``(train_ds, val_ds, properties)`` with ``properties`` as from :func:`load_msd_datalist`.

    Example:
        >>> train_ds, val_ds, props = build_msd_datasets("Task09_Spleen", spatial_size=(96, 96, 96),  # doctest: +SKIP
        ...                                              pixdim=(1.5, 1.5, 2.0), num_samples=4)
    """
    properties, cases = load_msd_datalist(root)
    _require_monai()
    from monai.data import CacheDataset, Dataset

    num_classes = _num_classes(properties)
    modality = infer_modality(properties) if modality is None else modality
    if split_file is not None:
        train_cases, val_cases = split_from_file(cases, split_file, fold, split_sides)
    else:
        train_cases, val_cases = split_cases(cases, val_frac=val_frac, seed=seed)
    common = {
        "modality": modality,
        "spatial_size": spatial_size,
        "pixdim": pixdim,
        "num_classes": num_classes,
        "in_channels": num_input_channels(properties),
        "label_mode": label_mode,
        "preprocess": preprocess,
    }
    train_tf = msd_transforms(
        "train", num_samples=num_samples, flip_prob=flip_prob, intensity_jitter=intensity_jitter,
        crop_ratio=crop_ratio, augment=augment, **common
    )
    # Reproducible ds[i] without a DataLoader; monai.data.DataLoader reseeds the transforms per worker anyway.
    train_tf.set_random_state(seed=seed)
    val_tf = msd_transforms("val", **common)
    if cache:
        try:
            train_ds = CacheDataset(train_cases, train_tf, progress=False)
            return train_ds, CacheDataset(val_cases, val_tf, progress=False), properties
        except Exception:
            _join_pool_workers()
            raise
    return Dataset(train_cases, train_tf), Dataset(val_cases, val_tf), properties


def _join_pool_workers(timeout: float = 120.0) -> None:
    """Wait for the threads of a ``multiprocessing`` thread pool that an error left working. ``CacheDataset`` loads
    cases on one; when a case raises, the error reaches the caller while the other threads still load theirs, and a
    process that exits with torch code running on them aborts ("terminate called without an active exception")."""
    from multiprocessing.pool import worker

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and getattr(thread, "_target", None) is worker:
            thread.join(timeout)
