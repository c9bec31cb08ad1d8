"""What every model case shares: a :class:`Network` description (how to build the fastseg3d and the plain
variant, the training loss, the input stride), the training-step and inference runners, and its registration as a
``model``-suite case. ``bench/largest_cube.py`` reads the same descriptions.

Providers: ``fastseg3d`` (the network on fastseg3d's fused ops) and ``plain`` (the same network with every fused
part in plain PyTorch; what that means is per network, see :attr:`Network.plain`), each eager, eager captured in
a CUDA graph (``+cuda-graph``: the step's launches replayed by one host call, which a fixed patch size allows) and
compiled.
``train_step`` is forward, loss and backward (no optimizer step: it is the same for both); ``infer`` is an eval
forward under ``torch.no_grad``. bf16/fp16 rows run under ``torch.autocast`` with fp32 parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from bench.registry import (
    CUDA_GRAPH,
    MODEL_MODES,
    Case,
    Setup,
    Unavailable,
    compile_variant,
    compiled,
    optional_compile,
    register,
    with_compile,
)
from fastseg3d.train.cuda_graph import capture_step

VARIANTS = ("fastseg3d", "plain")


@dataclass
class Network:
    """One benchmarked network.

    ``build(cfg, plain)`` returns the module (on the CPU); ``loss(plain)`` the training loss
    ``(output, label) -> scalar`` (label: (B, 1, *spatial) class indices); ``plain`` says what the plain variant
    replaces, for the README and the rows' readers. Unless ``plain_model`` is set, the plain variant is the
    fastseg3d module run under ``fastseg3d.backend("torch")`` (every fused op runs its PyTorch reference).
    ``graphable=False``: the training step cannot be captured in a CUDA graph (its
    loss draws on the host every step), so there are no ``+cuda-graph`` providers.
    """

    name: str
    in_channels: int
    out_channels: int
    build: Callable[[dict, bool], nn.Module]
    loss: Callable[[bool], Callable[[object, torch.Tensor], torch.Tensor]]
    stride: Callable[[nn.Module], int]
    plain: str
    quick_cfg: dict
    quick_side: int
    cfg: dict
    sides: tuple[int, ...] = (128, 160)
    batch: int = 2
    quick_batch: int = 1
    graphable: bool = True


NETWORKS: dict[str, Network] = {}


def cross_entropy(_plain: bool) -> Callable[[object, torch.Tensor], torch.Tensor]:
    """Voxel-wise cross-entropy on a logits tensor, the same for both variants (the networks without a fused loss)."""
    def loss(out, label):
        return F.cross_entropy(out.float(), label[:, 0])
    return loss


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def graphed(step: Callable[[], object], params: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    """``step`` (fixed inputs) captured in one CUDA graph, and a closure that replays it
    (:func:`fastseg3d.train.cuda_graph.capture_step`, which the trainer's ``train.cuda_graph`` uses too)."""
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a GPU")
    return capture_step(step, params, device)


def variant_context(plain: bool):
    """The backend every call of the variant runs under (tracing included, when compiled)."""
    return fastseg3d.backend("torch") if plain else contextlib.nullcontext()


def inputs(net: Network, batch: int, side: int, device: torch.device, seed: int = 0):
    """A random input and label of a cubic patch, drawn on ``device`` (at 512^3 a CPU draw and copy would take
    seconds of the largest-cube search's time box)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, net.in_channels, side, side, side, generator=g, device=device)
    label = torch.randint(0, net.out_channels, (batch, 1, side, side, side), generator=g, device=device)
    return x, label


def runners(net: Network, model: nn.Module, plain: bool, provider: str, x: torch.Tensor, label: torch.Tensor,
            dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], object]]:
    """``train_step`` and ``infer`` closures; compiled providers compile the training forward with its loss (the
    plain losses are what the fused ones replace) and the inference forward."""
    loss_fn = net.loss(plain)

    def forward_loss(x, label):
        return loss_fn(model(x), label)

    def forward(x):
        return model(x)

    if compile_variant(provider) is not None:
        forward_loss = compiled(forward_loss, provider, device)
        forward = compiled(forward, provider, device)
    graph = provider.endswith(CUDA_GRAPH)

    def train_step():
        model.train()
        with variant_context(plain), autocast(device, dtype):
            loss = forward_loss(x, label)
            loss.backward()

    def infer():
        model.eval()
        with variant_context(plain), torch.no_grad(), autocast(device, dtype):
            return forward(x)

    out = {"train_step": train_step, "infer": infer}
    if graph:  # captured on a mode's first call: a mode not measured costs no capture
        params = list(model.parameters())
        return {mode: _captured_on_first_call(fn, params, device) for mode, fn in out.items()}
    return out


def _captured_on_first_call(fn: Callable[[], object], params: list[torch.Tensor], device: torch.device
                            ) -> Callable[[], None]:
    replay = None

    def run():
        nonlocal replay
        if replay is None:
            replay = graphed(fn, params, device)
        replay()

    return run


def build(net: Network, cfg: dict, plain: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return net.build(cfg, plain).to(device)


def register_network(net: Network) -> Case:
    """Register ``net`` as a model-suite case named after it."""
    NETWORKS[net.name] = net

    def shapes(quick: bool):
        if quick:
            label = f"{net.quick_batch}x{net.in_channels}x{net.quick_side}^3 small"
            return [(label, {"b": net.quick_batch, "side": net.quick_side, "cfg": net.quick_cfg})]
        return [(f"{net.batch}x{net.in_channels}x{side}^3", {"b": net.batch, "side": side, "cfg": net.cfg})
                for side in net.sides]

    def providers(spec):
        # eager first: a whole-network compile can outlast a time box, and the plain eager baseline must not be lost;
        # then the plain network compiled, the other peer of the model targets; then both captured in CUDA graphs
        plain_compiled, *rest = (name for v in reversed(VARIANTS) for name in with_compile(v))
        graphed_variants = [v + CUDA_GRAPH for v in VARIANTS] if net.graphable else []
        return [*VARIANTS, plain_compiled, *graphed_variants, *rest]

    def setup(spec, dtype, provider, device) -> Setup:
        plain = provider.startswith("plain")
        if provider.endswith(CUDA_GRAPH) and device.type != "cuda":
            raise Unavailable("CUDA graphs need a GPU")
        model = build(net, spec["cfg"], plain, device)
        x, label = inputs(net, spec["b"], spec["side"], device)
        return Setup(None, list(model.parameters()), {},
                     runners=runners(net, model, plain, provider, x, label, dtype, device))

    return register(Case(name=net.name, shapes=shapes, providers=providers, setup=setup, modes=MODEL_MODES,
                         suite="model", optional=optional_compile(*VARIANTS)))
