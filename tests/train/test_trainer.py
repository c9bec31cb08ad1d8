"""The training loop: configs, checkpoints, exact resume, non-finite losses, DDP, evaluation, every recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("yaml")

from fastseg3d.cli import main as cli_main  # noqa: E402
from fastseg3d.train import NonFiniteLossError, Trainer, atomic_save, load_checkpoint, load_config  # noqa: E402
from fastseg3d.train.builders import enable_activation_checkpointing, schedule_factor  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A U-Net small enough for a CPU step in milliseconds; instance norm, so it has no batch-size-dependent layers.
TINY_UNET = ["model.name=unet", "model.kwargs={spatial_dims: 3, channels: [4, 8, 16]}"]
TINY_DATA = ["data.spatial_size=[16,16,16]", "data.num_train=4", "data.num_val=1", "data.batch_size=2",
             "val.roi_size=[16,16,16]", "val.num_images=1", "val.every=1", "train.log_every=1", "train.progress=false"]


def _rows(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_config_defaults_overrides_and_errors(tmp_path):
    cfg = load_config("quickstart", ["optimizer.lr=3e-4", "data.spatial_size=[32,32,32]", "train.amp=bf16"])
    assert cfg["optimizer"]["lr"] == 3e-4 and cfg["data"]["spatial_size"] == [32, 32, 32]
    assert cfg["train"]["amp"] == "bf16" and cfg["val"]["overlap"] == 0.5  # untouched default
    with pytest.raises(KeyError, match="optimizer.lrr"):
        load_config("quickstart", ["optimizer.lrr=1"])
    # A mapping merges into a structured section (defaults kept) and replaces a free-form one.
    cfg = load_config("quickstart", ["optimizer={lr: 0.1}", "model.kwargs={depths: [1, 1, 1, 1]}"])
    assert cfg["optimizer"]["lr"] == 0.1 and cfg["optimizer"]["name"] == "adamw"
    assert cfg["model"]["kwargs"] == {"depths": [1, 1, 1, 1]}
    # YAML 1.2 numbers ("1e-2" is a float) and integer keys take integers only.
    cfg = load_config("quickstart", ["loss.distill_kwargs.weight=1e-2", "train.epochs=3.0"])
    assert cfg["loss"]["distill_kwargs"]["weight"] == 0.01 and cfg["train"]["epochs"] == 3
    with pytest.raises(ValueError, match="train.epochs.*integer"):
        load_config("quickstart", ["train.epochs=2.5"])
    with pytest.raises(ValueError, match="optimizer.lr.*number"):
        load_config("quickstart", ["optimizer.lr=fast"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("quickstart", ["optimizer.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    # one line, as the CLI prints its errors, with the place of the mistake
    with pytest.raises(ValueError, match=r"^config \S*bad.yaml is not valid YAML: expected ',' or ']', but got "
                                         r"'<stream end>' at line 2, column 1$"):
        load_config(bad)
    # a key or section written twice (YAML keeps the last one silently)
    twice = tmp_path / "twice.yaml"
    twice.write_text("val:\n  every: 3\n  every: 0\n")
    with pytest.raises(ValueError, match=r"^config \S*twice.yaml is not valid YAML: the key 'every' is given twice "
                                         r"at line 3, column 3$"):
        load_config(twice)
    twice.write_text("val: {every: 3}\ntrain: {epochs: 2}\nval: {every: 1}\n")
    with pytest.raises(ValueError, match="the key 'val' is given twice"):
        load_config(twice)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_config("nope")


def test_schedules():
    base = {"warmup": 2, "min_lr": 0.0, "restart_period": 4, "power": 0.9, "step_size": 3, "gamma": 0.5}
    f = schedule_factor({**base, "name": "warmup_cosine"}, 1.0, 10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0, abs=1e-12)
    f = schedule_factor({**base, "name": "warmup_cosine_restarts"}, 1.0, 100)
    assert f(2) == 1.0 and f(6) == 1.0 and f(4) == pytest.approx(0.5)
    f = schedule_factor({**base, "name": "poly", "warmup": 0}, 1.0, 10)
    assert f(5) == pytest.approx(0.5**0.9)
    f = schedule_factor({**base, "name": "step", "warmup": 0}, 1.0, 10)
    assert [f(2), f(3), f(6)] == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="scheduler.name"):
        schedule_factor({**base, "name": "cosine"}, 1.0, 10)
    # a floor above the learning rate would turn the cosine's decay into a climb
    for name in ("warmup_cosine", "warmup_cosine_restarts"):
        with pytest.raises(ValueError, match=r"scheduler.min_lr \(0.01\) must not exceed optimizer.lr \(0.001\)"):
            schedule_factor({**base, "name": name, "min_lr": 0.01}, 1e-3, 10)
    assert schedule_factor({**base, "name": "warmup_cosine", "min_lr": 1e-3}, 1e-3, 10)(5) == pytest.approx(1.0)


def test_train_writes_run_directory_and_eval_reads_it(tmp_path):
    run = tmp_path / "run"
    code = cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--epochs", "2",
                     *TINY_UNET, *TINY_DATA])
    assert code == 0
    for name in ("config.yaml", "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "curves.png",
                 "images/val_0.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    val = _rows(run, "val")
    assert [r["epoch"] for r in val] == [0, 1]
    assert {"step", "epoch", "loss", "dice", "dice_per_class"} <= set(val[0]) and len(val[0]["dice_per_class"]) == 4
    assert len(_rows(run, "train")) == 4  # 2 steps per epoch, logged every step
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["model"]["name"] == "unet"
    assert ckpt["model"]["kwargs"]["in_channels"] == 4 and ckpt["model"]["kwargs"]["out_channels"] == 5
    assert load_config(run / "config.yaml")["model"]["name"] == "unet"  # the resolved config reloads

    out = tmp_path / "eval"
    code = cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--output-dir", str(out),
                     "--save-predictions", "--flip-tta"])
    assert code == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    assert result["mean"]["num_cases"] == 1 and len(result["cases"]) == 1
    assert result["mean"]["class_names"] == ["edema", "core", "vessel", "nodule"]
    nib = pytest.importorskip("nibabel")
    pred = nib.load(str(out / "predictions" / "synthetic_2_0000.nii.gz"))
    assert pred.shape == (16, 16, 16)

    # Post-processing: the most frequent predicted class, under a threshold above its count, moves into another.
    plain = np.asarray(pred.dataobj).astype(np.int64)
    source = int(np.bincount(plain.ravel()).argmax())
    into = (source + 1) % 5
    relabelled = tmp_path / "relabelled"
    code = cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--output-dir", str(relabelled),
                     "--save-predictions", "--flip-tta", "--relabel-small", str(source), str(into), str(plain.size)])
    assert code == 0
    moved = np.asarray(nib.load(str(relabelled / "predictions" / "synthetic_2_0000.nii.gz")).dataobj)
    assert np.array_equal(moved, np.where(plain == source, into, plain))
    # a run whose config relabels: eval follows it, --no-relabel-small turns it off
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    ckpt["config"]["val"]["relabel_small"] = [source, into, int(plain.size)]
    torch.save(ckpt, tmp_path / "relabelling.pt")
    for flags, expected in (([], np.where(plain == source, into, plain)), (["--no-relabel-small"], plain)):
        out = tmp_path / f"own{len(flags)}"
        assert cli_main(["eval", "--checkpoint", str(tmp_path / "relabelling.pt"), "--output-dir", str(out),
                         "--save-predictions", "--flip-tta", *flags]) == 0
        got = np.asarray(nib.load(str(out / "predictions" / "synthetic_2_0000.nii.gz")).dataobj)
        assert np.array_equal(got, expected), flags
    # BraTS's scoring: every class has a Dice, the ones absent from the label too
    scored = tmp_path / "scored"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--output-dir", str(scored),
                     "--score-empty", "--no-hd95"]) == 0
    scored_json = json.loads((scored / "eval_metrics.json").read_text())
    assert scored_json["mean"]["ignore_empty"] is False
    assert all(d is not None for case in scored_json["cases"] for d in case["dice_per_class"])
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--output-dir", str(scored),
                     "--no-score-empty", "--no-hd95"]) == 0
    assert json.loads((scored / "eval_metrics.json").read_text())["mean"]["ignore_empty"] is True
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--output-dir", str(relabelled),
                     "--relabel-small", "5", "1", "10"]) != 0
    from fastseg3d.train import SetupError

    with pytest.raises(SetupError, match=r"val.relabel_small=\[1, 1, 10\]: class and into must be two different"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "val.relabel_small=[1, 1, 10]",
                                           f"output_dir={tmp_path / 'bad'}"]))


class _Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    # SelfReg redraws its channel pairs from torch's global generator at every step: a resume that did not restore
    # the RNG states would diverge at once.
    args = ["deterministic=true", "train.epochs=3", *TINY_DATA, "model.name=selfreg_unet",
            "model.kwargs={spatial_dims: 3, channels: [4, 8, 16]}", "loss.distill=selfreg"]
    whole = tmp_path / "whole"
    Trainer(load_config("quickstart", args), whole).fit()

    part = tmp_path / "part"
    original = Trainer.train_epoch

    def stop_in_epoch_2(self, epoch):
        if epoch == 2:
            # A crash in the middle of epoch 2, while a row was being written: the latest checkpoint is epoch 1's.
            self.metrics.log({"step": self.step + 1, "epoch": 2, "split": "train", "loss": -1.0})
            with self.metrics.path.open("a") as f:
                f.write('{"step": 6, "epo')
            raise _Interrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_epoch_2)
    with pytest.raises(_Interrupt):
        Trainer(load_config("quickstart", args), part).fit()
    assert load_checkpoint(part / "checkpoint_latest.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "train_epoch", original)
    Trainer(load_config("quickstart", args), part, resume="auto").fit()

    assert len(_rows(whole, "train")) == 6
    assert [r["loss"] for r in _rows(part, "train")] == [r["loss"] for r in _rows(whole, "train")]
    assert [r["dice"] for r in _rows(part, "val")] == [r["dice"] for r in _rows(whole, "val")]
    a = load_checkpoint(whole / "checkpoint_final.pt")["network_weights"]
    b = load_checkpoint(part / "checkpoint_final.pt")["network_weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fastseg3d.train.builders import Objective

    run = tmp_path / "run"
    calls = {"n": 0}
    forward = Objective.forward

    def nan_in_epoch_1(self, output, target):
        loss, terms = forward(self, output, target)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] > 2 and self.training else (loss, terms)

    monkeypatch.setattr(Objective, "forward", nan_in_epoch_1)
    code = cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--epochs", "3",
                     *TINY_UNET, *TINY_DATA])
    assert code == 3
    assert load_checkpoint(run / "checkpoint_latest.pt")["epoch"] == 0
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):  # NaN from the first step
        Trainer(load_config("quickstart", ["train.epochs=3", *TINY_UNET, *TINY_DATA]), tmp_path / "again").fit()


@pytest.mark.parametrize("where", ["earlier_micro_batch_loss", "gradient"])
def test_a_non_finite_value_the_last_loss_does_not_show_stops(where, tmp_path, monkeypatch):
    """With 2 micro-batches a step: a loss that is NaN on the first micro-batch only, with finite gradients (its
    value alone is bad), or an infinite gradient under finite losses: either stops the run before the step."""
    from fastseg3d.train.builders import Objective

    calls = {"n": 0}
    forward = Objective.forward

    def nan_on_first_micro_batches(self, output, target):
        loss, terms = forward(self, output, target)
        if self.training:
            calls["n"] += 1
            if calls["n"] % 2 == 1:
                return loss + torch.full((), float("nan")), terms
        return loss, terms

    data = [o for o in TINY_DATA if not o.startswith("data.batch_size")]
    cfg = load_config("quickstart", [*TINY_UNET, *data, "train.epochs=1", "data.batch_size=1",
                                     "train.grad_accumulation=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    if where == "gradient":
        next(trainer.model.parameters()).register_hook(lambda g: g * float("inf"))
    else:
        monkeypatch.setattr(Objective, "forward", nan_on_first_micro_batches)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    what = "gradient norm" if where == "gradient" else "loss"
    with pytest.raises(NonFiniteLossError, match=f"non-finite {what} at epoch 0, step 1"):
        trainer.train_epoch(0)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))

def test_the_loop_reads_values_back_once_a_step(tmp_path, monkeypatch):
    """A read-back waits for the GPU to finish what was queued: the loop takes one an optimizer step (its losses'
    and gradient norm's finiteness, before the optimizer's step) and one a logged row, not one for each
    micro-batch's loss and term. With gradient accumulation (2 micro-batches a step) and a row every 2 steps."""
    import sys

    trainer_file = sys.modules[Trainer.__module__].__file__
    reads = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == trainer_file:
                reads.append(caller.f_code.co_name)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    data = [o for o in TINY_DATA if not o.startswith("train.log_every")]
    cfg = load_config("quickstart", [*TINY_UNET, *data, "train.epochs=1", "data.num_train=8", "data.batch_size=1",
                                     "train.grad_accumulation=2", "train.log_every=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_epoch(0)
    assert trainer.step == 4
    assert sorted(reads) == ["_check_step"] * 4 + ["_log_train"] * 2, reads


def test_checkpoints_are_atomic_and_corruption_is_named(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    atomic_save({"network_weights": {"w": torch.ones(2)}}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"network_weights": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["network_weights"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt"]

    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="checkpoint_latest.pt.*corrupt"):
        load_checkpoint(path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*network_weights"):
        load_checkpoint(foreign)


def test_bad_configs_fail_early_with_the_key(tmp_path):
    with pytest.raises(ValueError, match="loss.distill='dsd' does not fit model.name='unet'"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "loss.distill=dsd"]), tmp_path / "a")
    with pytest.raises(ValueError, match="model.kwargs.out_channels=3 but the data has 5"):
        Trainer(load_config("quickstart", [*TINY_DATA, "model.kwargs.out_channels=3"]), tmp_path / "b")
    with pytest.raises(ValueError, match="data.root"):
        Trainer(load_config("segformer3d_brats"), tmp_path / "c")
    with pytest.raises(ValueError, match="train.amp"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.amp=fp8"]), tmp_path / "d")


@pytest.mark.parametrize("name", ["segformer3d_brats", "mobileutr_btcv", "missu_brats", "dsd_unet", "selfreg_unet"])
def test_every_recipe_trains_a_step_on_synthetic_data(name, tmp_path):
    cfg = load_config(name, [
        "data.name=synthetic", "data.spatial_size=[32,32,32]", "data.num_train=2", "data.num_val=1",
        "data.batch_size=2", "data.num_workers=0", "train.epochs=1", "train.max_steps=1", "train.amp=none",
        "val.roi_size=[32,32,32]", "val.hd95=false", "val.sw_batch_size=1", "val.num_images=0",
        "train.progress=false"])
    result = Trainer(cfg, tmp_path).fit()
    assert result["num_cases"] == 1
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert ckpt["step"] == 1 and ckpt["model"]["name"] == cfg["model"]["name"]
    train = _rows(tmp_path, "train")
    assert len(train) == 1 and torch.isfinite(torch.tensor(train[0]["loss"]))
    if cfg["data"]["label_mode"] == "brats_regions":
        from fastseg3d.train.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(tmp_path / "checkpoint_final.pt", tmp_path / "eval", save_predictions=True)
        assert result["class_names"] == ["TC", "WT", "ET"] and len(result["dice_per_class"]) == 3
        nib = pytest.importorskip("nibabel")
        labels = nib.load(str(tmp_path / "eval" / "predictions" / "synthetic_2_0000.nii.gz")).get_fdata()
        assert set(labels.flatten().tolist()) <= {0, 1, 2, 3}  # MSD BraTS coding rebuilt from the regions
    if cfg["loss"]["distill"] == "dsd":
        assert {"kl_decoder", "kl_encoder"} <= set(train[0])
    elif cfg["loss"]["distill"] != "none":
        assert "distill" in train[0]


@pytest.mark.parametrize("name", ["segformer3d_brats", "mobileutr_btcv", "missu_brats", "dsd_unet", "selfreg_unet"])
def test_every_recipe_augments_msd_crops_as_published(name, tmp_path):
    """Each recipe's crops and augmentation (data.crop_ratio, data.augment) build from its config and give
    training crops of the configured size, labels as the loss wants them."""
    from monai.data import list_data_collate

    from tests.data.test_msd import _make_task
    from fastseg3d.train.builders import build_data

    task = _make_task(str(tmp_path), n_cases=3)
    # (the fake cases are not BraTS's: no published split)
    cfg = load_config(name, [f"data.root={task}", "data.spatial_size=[12,12,8]", "data.pixdim=null",
                             "data.split_file=null"])
    expected = {"segformer3d_brats": ("RandSpatialCropSamplesd", ["RandFlipd", "RandRotated", "RandCoarseDropoutd",
                                                                  "GibbsNoised"]),
                "mobileutr_btcv": ("RandCropByPosNegLabeld", ["RandFlipd"] * 3 + [
                    "RandRotate90d", "RandScaleIntensityd", "RandShiftIntensityd"]),
                "missu_brats": ("RandSpatialCropSamplesd", ["RandFlipd"] * 3 + [
                    "RandScaleIntensityd", "RandShiftIntensityd"]),
                "dsd_unet": ("RandCropByPosNegLabeld", ["RandFlipd"] * 3 + ["RandRotate90d", "RandShiftIntensityd"]),
                "selfreg_unet": ("RandCropByPosNegLabeld", ["OneOf"])}[name]
    data = build_data(cfg, training=False)
    types = [type(t).__name__ for t in data.train.transform.transforms]
    crop = types.index(expected[0])
    assert types[crop + 1:crop + 1 + len(expected[1])] == expected[1]
    batch = list_data_collate([data.train[i] for i in range(2)])
    crops = 2 * cfg["data"]["num_samples"]
    assert batch["image"].shape == (crops, 2, 12, 12, 8)
    assert batch["label"].shape == (crops, 3 if cfg["data"]["label_mode"] == "brats_regions" else 1, 12, 12, 8)


def test_bad_augment_is_a_setup_error_and_synthetic_data_warns(tmp_path):
    from fastseg3d.train import SetupError
    from tests.data.test_msd import _make_task
    from fastseg3d.train.builders import build_data

    task = _make_task(str(tmp_path), n_cases=3)
    base = ["data.name=msd", f"data.root={task}", "data.spatial_size=[8,8,8]"]
    with pytest.raises(SetupError, match=r"data.augment\[1\]: no transform 'RandFlop'"):
        build_data(load_config("quickstart", [*base, "data.augment=[{_target_: RandFlipd, keys: [image]}, "
                                                     "{_target_: RandFlop}]"]))
    with pytest.raises(SetupError, match="data.crop_ratio"):
        build_data(load_config("quickstart", [*base, "data.crop_ratio=[0, 0]"]))
    with pytest.raises(ValueError, match="data.augment' must be null or a list"):
        load_config("quickstart", ["data.augment=RandFlipd"])
    with pytest.warns(UserWarning, match="data.crop_ratio, data.augment, data.preprocess, data.split_file apply to "
                                         "data.name=msd"):
        build_data(load_config("dsd_unet", ["data.name=synthetic", "data.spatial_size=[16,16,16]"]), training=False)
    with pytest.raises(ValueError, match=r"^data.in_channels must be 1 to 4, got 5"):
        build_data(load_config("quickstart", ["data.in_channels=5"]), training=False)


def test_a_monai_network_by_dotted_path_trains_converted_and_evaluates(tmp_path):
    """model.name takes any network by its import path (channels from the data where its constructor takes them)
    and model.convert swaps the fused layers in: MONAI's MedNeXt trains on fastseg3d's depthwise convs, its
    checkpoint keeps MedNeXt's own keys and evaluates."""
    from monai.networks.nets import MedNeXt

    from fastseg3d.nn import DepthwiseConv3d
    from fastseg3d.train.evaluate import evaluate_checkpoint

    cfg = load_config("quickstart", [
        *TINY_DATA, "data.spatial_size=[32,32,32]", "val.roi_size=[32,32,32]", "model.name=monai.networks.nets.MedNeXt",
        "model.convert=true",
        "model.kwargs={spatial_dims: 3, init_filters: 4, kernel_size: 3, blocks_down: [1, 1, 1, 1], "
        "blocks_bottleneck: 1, blocks_up: [1, 1, 1, 1]}", "train.max_steps=1", "val.every=1", "val.num_images=0"])
    trainer = Trainer(cfg, tmp_path)
    assert isinstance(trainer.model, MedNeXt)
    assert sum(type(m) is DepthwiseConv3d for m in trainer.model.modules()) > 0
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert ckpt["model"]["convert"] is True and ckpt["model"]["kwargs"]["out_channels"] == trainer.data.out_channels
    plain = MedNeXt(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model"]["kwargs"].items()})
    assert list(ckpt["network_weights"]) == list(plain.state_dict())
    result = evaluate_checkpoint(tmp_path / "checkpoint_final.pt", tmp_path / "eval")
    assert result["num_cases"] == 1


@pytest.mark.parametrize("wrap", ["dsd", "selfreg"])
def test_model_wrap_trains_a_monai_network_with_self_distillation(wrap, tmp_path):
    """model.wrap wraps a MONAI network in DSD or SelfReg with its preset: DynUNet trains with the DSD loss (heads
    shared per scale, as published), UNETR with SelfReg's; the checkpoint says so and evaluates the bare logits."""
    from fastseg3d.distill import DSD, SelfReg
    from fastseg3d.train import SetupError
    from fastseg3d.train.evaluate import evaluate_checkpoint

    if wrap == "dsd":
        net = ["model.name=monai.networks.nets.DynUNet", "model.kwargs={spatial_dims: 3, kernel_size: [3, 3, 3, 3], "
               "strides: [1, 2, 2, 2], upsample_kernel_size: [2, 2, 2], filters: [4, 8, 16, 16]}"]
    else:
        pytest.importorskip("einops")
        net = ["model.name=monai.networks.nets.UNETR", "model.kwargs={img_size: 32, feature_size: 8, hidden_size: 48, "
               "mlp_dim: 96, num_heads: 4}"]
    base = [*TINY_DATA, "data.spatial_size=[32,32,32]", "val.roi_size=[32,32,32]", *net, "train.max_steps=1",
            "val.num_images=0"]
    trainer = Trainer(load_config("quickstart", [*base, f"model.wrap={wrap}", f"loss.distill={wrap}"]), tmp_path)
    assert isinstance(trainer.model, DSD if wrap == "dsd" else SelfReg)
    if wrap == "dsd":
        assert trainer.model.decoder_heads[-1] is trainer.model.encoder_heads[1]  # both at 1/2
    trainer.fit()
    row = _rows(tmp_path, "train")[0]
    assert {"kl_decoder", "kl_encoder"} <= set(row) if wrap == "dsd" else "distill" in row
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert ckpt["model"]["wrap"] == wrap
    assert evaluate_checkpoint(tmp_path / "checkpoint_final.pt", tmp_path / "eval")["num_cases"] == 1
    with pytest.raises(SetupError, match=f"loss.distill='none' does not fit .* with model.wrap={wrap}"):
        Trainer(load_config("quickstart", [*base, f"model.wrap={wrap}"]), tmp_path / "a")


def test_a_wrapped_run_resumes(tmp_path):
    """A DSD-wrapped DynUNet (heads shared per scale, so fewer parameters than heads) resumes its weights and
    optimizer state."""
    net = ["model.name=monai.networks.nets.DynUNet", "model.kwargs={spatial_dims: 3, kernel_size: [3, 3, 3, 3], "
           "strides: [1, 2, 2, 2], upsample_kernel_size: [2, 2, 2], filters: [4, 8, 16, 16]}", "model.wrap=dsd",
           "loss.distill=dsd"]
    args = ["train", "--config", "quickstart", "--output-dir", str(tmp_path), *TINY_DATA, "val.every=0", *net]
    assert cli_main([*args, "--epochs", "1"]) == 0
    assert cli_main([*args, "--epochs", "2", "--resume", "auto"]) == 0
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4 and ckpt["model"]["wrap"] == "dsd"
    assert any(k.startswith("encoder_heads.") for k in ckpt["network_weights"])


def test_model_wrap_errors_are_one_line(tmp_path):
    from fastseg3d.train import SetupError

    mednext = ["model.name=monai.networks.nets.MedNeXt", "model.kwargs={spatial_dims: 3, init_filters: 4}"]
    with pytest.raises(SetupError, match="model.wrap=dsd on model.name=monai.networks.nets.MedNeXt: no dsd preset "
                                         "for .*MedNeXt: the presets cover fastseg3d's UNet, monai's UNETR"):
        Trainer(load_config("quickstart", [*TINY_DATA, *mednext, "model.wrap=dsd", "loss.distill=dsd"]), tmp_path / "a")
    with pytest.raises(SetupError, match="model.wrap=selfreg: model.name=dsd_unet is already built for "
                                         "loss.distill='dsd'"):
        Trainer(load_config("dsd_unet", [*TINY_DATA, "data.name=synthetic", "model.wrap=selfreg",
                                         "loss.distill=selfreg"]), tmp_path / "b")
    with pytest.raises(ValueError, match="config key 'model.wrap' must be one of null, 'dsd', 'selfreg'"):
        load_config("quickstart", ["model.wrap=missu"])


def test_model_name_by_path_errors_are_one_line(tmp_path):
    from fastseg3d.train import SetupError

    for name, match in (("nowhere.Net", "model.name=nowhere.Net: cannot import it"),
                        ("torch.pi", "model.name=torch.pi is not a class or function"),
                        ("collections.OrderedDict", "made a OrderedDict, not a torch.nn.Module"),
                        ("unknown", "'model.name' must be one of .* or a dotted path to a network")):
        with pytest.raises((SetupError, ValueError), match=match):
            Trainer(load_config("quickstart", [*TINY_DATA, f"model.name={name}", "model.kwargs={size: [2]}"]),
                    tmp_path)


def test_split_file_sets_the_training_and_validation_cases(tmp_path):
    from fastseg3d.train import SetupError
    from fastseg3d.train.builders import build_data
    from tests.data.test_msd import _make_task

    task = _make_task(str(tmp_path), n_cases=4)
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["FAKE_000", "FAKE_001"], "val": ["FAKE_002"]},
                                 {"train": ["FAKE_000", "FAKE_003"], "val": ["FAKE_001"]}]))
    base = ["data.name=msd", f"data.root={task}", "data.spatial_size=[8,8,8]", f"data.split_file={folds}"]
    data = build_data(load_config("quickstart", [*base, "data.fold=1", "data.batch_size=2"]))
    assert [c["name"] for c in data.train.data] == ["FAKE_000", "FAKE_003"]
    assert [c["name"] for c in data.val.data] == ["FAKE_001"]
    with pytest.raises(SetupError, match=r"data.split_file=.*data.fold=0\)"):  # 2 cases, a step of 4
        Trainer(load_config("quickstart", [*base, "data.batch_size=4"]), tmp_path / "run")
    with pytest.raises(SetupError, match="holds 2 fold"):
        Trainer(load_config("quickstart", [*base, "data.fold=5"]), tmp_path / "run")
    # evaluation of every case, or of another folder, does not need the run's split file
    from fastseg3d.train.evaluate import _eval_dataset

    cfg = load_config("quickstart", [*base.copy()[:-1], f"data.split_file={tmp_path / 'gone.json'}"])
    _, dataset = _eval_dataset(cfg, "all")
    assert len(dataset) == 4
    with pytest.raises(ValueError, match="gone.json"):
        _eval_dataset(cfg, "val")


def test_subclass_hooks_train_step_and_epoch_callbacks(tmp_path):
    """nnU-Net's shape: a subclass overrides train_step (here an extra weight penalty, logged as a term) and gets
    on_epoch_start/on_epoch_end around each epoch, the validation result with the end."""
    calls = []

    class Penalised(Trainer):
        def train_step(self, image, label, epoch):
            with self._autocast():
                output = self.net(image)
            loss, terms = self.objective(output, label)
            penalty = sum(p.square().sum() for p in self.model.parameters()) * 1e-4
            self.backward(loss + penalty)
            return loss + penalty, {**terms, "penalty": penalty.detach()}

        def on_epoch_start(self, epoch):
            calls.append(("start", epoch))

        def on_epoch_end(self, epoch, result):
            calls.append(("end", epoch, sorted(result)[:1]))

    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=2", "val.every=2", "val.num_images=0"])
    result = Penalised(cfg, tmp_path).fit()
    assert calls == [("start", 0), ("end", 0, []), ("start", 1), ("end", 1, sorted(result)[:1])]
    train = _rows(tmp_path, "train")
    assert train and all(r["penalty"] > 0 and r["loss"] > r["segmentation"] for r in train)


def test_an_overridden_train_step_calling_backward_trains_as_the_loop_does(tmp_path):
    """``self.backward(loss)`` divides by the accumulation (and scales for fp16): an override written with it
    takes the same steps as the built-in train_step, where ``loss.backward()`` took steps twice as long."""
    class Own(Trainer):
        def train_step(self, image, label, epoch):
            with self._autocast():
                output = self.net(image)
            loss, terms = self.objective(output, label)
            self.backward(loss)
            return loss, terms

    overrides = [*TINY_UNET, *TINY_DATA, "data.batch_size=1", "train.grad_accumulation=2", "train.max_steps=2",
                 "val.every=0", "optimizer.name=sgd"]
    weights = []
    for cls, run in ((Trainer, "a"), (Own, "b")):
        trainer = cls(load_config("quickstart", overrides), tmp_path / run)
        trainer.fit()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_best_after_epoch_keeps_a_second_best_checkpoint(tmp_path, caplog):
    """checkpoint.best_after_epoch: a new best after that epoch is written to checkpoint_best_after.pt too (the
    SegFormer3D release's post-cutoff folder); a resumed run of an older checkpoint, which lacks the key, hears of
    no config change."""
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=3", "val.num_images=0",
                                     "checkpoint.best_after_epoch=0"])
    Trainer(cfg, tmp_path).fit()
    dice = {r["epoch"]: r["dice"] for r in _rows(tmp_path, "val")}
    best = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert best["best_metric"] == max(dice.values())
    improved_later = [e for e in (1, 2) if dice[e] > max(dice[x] for x in range(e))]
    if improved_later:
        after = load_checkpoint(tmp_path / "checkpoint_best_after.pt")
        assert after["epoch"] == improved_later[-1] and after["best_metric"] == dice[improved_later[-1]]
    else:
        assert not (tmp_path / "checkpoint_best_after.pt").exists()
    # a checkpoint written before the key existed: resuming it is no config change
    latest = tmp_path / "checkpoint_latest.pt"
    ckpt = load_checkpoint(latest)
    del ckpt["config"]["checkpoint"]["best_after_epoch"]
    atomic_save(ckpt, latest)
    with caplog.at_level("WARNING"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=4", "val.num_images=0"]), tmp_path,
                resume="auto")
    assert "config differs" not in caplog.text
    assert load_config("segformer3d_brats")["checkpoint"]["best_after_epoch"] == 400


