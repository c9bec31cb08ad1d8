"""build_data: MSD folders in either dataset.json spelling, and split sizes checked before any epoch."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("monai")
pytest.importorskip("nibabel")
pytest.importorskip("yaml")

from fastseg3d.train import load_config  # noqa: E402
from fastseg3d.train.builders import build_data, data_channels  # noqa: E402
from tests.data.test_msd import _make_task, _rewrite_json  # noqa: E402

MSD = ["data.name=msd", "data.spatial_size=[8,8,8]", "data.num_samples=1"]


def _cfg(task: str, *overrides: str) -> dict:
    return load_config("quickstart", [*MSD, f"data.root={task}", *overrides])


def test_nnunet_v2_dataset_json_gives_channels_and_class_names(tmp_path):
    task = _make_task(str(tmp_path))
    _rewrite_json(task, drop=("modality",), channel_names={"0": "FLAIR", "1": "T1w"},
                  labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    cfg = _cfg(task, "data.batch_size=1")
    data = build_data(cfg)
    assert (data.in_channels, data.out_channels) == (2, 4) == data_channels(cfg)
    assert data.class_names == ("background", "edema", "core", "enhancing")
    assert data.train[0]["image"].shape == (2, 8, 8, 8)


def test_one_case_has_no_validation_split(tmp_path):
    task = _make_task(str(tmp_path), n_cases=1)
    with pytest.raises(ValueError) as info:
        build_data(_cfg(task, "data.batch_size=1"))
    message = str(info.value)
    assert f"data.root={task} lists 1 case(s) in dataset.json: 1 for training, 0 for validation" in message
    assert "data.val_frac=0.2" in message and "val.every=5 needs at least one validation case" in message
    assert "set val.every=0" in message
    data = build_data(_cfg(task, "data.batch_size=1", "val.every=0"))  # training without validation is fine
    assert (len(data.train), len(data.val)) == (1, 0)


def test_training_split_smaller_than_a_batch(tmp_path):
    task = _make_task(str(tmp_path), n_cases=3)  # 2 for training, 1 for validation
    with pytest.raises(ValueError) as info:
        build_data(_cfg(task, "data.batch_size=3"))
    message = str(info.value)
    assert "3 case(s) in dataset.json: 2 for training, 1 for validation (data.val_frac=0.2)" in message
    assert "one optimizer step needs data.batch_size=3 training cases: lower data.batch_size" in message
    with pytest.raises(ValueError, match=r"data.batch_size=2 x train.grad_accumulation=2 training cases: lower "
                                         r"data.batch_size or train.grad_accumulation"):
        build_data(_cfg(task, "data.batch_size=2", "train.grad_accumulation=2"))
    assert len(build_data(_cfg(task, "data.batch_size=2")).train) == 2


def test_synthetic_training_set_smaller_than_a_batch():
    cfg = load_config("quickstart", ["data.spatial_size=[16,16,16]", "data.num_train=1", "data.num_val=1"])
    with pytest.raises(ValueError, match=r"data.num_train=1, data.num_val=1; one optimizer step needs "
                                         r"data.batch_size=2 training cases: .*raise data.num_train"):
        build_data(cfg)


def test_evaluation_skips_the_training_checks(tmp_path):
    task = _make_task(str(tmp_path), n_cases=1)
    data = build_data(_cfg(task, "data.batch_size=2"), training=False)
    assert (len(data.train), len(data.val), data.out_channels) == (1, 0, 4)


def test_dataset_json_errors_name_the_file(tmp_path):
    task = _make_task(str(tmp_path))
    _rewrite_json(task, labels={"background": 0, "whole tumor": [1, 2, 3]})
    with pytest.raises(ValueError, match="regions") as info:
        build_data(_cfg(task, "data.batch_size=1"))
    assert os.path.join(task, "dataset.json") in str(info.value)
    with open(os.path.join(task, "dataset.json")) as f:
        assert json.load(f)["labels"]["whole tumor"] == [1, 2, 3]


def test_the_validation_split_follows_split_seed_not_the_runs_seed(tmp_path):
    task = _make_task(str(tmp_path), n_cases=10)

    def val_cases(*overrides):
        return [case["name"] for case in build_data(_cfg(task, "data.batch_size=1", *overrides)).val.data]

    assert val_cases("seed=1") == val_cases("seed=2") == val_cases()
    assert any(val_cases(f"data.split_seed={s}") != val_cases() for s in range(1, 6))
