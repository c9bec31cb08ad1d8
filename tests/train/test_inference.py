"""Sliding-window inference, flip TTA, predictions, metrics, NIfTI export and label coding."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.train.inference import (
    MetricAccumulator,
    labels_from_prediction,
    relabel_small_class,
    save_prediction_nifti,
    segmentation_metrics,
    sliding_window_predict,
    to_onehot,
    to_prediction,
)

nib = pytest.importorskip("nibabel")


def _conv(kernel: int) -> nn.Module:
    return nn.Conv3d(2, 3, kernel, padding=kernel // 2).eval()


# ------------------------------------------------------------------------------------------------------
# sliding window and TTA


def test_single_window_constant_equals_forward():
    net = _conv(3)
    x = torch.randn(2, 2, 12, 16, 8)
    out = sliding_window_predict(net, x, (12, 16, 8), blend="constant", sw_batch_size=2)
    torch.testing.assert_close(out, net(x))
    assert not out.requires_grad


@pytest.mark.parametrize("roi", [(8, 8, 8), (32, 32, 32)], ids=["windows", "roi-larger-than-image"])
def test_gaussian_covers_non_divisible_image(roi):
    # A pointwise model gives the same value in every window covering a voxel, so any blend reproduces the forward
    # exactly where windows cover it; an uncovered voxel would come out 0 or NaN.
    net = _conv(1)
    x = torch.randn(1, 2, 20, 23, 17)
    out = sliding_window_predict(net, x, roi, overlap=0.5, sw_batch_size=3, blend="gaussian")
    assert out.shape == (1, 3, 20, 23, 17)
    torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blends_are_monais(blend):
    """Windows that disagree (a 3-wide kernel sees each window's zero padding at its borders): each blend weighs
    them as MONAI's sliding_window_inference does, and the two blends differ."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = _conv(3)
    x = torch.randn(1, 2, 20, 23, 17)
    out = sliding_window_predict(net, x, 8, overlap=0.5, sw_batch_size=2, blend=blend)
    with torch.no_grad():
        expected = sliding_window_inference(x, 8, 2, net, overlap=0.5, mode=blend)
    torch.testing.assert_close(out, expected.as_subclass(torch.Tensor))
    other = sliding_window_predict(net, x, 8, overlap=0.5, blend="constant" if blend == "gaussian" else "gaussian")
    assert (out - other).abs().max() > 1e-3


def test_flip_tta_is_identity_for_flip_equivariant_model():
    net = _conv(1)
    x = torch.randn(1, 2, 10, 12, 6)
    plain = sliding_window_predict(net, x, 8, blend="constant")
    torch.testing.assert_close(sliding_window_predict(net, x, 8, blend="constant", flip_tta=True), plain)


def test_flip_tta_averages_the_eight_flips():
    net = _conv(3)
    x = torch.randn(1, 2, 6, 7, 5)
    dims = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        expected = sum(net(x.flip(d)).flip(d) if d else net(x) for d in dims) / 8
    out = sliding_window_predict(net, x, (6, 7, 5), blend="constant", flip_tta=True)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, net(x).detach())


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_flip_tta_averages_probabilities_with_a_mode(mode):
    """TransBTS's (and nnU-Net's) test-time averaging: the flips' probabilities are averaged, and their logits come
    back, so that to_prediction gives the prediction of the mean probabilities."""
    net = _conv(3)
    x = torch.randn(1, 2, 6, 7, 5) * 4
    dims = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    act = (lambda t: t.softmax(1)) if mode == "softmax" else torch.sigmoid
    with torch.no_grad():
        mean = sum(act(net(x.flip(d)).flip(d) if d else net(x)) for d in dims) / 8
    out = sliding_window_predict(net, x, (6, 7, 5), blend="constant", flip_tta=True, mode=mode)
    torch.testing.assert_close(act(out), mean)
    assert torch.isfinite(out).all()
    expected = F.one_hot(mean.argmax(1), 3).movedim(-1, 1).float() if mode == "softmax" else (mean > 0.5).float()
    assert torch.equal(to_prediction(out, mode), expected)
    averaged_logits = sliding_window_predict(net, x, (6, 7, 5), blend="constant", flip_tta=True)
    assert not torch.allclose(act(averaged_logits), mean)
    # without TTA there is nothing to average: the logits as they are
    torch.testing.assert_close(sliding_window_predict(net, x, (6, 7, 5), mode=mode), net(x).detach())
    with pytest.raises(ValueError, match="mode"):
        sliding_window_predict(net, x, (6, 7, 5), flip_tta=True, mode="probabilities")


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_flip_tta_logits_stay_finite_where_probabilities_saturate(mode):
    """A confident network's probabilities are exactly 0 or 1 in fp32, whose log or logit is infinite: they are
    clamped 1e-7 from 0 and 1, so the logits that come back are finite and give the same prediction."""
    net = _conv(1)

    def confident(t):
        return net(t) * 1e3

    x = torch.randn(1, 2, 6, 7, 5)
    out = sliding_window_predict(confident, x, (6, 7, 5), blend="constant", flip_tta=True, mode=mode)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(to_prediction(out, mode), to_prediction(confident(x), mode))


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    aux: torch.Tensor