def test_msd_folder_trains_and_evaluates(tmp_path):
    from tests.data.test_msd import _make_task

    task = _make_task(str(tmp_path / "data"), n_cases=4)
    run = tmp_path / "run"
    code = cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--epochs", "1", *TINY_UNET,
                     "data.name=msd", f"data.root={task}", "data.spatial_size=[16,16,16]", "data.num_samples=2",
                     "data.batch_size=1", "val.roi_size=[16,16,16]", "val.num_images=1", "train.progress=false"])
    assert code == 0
    val = _rows(run, "val")
    assert len(val[0]["dice_per_class"]) == 3  # dataset.json declares 4 labels: background + 3
    out = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", "all", "--output-dir",
                     str(out), "--save-predictions", "--msd"]) == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    assert result["mean"]["num_cases"] == 4 and result["mean"]["hd95_per_class"] is not None
    assert len(result["mean"]["msd_per_class"]) == 3
    nib = pytest.importorskip("nibabel")
    image = nib.load(str(Path(task) / "imagesTr" / "FAKE_000.nii.gz"))
    pred = nib.load(str(out / "predictions" / "FAKE_000.nii.gz"))
    # The prediction lies voxel for voxel on the input file's grid (reorientation and cropping undone).
    assert pred.shape == image.shape[:3]
    assert pred.affine == pytest.approx(image.affine)


