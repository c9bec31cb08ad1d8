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
    """A stand-in for capture_step with a graph's semantics on a CPU: three warm-up runs, gradients cleared, the
    capture (run once, for the step's outputs), and a replay that runs the step again and writes its gradients and
    outputs into the tensors the capture made, as a graph's replay writes the same memory."""
    def capture(step, params, device):
        for _ in range(3):
            step()
        for p in params:
            p.grad = None
        calls.append("capture")
        first = step()
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


def test_replayed_steps_train_as_eager_ones(tmp_path, on_cpu):
    cfg = [*TINY_UNET, *TINY_DATA, *STEPS]
    eager = Trainer(load_config("quickstart", cfg), tmp_path / "eager")
    eager.fit()
    graphed = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true"]), tmp_path / "graph")
    graphed.fit()
    assert on_cpu == ["capture"] + ["replay"] * 4  # 2 epochs of 2 batches, captured once
    assert graphed._graph is not None
    torch.testing.assert_close(_losses(tmp_path / "graph"), _losses(tmp_path / "eager"))
    for a, b in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b)


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

    def fails(step, params, device):
        step()
        for p in params:
            p.grad = torch.full_like(p, float("nan"))  # what a failed capture may leave
        raise RuntimeError("CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph_module, "capture_step", fails)
    trainer = Trainer(cfg, tmp_path / "failed")
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger="fastseg3d.train.trainer"):
        loss, _ = trainer._graphed_step(image, label, 0)
        trainer._graphed_step(image, label, 0)  # no second attempt
    assert trainer._graph is None and trainer._graph_failed
    assert sum("could not be captured" in r.getMessage() for r in caplog.records) == 1
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in trainer.model.parameters())


def test_refusals(tmp_path):
    with pytest.raises(SetupError, match="train.cuda_graph needs a CUDA device, the run is on cpu"):
        Trainer(load_config("quickstart", [*TINY_UNET, *TINY_DATA, "train.cuda_graph=true"]), tmp_path / "run")
    cuda = types.SimpleNamespace(device=torch.device("cuda"), accum=1, compile_mode=None, distributed=False,
                                 cfg={"train": {"compile": False}})
    trainer_module._check_cuda_graph(cuda)
    for change, message in ((dict(accum=2), "grad_accumulation=1"), (dict(compile_mode="default"), "exclude"),
                            (dict(distributed=True), "one process")):
        with pytest.raises(SetupError, match=message):
            trainer_module._check_cuda_graph(types.SimpleNamespace(**{**vars(cuda), **change}))
    with pytest.raises(ValueError, match="train.cuda_graph"):
        load_config("quickstart", ["train.cuda_graph=3"])


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_gpu_captured_step_trains_as_eager(tmp_path, amp, caplog):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = [*TINY_UNET, *TINY_DATA, *STEPS, "device=cuda", f"train.amp={amp}"]
    eager = Trainer(load_config("quickstart", cfg), tmp_path / "eager")
    eager.fit()
    with caplog.at_level(logging.INFO, logger="fastseg3d.train.trainer"):
        graphed = Trainer(load_config("quickstart", [*cfg, "train.cuda_graph=true"]), tmp_path / "graph")
        graphed.fit()
    assert graphed._graph is not None, [r.getMessage() for r in caplog.records]
    tol = dict(rtol=1e-4, atol=1e-5) if amp == "none" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(_losses(tmp_path / "graph"), _losses(tmp_path / "eager"), **tol)
    for a, b in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, **tol)