@pytest.mark.parametrize("wrap", ["tuple", "dict", "dataclass"])
def test_logits_taken_from_structured_outputs(wrap):
    conv = _conv(1)

    class Net(nn.Module):
        def forward(self, x):
            y = conv(x)
            return {"tuple": (y, y * 0), "dict": {"logits": y, "aux": y * 0}, "dataclass": _Output(y, y * 0)}[wrap]

    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(sliding_window_predict(Net(), x, 8), conv(x).detach())
    custom = sliding_window_predict(Net(), x, 8, logits_fn=lambda o: conv(x) * 0 + 1)
    assert torch.all(custom == 1)


def test_first_window_stitches_as_transbts():
    """blend="first" at overlap 0.125 on a BraTS volume is TransBTS's test-time stitching of its 8 fixed crops
    (its tailor_and_concat, transcribed): a 3x3x3 conv pads each crop's border, so every crop's logits differ
    where crops overlap, and the stitching decides which the output holds. The missu_brats recipe validates so."""
    from fastseg3d.train.config import load_config

    val = load_config("missu_brats")["val"]
    net = nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 240, 240, 155)
    out = sliding_window_predict(net, x, val["roi_size"], overlap=val["overlap"], blend=val["blend"])
    with torch.no_grad():
        crops = [net(x[..., h:h + 128, w:w + 128, d:d + 128]) for d in (0, 27) for h in (0, 112) for w in (0, 112)]
    y = torch.empty(1, 2, 240, 240, 155)
    y[..., :128, :128, :128] = crops[0]
    y[..., :128, 128:240, :128] = crops[1][..., :, 16:128, :]
    y[..., 128:240, :128, :128] = crops[2][..., 16:128, :, :]
    y[..., 128:240, 128:240, :128] = crops[3][..., 16:128, 16:128, :]
    y[..., :128, :128, 128:155] = crops[4][..., 101:128]
    y[..., :128, 128:240, 128:155] = crops[5][..., :, 16:128, 101:128]
    y[..., 128:240, :128, 128:155] = crops[6][..., 16:128, :, 101:128]
    y[..., 128:240, 128:240, 128:155] = crops[7][..., 16:128, 16:128, 101:128]
    assert torch.equal(out, y)
    # batched windows: the same up to the conv's rounding on a batch
    torch.testing.assert_close(sliding_window_predict(net, x, 128, overlap=0.125, blend="first", sw_batch_size=3), y)
    averaged = sliding_window_predict(net, x, 128, overlap=0.125, blend="constant")
    assert not torch.allclose(out, averaged)


@pytest.mark.parametrize("roi", [(8, 8, 8), (32, 6, 40)], ids=["windows", "roi-larger-than-image"])
def test_first_window_covers_every_voxel(roi):
    net = _conv(1)
    x = torch.randn(2, 2, 20, 23, 17)
    for batch in (1, 4):
        out = sliding_window_predict(net, x, roi, overlap=0.25, sw_batch_size=batch, blend="first")
        torch.testing.assert_close(out, net(x).detach())
    conv = _conv(3)  # one window over the zero-padded image, as MONAI's
    torch.testing.assert_close(sliding_window_predict(conv, x, (32, 32, 32), blend="first"),
                               sliding_window_predict(conv, x, (32, 32, 32), blend="constant"))