def test_segformer3d_preprocessing_as_released_and_predictions_back_on_the_files(tmp_path):
    """data.preprocess as segformer3d_brats writes it (per-slice min-max, a fixed box, axes 1 and 3 swapped), on
    a box that fits the fake volumes: the network's input is the file's volume so transformed, validation, the
    unlabelled test cases and the saved predictions go through it, and predictions land back on the files' grid
    (zero outside the box)."""
    nib = pytest.importorskip("nibabel")
    from tests.data.test_msd import _make_task, add_test_cases
    from fastseg3d.train.builders import build_data

    task = _make_task(str(tmp_path / "data"), n_cases=3)
    images = add_test_cases(task)
    start, end = [2, 3, 1], [18, 15, 13]
    preprocess = load_config("segformer3d_brats")["data"]["preprocess"]
    assert [p["_target_"] for p in preprocess] == ["fastseg3d.data.msd.MinMaxPerSliced", "SpatialCropd", "Transposed"]
    assert preprocess[1]["roi_start"] == [56, 56, 13] and preprocess[1]["roi_end"] == [184, 184, 141]
    box = (f"data.preprocess=[{{_target_: fastseg3d.data.msd.MinMaxPerSliced, keys: [image], axis: 2}}, "
           f"{{_target_: SpatialCropd, keys: [image, label], roi_start: {start}, roi_end: {end}}}, "
           "{_target_: Transposed, keys: [image, label], indices: [0, 3, 2, 1]}]")
    overrides = [f"data.root={task}", box, "data.split_file=null", "data.spatial_size=[12,12,16]", "data.num_samples=1",
                 "data.batch_size=1", "data.num_workers=0", "val.roi_size=[12,12,16]", "val.hd95=false",
                 "val.num_images=0", "checkpoint.best_after_epoch=null", *TINY_UNET]
    cfg = load_config("segformer3d_brats", overrides)
    data = build_data(cfg, training=False)
    item = data.val[0]
    name = Path(str(item["image"].meta["filename_or_obj"])).name
    file = np.asarray(nib.load(str(Path(task) / "imagesTr" / name)).dataobj).astype(np.float64)
    volume = np.moveaxis(file, -1, 0)[:, ::-1]  # channel first, RAS (the fake files' x axis is flipped)
    low = volume.min(axis=(1, 2), keepdims=True)
    span = volume.max(axis=(1, 2), keepdims=True) - low
    scaled = (volume - low) / np.where(span > 0, span, 1.0)  # each z slice of each channel on its own
    expected = scaled[:, start[0]:end[0], start[1]:end[1], start[2]:end[2]].transpose(0, 3, 2, 1)
    np.testing.assert_allclose(np.asarray(item["image"]), expected, atol=1e-6)
    label = np.asarray(nib.load(str(Path(task) / "labelsTr" / name)).dataobj)[::-1]
    label = label[start[0]:end[0], start[1]:end[1], start[2]:end[2]].transpose(2, 1, 0)
    assert np.array_equal(np.asarray(item["label"][2]), label == 3)  # ET, of the same box and axes

    run = tmp_path / "run"
    assert cli_main(["train", "--config", "segformer3d_brats", "--output-dir", str(run), "--epochs", "1",
                     "--max-steps", "1", "train.progress=false", *overrides]) == 0
    for split in ("all", "test"):
        out = tmp_path / split
        assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", split,
                         "--output-dir", str(out), "--save-predictions", "--no-hd95"]) == 0
        paths = images if split == "test" else sorted(str(p) for p in (Path(task) / "imagesTr").iterdir())
        for path in paths:
            image = nib.load(path)
            pred = np.asarray(nib.load(str(out / "predictions" / Path(path).name)).dataobj)
            assert pred.shape == image.shape[:3]
            inside = np.zeros(pred.shape, bool)
            inside[image.shape[0] - end[0]:image.shape[0] - start[0], start[1]:end[1], start[2]:end[2]] = True
            # the box, undone (x flipped back onto the file's axis); the untrained network marks tumour in it
            assert not pred[~inside].any() and pred[inside].any()


