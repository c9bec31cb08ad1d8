"""train.cuda_graph: the training step captured in a CUDA graph and replayed (fastseg3d.train.cuda_graph).

CPU tier: the trainer's protocol with the capture stood in for by an emulation of a graph's semantics (the replay
rewrites the gradients and the step's outputs in place), the refusals, the fallbacks. GPU tier: a real capture
trains as the eager loop does."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from fastseg3d.train import SetupError, Trainer, load_config
from fastseg3d.train import cuda_graph as cuda_graph_module
from fastseg3d.train import trainer as trainer_module
from tests.train.test_trainer import TINY_DATA, TINY_UNET

STEPS = ["train.epochs=2", "val.every=0", "deterministic=true"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _emulated_capture(calls: list):
    """A stand-in for capture_step with a graph's semantics on a CPU: three warm-up runs, ``before_capture``,
    gradients cleared, the capture (run once for the step's outputs and gradients, its other effects undone, as a
    capture runs nothing), and a replay that runs the step again and writes its gradients and outputs into the
    tensors the capture made, as a graph's replay writes the same memory."""
    def capture(step, params, device, before_capture=None):
        for _ in range(3):
            step()
        before_capture()
        for p in params:
            p.grad = None
        calls.append("capture")
        first = step()
        before_capture()
        grads = [p.grad for p in params]

        def replay():
            calls.append("replay")
            for p in params:
                p.grad = None
            new = step()
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        g.copy_(p.grad)
                    p.grad = g
                for old, value in zip(tree_leaves(first), tree_leaves(new)):
                    if isinstance(old, torch.Tensor):
                        old.copy_(value)
        return replay
    return capture


@pytest.fixture
def on_cpu(monkeypatch):
    """train.cuda_graph allowed on the CPU, its capture emulated; the calls it makes."""
    calls: list = []
    monkeypatch.setattr(trainer_module, "_check_cuda_graph", lambda trainer: None)
    monkeypatch.setattr(cuda_graph_module, "capture_step", _emulated_capture(calls))
    return calls


MODELS = {
    "unet": TINY_UNET,
    # the quickstart's SegFormer3D (BatchNorm in its Mix-FFNs) with dropout before its head
    "segformer3d-dropout": ["model.kwargs={embed_dims: [16, 32, 64, 128], depths: [1, 1, 1, 1], num_heads: [1, 1, 2, "
                            "4], mlp_ratio: 2, decoder_dim: 64, decoder_dropout: 0.2}", "data.spatial_size=[32,32,32]",
                            "val.roi_size=[32,32,32]"],
    # DSD's fused KL terms (their backward reads the incoming gradient back, but not in a capture), BatchNorm
    "dsd-batchnorm": ["model.name=dsd_unet", "model.kwargs={channels: [4, 8, 16], norm: batch}", "loss.distill=dsd"],
}


@pytest.mark.parametrize("model", list(MODELS))
def test_replayed_steps_train_as_eager_ones(tmp_path, on_cpu, model):
    """Losses, weights and buffers as the eager loop's: the warm-up runs leave no trace (BatchNorm's running
    statistics, dropout's draws), each replay's gradients reach the optimizer, and a resumed run is exact."""
    cfg = [*TINY_DATA, *MODELS[model], *STEPS]
    eager = Trainer(load_config("quickstart", cfg), tmp_path / "eager")
    eager.fit()
    graphed = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true"]), tmp_path / "graph")
    graphed.fit()
    assert on_cpu == ["capture"] + ["replay"] * 4  # 2 epochs of 2 batches, captured once
    assert graphed._graph is None  # released when fit returns
    torch.testing.assert_close(_losses(tmp_path / "graph"), _losses(tmp_path / "eager"))
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    # resumed after the first epoch, a captured run repeats the uninterrupted one
    one = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true", "train.epochs=1"]), tmp_path / "resumed")
    one.fit()
    resumed = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true"]), tmp_path / "resumed",
                      resume="auto")
    resumed.fit()
    torch.testing.assert_close(_losses(tmp_path / "resumed"), _losses(tmp_path / "eager"))