def test_first_window_takes_monai_arguments_and_batches():
    """As MONAI's: roi as an int, an array or with -1 (the image's size), overlap per axis and checked, and
    sw_batch_size windows a model call whatever the batch."""
    net = _conv(1)
    x = torch.randn(3, 2, 10, 12, 9)
    calls = []
    out = sliding_window_predict(lambda t: calls.append(t.shape[0]) or net(t), x, np.array([8, -1, 8]),
                                 overlap=[0.5, 0.0, 0.25], sw_batch_size=5, blend="first")
    torch.testing.assert_close(out, net(x).detach())
    assert max(calls) == 5 and sum(calls) == 3 * 2 * 1 * 2  # 3 images x 2 windows along D, 1 along H, 2 along W
    for overlap in (-0.25, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            sliding_window_predict(net, x, 8, overlap=overlap, blend="first")


def test_check_window_for_first_blend_needs_logits_of_the_window_size():
    from fastseg3d.train.inference import check_window

    class Half(nn.Module):
        def forward(self, x):
            return x[:, :, ::2, ::2, ::2]

    check_window(Half(), 2, (8, 8, 8), "val.roi_size")  # averaged windows: MONAI resizes them
    with pytest.raises(ValueError, match=r"val.roi_size=\[8, 8, 8\]: blend 'first' needs logits the size"):
        check_window(Half(), 2, (8, 8, 8), "val.roi_size", "first")


def test_check_window_names_the_setting_for_a_network_that_raises_runtime_errors():
    """torch's and MONAI's networks refuse a size with a RuntimeError (MONAI's UNet concatenating skips of
    mismatched sizes); one about the meta device itself (a value read back) is no verdict on the size."""
    from monai.networks.nets import UNet as MonaiUNet

    from fastseg3d.train.inference import check_window

    net = MonaiUNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    check_window(net, 1, (16, 16, 16), "val.roi_size")
    with pytest.raises(ValueError, match=r"val.roi_size=\[12, 12, 12\]: the network cannot take.*Sizes of tensors"):
        check_window(net, 1, (12, 12, 12), "val.roi_size")

    class ReadsBack(nn.Module):
        def forward(self, x):
            return x * float(x.mean())

    check_window(ReadsBack(), 1, (5, 5, 5), "val.roi_size")


def test_check_window_in_training_names_a_batch_the_network_cannot_train_on():
    from fastseg3d.train.inference import check_window

    net = nn.Sequential(nn.Conv3d(1, 4, 4, stride=4), nn.BatchNorm3d(4))
    check_window(net, 1, (4, 4, 4), "data.spatial_size")  # eval: one voxel is fine
    check_window(net, 1, (4, 4, 4), "data.spatial_size", train_batch=2)
    check_window(net, 1, (8, 4, 4), "data.spatial_size", train_batch=1)
    with pytest.raises(ValueError, match=r"data.spatial_size=\[4, 4, 4\] in batches of 1 \(per process\): the "
                                         r"network cannot train on that \(Expected more than 1 value per channel"):
        check_window(net, 1, (4, 4, 4), "data.spatial_size", train_batch=1)
    assert net.training  # the check ran on a copy


def test_brats_scoring_refuses_a_spacing_of_another_length():
    from fastseg3d.train.inference import segmentation_metrics

    pred = torch.zeros(1, 2, 4, 4, 4)
    pred[:, 1, :2] = 1
    with pytest.raises(ValueError, match=r"spacing must be one number or one per spatial axis \(3\)"):
        segmentation_metrics(pred, pred.flip(2), include_background=False, ignore_empty=False, spacing=[1.0, 2.0])


def test_first_window_owner_of_each_voxel():
    """Each window fills its part with its scan index: every voxel comes from the first window along each axis
    that covers it (overlap 0.75 at roi 8 on 16 voxels: starts 0, 2, 4, 6, 8; the first window gives 0-7, each
    later one the 2 voxels past the previous one's end)."""
    count = [0]

    def numbered(t):
        count[0] += 1
        return torch.full((t.shape[0], 1, *t.shape[2:]), float(count[0] - 1))

    out = sliding_window_predict(numbered, torch.randn(1, 2, 16, 16, 16), 8, overlap=0.75, blend="first")
    owner = torch.tensor([0] * 8 + [1, 1, 2, 2, 3, 3, 4, 4])
    expected = owner[:, None, None] * 25 + owner[None, :, None] * 5 + owner[None, None, :]
    assert count[0] == 125 and torch.equal(out[0, 0], expected.float())
    with pytest.raises(ValueError, match="size of its window"):
        sliding_window_predict(lambda t: _conv(1)(t)[..., :4], torch.randn(1, 2, 16, 16, 16), 8, blend="first")


def test_bad_blend_rejected():
    with pytest.raises(ValueError, match="blend"):
        sliding_window_predict(_conv(1), torch.randn(1, 2, 4, 4, 4), 4, blend="mean")


# ------------------------------------------------------------------------------------------------------
# predictions and one-hot


def test_to_prediction_and_onehot():
    logits = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1, 1).repeat(1, 1, 2, 2, 2)
    soft = to_prediction(logits, "softmax")
    assert soft.dtype == torch.float32 and soft.shape == (1, 3, 2, 2, 2)
    assert soft[0, :, 0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert to_prediction(logits, "sigmoid")[0, :, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert to_prediction(torch.zeros(1, 2, 1, 1, 1), "sigmoid").sum() == 0  # sigmoid(0) = 0.5 is not > 0.5

    label = torch.tensor([0.0, 2.0]).view(1, 1, 2, 1, 1)  # MONAI loads labels as float
    onehot = to_onehot(label, 3, "softmax")
    assert onehot.shape == (1, 3, 2, 1, 1) and onehot.dtype == torch.float32
    assert onehot[0, :, 1, 0, 0].tolist() == [0.0, 0.0, 1.0]
    regions = torch.randint(0, 2, (1, 3, 2, 2, 2))
    assert torch.equal(to_onehot(regions, 3, "sigmoid"), regions.float())
    with pytest.raises(ValueError, match=r"sigmoid labels need 4 channels"):  # regions of another task
        to_onehot(regions, 4, "sigmoid")
    with pytest.raises(ValueError):
        to_onehot(regions, 3, "softmax")
    with pytest.raises(ValueError, match="mode"):
        to_prediction(logits, "argmax")


# ------------------------------------------------------------------------------------------------------
# metrics


def _onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return to_onehot(labels[None, None], k, "softmax")


def test_dice_exact_values():
    gt = torch.zeros(12, 12, 12, dtype=torch.long)
    pred = torch.zeros_like(gt)
    gt[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[2:6, 2:6, 2:4] = 1  # 32 of them
    gt[8:10, 8:10, 8:10] = 2
    pred[8:10, 8:10, 8:10] = 2
    m = segmentation_metrics(_onehot(pred, 3), _onehot(gt, 3), include_background=False, hd95=False)
    assert m["dice_per_class"] == pytest.approx([2 * 32 / (64 + 32), 1.0])
    assert m["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["hd95"] is None and m["hd95_per_class"] is None
    with_bg = segmentation_metrics(_onehot(pred, 3), _onehot(gt, 3), include_background=True, hd95=False)
    assert len(with_bg["dice_per_class"]) == 3


@pytest.mark.parametrize("spacing, expected", [(None, 3.0), ((2.0, 1.0, 1.0), 6.0)])
def test_hd95_of_shifted_cubes_is_the_shift(spacing, expected):
    gt = torch.zeros(1, 1, 20, 20, 20)
    pred = torch.zeros_like(gt)
    gt[..., 4:10, 4:10, 4:10] = 1
    pred[..., 7:13, 4:10, 4:10] = 1
    m = segmentation_metrics(pred, gt, include_background=True, spacing=spacing)
    assert m["hd95_per_class"] == [pytest.approx(expected)]
    assert m["hd95"] == pytest.approx(expected)


def test_empty_classes_give_none_and_are_skipped_in_means():
    gt = torch.zeros(10, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(gt)
    gt[1:4, 1:4, 1:4] = 1
    pred[1:4, 1:4, 1:4] = 1
    gt[6:8, 6:8, 6:8] = 3  # class 3 missed; class 2 absent everywhere
    m = segmentation_metrics(_onehot(pred, 4), _onehot(gt, 4), include_background=False)
    assert m["dice_per_class"] == [1.0, None, 0.0]
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95_per_class"][0] == 0.0 and m["hd95_per_class"][1:] == [None, None]
    json.dumps(m, allow_nan=False)

    empty = torch.zeros(1, 1, 4, 4, 4)
    nothing = segmentation_metrics(empty, empty, include_background=True)
    assert nothing == {"dice": None, "dice_per_class": [None], "hd95": None, "hd95_per_class": [None], "msd": None,
                       "msd_per_class": None}


def test_accumulator_means_over_defined_cases():
    acc = MetricAccumulator(include_background=False, hd95=False)
    a = torch.zeros(8, 8, 8, dtype=torch.long)
    a[1:5, 1:5, 1:5] = 1
    half = a.clone()
    half[1:5, 1:5, 1:3] = 0
    b = a.clone()
    b[6:8, 6:8, 6:8] = 2
    first = acc.update(_onehot(a, 3), _onehot(a, 3), loss=1.0)  # class 2 absent: undefined
    assert first["dice_per_class"] == [1.0, None]
    # batch of two cases: one loss value for both
    acc.update(torch.cat([_onehot(half, 3), _onehot(b, 3)]), torch.cat([_onehot(a, 3), _onehot(b, 3)]), loss=4.0)
    out = acc.aggregate()
    assert len(acc) == 3 and out["num_cases"] == 3
    assert out["dice_per_class"] == pytest.approx([(1.0 + 2 * 32 / 96 + 1.0) / 3, 1.0])
    assert out["dice"] == pytest.approx((out["dice_per_class"][0] + 1.0) / 2)
    assert out["loss"] == pytest.approx((1.0 + 2 * 4.0) / 3)
    json.dumps(out, allow_nan=False)
    acc.reset()
    with pytest.raises(ValueError):
        acc.aggregate()


@pytest.mark.parametrize("spacing", [None, (2.0, 1.0, 1.0)])
def test_mean_surface_distance_is_monais(spacing):
    """msd=True: MONAI's SurfaceDistanceMetric() (from the prediction's surface to the label's), per class, in the
    voxel size's units; through the accumulator too."""
    from monai.metrics import compute_average_surface_distance

    gt = torch.zeros(2, 20, 20, 20, dtype=torch.long)
    pred = torch.zeros_like(gt)
    gt[:, 4:10, 4:10, 4:10] = 1
    pred[0, 7:13, 4:10, 4:12] = 1
    pred[1, 4:10, 5:11, 4:10] = 1
    p, t = (torch.cat([_onehot(v[i], 2) for i in range(2)]) for v in (pred, gt))
    expected = compute_average_surface_distance(p, t, include_background=False, spacing=spacing)
    m = segmentation_metrics(p, t, include_background=False, hd95=False, spacing=spacing, msd=True)
    assert m["msd_per_class"] == [pytest.approx(expected.mean().item())] and m["msd"] == m["msd_per_class"][0]
    assert m["hd95"] is None and 0 < m["msd"] < 3 * (2.0 if spacing else 1.0)
    acc = MetricAccumulator(include_background=False, hd95=False, spacing=spacing, msd=True)
    acc.update(p[:1], t[:1])
    acc.update(p[1:], t[1:])
    assert acc.aggregate()["msd"] == pytest.approx(m["msd"])
    assert segmentation_metrics(p, t, include_background=False, hd95=False)["msd"] is None


def test_accumulator_hd95_with_per_batch_spacing():
    acc = MetricAccumulator(include_background=True, spacing=1.0)
    gt = torch.zeros(1, 1, 16, 16, 16)
    pred = torch.zeros_like(gt)
    gt[..., 2:8, 2:8, 2:8] = 1
    pred[..., 4:10, 2:8, 2:8] = 1
    acc.update(pred, gt)
    acc.update(pred, gt, spacing=(3.0, 1.0, 1.0))
    assert acc.aggregate()["hd95"] == pytest.approx((2.0 + 6.0) / 2)


# ------------------------------------------------------------------------------------------------------
# NIfTI and label coding


@pytest.mark.parametrize("values, dtype", [((0, 4), np.uint8), ((-1, 300), np.int16)])
def test_nifti_round_trip(tmp_path, values, dtype):
    labels = torch.randint(*values, (7, 9, 5))
    affine = np.array([[1.5, 0, 0, -10.0], [0, 0.8, 0, 4.0], [0, 0, 3.0, 2.5], [0, 0, 0, 1]])
    out = save_prediction_nifti(labels, affine, tmp_path / "sub" / "case_001.nii.gz")
    assert [p.name for p in out.parent.iterdir()] == ["case_001.nii.gz"]  # no temporary left behind
    img = nib.load(out)
    assert img.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.numpy())
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-6)


def test_nifti_stores_the_smallest_type_at_its_bounds(tmp_path):
    """255 still fits uint8 (a 255-class atlas is stored at 1 byte a voxel), 256 and -1 need int16."""
    for value, dtype in ((255, np.uint8), (256, np.int16), (-1, np.int16)):
        labels = np.zeros((2, 3, 4), np.int64)
        labels[1, 2, 3] = value
        img = nib.load(save_prediction_nifti(labels, None, tmp_path / f"p{value}.nii.gz"))
        assert img.get_data_dtype() == dtype and np.asarray(img.dataobj)[1, 2, 3] == value


def test_nifti_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="D, H, W"):
        save_prediction_nifti(np.zeros((1, 2, 3, 4), np.uint8), None, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="nii"):
        save_prediction_nifti(np.zeros((2, 3, 4), np.uint8), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="integers"):
        save_prediction_nifti(np.full((2, 3, 4), 0.5), None, tmp_path / "x.nii")


def _brats_regions(msd: torch.Tensor) -> torch.Tensor:
    """MSD Task01 labels -> (TC, WT, ET), as SegFormer3D's preprocessing does."""
    return torch.stack([(msd == 2) | (msd == 3), msd > 0, msd == 3]).float()


def test_brats_regions_map_back_to_msd_coding():
    msd = torch.randint(0, 4, (6, 7, 8))
    assert torch.equal(labels_from_prediction(_brats_regions(msd), "sigmoid", regions="brats"), msd)
    batched = _brats_regions(msd)[None]
    assert torch.equal(labels_from_prediction(batched, "sigmoid", regions=("TC", "WT", "ET")), msd)
    permuted = _brats_regions(msd)[[2, 0, 1]]  # ET, TC, WT
    assert torch.equal(labels_from_prediction(permuted, "sigmoid", regions=["et", "tc", "wt"]), msd)


def test_brats_innermost_region_wins():
    et_only = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1, 1)  # ET predicted outside TC and WT
    assert labels_from_prediction(et_only, "sigmoid", regions="brats").item() == 3


def test_softmax_and_generic_sigmoid_labels():
    labels = torch.randint(0, 3, (4, 5, 6))
    assert torch.equal(labels_from_prediction(_onehot(labels, 3), "softmax"), labels)
    pred = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]).view(2, 4, 1, 1)
    assert labels_from_prediction(pred, "sigmoid").flatten().tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="one case"):
        labels_from_prediction(torch.zeros(2, 3, 4, 4, 4), "softmax")