def test_dsd_recipe_validates_on_the_released_split():
    """configs/splits/dsd_unet.json: DSD's MSD-BraTS split as its loader draws it: the 484 cases sorted by name,
    the last 24 held out for testing, the other 460 shuffled by random.Random(0), the last 72 of them validation."""
    import random

    from fastseg3d.data.msd import split_from_file
    from fastseg3d.train.config import find_split_file

    path = find_split_file(load_config("dsd_unet")["data"]["split_file"])
    assert path.name == "dsd_unet.json" and path.is_file()
    split = json.loads(path.read_text())
    names = [f"BRATS_{i:03d}" for i in range(1, 485)]
    rest = names[:-24]
    random.Random(0).shuffle(rest)
    assert sorted(split["train"]) == sorted(rest[:-72]) and sorted(split["val"]) == sorted(rest[-72:])
    assert len(split["train"]) == 388 and len(split["val"]) == 72
    cases = [{"name": n, "image": f"{n}.nii.gz"} for n in names]
    train, val = split_from_file(cases, path)
    held_out = {c["name"] for c in cases} - {c["name"] for c in train + val}
    assert held_out == set(names[-24:])  # BRATS_461 to BRATS_484: never trained or validated on


def test_mobileutr_recipe_schedules_as_unetr_btcv():
    """UNETR/BTCV's LinearWarmupCosineAnnealingLR (50 warm-up epochs, cosine to 0 at epoch 5000, stepped per
    epoch), from lr / 50 where the release starts at 0; its Dice form and constant sliding-window blending."""
    import math

    cfg = load_config("mobileutr_btcv")
    sched = cfg["scheduler"]
    assert sched["interval"] == "epoch" and cfg["train"]["epochs"] == 5000
    factor = schedule_factor(sched, cfg["optimizer"]["lr"], cfg["train"]["epochs"])
    for epoch in range(1, 50):  # the release: linear from 0 at epoch 0 to the peak at epoch 49
        assert factor(epoch) == pytest.approx(min((epoch + 1) / 50, 1.0))
    for epoch in (50, 51, 1000, 2525, 4999):
        assert factor(epoch) == pytest.approx(0.5 * (1 + math.cos(math.pi * (epoch - 50) / 4950)))
    assert factor(0) == pytest.approx(1 / 50)
    assert cfg["loss"]["dice_kwargs"] == {"squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-6}
    assert cfg["val"]["blend"] == "constant" and cfg["val"]["overlap"] == 0.5


def test_selfreg_recipe_turns_zero_to_three_quarters_evenly():
    """TransUNet's rot90 draws k from 0..3 uniformly; the recipe's RandRotate90d (k in 1..3 when it fires) fires
    with p 0.75, which gives the same distribution."""
    from fastseg3d.data.msd import build_transforms

    (rotate,) = [spec for spec in load_config("selfreg_unet")["data"]["augment"][0]["transforms"][0]["transforms"]
                 if spec["_target_"] == "RandRotate90d"]
    (t,) = build_transforms([rotate])
    t.set_random_state(0)
    counts = np.zeros(4)
    for _ in range(8000):
        t.randomize()
        counts[t._rand_k % 4 if t._do_transform else 0] += 1
    assert np.allclose(counts / counts.sum(), 0.25, atol=0.015), counts


def test_segformer3d_recipe_validates_on_the_released_split():
    """configs/splits/segformer3d_brats.json: the release's 73 validation cases, the other 411 of MSD Task01 train;
    the recipe names it, found by name from any working directory."""
    from fastseg3d.data.msd import split_from_file
    from fastseg3d.train.config import find_split_file

    cfg = load_config("segformer3d_brats")
    path = find_split_file(cfg["data"]["split_file"])
    assert path.name == "segformer3d_brats.json" and path.is_file()
    split = json.loads(path.read_text())
    assert len(split["val"]) == 73 and len(split["train"]) == 411
    assert sorted(split["train"] + split["val"]) == [f"BRATS_{i:03d}" for i in range(1, 485)]
    assert {"BRATS_377", "BRATS_173", "BRATS_048"} <= set(split["val"]) and "BRATS_016" in split["train"]
    cases = [{"name": f"BRATS_{i:03d}", "image": f"{i}.nii.gz"} for i in range(1, 485)]
    train, val = split_from_file(cases, path)
    assert [c["name"] for c in val][:3] == ["BRATS_010", "BRATS_026", "BRATS_029"] and len(train) == 411
    assert find_split_file("no_such_split") == Path("no_such_split")  # left for the loader's error
    # a path (a folder in it) is never taken for the published split of the same name
    assert find_split_file("/nowhere/segformer3d_brats.json") == Path("/nowhere/segformer3d_brats.json")
    assert find_split_file("typo/segformer3d_brats") == Path("typo/segformer3d_brats")
    # a folder holding only some training cases: training refuses it, evaluation (the val side) takes it
    some = [c for c in cases if c["name"] in set(split["val"]) or c["name"] == "BRATS_016"]
    with pytest.raises(ValueError, match=r"train names 410 case\(s\).*data.split_file=null"):
        split_from_file(some, path)
    train, val = split_from_file(some, path, required=("val",))
    assert [c["name"] for c in train] == ["BRATS_016"] and len(val) == 73


def test_eval_predicts_the_unlabelled_test_cases(tmp_path):
    from tests.data.test_msd import _make_task, add_test_cases

    task = _make_task(str(tmp_path / "data"), n_cases=3)
    images = add_test_cases(task)
    run = tmp_path / "run"
    assert cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--epochs", "1", *TINY_UNET,
                     "data.name=msd", f"data.root={task}", "data.spatial_size=[16,16,16]", "data.batch_size=1",
                     "val.every=0", "data.pixdim=[2.0,2.0,2.0]", "val.roi_size=[16,16,16]",
                     "train.progress=false"]) == 0
    out = tmp_path / "test"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", "test", "--output-dir",
                     str(out)]) == 0
    listed = json.loads((out / "predictions.json").read_text())
    assert listed["mean"]["num_cases"] == 2 and [c["case"] for c in listed["cases"]] == ["FAKE_100", "FAKE_101"]
    assert not (out / "eval_metrics.json").exists()
    nib = pytest.importorskip("nibabel")
    for path in images:
        image = nib.load(path)
        pred = nib.load(str(out / "predictions" / Path(path).name))
        # on the input file's grid: the resampling to 2 mm, the reorientation and the crop undone
        assert pred.shape == image.shape[:3] and pred.affine == pytest.approx(image.affine)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", "test", "--data",
                     "synthetic"]) == 2
    # the labelled cases, resampled to 2 mm for the network, are scored on their label files' grids
    scored = tmp_path / "all"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", "all", "--output-dir",
                     str(scored), "--save-predictions", "--no-hd95"]) == 0
    result = json.loads((scored / "eval_metrics.json").read_text())
    assert result["mean"]["grid"] == "label files"
    for row in result["cases"]:
        pred = np.asarray(nib.load(str(scored / "predictions" / f"{row['case']}.nii.gz")).dataobj)
        truth = np.asarray(nib.load(str(Path(task) / "labelsTr" / f"{row['case']}.nii.gz")).dataobj)
        for k, dice in enumerate(row["dice_per_class"], start=1):
            p, t = pred == k, truth == k
            expected = 2 * (p & t).sum() / (p.sum() + t.sum()) if t.any() else None
            assert dice == pytest.approx(expected, abs=1e-6) if expected is not None else dice in (None, 1.0, 0.0)
    # label files stored as (X, Y, Z, 1), which loading squeezes, are scored the same
    for row in result["cases"]:
        path = str(Path(task) / "labelsTr" / f"{row['case']}.nii.gz")
        file = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(file.dataobj)[..., None], file.affine), path)
    again = tmp_path / "again"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--split", "all", "--output-dir",
                     str(again), "--no-hd95"]) == 0
    assert json.loads((again / "eval_metrics.json").read_text())["cases"] == result["cases"]


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_activation_checkpointing_keeps_gradients(monkeypatch, amp):
    """Every wrapped block is checkpointed (SegFormer3D runs a block whose forward was replaced through its call,
    not through its deferred residual path) and the gradients are unchanged; under autocast too, where the
    network's forward swaps in low-precision weight copies (autocast_weights) that the recompute must see again
    (it recomputed with the fp32 parameters: torch's CheckpointError)."""
    import torch.utils.checkpoint as checkpointing

    from fastseg3d.networks import SegFormer3D

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    kwargs = dict(in_channels=2, out_channels=3, embed_dims=(8, 16, 16, 16), depths=(2, 1, 1, 1),
                  num_heads=(1, 1, 1, 1), decoder_dim=16)
    plain, ckpt = SegFormer3D(**kwargs), SegFormer3D(**kwargs)
    ckpt.load_state_dict(plain.state_dict())
    assert enable_activation_checkpointing(ckpt) == 5
    x = torch.randn(2, 2, 32, 32, 32)
    for net in (plain, ckpt):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            net(x).float().square().mean().backward()
    assert len(calls) == 5
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_train_leaves_a_callers_process_group_alone(tmp_path, monkeypatch):
    """Under torchrun, ``fastseg3d train`` ends its workers at once (os._exit) only when its trainer made the
    process group; called in a process whose group the caller made, it returns and leaves the group up."""
    import torch.distributed as dist

    from fastseg3d.cli import main

    def leave(code):  # os._exit would end pytest itself, with this code
        raise AssertionError(f"os._exit({code}) in a process whose group the caller made")

    monkeypatch.setattr(os, "_exit", leave)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        code = main(["train", "--config", "quickstart", "--epochs", "1", *TINY_UNET, *TINY_DATA, "--output-dir",
                     str(tmp_path)])
        assert code == 0 and dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert (tmp_path / "checkpoint_final.pt").is_file()


