"""MSD task folders: datalist, split, transforms, case checks and batching, on tiny fake tasks built with nibabel."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastseg3d.data import msd
from fastseg3d.data.msd import (
    build_msd_datasets,
    build_transforms,
    infer_modality,
    label_names,
    load_msd_datalist,
    load_msd_test_list,
    msd_transforms,
    num_input_channels,
    num_output_channels,
    split_cases,
    split_from_file,
)

nib = pytest.importorskip("nibabel")
monai_data = pytest.importorskip("monai.data")

SHAPE = (20, 18, 16)
# Flipped x axis (so RAS reorients it), anisotropic spacing and an offset, as in real scans.
AFFINE = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, 1.2, 0.0, -12.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
BRATS_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
CT_HU = {"air": -1000.0, "tissue": 37.5, "fat": -500.0, "bone": 1000.0}  # 37.5 HU is the middle of (-175, 250)


def _label_volume(shift: int = 0) -> np.ndarray:
    """Nested blob: edema (1) around non-enhancing core (2) around enhancing core (3)."""
    label = np.zeros(SHAPE, np.uint8)
    label[5 + shift : 14 + shift, 4:13, 3:12] = 1
    label[7 + shift : 12 + shift, 6:11, 5:10] = 2
    label[8 + shift : 10 + shift, 7:9, 6:8] = 3
    return label


def _save(array: np.ndarray, path: str) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), path)


def _make_task(root, n_cases: int = 3, modality: dict | None = None, labels: dict | None = None) -> str:
    """An MSD-like task folder; MRI cases are 2-modality 4-D NIfTIs (X, Y, Z, C) with a zero border like skull-strip."""
    modality = modality or {"0": "FLAIR", "1": "T1w"}
    is_ct = infer_modality({"modality": modality}) == "CT"
    task = os.path.join(root, "Task01_Fake")
    os.makedirs(os.path.join(task, "imagesTr"))
    os.makedirs(os.path.join(task, "labelsTr"))
    rng = np.random.default_rng(0)
    training = []
    for i in range(n_cases):
        name = f"FAKE_{i:03d}"
        label = _label_volume(shift=i % 2)
        if is_ct:
            image = np.full(SHAPE, CT_HU["air"], np.float32)
            image[2:-2, 2:-2, 2:-2] = CT_HU["tissue"]
            image[3:5, 3:5, 3:5] = CT_HU["fat"]
            image[label == 3] = CT_HU["bone"]
        else:
            image = np.zeros((*SHAPE, len(modality)), np.float32)
            image[2:-2, 2:-2, 2:-2] = rng.uniform(1.0, 2.0, (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4, len(modality)))
            image[label > 0] += 3.0
        _save(image, os.path.join(task, "imagesTr", f"{name}.nii.gz"))
        _save(label, os.path.join(task, "labelsTr", f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": "Fake",
        "description": "tiny fake MSD task",
        "reference": "none",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D" if is_ct else "4D",
        "modality": modality,
        "labels": labels or BRATS_LABELS,
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return task


def _rewrite_json(task: str, drop: tuple[str, ...] = (), **entries) -> None:
    path = os.path.join(task, "dataset.json")
    with open(path) as f:
        meta = json.load(f)
    for key in drop:
        del meta[key]
    meta.update(entries)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.fixture
def task(tmp_path) -> str:
    return _make_task(str(tmp_path))


@pytest.fixture
def cases(task) -> list[dict]:
    return load_msd_datalist(task)[1]


def _val(case: dict, **kwargs) -> dict:
    return msd_transforms("val", num_classes=4, **kwargs)(case)


# ----------------------------------------------------------------------------------------------- datalist and split


def test_load_datalist_resolves_relative_paths(task):
    props, cases = load_msd_datalist(task)
    assert [c["name"] for c in cases] == ["FAKE_000", "FAKE_001", "FAKE_002"]
    for c in cases:
        assert os.path.isabs(c["image"]) and os.path.isfile(c["image"]) and "/./" not in c["image"]
        assert c["image"] == os.path.join(task, "imagesTr", c["name"] + ".nii.gz")
        assert c["label"] == os.path.join(task, "labelsTr", c["name"] + ".nii.gz")
    assert "training" not in props
    assert props["labels"] == BRATS_LABELS and props["modality"] == {"0": "FLAIR", "1": "T1w"}
    assert props["numTraining"] == 3
    assert infer_modality(props) == "MRI"
    assert num_output_channels(props) == 4 and num_output_channels(props, "brats_regions") == 3


def test_load_datalist_relative_root(task, monkeypatch):
    monkeypatch.chdir(os.path.dirname(task))
    _, cases = load_msd_datalist(os.path.basename(task))
    assert cases[0]["image"] == os.path.join(task, "imagesTr", "FAKE_000.nii.gz")


def test_infer_modality():
    assert infer_modality({"modality": {"0": "CT"}}) == "CT"
    assert infer_modality({"modality": {"0": "T2", "1": "ADC"}}) == "MRI"
    assert infer_modality({}) == "MRI"
    # a CT task spelled in lower case or padded is still windowed as CT, not z-scored as MRI
    assert infer_modality({"modality": {"0": "ct"}}) == infer_modality({"channel_names": {"0": " CT "}}) == "CT"


@pytest.mark.parametrize("props, modality, channels", [
    ({"channel_names": {"0": "CT"}}, "CT", 1),
    ({"channel_names": {"0": "T2", "1": "ADC"}}, "MRI", 2),
    ({"modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd"}, "channel_names": {"0": "CT"}}, "MRI", 3),  # modality first
    ({"modality": "CT"}, "CT", 1),
    ({}, "MRI", 1),
])
def test_channels_from_modality_or_channel_names(props, modality, channels):
    assert infer_modality(props) == modality and num_input_channels(props) == channels


@pytest.mark.parametrize("labels, names", [
    ({"0": "background", "1": "edema", "2": "core"}, ("background", "edema", "core")),
    ({"1": "edema", "0": "background"}, ("background", "edema")),
    ({"background": 0, "edema": 1, "core": 2}, ("background", "edema", "core")),
    ({"core": 2, "background": 0, "edema": 1}, ("background", "edema", "core")),
])
def test_label_names_msd_and_nnunet_v2_forms(labels, names):
    assert label_names({"labels": labels}) == names
    assert num_output_channels({"labels": labels}) == len(names)


@pytest.mark.parametrize("entries, match", [
    ({"labels": {"background": 0, "whole tumor": [1, 2, 3], "enhancing": 3}}, "regions"),
    ({"labels": {"background": 0, "tumour": 1, "ignore": 2}}, "'ignore' label"),
    ({"labels": {"0": "background", "2": "tumour"}}, "0..N-1"),
    ({"labels": {"background": 0, "tumour": 2}}, "0..N-1"),
    ({"labels": {"background": 0, "a": 1, "b": 1}}, "0..N-1"),
    ({"labels": {"background": 0, "tumour": "1"}}, "integers"),
    ({"labels": {}}, "no 'labels'"),
    ({"channel_names": {"1": "CT"}}, "'channel_names' keys must be 0..N-1"),
    ({"modality": ["T2", "ADC"]}, "'modality' must map channel indices"),
])
def test_unreadable_dataset_json_names_the_file(task, entries, match):
    _rewrite_json(task, drop=("modality",) if "channel_names" in entries else (), **entries)
    with pytest.raises(ValueError, match=match) as info:
        load_msd_datalist(task)
    assert os.path.join(task, "dataset.json") in str(info.value)


def test_split_deterministic_and_disjoint():
    items = [f"case{i}" for i in range(10)]
    train, val = split_cases(items, val_frac=0.2, seed=3)
    assert (train, val) == split_cases(items, val_frac=0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and sorted(train + val) == sorted(items)
    assert any(split_cases(items, val_frac=0.2, seed=s)[1] != val for s in range(4, 10))
    assert train == [x for x in items if x in train]  # input order kept


@pytest.mark.parametrize("n, val_frac", [(2, 0.2), (3, 0.01), (3, 0.99), (5, 0.5)])
def test_split_keeps_one_case_each_side(n, val_frac):
    train, val = split_cases(list(range(n)), val_frac=val_frac)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n


def test_split_from_file_and_nnunet_folds(tmp_path):
    cases = [{"name": f"c{i}"} for i in range(5)]
    own = tmp_path / "split.json"
    own.write_text(json.dumps({"train": ["c3", "c0.nii.gz", "c1"], "val": ["c4"]}))
    train, val = split_from_file(cases, own)
    assert [c["name"] for c in train] == ["c0", "c1", "c3"] and [c["name"] for c in val] == ["c4"]  # c2 unused
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c2"]}, {"train": ["c2", "c3"], "val": ["c4"]}]))
    assert [c["name"] for c in split_from_file(cases, folds, fold=1)[1]] == ["c4"]
    for content, match in (({"train": ["c0"], "val": ["c9"]}, r"val names 1 case\(s\) dataset.json does not list"),
                           ({"train": ["c0", "c1"], "val": ["c1"]}, "1 case\\(s\\) on both sides"),
                           ({"train": ["c0"], "val": []}, "no val cases"),
                           ({"train": ["c0"]}, "must hold")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            split_from_file(cases, bad)
    with pytest.raises(ValueError, match="holds 2 fold"):
        split_from_file(cases, folds, fold=2)
    with pytest.raises(ValueError, match="holds one split, not folds"):
        split_from_file(cases, own, fold=1)
    with pytest.raises(ValueError, match="split file .*missing.json"):
        split_from_file(cases, tmp_path / "missing.json")


def test_datasets_follow_a_split_file(task, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["FAKE_001", "FAKE_002"], "val": ["FAKE_000"]}))
    train_ds, val_ds, _ = build_msd_datasets(task, spatial_size=(8, 8, 8), split_file=split)
    assert [c["name"] for c in train_ds.data] == ["FAKE_001", "FAKE_002"]
    assert [c["name"] for c in val_ds.data] == ["FAKE_000"]


def test_split_rejects_bad_fraction():
    for val_frac in (1.0, 0.0, -0.1):  # 0 would still draw one validation case: refused, not silently changed
        with pytest.raises(ValueError, match="val_frac"):
            split_cases([1, 2, 3], val_frac=val_frac)


@pytest.mark.parametrize("n, val_frac, n_val", [(10, 0.27, 3), (3, 0.5, 2), (10, 0.25, 2)])
def test_split_rounds_the_validation_share(n, val_frac, n_val):
    """round(n * val_frac) cases validate, as documented (2.7 -> 3, where the floor gives 2)."""
    train, val = split_cases(list(range(n)), val_frac=val_frac)
    assert (len(train), len(val)) == (n - n_val, n_val)


# ------------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("num_samples", [1, 2])
def test_train_labels_shapes_and_dtypes(cases, num_samples):
    tf = msd_transforms("train", spatial_size=(12, 10, 8), num_classes=4, num_samples=num_samples)
    out = tf(cases[0])
    samples = out if num_samples > 1 else [out]
    assert isinstance(out, list if num_samples > 1 else dict) and len(samples) == num_samples
    for s in samples:
        assert s["image"].shape == (2, 12, 10, 8) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 12, 10, 8) and s["label"].dtype == torch.int64
        assert set(s["label"].unique().tolist()) <= {0, 1, 2, 3}
        assert s["name"] == "FAKE_000"


def test_train_pads_volumes_smaller_than_the_crop(cases):
    out = msd_transforms("train", spatial_size=(32, 32, 32), num_classes=4)(cases[0])
    assert out["image"].shape == (2, 32, 32, 32) and out["label"].shape == (1, 32, 32, 32)


def test_train_brats_regions_are_nested_binary(cases):
    out = msd_transforms("train", spatial_size=(12, 10, 8), num_classes=4, label_mode="brats_regions")(cases[0])
    label = out["label"]
    assert label.shape == (3, 12, 10, 8) and label.dtype == torch.float32
    assert set(label.unique().tolist()) <= {0.0, 1.0}
    tc, wt, et = label
    assert bool((wt >= tc).all()) and bool((tc >= et).all())


def test_brats_regions_mapping_on_known_voxels(cases):
    labels = _val(cases[0])["label"][0]
    regions = _val(cases[0], label_mode="brats_regions")["label"]
    assert regions.shape == (3, *labels.shape)
    expected = {0: (0, 0, 0), 1: (0, 1, 0), 2: (1, 1, 0), 3: (1, 1, 1)}  # MSD coding -> (TC, WT, ET)
    for value, channels in expected.items():
        mask = labels == value
        assert mask.any(), f"class {value} missing from the fake case"
        for channel, want in zip(regions, channels):
            assert bool((channel[mask] == want).all()), (value, channels)


def test_convert_brats_regions_direct():
    out = msd.ConvertMSDBratsRegionsd("label")({"label": torch.tensor([[[[0, 1, 2, 3]]]])})["label"]
    assert out.dtype == torch.float32
    assert out[:, 0, 0].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]


def _blob_center_world(affine: np.ndarray, label: np.ndarray, value: int = 3) -> np.ndarray:
    center = np.argwhere(label == value).mean(axis=0)
    return (np.asarray(affine) @ np.append(center, 1.0))[:3]


@pytest.mark.parametrize("pixdim", [None, (1.0, 1.0, 1.0)])
def test_val_keeps_world_affine(cases, pixdim):
    out = _val(cases[1], pixdim=pixdim)
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and label.dtype == torch.int64 and label.shape[1:] == image.shape[1:]
    affine = image.affine.numpy()
    spacing = (1.5, 1.2, 2.0) if pixdim is None else pixdim
    np.testing.assert_allclose(np.diag(affine)[:3], spacing, atol=1e-5)  # RAS: positive diagonal
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), AFFINE, atol=1e-6)
    np.testing.assert_allclose(label.affine.numpy(), affine)
    file_label = nib.load(cases[1]["label"]).get_fdata()
    # The enhancing blob lies at the same world position in the file and in the output.
    np.testing.assert_allclose(
        _blob_center_world(affine, label[0].numpy()), _blob_center_world(AFFINE, file_label), atol=0.75
    )
    if pixdim is None:  # the zero border is cropped away, the flipped x axis is reversed
        assert image.shape == (2, SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4)
        np.testing.assert_array_equal(label[0].numpy(), file_label[::-1][2:-2, 2:-2, 2:-2])


def test_val_is_deterministic(cases):
    tf = msd_transforms("val", num_classes=4)
    torch.testing.assert_close(tf(cases[0])["image"].as_tensor(), tf(cases[0])["image"].as_tensor())


def test_resampling_never_invents_a_label_value(cases):
    """pixdim resamples the label by nearest neighbour: a label of classes 0 and 3 only, interpolated linearly,
    would come out with 1s and 2s along the border (classes the file never had)."""
    label = np.where(_label_volume() > 0, 3, 0).astype(np.uint8)
    _break_case(cases[0], label=label)
    out = _val(cases[0], pixdim=(1.0, 1.0, 1.0))
    assert out["image"].shape[1:] != (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4)  # it was resampled
    assert set(out["label"].unique().tolist()) == {0, 3}


def test_mri_normalised_per_channel(cases):
    image = _val(cases[0])["image"]
    for channel in image:
        nonzero = channel[channel != 0]
        assert abs(float(nonzero.mean())) < 1e-3 and abs(float(nonzero.std()) - 1) < 1e-2


def test_ct_normalisation_range(tmp_path):
    task = _make_task(str(tmp_path), modality={"0": "CT"}, labels={"0": "background", "1": "a", "2": "b", "3": "c"})
    props, cases = load_msd_datalist(task)
    assert infer_modality(props) == "CT"
    out = _val(cases[0], modality="CT")
    image = out["image"]
    assert image.shape[0] == 1 and float(image.min()) == 0.0 and float(image.max()) == 1.0
    torch.testing.assert_close(image[out["label"] == 1].unique(), torch.tensor([0.5]))  # 37.5 HU
    assert bool((image[out["label"] == 3] == 1.0).all())  # 1000 HU clipped
    # The air around the body is cropped away with the foreground crop.
    assert image.shape[1:] == (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4)


def test_nnunet_v2_ct_task_is_windowed_as_ct(tmp_path):
    task = _make_task(str(tmp_path), modality={"0": "CT"}, labels={"0": "background", "1": "a", "2": "b", "3": "c"})
    _rewrite_json(task, drop=("modality",), channel_names={"0": "CT"},
                  labels={"background": 0, "a": 1, "b": 2, "c": 3})
    train_ds, val_ds, props = build_msd_datasets(task, spatial_size=(8, 8, 8), val_frac=0.4)
    assert infer_modality(props) == "CT" and num_output_channels(props) == 4
    out = val_ds[0]
    image = out["image"]
    assert image.shape[0] == 1 and float(image.min()) == 0.0 and float(image.max()) == 1.0  # HU window, not z-score
    torch.testing.assert_close(image[out["label"] == 1].unique(), torch.tensor([0.5]))  # 37.5 HU
    assert train_ds[0]["image"].shape == (1, 8, 8, 8)


def _transform_types(tf) -> list[str]:
    return [type(t).__name__ for t in tf.transforms]


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_prob_flips_image_and_label_along_every_axis(cases, flip_prob):
    """The default augmentation flips along each of the three axes with flip_prob, image and label together: a crop
    of the whole (foreground-cropped) volume without intensity jitter is the validation volume, flipped along all
    axes at flip_prob 1 and as it is at 0."""
    val = _val(cases[0])
    size = tuple(val["image"].shape[1:])
    tf = msd_transforms("train", spatial_size=size, num_classes=4, crop_ratio=None, flip_prob=flip_prob,
                        intensity_jitter=0.0)
    tf.set_random_state(seed=0)
    out = tf(cases[0])
    dims = (1, 2, 3) if flip_prob else ()
    assert torch.equal(out["label"].as_tensor(), val["label"].as_tensor().flip(dims))
    torch.testing.assert_close(out["image"].as_tensor(), val["image"].as_tensor().flip(dims))


def test_crop_ratio_centres_every_crop_on_foreground_or_anywhere(cases):
    """(1, 0): every crop's centre voxel is foreground; None: crops anywhere (RandSpatialCropSamplesd), no label
    needed to place them."""
    tf = msd_transforms("train", spatial_size=(5, 5, 5), num_classes=4, num_samples=4, crop_ratio=(1.0, 0.0))
    tf.set_random_state(seed=0)
    for _ in range(3):
        assert all(s["label"][0, 2, 2, 2] > 0 for s in tf(cases[0]))
    anywhere = msd_transforms("train", spatial_size=(5, 5, 5), num_classes=4, num_samples=4, crop_ratio=None)
    assert "RandSpatialCropSamplesd" in _transform_types(anywhere)
    assert "RandCropByPosNegLabeld" not in _transform_types(anywhere)
    anywhere.set_random_state(seed=0)
    assert any(s["label"][0, 2, 2, 2] == 0 for _ in range(3) for s in anywhere(cases[0]))
    for bad in ((1.0,), (0.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="crop_ratio"):
            msd_transforms("train", num_classes=4, crop_ratio=bad)


def test_augment_replaces_the_default_augmentation(cases):
    default = _transform_types(msd_transforms("train", spatial_size=(8, 8, 8), num_classes=4))
    assert default.count("RandFlipd") == 3 and "RandShiftIntensityd" in default
    specs = [{"_target_": "RandRotate90d", "keys": ["image", "label"], "prob": 1.0, "max_k": 3},
             {"_target_": "monai.transforms.RandShiftIntensityd", "keys": ["image"], "offsets": 0.1, "prob": 1.0}]
    tf = msd_transforms("train", spatial_size=(8, 8, 8), num_classes=4, augment=specs)
    types = _transform_types(tf)
    assert "RandFlipd" not in types and types.count("RandShiftIntensityd") == 1 and "RandRotate90d" in types
    assert types.index("RandRotate90d") > types.index("RandCropByPosNegLabeld")  # on the crops
    out = pickle.loads(pickle.dumps(tf))(cases[0])
    assert out["image"].shape == (2, 8, 8, 8) and set(out["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert "RandFlipd" not in _transform_types(msd_transforms("train", num_classes=4, augment=[]))


def test_build_transforms_nested_and_named_errors():
    from monai.transforms import OneOf, RandFlipd

    (one_of,) = build_transforms([{"_target_": "OneOf", "weights": [0.5, 0.5], "transforms": [
        {"_target_": "RandFlipd", "keys": ["image"], "prob": 1.0, "spatial_axis": 0},
        {"_target_": "Compose", "transforms": [{"_target_": "RandFlipd", "keys": ["image"], "prob": 1.0}]}]}])
    assert isinstance(one_of, OneOf) and isinstance(one_of.transforms[0], RandFlipd)
    assert list(one_of.weights) == [0.5, 0.5]
    for specs, match in (
            ({"_target_": "RandFlipd"}, r"augment must be a list"),
            (["RandFlipd"], r"augment\[0\] must be a mapping"),
            ([{"keys": ["image"]}], r"augment\[0\] must name its transform in '_target_'"),
            ([{"_target_": "RandFlipX", "keys": ["image"]}], r"augment\[0\]: no transform 'RandFlipX'"),
            ([{"_target_": "nowhere.RandFlipd"}], r"augment\[0\]: no transform 'nowhere.RandFlipd'"),
            ([{"_target_": "RandFlipd", "keys": ["image"], "bogus": 1}], r"augment\[0\]: RandFlipd\(.*\) failed"),
            ([{"_target_": "OneOf", "transforms": [{"_target_": "RandZoom9d"}]}],
             r"augment\[0\].transforms\[0\]: no transform 'RandZoom9d'")):
        with pytest.raises(ValueError, match=match):
            build_transforms(specs)


def test_transforms_pickle(cases):
    tf = pickle.loads(pickle.dumps(msd_transforms("train", spatial_size=(8, 8, 8), num_classes=4)))
    assert tf(cases[0])["image"].shape == (2, 8, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "test"}, "mode"),
        ({"modality": "PET"}, "modality"),
        ({"label_mode": "onehot"}, "label_mode"),
        ({"label_mode": "brats_regions", "num_classes": 3}, "num_classes=4"),
        ({"spatial_size": (8, 8)}, "spatial_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"in_channels": 0}, "in_channels"),
        ({"spatial_size": (8, 0, 8)}, "spatial_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"intensity_jitter": -0.1}, "intensity_jitter"),
        ({"ct_range": (250.0, -175.0)}, "ct_range"),
    ],
)
def test_transform_arguments_validated(kwargs, match):
    args = {"mode": "train", "num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        msd_transforms(args.pop("mode"), **args)


# -------------------------------------------------------------------------------------------------------- errors


def test_missing_folder_and_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_msd_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_msd_datalist(tmp_path)


def test_invalid_json(task):
    with open(os.path.join(task, "dataset.json"), "w") as f:
        f.write('{"training": [')
    with pytest.raises(ValueError, match=re.escape(os.path.join(task, "dataset.json"))):
        load_msd_datalist(task)


@pytest.mark.parametrize("key, folder", [("image", "imagesTr"), ("label", "labelsTr")])
def test_missing_listed_file(task, key, folder):
    os.remove(os.path.join(task, folder, "FAKE_001.nii.gz"))
    with pytest.raises(FileNotFoundError, match=f"{key} file .*{folder}/FAKE_001.nii.gz"):
        load_msd_datalist(task)


def _break_case(case: dict, *, image=None, label=None) -> None:
    if image is not None:
        _save(image, case["image"])
    if label is not None:
        _save(label, case["label"])


def _case_error(case: dict, mode: str = "val", **kwargs) -> pytest.ExceptionInfo:
    tf = msd_transforms(mode, spatial_size=(8, 8, 8), num_classes=4, **kwargs)
    with pytest.raises(ValueError, match=re.escape(case["image"])) as info:
        tf(case)
    assert case["label"] in str(info.value)
    return info


def test_shape_mismatch_names_files(cases):
    _break_case(cases[0], label=np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8))
    assert "does not match" in str(_case_error(cases[0]).value)


@pytest.mark.parametrize("key", ["image", "label"])
def test_a_truncated_file_names_the_case(cases, key):
    """MONAI's wrapped reader error (EOFError of a cut .nii.gz) comes out under the case's files."""
    data = open(cases[0][key], "rb").read()
    with open(cases[0][key], "wb") as f:
        f.write(data[: len(data) // 2])
    info = _case_error(cases[0])
    assert isinstance(info.value, msd.InvalidCaseError) and "cannot read" in str(info.value)


def test_a_bad_case_while_caching_ends_the_process_cleanly(tmp_path):
    """CacheDataset loads cases on a thread pool: the error of one case must not leave the others loading while
    the process exits (it aborted with "terminate called without an active exception")."""
    task = _make_task(str(tmp_path), n_cases=6)
    case = load_msd_datalist(task)[1][0]
    _break_case(case, label=np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8))
    code = ("from fastseg3d.data.msd import build_msd_datasets; "
            f"build_msd_datasets({task!r}, spatial_size=(8, 8, 8), val_frac=0.5, cache=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "does not match image shape" in proc.stderr, proc.stderr[-2000:]


def test_label_placed_elsewhere_names_files(cases):
    label = np.asarray(nib.load(cases[0]["label"]).dataobj)
    nib.save(nib.Nifti1Image(label, np.eye(4)), cases[0]["label"])  # a header written without the image's
    assert "places it elsewhere than the image" in str(_case_error(cases[0]).value)
    shifted = AFFINE.copy()
    shifted[:3, 3] += 1e-4  # float rounding of a header is not a misplacement
    nib.save(nib.Nifti1Image(label, shifted), cases[0]["label"])
    assert _val(cases[0])["label"].shape[0] == 1


def test_label_out_of_range_names_files(cases):
    label = _label_volume()
    label[0, 0, 0] = 5
    _break_case(cases[0], label=label)
    assert "[5.0]" in str(_case_error(cases[0], mode="train").value)
    assert "0..3" in str(_case_error(cases[0], label_mode="brats_regions").value)


@pytest.mark.parametrize("value, dtype, shown", [(4, np.uint8, "[4.0]"), (-1, np.int8, "[-1.0]"),
                                                 (1.5, np.float32, "[1.5]")])
def test_label_just_outside_the_classes_names_files(cases, value, dtype, shown):
    """The edges of 0..num_classes-1: the first value past the last class, a negative one, a fractional one
    (a label resampled with linear interpolation) would each train a wrong or non-existent class."""
    label = _label_volume().astype(dtype)
    label[0, 0, 0] = value
    _break_case(cases[0], label=label)
    assert shown in str(_case_error(cases[0]).value)


def test_nan_image_names_files(cases):
    image = nib.load(cases[0]["image"]).get_fdata().astype(np.float32)
    image[3, 3, 3, 1] = np.nan
    _break_case(cases[0], image=image)
    assert "NaN" in str(_case_error(cases[0]).value)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channels_other_than_declared_name_files(cases, in_channels):
    message = str(_case_error(cases[0], in_channels=in_channels).value)  # the fake cases have 2 channels
    assert f"image has 2 channel(s) but dataset.json declares {in_channels}" in message


def test_declared_channels_checked_on_a_3d_image(cases):
    image = nib.load(cases[0]["image"]).get_fdata().astype(np.float32)[..., 0]
    _break_case(cases[0], image=image)
    assert "image has 1 channel(s) but dataset.json declares 2" in str(_case_error(cases[0], in_channels=2).value)
    assert _val(cases[0], in_channels=1)["image"].shape[0] == 1


def test_datasets_check_the_channels_dataset_json_declares(task):
    _rewrite_json(task, modality={"0": "FLAIR"})
    train_ds, val_ds, _ = build_msd_datasets(task, spatial_size=(8, 8, 8))
    with pytest.raises(msd.InvalidCaseError, match="declares 1") as info:
        train_ds[0]
    assert train_ds.data[0]["image"] in str(info.value)
    _rewrite_json(task, drop=("modality",), channel_names={"0": "FLAIR", "1": "T1w"})
    assert build_msd_datasets(task, spatial_size=(8, 8, 8))[0][0]["image"].shape == (2, 8, 8, 8)


def test_dataset_item_raises_case_error(task, cases):
    _break_case(cases[2], label=np.zeros(SHAPE[:2] + (3,), np.uint8))
    train_ds, val_ds, _ = build_msd_datasets(task, spatial_size=(8, 8, 8), val_frac=0.01)
    ds = train_ds if cases[2]["name"] in [c["name"] for c in train_ds.data] else val_ds
    index = [c["name"] for c in ds.data].index(cases[2]["name"])
    with pytest.raises(ValueError, match="FAKE_002"):
        ds[index]


def test_missing_monai_gives_install_hint(task, monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)
    spec = importlib.util.spec_from_file_location("_msd_without_monai", msd.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing works without MONAI
    assert len(module.load_msd_datalist(task)[1]) == 3
    for call in (lambda: module.msd_transforms("val", num_classes=4), lambda: module.CheckCased):
        with pytest.raises(ImportError, match=re.escape('pip install "fastseg3d[monai]"')):
            call()


# ------------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("cache", [False, True])
def test_loader_batches_with_list_data_collate(task, cache):
    train_ds, val_ds, props = build_msd_datasets(
        task, spatial_size=(8, 8, 8), num_samples=2, val_frac=0.2, seed=0, cache=cache
    )
    assert len(train_ds) == 2 and len(val_ds) == 1 and props["labels"] == BRATS_LABELS
    loader = monai_data.DataLoader(
        train_ds, batch_size=2, shuffle=True, num_workers=0, collate_fn=monai_data.list_data_collate
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 2, 8, 8, 8) and batch["label"].shape == (4, 1, 8, 8, 8)
    assert batch["label"].dtype == torch.int64 and len(batch["name"]) == 4
    val_batch = next(iter(monai_data.DataLoader(val_ds, batch_size=1, collate_fn=monai_data.list_data_collate)))
    assert val_batch["image"].shape[:2] == (1, 2) and val_batch["image"].affine.shape == (1, 4, 4)


def test_training_items_are_reproducible_by_seed(task):
    """build_msd_datasets seeds the training transforms: the random crops and flips of train_ds[i] are the same in
    every build with the same seed, so a run is reproducible without a DataLoader."""
    def draws(seed):
        train_ds, _, _ = build_msd_datasets(task, spatial_size=(6, 6, 6), num_samples=2, seed=seed)
        return [torch.cat([s["image"].as_tensor() for s in train_ds[0]]) for _ in range(3)]

    first, again = draws(0), draws(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # successive draws differ: it is the seed, not a constant crop


def test_single_sample_items_are_dicts(task):
    train_ds, _, _ = build_msd_datasets(task, spatial_size=(8, 8, 8), label_mode="brats_regions")
    assert isinstance(train_ds[0], dict) and train_ds[0]["label"].shape == (3, 8, 8, 8)
    batch = next(iter(monai_data.DataLoader(train_ds, batch_size=2)))  # the default collate works for one crop per case
    assert batch["image"].shape == (2, 2, 8, 8, 8) and batch["label"].shape == (2, 3, 8, 8, 8)


def add_test_cases(task: str, n: int = 2, listed: bool = True) -> list[str]:
    """Unlabelled 2-modality images in ``imagesTs/`` (``dataset.json``'s ``test`` list naming them, or not, as
    nnU-Net v2 writes it); returns their paths."""
    os.makedirs(os.path.join(task, "imagesTs"), exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        image = np.zeros((*SHAPE, 2), np.float32)
        image[2:-2, 2:-2, 2:-2] = rng.uniform(1.0, 2.0, (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4, 2))
        paths.append(os.path.join(task, "imagesTs", f"FAKE_{100 + i:03d}.nii.gz"))
        _save(image, paths[-1])
    _rewrite_json(task, test=[f"./imagesTs/{os.path.basename(p)}" for p in paths] if listed else [])
    return paths


def test_test_list_from_dataset_json_or_images_ts(task):
    with pytest.raises(ValueError, match="lists no test cases"):
        load_msd_test_list(task)
    paths = add_test_cases(task)
    cases = load_msd_test_list(task)
    assert [c["image"] for c in cases] == paths and cases[0]["name"] == "FAKE_100"
    _rewrite_json(task, test=[{"image": "./imagesTs/FAKE_101.nii.gz"}])
    assert [c["image"] for c in load_msd_test_list(task)] == paths[1:]
    _rewrite_json(task, drop=("test",))  # nnU-Net v2: the folder is the list
    assert [c["image"] for c in load_msd_test_list(task)] == paths
    _rewrite_json(task, test=["./imagesTs/missing.nii.gz"])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_msd_test_list(task)
    _rewrite_json(task, test=[3])
    with pytest.raises(ValueError, match="test entry 0"):
        load_msd_test_list(task)


def test_images_ts_names_skips_hidden_files_and_refuses_one_file_per_channel(task):
    folder = os.path.join(task, "imagesTs")
    os.makedirs(folder)
    _rewrite_json(task, drop=("test",))
    image = np.zeros(SHAPE, np.float32)
    for name in ("pat_000_0000", "pat_001_0000", "._pat_000_0000"):  # macOS leaves ._ copies in archives
        _save(image, os.path.join(folder, name + ".nii.gz"))
    cases = load_msd_test_list(task)
    assert [c["name"] for c in cases] == ["pat_000", "pat_001"]  # nnU-Net's single-channel files
    assert cases[0]["image"] == os.path.join(folder, "pat_000_0000.nii.gz")
    for name in ("pat_000_0001", "pat_001_0001"):
        _save(image, os.path.join(folder, name + ".nii.gz"))
    with pytest.raises(ValueError, match="one file per channel"):
        load_msd_test_list(task)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    for name in ("amos_0001", "amos_0002", "amos_0007"):  # four-digit case numbers are cases
        _save(image, os.path.join(folder, name + ".nii.gz"))
    assert [c["name"] for c in load_msd_test_list(task)] == ["amos_0001", "amos_0002", "amos_0007"]


def test_predict_transforms_take_an_image_alone_and_check_it(task):
    paths = add_test_cases(task, n=1)
    tf = msd_transforms("predict", modality="MRI", num_classes=4, in_channels=2, pixdim=(2.0, 2.0, 2.0))
    item = tf({"image": paths[0], "name": "FAKE_100"})
    assert "label" not in item and item["image"].shape[0] == 2 and item["image"].dtype == torch.float32
    with pytest.raises(msd.InvalidCaseError, match="declares 3"):
        msd_transforms("predict", num_classes=4, in_channels=3)({"image": paths[0]})


def test_normalize_over_brain_is_transbts_z_score():
    """TransBTS's preprocessing (MISSU's): mask = the modalities' sum > 0, then each modality's masked voxels
    minus their mean, over their (population) standard deviation; outside the mask the image stays as it is."""
    import numpy as np

    from fastseg3d.data.msd import NormalizeOverBraind

    rng = np.random.default_rng(0)
    image = rng.uniform(0.5, 9.0, size=(4, 6, 7, 5))
    image[:, :2] = 0.0  # background: every modality 0
    image[2, 3, 1:4, 2] = 0.0  # brain voxels that are 0 in one modality only
    image[3, 2:, :, :] = 7.0  # a modality constant over the brain
    expected = image.copy()
    mask = image.sum(0) > 0
    for k in range(4):
        x = expected[k]
        y = x[mask]
        x[mask] -= y.mean()
        if y.std() > 0:
            x[mask] /= y.std()
    out = NormalizeOverBraind("image")({"image": torch.from_numpy(image.copy()), "other": 1})
    assert out["other"] == 1
    got = out["image"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[2, 3, 1:4, 2] < 0).all()  # normalised with the brain, where a per-channel nonzero mask keeps 0
    assert (got[:, :2] == 0).all() and (got[3][mask] == 0).all()
    empty = torch.zeros(2, 3, 3, 3)
    assert NormalizeOverBraind("image")({"image": empty})["image"].eq(0).all()
    with pytest.raises(ValueError, match=r"image must be a channel-first \(C, D, H, W\) volume"):
        NormalizeOverBraind("image")({"image": torch.zeros(4, 4, 4)})


def test_min_max_per_slice_scales_each_slice_of_each_channel():
    from fastseg3d.data.msd import MinMaxPerSliced

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64) * 3 + 1
    x[1, :, :, 4] = 2.5  # a constant slice
    for axis in (0, 1, 2, -1):
        out = MinMaxPerSliced("image", axis=axis)({"image": x.clone(), "other": 1})
        assert out["other"] == 1
        y = out["image"]
        a = axis % 3 + 1
        moved, got = x.movedim(a, 1), y.movedim(a, 1)  # (C, slice, ...)
        for c in range(2):
            for i in range(moved.shape[1]):
                s = moved[c, i]
                expected = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else torch.zeros_like(s)
                assert torch.allclose(got[c, i], expected)
    assert MinMaxPerSliced("image")({"image": x})["image"][1, :, :, 4].eq(0).all()
    with pytest.raises(ValueError, match="axis must be a spatial axis"):
        MinMaxPerSliced("image", axis=3)
    with pytest.raises(ValueError, match=r"image must be a channel-first \(C, D, H, W\) volume"):
        MinMaxPerSliced("image")({"image": torch.zeros(4, 4, 4)})