# ------------------------------------------------------------------------------------------------------
# post-processing


def test_relabel_small_class_on_msd_labels():
    """Per case: below the threshold the enhancing voxels (3) become non-enhancing (2), at it they stay."""
    labels = torch.zeros(3, 6, 7, 8, dtype=torch.long)
    labels[:, 1:3] = 1
    labels[:, 3, :2] = 2
    labels[0, 4, :3, :3] = 3  # 9 voxels of class 3
    labels[1, 4, :2, :2] = 3  # 4 voxels
    pred = to_onehot(labels[:, None], 4, "softmax")
    before = pred.clone()
    out = relabel_small_class(pred, 3, 2, 5)
    assert torch.equal(pred, before)  # a new tensor
    assert out.dtype == pred.dtype and out.shape == pred.shape
    expected = labels.clone()
    expected[1][labels[1] == 3] = 2
    assert torch.equal(out.argmax(1), expected)
    assert torch.equal(out.sum(1), torch.ones_like(out.sum(1)))  # still one-hot
    # exactly min_voxels: kept
    assert torch.equal(relabel_small_class(pred, 3, 2, 4).argmax(1), labels)


def test_relabel_small_class_on_brats_regions():
    """(TC, WT, ET): a small ET leaves the ET channel and stays tumour core, even where TC was not predicted."""
    msd = torch.zeros(2, 5, 6, 7, dtype=torch.long)
    msd[:, 1:4] = 1
    msd[:, 2, 1:4, 1:4] = 2
    msd[0, 2, 2, 2] = 3  # case 0: one ET voxel
    msd[1, 2, 1:3, 1:3] = 3  # case 1: 4 ET voxels
    pred = torch.stack([_brats_regions(m) for m in msd])
    pred[0, 0, 2, 2, 2] = 0  # ET predicted outside TC
    out = relabel_small_class(pred, 2, 0, 2)
    assert out[0, 2].sum() == 0 and out[0, 0, 2, 2, 2] == 1
    assert torch.equal(out[1], pred[1])
    assert torch.equal(out[:, 1], pred[:, 1])  # WT untouched
    expected = msd.clone()
    expected[0][msd[0] == 3] = 2
    assert torch.equal(torch.stack([labels_from_prediction(o, "sigmoid", regions="brats") for o in out]), expected)