def test_ddp_trains_dsd_with_a_detached_teacher(tmp_path, monkeypatch):
    """With detach_teacher, DSD's encoder teacher head gets no gradient: DDP must be told (it raised on the second
    step)."""
    import torch.distributed as dist

    from fastseg3d.cli import main

    monkeypatch.setattr(os, "_exit", lambda code: None)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):  # read as torchrun; a group of one
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        code = main(["train", "--config", "dsd_unet", "--epochs", "1", "--output-dir", str(tmp_path),
                     "model.kwargs={channels: [4, 8, 8, 8]}", "data.name=synthetic", "loss.distill_kwargs="
                     "{detach_teacher: true}", "train.amp=none", "data.cache=false", "data.num_workers=0", *TINY_DATA])
    finally:
        dist.destroy_process_group()
    assert code == 0 and (tmp_path / "checkpoint_final.pt").is_file()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, accumulation):
    """torchrun with 2 gloo processes of 2 cases each == 1 process of 4 cases (same data order, averaged grads),
    also when gradients accumulate over micro-batches (DDP syncs only on the last one)."""
    args = ["train", "--config", "quickstart", "--epochs", "1", "--deterministic", *TINY_UNET, *TINY_DATA,
            "data.num_train=8", "data.batch_size=4", f"train.grad_accumulation={accumulation}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's agent leaves a folder there
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "fastseg3d", *args, "--output-dir", str(one)], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastseg3d", *args, "--output-dir", str(two)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = 2 // accumulation
    assert len(_rows(one, "train")) == len(_rows(two, "train")) == steps  # rank 0 alone logs
    assert load_checkpoint(two / "checkpoint_final.pt")["step"] == steps
    for a, b in zip(_rows(one, "train"), _rows(two, "train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa = load_checkpoint(one / "checkpoint_final.pt")["network_weights"]
    wb = load_checkpoint(two / "checkpoint_final.pt")["network_weights"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("extra", [
    ["train.amp=bf16"],
    ["train.amp=fp16", "train.grad_clip=1.0"],
    ["train.channels_last=true", "train.grad_accumulation=2", "train.activation_checkpointing=true"],
    ["scheduler.name=poly", "scheduler.interval=epoch", "optimizer.name=sgd", "optimizer.nesterov=true"],
])
def test_training_options_run(extra, tmp_path):
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=1", "val.every=0", *extra])
    trainer = Trainer(cfg, tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # steps were taken
    rows = _rows(tmp_path, "train")
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert trainer.step == 2 // int(cfg["train"]["grad_accumulation"])
    if cfg["train"]["amp"] == "fp16":
        assert load_checkpoint(tmp_path / "checkpoint_final.pt")["grad_scaler_state"]  # the scaler is saved


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    # reduce-overhead marks each step's start for CUDA graphs (on CPU tensors Inductor compiles without them)
    marks = []
    mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(mark()))
    args = [*TINY_UNET, *TINY_DATA, "train.epochs=1", "val.every=0", "deterministic=true"]
    Trainer(load_config("quickstart", args), tmp_path / "eager").fit()
    assert not marks
    Trainer(load_config("quickstart", [*args, "train.compile=reduce-overhead"]), tmp_path / "compiled").fit()
    assert len(marks) == 2
    eager, compiled = _rows(tmp_path / "eager", "train"), _rows(tmp_path / "compiled", "train")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.timeout(480)  # a network's ~70-90 Triton specialisations compile one after another in one worker
@pytest.mark.gpu
def test_gpu_reduce_overhead_training_matches_eager(tmp_path):
    """The quickstart SegFormer3D (fused ops) trained under bf16 autocast eagerly and with train.compile=
    reduce-overhead, whose forward and backward replay from CUDA graphs: the same losses within bf16 rounding."""
    args = ["device=cuda", "train.amp=bf16", "data.num_train=6", "data.num_val=1", "train.epochs=1", "val.every=0",
            "train.log_every=1", "train.progress=false", "seed=0"]
    Trainer(load_config("quickstart", args), tmp_path / "eager").fit()
    Trainer(load_config("quickstart", [*args, "train.compile=reduce-overhead"]), tmp_path / "graphed").fit()
    eager, graphed = _rows(tmp_path / "eager", "train"), _rows(tmp_path / "graphed", "train")
    assert len(eager) == len(graphed) == 3
    for a, b in zip(eager, graphed):
        assert np.isfinite(b["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=3e-2)


def test_compile_takes_true_false_or_a_mode(tmp_path):
    from fastseg3d.train.trainer import _compile_mode

    assert _compile_mode(False) is None
    assert _compile_mode(True) == "default"
    assert _compile_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="train.compile must be true, false or one of default, reduce-overhead"):
        _compile_mode("fast")

    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.compile=reduce-overhead",
                                     "train.grad_accumulation=2"])
    with pytest.raises(ValueError, match="cannot accumulate gradients over micro-batches"):
        Trainer(cfg, tmp_path)


def test_metrics_mirror_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import types

    from fastseg3d.train.logger import MetricsLogger

    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLogger(tmp_path)
    log.log({"step": 3, "epoch": 0, "split": "val", "loss": 0.5, "dice": 0.7, "dice_per_class": [0.6, None]})
    log.close()
    assert written[0] == ("dir", str(tmp_path / "tb"))
    assert ("val/loss", 0.5, 3) in written and ("val/dice_per_class/0", 0.6, 3) in written
    assert not any(w[0] == "val/dice_per_class/1" for w in written) and written[-1] == ("closed",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["dice_per_class"] == [0.6, None]


def test_metrics_rows_skip_what_a_crash_left(tmp_path):
    """Resuming reads metrics.jsonl back: a line cut short or holding bytes that are not UTF-8 is dropped."""
    from fastseg3d.train.logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo\xff\xfe\n{"step": 3}\n'
                                             b'\x00\x00')
    log = MetricsLogger(tmp_path)
    assert log.rows() == [{"step": 1, "loss": 0.5}, {"step": 3}]
    log.truncate_after(1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


def test_non_finite_loss_stops_every_rank(tmp_path):
    """A diverging DDP run stops on both ranks together (no rank left waiting in an all-reduce)."""
    args = ["train", "--config", "quickstart", "--epochs", "3", *TINY_UNET, *TINY_DATA, "data.num_train=8",
            "data.batch_size=4", "optimizer.lr=1e30", "scheduler.warmup=0"]
    # The agent stops the other worker once one fails; polling every 5 s gives a loaded machine's second rank time
    # to print its own error (a rank left in the all-reduce would print gloo's lost-peer error instead).
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=5", "-m", "fastseg3d", *args, "--output-dir", str(tmp_path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: non-finite") == 2, proc.stderr[-3000:]


def test_output_mode_and_data_channels_follow_the_data_config():
    from fastseg3d.train.builders import data_channels, output_mode

    assert output_mode("labels") == "softmax" and output_mode("brats_regions") == "sigmoid"
    with pytest.raises(ValueError, match="data.label_mode"):
        output_mode("regions")
    cfg = load_config("quickstart")
    assert data_channels(cfg) == (4, 5)
    cfg["data"]["label_mode"] = "brats_regions"
    assert data_channels(cfg) == (4, 3)
    assert data_channels(load_config("segformer3d_brats")) is None  # an MSD config whose root is not set


@pytest.mark.parametrize("name", ["dsd_unet", "selfreg_unet"])
def test_objective_casts_no_output_under_autocast(name, monkeypatch):
    """Under autocast the logits, heads and features reach fastseg3d's DiceCE and the fused ops in bf16 (no fp32
    copies of DSD's heads, no fp32 gradients saved for them), and the loss is the one of fp32 copies of the
    outputs, as every term computes in fp32."""
    import fastseg3d.losses.dsd as dsd_loss
    import fastseg3d.losses.selfreg as selfreg_loss
    from fastseg3d.train.builders import build_model, build_objective

    cfg = load_config(name, ["model.kwargs={channels: [4, 8, 8, 8]}"])
    net = build_model(cfg["model"], 1, 3)
    objective = build_objective(cfg, "softmax", 3)
    seen = {"fused": [], "dice_ce": []}

    def record(kind, fn, n_inputs=2):
        def wrapped(*args, **kwargs):
            for a in args[:n_inputs]:
                seen[kind].extend(t.dtype for t in (a if isinstance(a, (list, tuple)) else [a]))
            return fn(*args, **kwargs)
        return wrapped

    for module, fn in ((dsd_loss, "kl_distill_multi"), (selfreg_loss, "selfreg_inter_multi"),
                       (selfreg_loss, "selfreg_intra")):
        monkeypatch.setattr(module, fn, record("fused", getattr(module, fn)))
    for loss in (objective.segmentation, getattr(objective.distill, "dice_ce", None)):
        if loss is not None:
            monkeypatch.setattr(loss, "forward", record("dice_ce", loss.forward, 1))
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = net(x)
    torch.manual_seed(1)  # SelfReg's channel draws
    loss, terms = objective(output, y)
    assert seen["fused"] and set(seen["fused"]) == {torch.bfloat16}
    assert seen["dice_ce"] and set(seen["dice_ce"]) == {torch.bfloat16}
    fp32 = type(output)(*(tuple(t.float() for t in v) if isinstance(v, tuple) else v.float() for v in output))
    torch.manual_seed(1)
    torch.testing.assert_close(loss, objective(fp32, y)[0], rtol=1e-6, atol=0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["dice_ce", "dice"])
def test_dsd_supervises_its_heads_with_the_configured_segmentation_loss(name):
    from fastseg3d.train.builders import build_objective

    cfg = load_config("dsd_unet", [f"loss.name={name}", "loss.lambda_dice=0.6",
                                     "loss.lambda_ce=0.4"])
    objective = build_objective(cfg, "softmax", 3)
    dice_ce = objective.distill.dice_ce
    expected = (1.0, 0.0) if name == "dice" else (0.6, 0.4)
    assert (dice_ce.lambda_dice, dice_ce.lambda_ce) == expected
    assert (objective.segmentation.lambda_dice, objective.segmentation.lambda_ce) == expected


def test_distill_kwargs_without_a_distillation_are_said():
    """A recipe's distillation settings with loss.distill=none (an ablation): a warning naming them, no error."""
    from fastseg3d.train.builders import build_objective

    cfg = load_config("quickstart", ["loss.distill=none", "loss.distill_kwargs={temperature: 2.0}"])
    with pytest.warns(UserWarning, match=r"loss.distill_kwargs \(temperature\) apply to a distillation loss"):
        assert build_objective(cfg, "softmax", 3).distill is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_objective(load_config("quickstart", ["loss.distill=none"]), "softmax", 3)


@pytest.mark.parametrize("name", ["dice_ce", "dice"])
def test_objective_segmentation_on_labels_is_monais(name):
    """On label maps the objective's segmentation loss is fastseg3d's DiceCE (Dice alone for ``loss.name=dice``),
    equal to MONAI's loss of the same settings, value and gradient."""
    from monai.losses import DiceCELoss, DiceLoss

    from fastseg3d.train.builders import build_objective

    cfg = load_config("quickstart", [f"loss.name={name}", "loss.include_background=false", "loss.lambda_dice=0.6",
                                     "loss.lambda_ce=0.4"])
    objective = build_objective(cfg, "softmax", 4)
    if name == "dice":
        expected_fn = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    else:
        expected_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, lambda_dice=0.6,
                                 lambda_ce=0.4)
    logits = torch.randn(2, 4, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 6, 5, 7)).double()
    loss, terms = objective(logits, target)
    expected = expected_fn(logits, target)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0],
                               rtol=1e-10, atol=1e-14)
    assert set(terms) == {"segmentation"}


@pytest.mark.parametrize("config,expected", [
    # MISSU's released softmax_dice (seeds §4.4): per label over the batch, summed, no numerator smoothing
    ("missu_brats", dict(include_background=False, to_onehot_y=True, softmax=True, batch=True, reduction="sum",
                         smooth_nr=0.0)),
    # TransUNet's Dice, 0.6 of SelfReg's loss with 0.4 CE (§3.3): squares in the denominator, per class over the batch
    ("selfreg_unet", dict(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, lambda_dice=0.6,
                          lambda_ce=0.4)),
])
def test_recipe_configs_train_the_published_dice(config, expected):
    """The recipes' Dice forms come through loss.dice_kwargs to the fused loss: MONAI's loss of the published
    settings, value and gradient."""
    from monai.losses import DiceCELoss, DiceLoss

    from fastseg3d.train.builders import build_objective

    cfg = load_config(config)
    objective = build_objective(cfg, "softmax", 4)
    assert objective.segmentation.fused
    if cfg["loss"]["name"] == "dice":
        expected_fn = DiceLoss(**expected)
    else:
        expected_fn = DiceCELoss(**expected)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 6, 5, 7), generator=g).double()
    loss = objective.segmentation(logits, target)  # the term the recipe's distillation loss is added to
    reference = expected_fn(logits, target)
    torch.testing.assert_close(loss, reference, rtol=1e-8, atol=1e-8)  # MONAI's squared form cancels digits
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(reference, logits)[0],
                               rtol=1e-6, atol=1e-10)


def test_dice_kwargs_reach_dsd_terms_and_bad_ones_are_named():
    from fastseg3d.train import SetupError
    from fastseg3d.train.builders import build_objective

    cfg = load_config("dsd_unet", ["loss.dice_kwargs={batch: true, squared_pred: true}"])
    objective = build_objective(cfg, "softmax", 3)
    for loss in (objective.segmentation, objective.distill.dice_ce):
        assert loss.fused and (loss.batch, loss.squared_pred) == (True, True)
    with pytest.raises(SetupError, match="loss.dice_kwargs cannot set include_background"):
        build_objective(load_config("quickstart", ["loss.dice_kwargs={include_background: false}"]), "softmax", 3)
    with pytest.raises(SetupError, match="loss.dice_kwargs: DiceCELoss refuses"):
        build_objective(load_config("quickstart", ["loss.dice_kwargs={bogus: 1}"]), "softmax", 3)
    # a setting only MONAI's composition computes: MONAI's loss, on fp32 logits (it computes in its input's dtype)
    objective = build_objective(load_config("quickstart", ["loss.dice_kwargs={label_smoothing: 0.1}"]), "softmax", 3)
    assert not objective.segmentation.fused
    logits, target = torch.randn(2, 3, 4, 5, 6, dtype=torch.bfloat16), torch.randint(0, 3, (2, 1, 4, 5, 6))
    expected = objective.segmentation.composition(logits.float(), target)
    torch.testing.assert_close(objective(logits, target)[0], expected)
    with pytest.raises(SetupError, match="loss.dice_kwargs and loss.distill_kwargs: DSDLoss refuses"):
        build_objective(load_config("dsd_unet", ["loss.dice_kwargs={label_smoothing: 0.1}"]), "softmax", 3)
    with pytest.raises(SetupError, match="loss.dice_kwargs: DiceLoss refuses"):
        build_objective(load_config("quickstart", ["loss.name=dice", "loss.dice_kwargs={reduction: median}"]),
                        "sigmoid", 3)