def test_batch_of_another_shape_and_failed_capture_run_eagerly(tmp_path, on_cpu, monkeypatch, caplog):
    cfg = load_config("quickstart", [*TINY_UNET, *TINY_DATA, *STEPS, "train.cuda_graph=true"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.model.train()
    image, label = trainer._to_device(next(iter(trainer.train_loader)))
    trainer._graphed_step(image, label, 0)
    grads = [p.grad for p in trainer.model.parameters()]
    # a smaller batch: eager, into the graph's gradients zeroed in place (not added to the last replay's)
    small = image[:1], label[:1]
    trainer._graphed_step(*small, 0)
    assert all(p.grad is g for p, g in zip(trainer.model.parameters(), grads))
    reference = Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, *STEPS]), tmp_path / "reference")
    reference.model.load_state_dict(trainer.model.state_dict())
    reference.model.train()
    reference.train_step(*small, 0)
    for p, q in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    # a hook that drops the gradients (zero_grad's default) does not cut the optimizer off the replays'
    for p in trainer.model.parameters():
        p.grad = None
    trainer._graphed_step(image, label, 0)
    assert all(p.grad is g for p, g in zip(trainer.model.parameters(), grads))

    def fails(step, params, device, before_capture=None):
        raise RuntimeError("CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph_module, "capture_step", fails)
    trainer = Trainer(cfg, tmp_path / "failed")
    with pytest.raises(RuntimeError, match=r"could not be captured \(CUDA graph capture failed: .*without train"):
        trainer._graphed_step(image, label, 0)


def test_refusals(tmp_path):
    with pytest.raises(SetupError, match="train.cuda_graph needs a CUDA device, the run is on cpu"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.cuda_graph=true"]), tmp_path / "run")
    cuda = types.SimpleNamespace(device=torch.device("cuda"), accum=1, compile_mode=None, distributed=False,
                                 cfg={"loss": {"distill": "none"}, "train": {"compile": False,
                                                                        "activation_checkpointing": False}})
    trainer_module._check_cuda_graph(cuda)
    for change, message in ((dict(accum=2), "grad_accumulation=1"), (dict(compile_mode="default"), "exclude"),
                            (dict(distributed=True), "one process")):
        with pytest.raises(SetupError, match=message):
            trainer_module._check_cuda_graph(types.SimpleNamespace(**{**vars(cuda), **change}))
    for change, message in (({"loss": {"distill": "selfreg"}}, "SelfReg"),
                            ({"train": {"compile": False, "activation_checkpointing": True}}, "checkpointing")):
        cfg = {"loss": {"distill": "none"}, "train": {"compile": False, "activation_checkpointing": False}}
        cfg.update(change)
        with pytest.raises(SetupError, match=message):
            trainer_module._check_cuda_graph(types.SimpleNamespace(**{**vars(cuda), "cfg": cfg}))
    with pytest.raises(ValueError, match="train.cuda_graph"):
        load_config("quickstart", ["train.cuda_graph=3"])


def test_cli_flag_sets_it(tmp_path, capsys):
    from fastseg3d.cli import main

    code = main(["train", "--config", "quickstart", "--output-dir", str(tmp_path / "run"), "--cuda-graph",
                 *TINY_UNET, *TINY_DATA])
    assert code == 2 and "train.cuda_graph needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
# (ids without fp32/fp16, which the tier's order puts last as cases the interpreter tier covers: these it does not)
@pytest.mark.parametrize("case", ["float-dsd-batchnorm", "bf16-dropout", "half-scaler-clip-dropout-workers"])
def test_gpu_captured_step_trains_as_eager(tmp_path, case, caplog):
    """A real capture: the replays train as the eager loop does (losses, weights, BatchNorm buffers), with the fused
    DSD losses, SegFormer3D's fused layers, GradScaler and clipping, dropout, and a DataLoader's pin-memory thread
    running during the capture."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    extra = {"float-dsd-batchnorm": [*MODELS["dsd-batchnorm"]],
             "bf16-dropout": [*MODELS["segformer3d-dropout"], "train.amp=bf16"],
             "half-scaler-clip-dropout-workers": [*MODELS["segformer3d-dropout"], "train.amp=fp16",
                                                  "train.grad_clip=1.0", "data.num_workers=2"]}[case]
    cfg = [*TINY_DATA, *STEPS, "device=cuda", *extra]
    eager = Trainer(load_config("quickstart", cfg), tmp_path / "eager")
    eager.fit()
    with caplog.at_level(logging.INFO, logger="fastseg3d.train.trainer"):
        graphed = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true"]), tmp_path / "graph")
        graphed.fit()
    assert any("is captured" in r.getMessage() for r in caplog.records)
    tol = dict(rtol=1e-4, atol=1e-5) if case.startswith("float") else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(_losses(tmp_path / "graph"), _losses(tmp_path / "eager"), **tol)
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_replayed_non_finite_loss_stops_the_run(tmp_path, on_cpu, monkeypatch):
    """A replay runs no Python, so nothing in the step notes its loss: the trainer checks the loss the replay wrote.
    A NaN there (with finite gradients) stops the run before the optimizer's step."""
    from fastseg3d.train import NonFiniteLossError
    from fastseg3d.train.builders import Objective

    replaying = [False]
    note = Trainer._note_finite
    monkeypatch.setattr(Trainer, "_note_finite", lambda self, loss: None if replaying[0] else note(self, loss))
    capture = cuda_graph_module.capture_step

    def capture_without_python(*args, **kwargs):
        replay = capture(*args, **kwargs)

        def run():
            replaying[0] = True
            try:
                replay()
            finally:
                replaying[0] = False
        return run

    monkeypatch.setattr(cuda_graph_module, "capture_step", capture_without_python)
    forward = Objective.forward
    calls = {"n": 0}

    def nan_from_the_first_replay(self, output, target):
        loss, _ = forward(self, output, target)
        calls["n"] += 1
        if calls["n"] > 4:  # 3 warm-up runs and the capture, then the replays
            loss = loss + torch.full((), float("nan"))
        return loss, {"segmentation": loss.detach()}

    monkeypatch.setattr(Objective, "forward", nan_from_the_first_replay)
    trainer = Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, *STEPS, "train.cuda_graph=true"]),
                      tmp_path / "run")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 0, step 1"):
        trainer.train_epoch(0)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_capture_step_refuses_a_capture_under_autocast():
    """The step enters autocast itself: an autocast around the capture would keep its cast cache past the capture
    (checked before any CUDA call, so on any machine)."""
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="capture outside autocast"):
        cuda_graph_module.capture_step(lambda: None, [], torch.device("cpu"))