@pytest.mark.parametrize("args, match", [
    ((3, 3, 10), "two different channels"),
    ((4, 2, 10), "two different channels"),
    ((-1, 2, 10), "two different channels"),
    ((3, 2, 0), "min_voxels must be >= 1"),
    ((3, 2, True), "three integers"),
    ((3.0, 2, 10), "three integers"),
])
def test_relabel_small_class_rejects_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        relabel_small_class(torch.zeros(1, 4, 2, 2, 2), *args)
    with pytest.raises(ValueError, match="pred must be"):
        relabel_small_class(torch.zeros(4, 2), 1, 0, 1)


def test_relabel_small_class_pays_under_brats_scoring():
    """A case without enhancing tumour in its label: a few false-positive ET voxels score 0 under BraTS's scoring
    (ignore_empty=False) and 1 once relabelled; under MONAI's default (ignore_empty) the class has no Dice."""
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[:, 2:6, 2:6, 2:6] = 2  # non-enhancing tumour, no ET
    pred_labels = labels.clone()
    pred_labels[:, 3, 3, 3:5] = 3  # two false-positive ET voxels
    target = to_onehot(labels[:, None], 4, "softmax")
    pred = to_onehot(pred_labels[:, None], 4, "softmax")
    et = 2  # index of class 3 among the foreground classes
    brats = MetricAccumulator(include_background=False, hd95=False, ignore_empty=False)
    assert brats.update(pred, target)["dice_per_class"][et] == 0.0
    assert brats.update(relabel_small_class(pred, 3, 2, 500), target)["dice_per_class"][et] == 1.0
    assert brats.aggregate()["dice_per_class"][et] == 0.5
    monai = MetricAccumulator(include_background=False, hd95=False)
    assert monai.update(pred, target)["dice_per_class"][et] is None
    assert segmentation_metrics(pred, target, include_background=False, hd95=False,
                                ignore_empty=False)["dice_per_class"][et] == 0.0