def test_resume_takes_the_configs_optimizer_settings_and_refuses_another_optimizer_or_network(tmp_path):
    """The checkpoint gives the optimizer's moments and the schedule's position; a changed learning rate or weight
    decay is what runs (and what config.yaml says). Another optimizer or network is a one-line SetupError, before
    the run's config.yaml is rewritten."""
    from fastseg3d.train import SetupError

    base = [*TINY_UNET, *TINY_DATA, "val.every=0", "scheduler.name=constant", "scheduler.warmup=0"]
    run = tmp_path / "run"
    Trainer(load_config("quickstart", [*base, "train.epochs=1"]), run).fit()
    config = (run / "config.yaml").read_text()
    for change, match in (("optimizer.name=sgd", "optimizer.name=adamw, not sgd"),
                          ("optimizer.amsgrad=true", "made with amsgrad=False"),
                          ("model.kwargs={spatial_dims: 3, channels: [4, 8, 32]}", "model.kwargs.channels")):
        with pytest.raises(SetupError, match=match):
            Trainer(load_config("quickstart", [*base, "train.epochs=2", change]), run, resume="auto")
        assert (run / "config.yaml").read_text() == config
    trainer = Trainer(load_config("quickstart", [*base, "train.epochs=2", "optimizer.lr=1e-5",
                                                 "optimizer.weight_decay=0.5"]), run, resume="auto")
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == 1e-5 and group["weight_decay"] == 0.5 and trainer.scheduler.base_lrs == [1e-5]
    assert trainer.optimizer.state  # the moments came from the checkpoint
    trainer.fit()
    assert {r["lr"] for r in _rows(run, "train") if r["epoch"] == 1} == {1e-5}
    assert "lr: 1.0e-05" in (run / "config.yaml").read_text()


def test_checkpoints_are_readable_as_other_files_and_a_killed_writes_temporary_goes(tmp_path):
    from fastseg3d.train.checkpoint import remove_stale_temporaries

    old = os.umask(0o022)
    try:
        atomic_save({"network_weights": {}}, tmp_path / "checkpoint_best.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint_best.pt").stat().st_mode & 0o777 == 0o644
    stale = tmp_path / ".checkpoint_latest.pt.abc123.tmp"
    stale.write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt", "keep.tmp"]


def test_a_window_the_network_cannot_take_and_bad_data_are_setup_errors(tmp_path):
    """Found when the run starts, not at its first validation (SegFormer3D's windows must be multiples of 32), and
    a data folder the run cannot read is one line, as eval reports it."""
    from fastseg3d.train import SetupError
    from fastseg3d.train.evaluate import evaluate_checkpoint

    segformer = ["model.kwargs={embed_dims: [8, 16, 16, 16], num_heads: [1, 1, 1, 1], depths: [1, 1, 1, 1], "
                 "decoder_dim: 16}", "data.spatial_size=[32,32,32]", "data.num_train=2", "data.num_val=1",
                 "data.batch_size=2", "train.progress=false"]
    with pytest.raises(SetupError, match=r"val.roi_size=\[40, 40, 40\].*positive multiple"):
        Trainer(load_config("quickstart", [*segformer, "val.roi_size=[40,40,40]"]), tmp_path / "a")
    run = tmp_path / "b"
    Trainer(load_config("quickstart", [*segformer, "train.epochs=1", "train.max_steps=1", "val.every=0"]), run).fit()
    with pytest.raises(SetupError, match=r"roi=\[48, 32, 32\].*positive multiple"):
        evaluate_checkpoint(run / "checkpoint_final.pt", tmp_path / "eval", val_overrides={"roi_size": [48, 32, 32]})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text('{"training": [')
    with pytest.raises(SetupError, match="dataset.json is not valid JSON"):
        Trainer(load_config("quickstart", [*TINY_UNET, "data.name=msd", f"data.root={bad}"]), tmp_path / "c")


def test_a_bad_case_found_in_training_is_one_line_and_keeps_the_run(tmp_path, capsys):
    from tests.data.test_msd import SHAPE, _break_case, _make_task

    from fastseg3d.data.msd import load_msd_datalist

    task = _make_task(str(tmp_path / "data"), n_cases=4)
    for case in load_msd_datalist(task)[1]:
        _break_case(case, label=np.full(SHAPE, 7, np.uint8))
    run = tmp_path / "run"
    code = cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--epochs", "1", *TINY_UNET,
                     "data.name=msd", f"data.root={task}", "data.spatial_size=[16,16,16]", "data.batch_size=1",
                     "data.cache=false", "data.num_workers=1", "val.roi_size=[16,16,16]", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: image " in err and "outside the declared classes" in err and "Traceback" not in err
    assert "checkpoints are kept" in err  # found while training (from a DataLoader worker), not at setup


def _sgd(lr: float) -> list[str]:
    """Plain gradient descent: a step's weight change is -lr times the gradient (Adam's would not show its scale)."""
    return ["optimizer.name=sgd", f"optimizer.lr={lr}", "optimizer.momentum=0", "optimizer.weight_decay=0",
            "scheduler.name=constant", "scheduler.warmup=0", "val.every=0", "deterministic=true", "train.epochs=1"]


def test_accumulated_micro_batches_step_as_their_whole_batch(tmp_path):
    """One step on 4 cases, as one batch or as 2 accumulated micro-batches of 2 (the same cases: the order is a
    function of seed and epoch, the augmentation of case and epoch; the norms are per case): the same update."""
    data = [o for o in TINY_DATA if not o.startswith("data.batch_size")]
    updates = []
    for batch, accumulation in ((4, 1), (2, 2)):
        cfg = load_config("quickstart", [*TINY_UNET, *data, *_sgd(0.5), f"data.batch_size={batch}",
                                         f"train.grad_accumulation={accumulation}"])
        trainer = Trainer(cfg, tmp_path / f"accumulate{accumulation}")
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_epoch(0)
        assert trainer.step == 1
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)]))
    whole, accumulated = updates
    assert whole.norm() > 1e-3
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clipping_bounds_the_true_gradient(amp, tmp_path):
    """A clipped step of plain gradient descent moves the weights by lr * the clip's norm, also under fp16, whose
    scaler multiplies the gradients by its scale until they are unscaled (clipping them scaled would move them that
    many times too little)."""
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, *_sgd(1.0), "train.max_steps=1", f"train.amp={amp}",
                                     "train.grad_clip=0.01"])
    trainer = Trainer(cfg, tmp_path)
    if amp == "fp16":
        # 2^8 rather than the default 2^16, which is within a factor 2 of this network's first overflow
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_epoch(0)
    if amp == "fp16":
        assert trainer.scaler.get_scale() == 2.0**8  # no overflow: the step was taken
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-3)


def test_resume_restores_the_gradient_scaler(tmp_path):
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=2", "val.every=0", "train.amp=fp16"])
    Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=1", "val.every=0",
                                       "train.amp=fp16"]), tmp_path).fit()
    path = tmp_path / "checkpoint_latest.pt"
    ckpt = load_checkpoint(path)
    # a scale the run lowered after overflows, and steps counted towards its next growth
    ckpt["grad_scaler_state"].update(scale=512.0, _growth_tracker=7)
    atomic_save(ckpt, path)
    trainer = Trainer(cfg, tmp_path, resume="auto")
    assert trainer.scaler.get_scale() == 512.0 and trainer.scaler.state_dict()["_growth_tracker"] == 7


def test_resume_keeps_the_best_checkpoints_metric(tmp_path):
    """The latest checkpoint is written before its epoch's validation: a new best found by that validation is in
    checkpoint_best.pt only. A resumed run must not replace that best by a worse model."""
    args = [*TINY_UNET, *TINY_DATA, "deterministic=true"]
    Trainer(load_config("quickstart", [*args, "train.epochs=1"]), tmp_path).fit()
    best = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt")["best_metric"] == -float("inf")
    best["best_metric"] = 2.0  # above any Dice
    atomic_save(best, tmp_path / "checkpoint_best.pt")
    trainer = Trainer(load_config("quickstart", [*args, "train.epochs=2"]), tmp_path, resume="auto")
    assert trainer.best_metric == 2.0
    trainer.fit()
    assert len(_rows(tmp_path, "val")) == 2
    kept = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert kept["best_metric"] == 2.0 and kept["epoch"] == 0


def test_validation_leaves_the_training_random_streams_alone(tmp_path, monkeypatch):
    """Whatever validation draws (a network that samples in eval mode, a random transform) does not reach the
    training after it: a resumed run, whose checkpoint was written before validation, would differ otherwise."""
    import random

    from fastseg3d.train import inference
    from fastseg3d.train.checkpoint import capture_rng_state

    predict_case = inference.predict_case

    def drawing(*args, **kwargs):
        torch.rand(3), np.random.rand(3), random.random()
        return predict_case(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_case", drawing)
    trainer = Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=1"]), tmp_path)
    before = capture_rng_state(trainer.device)
    trainer.validate(0)
    after = capture_rng_state(trainer.device)
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]
    assert all(np.array_equal(a, b) for a, b in zip(after["numpy"], before["numpy"]))
    torch.rand(3)  # (the patch drew: the comparison above can fail)
    assert not torch.equal(capture_rng_state(trainer.device)["torch"], before["torch"])


class _Draws(torch.utils.data.Dataset):
    """A torch draw and a draw of a MONAI-style transform's own generator, per item."""

    class Transform:
        def set_random_state(self, seed):
            self.R = np.random.RandomState(seed)

    def __init__(self):
        self.transform = self.Transform()
        self.transform.set_random_state(0)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([torch.rand(()).item(), self.transform.R.rand()], dtype=torch.float64)


def test_data_workers_draw_apart_per_rank_and_worker():
    """With data.num_workers=2 under torchrun, each rank's workers draw their own torch and transform streams
    (torch gives every rank the same worker seeds), reproducibly for a seed."""
    import functools

    from fastseg3d.train.trainer import _seed_worker

    def draws(rank):
        torch.manual_seed(0)  # the loader's base seed comes from torch's generator, alike on every rank
        loader = torch.utils.data.DataLoader(_Draws(), batch_size=1, num_workers=2,
                                             worker_init_fn=functools.partial(_seed_worker, rank=rank))
        return torch.cat(list(loader))  # items 0, 2 from worker 0; 1, 3 from worker 1

    rank0, rank1 = draws(0), draws(1)
    torch.testing.assert_close(draws(0), rank0, rtol=0, atol=0)
    for d in (rank0, rank1):  # two workers, each stream its own
        assert len(set(d[:, 0].tolist())) == 4 and len(set(d[:, 1].tolist())) == 4
    assert not set(rank0.flatten().tolist()) & set(rank1.flatten().tolist())


def _ct_task_with_air_over_the_label(root: Path, bad_label: bool = False) -> str:
    """One CT case, 12^3: a labelled block of 6^3 voxels of which the first 2 of 6 slabs lie in air (-1000 HU), which
    the foreground crop (following the image) leaves out."""
    nib = pytest.importorskip("nibabel")
    task = root / "Task99_Air"
    for d in ("imagesTr", "labelsTr"):
        (task / d).mkdir(parents=True)
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:8, 3:9, 3:9] = 1
    if bad_label:
        label[3, 3, 3] = 7
    image = np.full((12, 12, 12), 40.0, np.float32)
    image[:4] = -1000.0
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(task / "imagesTr" / "c0.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(task / "labelsTr" / "c0.nii.gz"))
    (task / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "lesion"}, "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}]}))
    return str(task)


def _everywhere_class_1(path: Path, task: str) -> None:
    """A checkpoint of a 1x1x1 conv predicting class 1 at every voxel it sees."""
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    torch.save({"model": {"name": "torch.nn.Conv3d", "kwargs": {"in_channels": 1, "out_channels": 2,
                                                                "kernel_size": 1}},
                "network_weights": conv.state_dict(),
                "config": {"data": {"name": "msd", "root": task, "spatial_size": [8, 8, 8], "pixdim": None}}}, path)


def test_eval_scores_msd_cases_on_the_label_files_past_the_foreground_crop(tmp_path):
    """Without resampling (data.pixdim null) the cases are still scored on their label files: on the network's grid,
    cropped to the image's foreground, the labelled voxels in air were left out and Dice came out higher."""
    task = _ct_task_with_air_over_the_label(tmp_path)
    _everywhere_class_1(tmp_path / "m.pt", task)
    out = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", "--no-hd95",
                     "--output-dir", str(out)]) == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    assert result["mean"]["grid"] == "label files"
    predicted, labelled, both = 8 * 12 * 12, 6 * 6 * 6, 4 * 6 * 6  # class 1 on the 8 slabs the crop keeps
    assert result["mean"]["dice"] == pytest.approx(2 * both / (predicted + labelled), abs=1e-6)


