"""The run directory: a second run cannot replace a first one, a crash in validation keeps the epoch's training,
config.yaml is written only once a run or resume has started, data.root is stored absolute, usage mistakes are
one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("yaml")

from fastseg3d.cli import main as cli_main  # noqa: E402
from fastseg3d.train import SetupError, Trainer, load_checkpoint, load_config  # noqa: E402
from tests.train.test_trainer import TINY_DATA, TINY_UNET  # noqa: E402

ONE_EPOCH = ["--config", "quickstart", "--epochs", "1", *TINY_UNET, *TINY_DATA]


def _rows(run: Path, split: str | None = None) -> list[dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if split is None or r["split"] == split]


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", *ONE_EPOCH, "--output-dir", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {"checkpoint_best.pt", "metrics.jsonl", "config.yaml"} <= set(before)
    capsys.readouterr()

    # a changed config too: the refusal comes before config.yaml is touched
    assert cli_main(["train", *ONE_EPOCH, "--output-dir", str(run), "optimizer.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} holds a run (checkpoint_best.pt, ") and err.count("\n") == 1
    assert "--resume auto" in err and "--overwrite" in err and "--output-dir" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    with pytest.raises(SystemExit) as exit_info:  # argparse: the two exclude each other
        cli_main(["train", *ONE_EPOCH, "--output-dir", str(run), "--resume", "auto", "--overwrite"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err

    (run / "notes.txt").write_text("mine")
    (run / "tb").mkdir()
    (run / "tb" / "events.old").write_text("old")
    (run / "images" / "val_7.png").write_bytes(b"old")
    assert cli_main(["train", *ONE_EPOCH, "--output-dir", str(run), "--overwrite", "val.every=0"]) == 0
    # the old run's files are gone (no val rows, no best checkpoint, no images), what is not a run's stays
    assert not (run / "checkpoint_best.pt").exists() and not (run / "images").exists()
    assert not (run / "tb" / "events.old").exists() and (run / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in _rows(run)] == [1, 2] and not _rows(run, "val")
    assert load_config(run / "config.yaml")["val"]["every"] == 0


def test_resume_auto_without_a_checkpoint_starts_a_fresh_metrics_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # the rows of a run that never wrote a checkpoint (stopped in its first epoch)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "split": "train", "loss": 9.0}) + "\n")
    Trainer(load_config("quickstart", ["train.epochs=1", *TINY_UNET, *TINY_DATA, "val.every=0"]), run,
            resume="auto").fit()
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and 9.0 not in [r["loss"] for r in rows]


def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = load_config("quickstart", ["train.epochs=1", *TINY_UNET, *TINY_DATA, "val.every=0"])
    Trainer(cfg, run).fit()
    rows = _rows(run)
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        Trainer(cfg, run, resume="auto").fit()
    assert "already finished (epoch 0, step 2): nothing left to train" in caplog.text
    assert _rows(run) == rows


class _Interrupt(Exception):
    pass


def test_a_crash_in_validation_keeps_the_epochs_training_and_the_resumed_run_validates_it(tmp_path,
                                                                                          monkeypatch):
    args = ["deterministic=true", "train.epochs=2", *TINY_UNET, *TINY_DATA, "val.num_images=0"]
    _validate = Trainer._validate

    def validate_drawing(self, epoch):
        torch.rand(1)  # what validation draws must not reach the training (its checkpoint is from before it)
        return _validate(self, epoch)

    monkeypatch.setattr(Trainer, "_validate", validate_drawing)
    whole = tmp_path / "whole"
    trainer = Trainer(load_config("quickstart", args), whole)
    expected = trainer.fit()
    state = torch.get_rng_state()
    trainer.validate(1)
    assert torch.equal(torch.get_rng_state(), state)

    part = tmp_path / "part"
    validate = Trainer.validate

    def crash_at(crash_epoch):
        def validate_or_crash(self, epoch):
            if epoch == crash_epoch:
                raise _Interrupt
            return validate(self, epoch)
        return validate_or_crash

    monkeypatch.setattr(Trainer, "validate", crash_at(0))
    with pytest.raises(_Interrupt):
        Trainer(load_config("quickstart", args), part).fit()
    ckpt = load_checkpoint(part / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2 and ckpt["val_pending"]  # epoch 0's training is kept
    # the resumed run validates epoch 0 first, then crashes in the last epoch's validation
    monkeypatch.setattr(Trainer, "validate", crash_at(1))
    with pytest.raises(_Interrupt):
        Trainer(load_config("quickstart", args), part, resume="auto").fit()
    assert load_checkpoint(part / "checkpoint_latest.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "validate", validate)
    resumed = Trainer(load_config("quickstart", args), part, resume="auto")
    assert resumed.val_pending
    assert resumed.fit()["dice"] == expected["dice"]  # nothing left to train: the last validation alone

    assert [r["loss"] for r in _rows(part, "train")] == [r["loss"] for r in _rows(whole, "train")]
    assert [(r["epoch"], r["dice"]) for r in _rows(part, "val")] == [(r["epoch"], r["dice"])
                                                                     for r in _rows(whole, "val")]
    for kind in ("final", "best"):
        a = load_checkpoint(whole / f"checkpoint_{kind}.pt")
        b = load_checkpoint(part / f"checkpoint_{kind}.pt")
        assert a["epoch"] == b["epoch"] and a["best_metric"] == b["best_metric"]
        assert all(torch.equal(a["network_weights"][k], b["network_weights"][k]) for k in a["network_weights"])
    # a resume after the validation finished does not repeat it
    assert not Trainer(load_config("quickstart", [*args, "train.epochs=3"]), part, resume="auto").val_pending


def test_a_failed_start_or_resume_leaves_the_run_and_a_changed_config_is_named(tmp_path, caplog):
    args = ["train.epochs=1", *TINY_UNET, *TINY_DATA]
    run = tmp_path / "run"
    Trainer(load_config("quickstart", args), run).fit()
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    with pytest.raises(ValueError, match="loss.distill='dsd' does not fit"):  # fails building, before removing
        Trainer(load_config("quickstart", [*args, "loss.distill=dsd"]), run, overwrite=True)
    bigger = [*args, "model.kwargs={spatial_dims: 3, channels: [8, 16, 32]}"]
    with (caplog.at_level(logging.INFO, logger="fastseg3d"),
          pytest.raises(SetupError, match="differs in model.kwargs.channels.*size mismatch")):
        Trainer(load_config("quickstart", bigger), run, resume="auto")
    assert "model.kwargs.channels [4, 8, 16] -> [8, 16, 32]" in caplog.text
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        Trainer(load_config("quickstart", [*args, "train.epochs=2", "val.overlap=0.25"]), run, resume="auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "val.overlap 0.5 -> 0.25" in warnings[0] and "epochs" not in warnings[0]
    assert "train.epochs 1 -> 2" in caplog.text
    assert load_config(run / "config.yaml")["train"]["epochs"] == 2  # the resumed run's config


def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch):
    from tests.data.test_msd import _make_task

    _make_task(str(tmp_path / "data"), n_cases=3)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code = cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--max-steps", "1", *TINY_UNET,
                     "data.name=msd", "data.root=data/Task01_Fake", "data.spatial_size=[16,16,16]",
                     "data.batch_size=1", "val.roi_size=[16,16,16]", "val.num_images=0", "train.progress=false"])
    assert code == 0
    root = str(tmp_path / "data" / "Task01_Fake")
    assert load_config(run / "config.yaml")["data"]["root"] == root
    assert load_checkpoint(run / "checkpoint_final.pt")["config"]["data"]["root"] == root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint_final.pt"), "--no-hd95"]) == 0


def test_eval_setup_mistakes_are_one_line_errors(tmp_path, capsys):
    from tests.data.test_msd import _make_task

    task = _make_task(str(tmp_path / "data"), n_cases=3)  # two MRI channels
    run = tmp_path / "run"
    assert cli_main(["train", "--config", "quickstart", "--output-dir", str(run), "--max-steps", "1", *TINY_UNET,
                     "data.name=msd", f"data.root={task}", "data.spatial_size=[16,16,16]", "data.batch_size=1",
                     "val.roi_size=[16,16,16]", "val.num_images=0", "train.progress=false"]) == 0
    capsys.readouterr()
    ckpt = str(run / "checkpoint_final.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    three = _make_task(str(tmp_path / "three"), n_cases=2, modality={"0": "FLAIR", "1": "T1w", "2": "T2w"})
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in ((["--overlap", "1.5"], "overlap"), (["--data", str(empty)], "no dataset.json"),
                          (["--data", "synthetic"], "predicts 4 channels but the data (synthetic"),
                          (["--data", three], "takes 2 input channels but the data (msd"),
                          (["--output-dir", str(a_file)], f"cannot write the results to {a_file}")):
        assert cli_main(["eval", "--checkpoint", ckpt, "--no-hd95", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err

    # checkpoints eval and --resume cannot use: one line each, naming the file
    saved = torch.load(ckpt, weights_only=False)
    corrupt, plain, anonymous, other = (tmp_path / f"{n}.pt" for n in ("corrupt", "plain", "anonymous", "other"))
    corrupt.write_bytes(b"hello, not a checkpoint")
    torch.save(saved["network_weights"], plain)
    torch.save({k: v for k, v in saved.items() if k != "model"}, anonymous)
    torch.save({**saved, "model": {"name": "segformer3d", "kwargs": {"in_channels": 2, "out_channels": 4}}}, other)
    for path, message in ((corrupt, "is corrupt or not a torch file ("),
                          (plain, "converts with fastseg3d convert --from official-segformer3d"),
                          (anonymous, "does not say which network it holds"),
                          (other, "does not fit model segformer3d: Error(s) in loading state_dict")):
        assert cli_main(["eval", "--checkpoint", str(path), "--no-hd95"]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err and len(err) < 600, err
    assert cli_main(["train", "--config", "quickstart", "--output-dir", str(tmp_path / "again"), "--max-steps", "1",
                     "--resume", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "corrupt" in err and err.count("\n") == 1, err


def test_usage_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
    def error(*argv):
        assert cli_main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    run = str(tmp_path / "run")
    assert "data.root=" in error("train", *ONE_EPOCH, "--output-dir", run, "data.name=msd")
    assert f"data.root={tmp_path / 'nope'} does not exist" in error("train", *ONE_EPOCH, "--output-dir", run,
                                                                    "data.name=msd", f"data.root={tmp_path}/nope")
    assert f"data.root={tmp_path} has no dataset.json" in error("train", *ONE_EPOCH, "--output-dir", run,
                                                                "data.name=msd", f"data.root={tmp_path}")
    assert "resume checkpoint nope.pt does not exist" in error("train", *ONE_EPOCH, "--output-dir", run,
                                                               "--resume", "nope.pt")
    assert "device='gpu' is not" in error("train", *ONE_EPOCH, "--output-dir", run, "--device", "gpu")
    ckpt = tmp_path / "some.pt"
    ckpt.write_bytes(b"not read before the checks")
    assert "checkpoint nope.pt does not exist" in error("eval", "--checkpoint", "nope.pt")
    assert "--data /nope is not a folder" in error("eval", "--checkpoint", str(ckpt), "--data", "/nope")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no CUDA device" in error("train", *ONE_EPOCH, "--output-dir", run, "--device", "cuda")
    assert "torch sees no CUDA device" in error("eval", "--checkpoint", str(ckpt), "--device", "cuda")
    # training crops the network cannot take (a U-Net of three levels: multiples of 4), with validation off too
    assert "data.spatial_size=[18, 16, 16]: the network cannot take" in error(
        "train", *ONE_EPOCH, "--output-dir", run, "data.spatial_size=[18,16,16]", "val.every=0")
    # the quickstart SegFormer3D at 32^3 keeps one token at its last stage: a batch of one trains no BatchNorm there
    assert "data.spatial_size=[32, 32, 32] in batches of 1 (per process): the network cannot train on that" in error(
        "train", "--config", "quickstart", "--output-dir", run, "data.spatial_size=32", "data.batch_size=1",
        "data.num_train=2", "data.num_val=1")
    assert "its value is not valid YAML (expected ',' or ']'" in error(
        "train", *ONE_EPOCH, "--output-dir", run, "data.spatial_size=[16, 16, 16")
    assert "'seed' value must be in [0, 1e19)" in error("train", *ONE_EPOCH, "--output-dir", run, "seed=" + "9" * 20)
    assert not Path(run).exists()  # nothing was written
    assert f"the run directory {ckpt} is a file" in error("train", *ONE_EPOCH, "--output-dir", str(ckpt))
    # found once the network and the data are built: still one line
    assert "cannot accumulate gradients" in error("train", *ONE_EPOCH, "--output-dir", str(tmp_path / "r2"),
                                                  "train.compile=reduce-overhead", "train.grad_accumulation=2")


def test_rng_state_holds_the_training_gpus_generator_only(monkeypatch):
    """Under torchrun rank 0 writes the checkpoint: its other GPUs' generators were seeded and never drawn from,
    so each rank restores rank 0's training-GPU state into its own GPU (every rank draws in step); checkpoints that
    held every GPU's state restore this device's entry."""
    from fastseg3d.train import checkpoint

    drawn = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: drawn[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.__setitem__(torch.device(device).index, state))
    state = checkpoint.capture_rng_state(torch.device("cuda", 0))
    assert torch.equal(state["cuda"], drawn[0])
    checkpoint.restore_rng_state(state, torch.device("cuda", 3))  # rank 3's GPU
    assert list(restored) == [3] and torch.equal(restored[3], drawn[0])
    restored.clear()
    checkpoint.restore_rng_state({**state, "cuda": [drawn[0], drawn[1]]}, torch.device("cuda", 1))
    assert list(restored) == [1] and torch.equal(restored[1], drawn[1])
    restored.clear()
    cpu_state = checkpoint.capture_rng_state(torch.device("cpu"))
    assert "cuda" not in cpu_state
    checkpoint.restore_rng_state(state, torch.device("cpu"))  # a CPU run ignores a GPU run's CUDA state
    assert not restored


def test_a_fixed_gpu_index_under_torchrun_is_refused(monkeypatch):
    """Every rank would train on the one GPU named; ``cuda`` and ``auto`` take the local rank's."""
    from fastseg3d.train.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=2, world=4) == torch.device("cuda", 2)
    assert resolve_device("auto", local_rank=1, world=4) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SetupError, match="names one GPU for all 4 processes"):
        resolve_device("cuda:1", local_rank=2, world=4)


def test_train_flags_are_config_overrides(tmp_path):
    """--backend, --channels-last, --val-every and --save-every set their config keys (as key=value would)."""
    import yaml

    run = tmp_path / "run"
    assert cli_main(["train", *ONE_EPOCH, "--output-dir", str(run), "--backend", "torch", "--channels-last",
                     "--val-every", "0", "--save-every", "2"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["backend"], cfg["train"]["channels_last"], cfg["val"]["every"], cfg["checkpoint"]["save_every"]) == (
        "torch", True, 0, 2)
    assert not _rows(run, "val")