def test_voxel_spacing_follows_transposed_axes():
    """Transposed (SegFormer3D's swapped axes) leaves the affine as it was: the spacing HD95 is measured in is
    permuted with the axes."""
    from monai.data import MetaTensor
    from monai.transforms import Transposed

    from fastseg3d.train.inference import _voxel_spacing

    image = MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.0])))
    assert _voxel_spacing(image) == [1.0, 2.0, 3.0]
    swapped = Transposed("image", indices=[0, 3, 2, 1])({"image": image})["image"]
    assert swapped.shape == (1, 6, 5, 4) and _voxel_spacing(swapped) == [3.0, 2.0, 1.0]
    assert _voxel_spacing(torch.zeros(1, 4, 5, 6)) is None


@pytest.mark.parametrize("spacing", [None, (1.0, 2.0, 0.5)])
def test_brats_scoring_of_empty_classes(spacing):
    """ignore_empty=False: Dice 1 / distance 0 where both sides are empty, Dice 0 / the volume's diagonal where one
    is; MONAI's default leaves those undefined (None in the summaries)."""
    labels = torch.zeros(1, 6, 8, 10, dtype=torch.long)
    labels[:, 1:4, 2:6, 2:7] = 1
    labels[:, 2, 3, 3:5] = 3  # class 3 in the label, not predicted; class 2 on neither side
    pred_labels = labels.clone()
    pred_labels[pred_labels == 3] = 1
    target = to_onehot(labels[:, None], 4, "softmax")
    pred = to_onehot(pred_labels[:, None], 4, "softmax")
    steps = np.ones(3) if spacing is None else np.asarray(spacing)
    diagonal = float(np.sqrt(((np.asarray([6, 8, 10]) * steps) ** 2).sum()))
    brats = segmentation_metrics(pred, target, include_background=False, hd95=True, msd=True, spacing=spacing,
                                 ignore_empty=False)
    assert brats["dice_per_class"][1:] == [1.0, 0.0]
    assert brats["hd95_per_class"][1:] == [0.0, pytest.approx(diagonal)]
    assert brats["msd_per_class"][1:] == [0.0, pytest.approx(diagonal)]
    assert brats["hd95_per_class"][0] == segmentation_metrics(pred, target, include_background=False,
                                                              spacing=spacing)["hd95_per_class"][0]  # unchanged
    monai = segmentation_metrics(pred, target, include_background=False, hd95=True, msd=True, spacing=spacing)
    assert monai["dice_per_class"][1:] == [None, 0.0]
    assert monai["hd95_per_class"][1:] == [None, None] and monai["msd_per_class"][1:] == [None, None]


