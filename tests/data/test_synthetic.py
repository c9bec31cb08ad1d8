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


def test_augmentation_flips_image_and_label_together_and_anew_each_epoch():
    """A flipped case is still a case: the image is flipped along the label's axes (never the channel axis), and
    set_epoch draws new flips, as the trainer relies on for augmentation across epochs."""
    import itertools

    aug = SyntheticSegmentation(3, (16, 16, 16), in_channels=2, augment=True)
    plain = SyntheticSegmentation(3, (16, 16, 16), in_channels=2)
    combos = [d for r in range(4) for d in itertools.combinations((1, 2, 3), r)]
    seen = {i: set() for i in range(3)}
    for epoch in range(6):
        aug.set_epoch(epoch)
        for i in range(3):
            a, p = aug[i], plain[i]
            dims = [d for d in combos if torch.equal(a["label"], p["label"].flip(d))]
            assert any(torch.equal(a["image"], p["image"].flip(d)) for d in dims), (epoch, i)
            seen[i].add(tuple(dims[0]))
    assert all(len(flips) > 1 for flips in seen.values())


def test_air_is_zero_and_bias_field_scales_a_multiplicative_field():
    """Without noise the air around the body is exactly 0 (the foreground an MSD-style crop finds), and bias_field
    is the amplitude of one multiplicative field per channel: doubling it doubles each voxel's deviation."""
    images = {b: generate_case(2, (24, 24, 24), in_channels=2, noise=0.0, bias_field=b)[0] for b in (0.0, 0.2, 0.4)}
    corners = images[0.2][:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
    assert torch.equal(corners, torch.zeros_like(corners))
    body = images[0.0] != 0
    assert body.float().mean() > 0.2
    low, high = (images[b][body] / images[0.0][body] - 1 for b in (0.2, 0.4))
    assert low.abs().max() > 0.02 and low.abs().max() <= 0.2 + 1e-5
    torch.testing.assert_close(high, 2 * low, rtol=1e-4, atol=1e-5)


def test_index_past_the_cases_raises():
    """ds[num_cases] is no extra case (a loop over the dataset stops there), and a negative index is refused."""
    ds = SyntheticSegmentation(2, (16, 16, 16), in_channels=1)
    for index in (2, -1):
        with pytest.raises(IndexError):
            ds[index]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_cases=0), "num_cases"),
    (dict(num_cases=2, label_mode="regions"), "label_mode"),
    (dict(num_cases=2, spatial_size=(8, 16, 16)), "spatial_size"),
    (dict(num_cases=2, in_channels=5), "in_channels"),
    (dict(num_cases=2, in_channels=0), "in_channels"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSegmentation(**kwargs)