def test_eval_measures_hd95_in_the_label_files_millimetres(tmp_path):
    """On the label files' grid HD95 is in their voxel size, each axis's own (3, 1 and 0.5 mm here): scored in
    voxels, or with the axes' sizes in another order, an anisotropic scan's distances come out wrong."""
    nib = pytest.importorskip("nibabel")
    from fastseg3d.train.inference import segmentation_metrics, to_onehot

    task = Path(_ct_task_with_air_over_the_label(tmp_path))
    for name in ("imagesTr/c0.nii.gz", "labelsTr/c0.nii.gz"):
        data = np.asarray(nib.load(str(task / name)).dataobj)
        nib.save(nib.Nifti1Image(data, np.diag([3.0, 1.0, 0.5, 1.0])), str(task / name))
    _everywhere_class_1(tmp_path / "m.pt", str(task))
    out = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", "--output-dir", str(out)]) == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    label = np.asarray(nib.load(str(task / "labelsTr" / "c0.nii.gz")).dataobj).astype(np.int64)
    pred = np.zeros_like(label)
    pred[4:] = 1  # class 1 on the 8 slabs the foreground crop keeps
    p, t = (to_onehot(torch.as_tensor(v)[None, None], 2, "softmax") for v in (pred, label))
    hd95 = {s: segmentation_metrics(p, t, include_background=False, spacing=s)["hd95"]
            for s in ((3.0, 1.0, 0.5), None, (0.5, 1.0, 3.0))}
    assert len(set(hd95.values())) == 3  # the three tell apart on this case
    assert result["mean"]["hd95"] == pytest.approx(hd95[(3.0, 1.0, 0.5)])


def test_eval_score_empty_scores_a_class_the_label_file_lacks(tmp_path):
    """--score-empty (val.ignore_empty=false) reaches the scoring: a class predicted but absent from the label file
    scores Dice 0 and the file's diagonal as HD95 (BraTS's rule), where the default leaves it unscored."""
    nib = pytest.importorskip("nibabel")
    task = Path(_ct_task_with_air_over_the_label(tmp_path))
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), np.eye(4)), str(task / "labelsTr" / "c0.nii.gz"))
    _everywhere_class_1(tmp_path / "m.pt", str(task))
    for flag, dice, hd95 in (("--score-empty", 0.0, pytest.approx(np.sqrt(3 * 12**2))),
                             ("--no-score-empty", None, None)):
        out = tmp_path / flag
        assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", flag,
                         "--output-dir", str(out)]) == 0
        mean = json.loads((out / "eval_metrics.json").read_text())["mean"]
        assert mean["dice_per_class"] == [dice] and mean["hd95_per_class"] == [hd95], flag


def test_eval_saves_brats_regions_in_the_msd_coding_on_the_files_grid(tmp_path):
    """label_mode=brats_regions: all three regions are scored (channel 0, TC, is no background), the saved labels
    are MSD Task01's rebuilt from the regions (TC and WT without ET: 2), brought back through the 2 mm resampling
    by nearest neighbour (no value between 0 and 2 at the border), and val.max_cases limits the cases."""
    nib = pytest.importorskip("nibabel")
    from tests.data.test_msd import _make_task

    task = _make_task(str(tmp_path / "data"), n_cases=2)
    conv = torch.nn.Conv3d(2, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 1.0, -1.0]))  # TC and WT everywhere it sees, ET nowhere
    torch.save({"model": {"name": "torch.nn.Conv3d", "kwargs": {"in_channels": 2, "out_channels": 3,
                                                                "kernel_size": 1}},
                "network_weights": conv.state_dict(),
                "config": {"data": {"name": "msd", "root": task, "spatial_size": [8, 8, 8], "pixdim": [2.0, 2.0, 2.0],
                                    "label_mode": "brats_regions"}}}, tmp_path / "m.pt")
    out = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", "--no-hd95",
                     "--save-predictions", "--output-dir", str(out)]) == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    assert result["mean"]["class_names"] == ["TC", "WT", "ET"] and result["mean"]["num_cases"] == 2
    for row in result["cases"]:
        pred = np.asarray(nib.load(str(out / "predictions" / f"{row['case']}.nii.gz")).dataobj)
        assert set(np.unique(pred).tolist()) == {0, 2}
        truth = np.asarray(nib.load(str(Path(task) / "labelsTr" / f"{row['case']}.nii.gz")).dataobj)
        tumour = pred > 0
        for k, region in enumerate((truth >= 2, truth >= 1, truth == 3)):
            expected = 2 * (tumour & region).sum() / (tumour.sum() + region.sum()) if k < 2 else 0.0
            assert row["dice_per_class"][k] == pytest.approx(expected, abs=1e-6), k
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", "--no-hd95", "--max-cases",
                     "1", "--output-dir", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "eval_metrics.json").read_text())["mean"]["num_cases"] == 1


def test_eval_of_a_bad_case_is_one_line(tmp_path, capsys):
    """Evaluation loads its cases one by one as it predicts them: a case found invalid there is one line, as in
    training, not a traceback."""
    task = _ct_task_with_air_over_the_label(tmp_path, bad_label=True)
    _everywhere_class_1(tmp_path / "m.pt", task)
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--split", "all", "--no-hd95",
                     "--output-dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "error: image " in err and "outside the declared classes" in err and "Traceback" not in err


def test_resume_restores_pythons_and_numpys_generators(tmp_path):
    """A resumed run draws from Python's and NumPy's global generators as the saved run would have (a user
    transform drawing from them would otherwise diverge after a resume)."""
    import random

    args = [*TINY_UNET, *TINY_DATA, "deterministic=true", "val.every=0"]
    Trainer(load_config("quickstart", [*args, "train.epochs=1"]), tmp_path).fit()
    path = tmp_path / "checkpoint_latest.pt"
    ckpt = load_checkpoint(path)
    random.seed(1234)
    np.random.seed(1234)
    expected = (random.random(), float(np.random.rand()))
    random.seed(1234)
    np.random.seed(1234)
    ckpt["rng_state"].update(python=random.getstate(), numpy=np.random.get_state())
    atomic_save(ckpt, path)
    random.seed(0)
    np.random.seed(0)
    Trainer(load_config("quickstart", [*args, "train.epochs=2"]), tmp_path, resume="auto")
    assert (random.random(), float(np.random.rand())) == expected


def test_resume_without_a_best_checkpoint_keeps_the_latest_ones_metric(tmp_path):
    """Resuming where no checkpoint_best.pt is (deleted, or another run's checkpoint into a new folder) keeps the
    best metric the latest checkpoint holds, so the next validation does not replace the best with a worse one."""
    args = [*TINY_UNET, *TINY_DATA, "deterministic=true"]
    Trainer(load_config("quickstart", [*args, "train.epochs=2"]), tmp_path).fit()
    latest = load_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert latest["best_metric"] > -float("inf")
    (tmp_path / "checkpoint_best.pt").unlink()
    trainer = Trainer(load_config("quickstart", [*args, "train.epochs=3"]), tmp_path, resume="auto")
    assert trainer.best_metric == latest["best_metric"]


def test_resume_removes_a_killed_writers_temporary(tmp_path):
    args = [*TINY_UNET, *TINY_DATA, "deterministic=true", "val.every=0"]
    Trainer(load_config("quickstart", [*args, "train.epochs=1"]), tmp_path).fit()
    stale = tmp_path / ".checkpoint_latest.pt.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    Trainer(load_config("quickstart", [*args, "train.epochs=2"]), tmp_path, resume="auto")
    assert not stale.exists()


def _lrs(run: Path) -> list[float]:
    return [r["lr"] for r in _rows(run, "train")]


def test_the_logged_learning_rate_follows_the_schedule_by_step_or_epoch(tmp_path):
    """The schedule advances once an optimizer step (interval=step) or once an epoch (interval=epoch), over the run's
    length in those intervals (train.max_steps shortening it), and each train row logs the rate its step left."""
    from fastseg3d.train.builders import schedule_factor

    base = [*TINY_UNET, *TINY_DATA, "val.every=0", "optimizer.lr=0.01", "scheduler.name=warmup_cosine",
            "scheduler.min_lr=0.001"]
    # 2 steps an epoch: 4 steps in all, the first 2 of them warm-up, the last one ending at the floor
    cfg = load_config("quickstart", [*base, "train.epochs=2", "scheduler.warmup=2", "scheduler.interval=step"])
    Trainer(cfg, tmp_path / "step").fit()
    f = schedule_factor(cfg["scheduler"], 0.01, 4)
    assert _lrs(tmp_path / "step") == pytest.approx([0.01 * f(t) for t in (1, 2, 3, 4)], rel=1e-9)
    assert _lrs(tmp_path / "step")[-1] == pytest.approx(0.001)
    # train.max_steps=3 of 6: the cosine ends at the floor at step 3
    cfg = load_config("quickstart", [*base, "train.epochs=3", "train.max_steps=3", "scheduler.warmup=0"])
    Trainer(cfg, tmp_path / "max_steps").fit()
    f = schedule_factor(cfg["scheduler"], 0.01, 3)
    assert _lrs(tmp_path / "max_steps") == pytest.approx([0.01 * f(t) for t in (1, 2, 3)], rel=1e-9)
    # interval=epoch: the rate of epoch e's rows is the one after e intervals of 3
    cfg = load_config("quickstart", [*base, "train.epochs=3", "scheduler.warmup=0", "scheduler.interval=epoch"])
    Trainer(cfg, tmp_path / "epoch").fit()
    f = schedule_factor(cfg["scheduler"], 0.01, 3)
    rows = _rows(tmp_path / "epoch", "train")
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * f(r["epoch"]) for r in rows], rel=1e-9)
    assert len({r["lr"] for r in rows}) == 3
    # train.max_steps=3 of 2-step epochs shortens a per-epoch schedule to the 2 epochs the run reaches
    cfg = load_config("quickstart", [*base, "train.epochs=3", "train.max_steps=3", "scheduler.warmup=0",
                                     "scheduler.interval=epoch"])
    Trainer(cfg, tmp_path / "epoch_max_steps").fit()
    f = schedule_factor(cfg["scheduler"], 0.01, 2)
    rows = _rows(tmp_path / "epoch_max_steps", "train")
    assert [r["epoch"] for r in rows] == [0, 0, 1]
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * f(r["epoch"]) for r in rows], rel=1e-9)
    # train.grad_accumulation=2 of batches of 1: 2 steps an epoch, the cosine at its floor after the run's 4th
    cfg = load_config("quickstart", [*base, "train.epochs=2", "scheduler.warmup=0", "data.batch_size=1",
                                     "train.grad_accumulation=2"])
    Trainer(cfg, tmp_path / "accumulated").fit()
    assert _lrs(tmp_path / "accumulated")[-1] == pytest.approx(0.001) and len(_lrs(tmp_path / "accumulated")) == 4


def test_train_rows_average_every_micro_batch_since_the_last_row(tmp_path, monkeypatch):
    """A train row holds the mean loss and terms over all micro-batches since the previous row (not the last one's,
    not their sum), at the step it was written, and seconds_per_step counts a step's micro-batches."""
    from fastseg3d.train import trainer as trainer_module

    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock["t"])}))

    class Counting(Trainer):
        """Loss n on the n-th micro-batch, each taking one second; no backward (no gradient: steps change nothing)."""

        n = 0

        def train_step(self, image, label, epoch):
            self.n += 1
            clock["t"] += 1.0
            loss = torch.tensor(float(self.n))
            return loss, {"segmentation": 2 * loss}

    data = [o for o in TINY_DATA if not o.startswith(("train.log_every", "data.batch_size"))]
    cfg = load_config("quickstart", [*TINY_UNET, *data, "data.num_train=8", "data.batch_size=1",
                                     "train.grad_accumulation=2", "train.log_every=2", "train.epochs=1",
                                     "val.every=0"])
    Counting(cfg, tmp_path).fit()
    rows = _rows(tmp_path, "train")
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["loss"] for r in rows] == [2.5, 6.5]  # micro-batches 1-4, then 5-8
    assert [r["segmentation"] for r in rows] == [5.0, 13.0]
    assert [r["seconds_per_step"] for r in rows] == [2.0, 2.0]  # 4 s for 2 steps of 2 micro-batches