def test_brats_scoring_of_empty_regions_with_channel_0_kept():
    """Sigmoid regions (TC, WT, ET) are scored with include_background=True: channel 0 is a region like the others,
    and BraTS's rule for empty regions applies to it too (TC empty on both sides, ET predicted but not labelled)."""
    target = torch.zeros(1, 3, 6, 8, 10)
    target[:, 1, 1:4, 2:6, 2:7] = 1
    pred = target.clone()
    pred[:, 2, 2, 3, 3:5] = 1
    m = segmentation_metrics(pred, target, include_background=True, hd95=True, msd=True, ignore_empty=False)
    diagonal = float(np.sqrt(6**2 + 8**2 + 10**2))
    assert m["dice_per_class"] == [1.0, 1.0, 0.0]
    assert m["hd95_per_class"] == [0.0, 0.0, pytest.approx(diagonal)]
    assert m["msd_per_class"] == [0.0, 0.0, pytest.approx(diagonal)]


def test_predict_case_follows_the_val_settings():
    """Validation and `fastseg3d eval` predict through predict_case: the val section's overlap, window batch, blend
    and flip TTA apply, the flips averaged as probabilities of the data's mode, and the label comes one-hot."""
    from fastseg3d.train.inference import predict_case

    torch.manual_seed(0)
    net = _conv(3)
    image = torch.randn(2, 16, 12, 10) * 3
    label = torch.randint(0, 3, (1, 16, 12, 10))
    cfg = {"overlap": 0.25, "sw_batch_size": 2, "blend": "constant", "flip_tta": True}
    case = predict_case(net, {"image": image, "label": label}, (8, 8, 8), cfg, "softmax", 3, torch.device("cpu"))

    def predict(**changes):
        kwargs = {"overlap": 0.25, "sw_batch_size": 2, "blend": "constant", "flip_tta": True, "mode": "softmax",
                  **changes}
        return sliding_window_predict(net, image[None], (8, 8, 8), **kwargs)

    expected = predict()
    torch.testing.assert_close(case["logits"], expected)
    assert torch.equal(case["pred"], to_prediction(expected, "softmax"))
    assert torch.equal(case["target"], to_onehot(label[None], 3, "softmax")) and case["spacing"] is None
    for changes in ({"overlap": 0.5}, {"blend": "gaussian"}, {"mode": None}):  # each setting tells here
        assert not torch.allclose(predict(**changes), expected), changes


