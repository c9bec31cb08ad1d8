"""The embedded synthetic dataset: deterministic, every structure present, realistic imbalance, valid regions."""

from __future__ import annotations

import pytest
import torch

from fastseg3d.data.synthetic import CLASS_NAMES, SyntheticSegmentation, brats_regions, generate_case


def test_cases_are_deterministic_by_seed_and_differ_across_seeds():
    a, b = SyntheticSegmentation(3, (24, 24, 24), seed=5), SyntheticSegmentation(3, (24, 24, 24), seed=5)
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    other = SyntheticSegmentation(3, (24, 24, 24), seed=6)
    assert not torch.equal(a[0]["label"], other[0]["label"])
    assert not torch.equal(a[0]["label"], a[1]["label"])


def test_every_structure_appears_with_class_imbalance_and_distinct_contrast():
    counts = torch.zeros(len(CLASS_NAMES))
    means = []
    for seed in range(4):
        image, label = generate_case(seed, (48, 48, 48), in_channels=4)
        assert image.dtype == torch.float32 and label.dtype == torch.int64 and torch.isfinite(image).all()
        counts += torch.bincount(label.flatten(), minlength=len(CLASS_NAMES))
        means.append(torch.stack([image[:, label == k].mean(1) for k in range(len(CLASS_NAMES))]))
    frac = counts / counts.sum()
    assert frac[0] > 0.9 and (frac[1:] > 0.0005).all()  # background dominates; no structure is missing
    mean = torch.stack(means).mean(0)  # (classes, channels)
    for i in range(1, len(CLASS_NAMES)):
        for j in range(i):
            # Every pair of classes differs by more than the noise in at least one modality.
            assert (mean[i] - mean[j]).abs().max() > 0.15, (CLASS_NAMES[i], CLASS_NAMES[j])


def test_core_is_nested_inside_edema_and_regions_are_nested():
    _, label = generate_case(3, (40, 40, 40))
    regions = brats_regions(label)
    tc, wt, et = regions
    assert (tc <= wt).all() and torch.equal(tc, et) and tc.sum() > 0
    # The core touches only edema or other core voxels: dilate it by one voxel and look at the shell.
    core = (label == 2).float()[None, None]
    shell = (torch.nn.functional.max_pool3d(core, 3, 1, 1)[0, 0] > 0) & (label != 2)
    assert set(label[shell].unique().tolist()) <= {1}


def test_dataset_items_modes_cache_and_augmentation():
    ds = SyntheticSegmentation(2, (16, 16, 16), in_channels=2, label_mode="brats_regions", cache=True)
    item = ds[0]
    assert item["image"].shape == (2, 16, 16, 16) and item["label"].shape == (3, 16, 16, 16)
    assert item["label"].dtype == torch.float32 and ds.num_classes == 3
    assert ds[0]["image"] is item["image"] or torch.equal(ds[0]["image"], item["image"])
    aug = SyntheticSegmentation(4, (16, 16, 16), augment=True)
    plain = SyntheticSegmentation(4, (16, 16, 16))
    flipped = 0
    for epoch in range(3):
        aug.set_epoch(epoch)
        for i in range(4):
            a, p = aug[i], plain[i]
            assert torch.equal(a["label"], aug[i]["label"])  # same (case, epoch) -> same flips
            assert sorted(a["label"].flatten().tolist()) == sorted(p["label"].flatten().tolist())
            flipped += not torch.equal(a["label"], p["label"])
    assert flipped > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_cases=0), "num_cases"),
    (dict(num_cases=2, label_mode="regions"), "label_mode"),
    (dict(num_cases=2, spatial_size=(8, 16, 16)), "spatial_size"),
    (dict(num_cases=2, in_channels=5), "in_channels"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSegmentation(**kwargs)