def test_max_steps_ends_the_run_with_a_validation_and_its_checkpoints(tmp_path):
    """train.max_steps reached in the first of 3 epochs ends the run there: that epoch validates (whatever
    val.every says) and writes the latest and final checkpoints, and no later epoch trains."""
    calls = []

    class Recording(Trainer):
        def on_epoch_end(self, epoch, result):
            calls.append((epoch, bool(result)))

    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=3", "train.max_steps=1", "val.every=2",
                                     "val.num_images=0"])
    Recording(cfg, tmp_path).fit()
    assert calls == [(0, True)]
    assert [(r["epoch"], r["step"]) for r in _rows(tmp_path, "val")] == [(0, 1)]
    for kind in ("latest", "final"):
        ckpt = load_checkpoint(tmp_path / f"checkpoint_{kind}.pt")
        assert (ckpt["epoch"], ckpt["step"]) == (0, 1), kind


def test_the_last_epoch_writes_the_latest_checkpoint_between_save_every(tmp_path):
    """checkpoint.save_every=2 over 3 epochs: latest at epoch 1, and again at the last epoch (2), so that a resume
    starts from the end rather than repeating an epoch."""
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=3", "val.every=0",
                                     "checkpoint.save_every=2"])
    Trainer(cfg, tmp_path).fit()
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt")["epoch"] == 2


@pytest.mark.parametrize("dice,best_epoch,best_after_epoch", [
    ([0.5, 0.5, 0.5], 0, None),  # a tie is no new best: the first checkpoint stays
    ([0.1, 0.2, 0.15], 1, None),  # the best at the cutoff epoch (1) itself is not "after" it
    ([0.1, 0.2, 0.3], 2, 2),
])
def test_best_checkpoints_take_strictly_better_dice_and_best_after_is_past_the_cutoff(tmp_path, monkeypatch, dice,
                                                                                       best_epoch, best_after_epoch):
    """Which epoch checkpoint_best.pt and checkpoint_best_after.pt (checkpoint.best_after_epoch=1) hold, for given
    validation Dice per epoch."""
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: {"loss": 0.5, "dice": dice[epoch],
                                                                  "dice_per_class": [dice[epoch]]})
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=3", "checkpoint.best_after_epoch=1"])
    Trainer(cfg, tmp_path).fit()
    best = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert (best["epoch"], best["best_metric"]) == (best_epoch, max(dice))
    after = tmp_path / "checkpoint_best_after.pt"
    assert (load_checkpoint(after)["epoch"] if after.exists() else None) == best_after_epoch


def test_training_validation_takes_max_cases_and_draws_num_images(tmp_path):
    """val.max_cases limits the cases validated during training, val.num_images the slice previews written."""
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "data.num_val=3", "val.max_cases=2", "val.num_images=1",
                                     "train.epochs=1", "val.hd95=false"])
    result = Trainer(cfg, tmp_path).fit()
    assert result["num_cases"] == 2 and _rows(tmp_path, "val")[0]["num_cases"] == 2
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["val_0.png"]


@pytest.mark.parametrize("label_mode,names", [("labels", ["edema", "core", "vessel", "nodule"]),
                                              ("brats_regions", ["TC", "WT", "ET"])])
def test_curves_name_the_classes_the_mean_dice_averages(tmp_path, monkeypatch, label_mode, names):
    """curves.png's per-class Dice lines are named after the scored classes: the label maps' foreground (no
    background), every BraTS region (TC is no background)."""
    from fastseg3d.train import plots

    seen = []
    monkeypatch.setattr(plots, "plot_curves", lambda log, out, class_names=None: seen.append(class_names))
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.epochs=1", f"data.label_mode={label_mode}",
                                     "val.num_images=0", "val.hd95=false"])
    Trainer(cfg, tmp_path).fit()
    assert seen == [names]


def test_amp_picks_the_autocast_dtype_and_only_fp16_scales(tmp_path):
    """train.amp=bf16 autocasts to bfloat16 with no gradient scaler (bf16 has fp32's range); fp16 autocasts to
    float16 and scales the loss; none does neither."""
    for amp, dtype, scaled in (("none", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)):
        trainer = Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, f"train.amp={amp}"]), tmp_path / amp)
        with trainer._autocast():
            assert (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) == dtype, amp
        assert trainer.scaler.is_enabled() == scaled, amp


def test_an_epochs_leftover_micro_batches_leave_no_gradient(tmp_path):
    """3 micro-batches with train.grad_accumulation=2: the third, too few for a step, is dropped with its gradient,
    which would otherwise be added into the next epoch's first step."""
    data = [o for o in TINY_DATA if not o.startswith("data.batch_size")]
    cfg = load_config("quickstart", [*TINY_UNET, *data, "data.num_train=3", "data.batch_size=1",
                                     "train.grad_accumulation=2", "val.every=0"])
    trainer = Trainer(cfg, tmp_path)
    trainer.train_epoch(0)
    assert trainer.step == 1
    assert all(p.grad is None for p in trainer.model.parameters())


def test_optimizers_are_the_named_ones_with_the_configs_settings():
    """optimizer.name picks Adam, AdamW or SGD, each with the config's betas, momentum, nesterov, weight decay."""
    from fastseg3d.train.builders import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = load_config("quickstart", ["optimizer.lr=0.05", "optimizer.weight_decay=0.25", "optimizer.betas=[0.8, 0.9]",
                                     "optimizer.momentum=0.7", "optimizer.nesterov=true"])["optimizer"]
    for name, cls, settings in (("adamw", torch.optim.AdamW, {"betas": (0.8, 0.9)}),
                                ("adam", torch.optim.Adam, {"betas": (0.8, 0.9)}),
                                ("sgd", torch.optim.SGD, {"momentum": 0.7, "nesterov": True})):
        optimizer = build_optimizer(params, {**cfg, "name": name})
        assert type(optimizer) is cls, name
        group = optimizer.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.05, 0.25), name
        assert {k: group[k] for k in settings} == settings, name


def test_schedules_with_a_warmup_and_past_their_end():
    """After a warm-up, poly still reaches 0 at the run's end and the step schedule counts its step_size from the
    warm-up's end; past the end, the cosine stays at its floor (it does not climb back)."""
    base = {"warmup": 2, "min_lr": 0.0, "restart_period": 4, "power": 0.9, "step_size": 3, "gamma": 0.5}
    f = schedule_factor({**base, "name": "poly"}, 1.0, 10)
    assert f(1) == 1.0 and f(5) == pytest.approx(0.5**0.9) and f(10) == 0.0
    f = schedule_factor({**base, "name": "step"}, 1.0, 10)
    assert [f(2), f(4), f(5), f(8)] == [1.0, 1.0, 0.5, 0.25]
    f = schedule_factor({**base, "name": "warmup_cosine", "min_lr": 0.1}, 1.0, 10)
    assert [f(10), f(12), f(16)] == pytest.approx([0.1, 0.1, 0.1])


def test_a_bad_schedule_interval_is_refused():
    """build_scheduler's own check (a config built in code skips load_config's)."""
    from fastseg3d.train.builders import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = load_config("quickstart")["scheduler"]
    with pytest.raises(ValueError, match="scheduler.interval must be 'step' or 'epoch', got 'batch'"):
        build_scheduler(optimizer, {**sched, "interval": "batch"}, 10)


def test_the_objective_adds_each_distillation_term_with_its_weight():
    """The loss that trains is the segmentation loss plus the distillation loss: DSD's KL terms (decoder and
    encoder) times loss.distill_kwargs.kl_weight, MISSU's KL of the students (decoder) towards the teachers
    (skips), SelfReg's term; its terms are what it is summed from."""
    from fastseg3d.losses import MISSUDistillLoss
    from fastseg3d.train.builders import build_model, build_objective

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g)
    cfg = load_config("dsd_unet", ["model.kwargs={channels: [4, 8, 8, 8]}", "loss.distill_kwargs={kl_weight: 0.3}"])
    torch.manual_seed(0)
    output = build_model(cfg["model"], 1, 3)(torch.randn(2, 1, 16, 16, 16, generator=g))
    objective = build_objective(cfg, "softmax", 3)
    loss, terms = objective(output, y)
    assert terms["kl_decoder"] > 0 and terms["kl_encoder"] > 0
    expected = terms["dice_ce"] + 0.3 * (terms["kl_decoder"] + terms["kl_encoder"])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, objective.distill(output, y))

    logits = torch.randn(2, 3, 16, 16, 16, generator=g)
    pairs = [(torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 4, 8, 8, 8, generator=g)) for _ in range(2)]
    objective = build_objective(load_config("missu_brats", ["loss.distill_kwargs={weight: 0.5}"]), "softmax", 3)
    loss, terms = objective((logits, pairs), y)
    kd = MISSUDistillLoss(weight=0.5)([s for s, _ in pairs], [t for _, t in pairs])
    torch.testing.assert_close(terms["distill"], kd)
    torch.testing.assert_close(loss, terms["segmentation"] + kd)

    cfg = load_config("selfreg_unet", ["model.kwargs={channels: [4, 8, 8, 8]}"])
    output = build_model(cfg["model"], 1, 3)(torch.randn(2, 1, 16, 16, 16, generator=g))
    loss, terms = build_objective(cfg, "softmax", 3)(output, y)
    assert terms["distill"] > 0
    torch.testing.assert_close(loss, terms["segmentation"] + terms["distill"])


def test_model_names_build_their_networks():
    """Each of MODELS builds the network class of that name (mobileutr_l is the large MobileUtr, not the small)."""
    from fastseg3d import networks
    from fastseg3d.train.builders import build_model

    assert type(build_model({"name": "mobileutr_l", "kwargs": {}}, 1, 3)) is networks.MobileUtrL
    assert type(build_model({"name": "mobileutr", "kwargs": {}}, 1, 3)) is networks.MobileUtr


def test_loss_configs_that_fit_or_not():
    """MISSU trains without its distillation (an ablation) where other networks must get their own; sigmoid regions
    refuse loss.include_background=false (it would drop TC)."""
    from fastseg3d.train import SetupError
    from fastseg3d.train.builders import build_objective

    assert build_objective(load_config("missu_brats", ["loss.distill=none", "loss.distill_kwargs={}"]), "softmax",
                           3).distill is None
    with pytest.raises(SetupError, match="loss.distill='none' does not fit model.name='dsd_unet'"):
        build_objective(load_config("dsd_unet", ["loss.distill=none"]), "softmax", 3)
    with pytest.raises(SetupError, match="loss.include_background=false with sigmoid regions"):
        build_objective(load_config("quickstart", ["loss.include_background=false"]), "sigmoid", 3)


def test_objective_on_regions_is_monais_with_the_configured_weights():
    """Sigmoid regions (BraTS): MONAI's DiceCE with loss.lambda_dice and loss.lambda_ce, on fp32 logits."""
    from monai.losses import DiceCELoss

    from fastseg3d.train.builders import build_objective

    cfg = load_config("quickstart", ["loss.lambda_dice=0.3", "loss.lambda_ce=1.7"])
    objective = build_objective(cfg, "sigmoid", 3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 7, dtype=torch.float64, generator=g)
    target = torch.randint(0, 2, (2, 3, 6, 5, 7), generator=g).double()
    expected = DiceCELoss(sigmoid=True, lambda_dice=0.3, lambda_ce=1.7)(logits, target)
    torch.testing.assert_close(objective(logits, target)[0], expected)


def test_metrics_rows_are_strict_json_and_tensorboard_resumes_past_the_checkpoint(tmp_path, monkeypatch):
    """A NaN or infinite value is written as null (metrics.jsonl stays valid JSON for any reader), step and epoch
    are the x axis rather than scalars of their own, and after truncate_after(step) TensorBoard's writer purges
    what the stopped run logged past that step."""
    import types

    from fastseg3d.train.logger import MetricsLogger, progress_bar

    opened, written = [], []

    class Writer:
        def __init__(self, logdir, **kwargs):
            opened.append(kwargs)

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLogger(tmp_path)
    log.truncate_after(5)
    log.log({"step": 6, "epoch": 1, "split": "val", "loss": float("nan"), "dice": torch.tensor(float("inf")),
             "dice_per_class": [float("nan"), 0.5]})
    log.close()
    assert opened == [{"purge_step": 6}]
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 6, "epoch": 1, "split": "val", "loss": None, "dice": None,
                                "dice_per_class": [None, 0.5]}
    assert written == [("val/dice_per_class/1", 6)]
    assert progress_bar(3, False) is None
    with pytest.raises(ValueError, match="train.progress must be auto, true or false, got 'sometimes'"):
        progress_bar(3, "sometimes")