def test_nifti_takes_the_image_files_sform_and_qform(tmp_path):
    """A file whose sform and qform differ (a registration's edited sform, a shear a qform cannot hold): MONAI's
    loader may take the qform where viewers take the sform; ``like`` writes the prediction with the file's own
    two, so it overlays the scan either way."""
    sform = np.array([[0.0, 0.0, 2.0, -10.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 1.5, 0.0, 5.0], [0, 0, 0, 1]])
    qform = np.diag([-1.0, -1.0, 1.0, 1.0])
    qform[:3, 3] = [30, 40, -50]
    scan = nib.Nifti1Image(np.zeros((6, 7, 8, 2), np.float32), sform)
    scan.set_qform(qform, code=1)
    scan.set_sform(sform, code=2)
    nib.save(scan, str(tmp_path / "scan.nii.gz"))
    labels = np.random.default_rng(0).integers(0, 3, (6, 7, 8))
    out = nib.load(save_prediction_nifti(labels, qform, tmp_path / "p.nii.gz", like=tmp_path / "scan.nii.gz"))
    np.testing.assert_allclose(out.get_sform(), sform)
    np.testing.assert_allclose(out.get_qform(), qform, atol=1e-6)
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (2, 1)
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
    with pytest.raises(ValueError, match="do not lie on"):
        save_prediction_nifti(labels[:5], None, tmp_path / "q.nii.gz", like=tmp_path / "scan.nii.gz")


def test_accumulator_refuses_another_class_count_at_update():
    from fastseg3d.train.inference import MetricAccumulator

    acc = MetricAccumulator(include_background=False, hd95=False)
    pred = torch.zeros(1, 3, 4, 4, 4)
    pred[:, 0] = 1
    acc.update(pred, pred)
    with pytest.raises(ValueError, match="pred has 4 channels where the earlier updates had other counts"):
        acc.update(torch.zeros(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4))
    assert acc.aggregate()["num_cases"] == 1


def test_first_blend_names_a_roi_of_another_length():
    net = nn.Conv3d(1, 2, 1)
    with pytest.raises(ValueError, match=r"roi_size \(8, 8\) must have one size per spatial axis of the image \(3\)"):
        sliding_window_predict(net, torch.randn(1, 1, 8, 8, 8), (8, 8), blend="first")
