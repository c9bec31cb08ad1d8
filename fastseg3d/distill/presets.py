"""Layer names for :class:`fastseg3d.distill.DSD` and :class:`fastseg3d.distill.SelfReg` on known backbones.

Each function takes the method, ``"dsd"`` or ``"selfreg"`` (and, where the names depend on its depth, the built
network), and returns the keyword arguments naming the layers: ``encoder_layers`` and ``decoder_layers``
(DSD: both with the teacher last, and ``share_heads`` where the published variant shares heads), plus
``final_layer`` for SelfReg.
"""

from __future__ import annotations

from torch import nn

__all__ = ["METHODS", "dynunet_layers", "layers_for", "swinunetr_layers", "unet_layers", "unetr_layers",
           "vnet_layers"]

METHODS = ("dsd", "selfreg")


def _is(net: nn.Module, cls_name: str, package: str) -> bool:
    # by class name and package: MONAI is optional, a subclass keeps the layer names, and MONAI's UNet is another UNet
    return any(c.__name__ == cls_name and c.__module__.startswith(package) for c in type(net).__mro__)


def _check(net: nn.Module | None, cls_name: str, method: str, package: str) -> None:
    if net is not None and not _is(net, cls_name, package):
        raise TypeError(f"expected {package.rstrip('.')}'s {cls_name}, got {type(net).__module__}.{type(net).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def unet_layers(net: nn.Module, method: str) -> dict:
    """fastseg3d's :class:`fastseg3d.networks.unet.UNet` with L levels.

    DSD (as DSD's UNETR placement): decoder heads on the bottleneck ``encoder.{L-1}`` and ``decoder.0 ..
    decoder.{L-3}`` (coarse to fine, the 1/2-resolution stage is the teacher), encoder heads on ``encoder.0 ..
    encoder.{L-2}`` (the 1/2**(L-2) stage is the teacher): 4 + 4 heads for 5 levels. SelfReg (as SelfReg's
    ``UNet_hd``): encoder ``encoder.1 .. encoder.{L-1}``, decoder ``decoder.0 .. decoder.{L-3}``, final ``final``.

    Example:
        >>> from fastseg3d.networks.unet import UNet
        >>> from fastseg3d.distill import presets
        >>> presets.unet_layers(UNet(3, 1, 2, channels=(8, 16, 32)), "selfreg")
        {'encoder_layers': ('encoder.1', 'encoder.2'), 'decoder_layers': ('decoder.0',), 'final_layer': 'final'}
    """
    _check(net, "UNet", method, "fastseg3d.")
    levels = len(net.encoder)
    if levels < 3:
        raise ValueError(f"the presets need a UNet of at least 3 levels, got {levels}")
    decoder = tuple(f"decoder.{j}" for j in range(levels - 2))
    if method == "dsd":
        return {"encoder_layers": tuple(f"encoder.{i}" for i in range(levels - 1)),
                "decoder_layers": (f"encoder.{levels - 1}", *decoder)}
    return {"encoder_layers": tuple(f"encoder.{i}" for i in range(1, levels)), "decoder_layers": decoder,
            "final_layer": "final"}


def unetr_layers(method: str) -> dict:
    """MONAI's ``UNETR`` (any configuration: the names do not depend on it).

    DSD, exactly the published placement (seeds: out_dec4 .. out_dec1, out_enc1 .. out_enc4): decoder heads on the
    ViT's last hidden state as a volume (``decoder5:input``, 1/16), ``decoder5`` (1/8), ``decoder4`` (1/4),
    ``decoder3`` (1/2, teacher); encoder heads on ``encoder1`` (1/1) .. ``encoder4`` (1/8, teacher). SelfReg:
    encoder ``encoder2 .. encoder4`` and the bottleneck volume ``decoder5:input``, decoder ``decoder5 ..
    decoder3``, final ``decoder2`` (the feature the output conv reads).

    Example:
        >>> from fastseg3d.distill import presets
        >>> presets.unetr_layers("dsd")["decoder_layers"]
        ('decoder5:input', 'decoder5', 'decoder4', 'decoder3')
    """
    _check(None, "UNETR", method, "monai.")
    if method == "dsd":
        return {"encoder_layers": ("encoder1", "encoder2", "encoder3", "encoder4"),
                "decoder_layers": ("decoder5:input", "decoder5", "decoder4", "decoder3")}
    return {"encoder_layers": ("encoder2", "encoder3", "encoder4", "decoder5:input"),
            "decoder_layers": ("decoder5", "decoder4", "decoder3"), "final_layer": "decoder2"}


def dynunet_layers(net: nn.Module, method: str) -> dict:
    """MONAI's ``DynUNet`` (``deep_supervision=False``) with n down-sampling steps.

    DSD, as DSD's nnU-Net variant: encoder heads on ``input_block`` and ``downsamples.*`` (the deepest
    down-sampling output is the teacher), decoder heads on ``bottleneck`` and every ``upsamples.*`` but the last
    (the one nearest the output is the teacher), and ``share_heads=True``: an encoder and a decoder feature at the
    same scale share one head, as published (filters 32..320, 8 classes: 8,592 head parameters). SelfReg: encoder
    ``downsamples.*`` and ``bottleneck``, decoder every ``upsamples.*`` but the last, final the last ``upsamples``
    stage.

    Example:
        >>> from monai.networks.nets import DynUNet
        >>> from fastseg3d.distill import presets
        >>> net = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2])
        >>> presets.dynunet_layers(net, "selfreg")["final_layer"]
        'upsamples.1'
    """
    _check(net, "DynUNet", method, "monai.")
    if getattr(net, "deep_supervision", False):
        raise ValueError("DynUNet(deep_supervision=True) returns its heads stacked with the logits; build it with "
                         "deep_supervision=False (the wrapper taps the decoder itself)")
    n_up = len(net.upsamples)
    ups = tuple(f"upsamples.{j}" for j in range(n_up - 1))
    downs = tuple(f"downsamples.{i}" for i in range(len(net.downsamples)))
    if method == "dsd":
        return {"encoder_layers": ("input_block", *downs), "decoder_layers": ("bottleneck", *ups), "share_heads": True}
    return {"encoder_layers": (*downs, "bottleneck"), "decoder_layers": ups, "final_layer": f"upsamples.{n_up - 1}"}


def swinunetr_layers(method: str) -> dict:
    """MONAI's ``SwinUNETR`` (any configuration: the names do not depend on it).

    DSD, as DSD's SwinUNETR variant: encoder heads on ``encoder1`` (1/1) .. ``encoder4`` (1/8, teacher), decoder
    heads on ``decoder5`` (1/16) .. ``decoder2`` (1/2, teacher), and ``share_heads=True``: a decoder feature uses the
    encoder head of its scale, as published (the 1/16 head, on the Swin stage the release taps but leaves out of
    its loss, is the decoder's own here: 520 parameters, of 1,336 for all heads at feature size 12 and 4 classes).
    SelfReg: encoder ``encoder2 .. encoder4`` and the bottleneck ``encoder10``, decoder ``decoder5 .. decoder2``,
    final ``decoder1`` (the feature the output conv reads).

    Example:
        >>> from fastseg3d.distill import presets
        >>> presets.swinunetr_layers("dsd")["decoder_layers"]
        ('decoder5', 'decoder4', 'decoder3', 'decoder2')
    """
    _check(None, "SwinUNETR", method, "monai.")
    if method == "dsd":
        return {"encoder_layers": ("encoder1", "encoder2", "encoder3", "encoder4"),
                "decoder_layers": ("decoder5", "decoder4", "decoder3", "decoder2"), "share_heads": True}
    return {"encoder_layers": ("encoder2", "encoder3", "encoder4", "encoder10"),
            "decoder_layers": ("decoder5", "decoder4", "decoder3", "decoder2"), "final_layer": "decoder1"}


def vnet_layers(method: str) -> dict:
    """MONAI's ``VNet``.

    DSD, as DSD's VNet variant: encoder heads on ``in_tr`` (1/1), ``down_tr32``, ``down_tr64`` and ``down_tr128``
    (1/8, teacher), decoder heads on ``down_tr256`` (1/16), ``up_tr256``, ``up_tr128`` and ``up_tr64`` (1/2, teacher),
    8 separate heads (the release also builds a ninth, on ``up_tr32``, that its forward never calls: 152
    parameters at 4 classes, not built here). SelfReg: encoder ``down_tr32 .. down_tr256``, decoder ``up_tr256 ..
    up_tr64``, final ``up_tr32``.

    Example:
        >>> from fastseg3d.distill import presets
        >>> presets.vnet_layers("dsd")["encoder_layers"]
        ('in_tr', 'down_tr32', 'down_tr64', 'down_tr128')
    """
    _check(None, "VNet", method, "monai.")
    if method == "dsd":
        return {"encoder_layers": ("in_tr", "down_tr32", "down_tr64", "down_tr128"),
                "decoder_layers": ("down_tr256", "up_tr256", "up_tr128", "up_tr64")}
    return {"encoder_layers": ("down_tr32", "down_tr64", "down_tr128", "down_tr256"),
            "decoder_layers": ("up_tr256", "up_tr128", "up_tr64"), "final_layer": "up_tr32"}


# (class name, package, preset, whether the preset reads the built network)
_PRESETS = (("UNet", "fastseg3d.", "unet_layers", True), ("UNETR", "monai.", "unetr_layers", False),
            ("DynUNet", "monai.", "dynunet_layers", True), ("SwinUNETR", "monai.", "swinunetr_layers", False),
            ("VNet", "monai.", "vnet_layers", False))


def layers_for(net: nn.Module, method: str) -> dict:
    """The preset of ``net``'s class (fastseg3d's UNet, MONAI's UNETR, DynUNet, SwinUNETR or VNet, subclasses
    included) for ``method``; a ``ValueError`` naming those for any other network.

    Example:
        >>> from fastseg3d.networks.unet import UNet
        >>> from fastseg3d.distill import presets
        >>> presets.layers_for(UNet(3, 1, 2, channels=(8, 16, 32)), "dsd")["decoder_layers"]
        ('encoder.2', 'decoder.0')
    """
    for cls_name, package, preset, reads_net in _PRESETS:
        if _is(net, cls_name, package):
            fn = globals()[preset]
            return fn(net, method) if reads_net else fn(method)
    known = ", ".join(f"{package.rstrip('.')}'s {name}" for name, package, _, _ in _PRESETS)
    raise ValueError(f"no {method} preset for {type(net).__module__}.{type(net).__name__}: the presets cover "
                     f"{known} (other networks: wrap them with fastseg3d.distill.DSD/SelfReg and their layer names)")
