"""layers_for: the preset of a network's class, subclasses included, for each method; other networks refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastseg3d.distill import presets
from fastseg3d.networks.unet import UNet
from tests.distill.test_dsd import _small_unetr, unetr_cls  # noqa: F401  (fixture)

nets = pytest.importorskip("monai.networks.nets")


def _dynunet(cls=None):
    return (cls or nets.DynUNet)(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                                 filters=[4, 8, 16])


def test_layers_for_picks_each_class_preset_for_each_method(unetr_cls):  # noqa: F811
    """Each known class gets its own preset, for the method asked (the DSD and SelfReg presets differ for every
    class: a dispatch that ignored the method or the class would show)."""
    with torch.device("meta"):  # VNet's 45M parameters, not allocated
        vnet = nets.VNet(in_channels=1, out_channels=2)
    cases = [(UNet(3, 1, 2, channels=(4, 8, 8)), presets.unet_layers, True),
             (_small_unetr(unetr_cls), presets.unetr_layers, False), (_dynunet(), presets.dynunet_layers, True),
             (vnet, presets.vnet_layers, False),
             (nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12), presets.swinunetr_layers, False)]
    for net, preset, reads_net in cases:
        for method in presets.METHODS:
            expected = preset(net, method) if reads_net else preset(method)
            assert presets.layers_for(net, method) == expected, (type(net).__name__, method)
        assert presets.layers_for(net, "dsd") != presets.layers_for(net, "selfreg")


def test_subclasses_keep_their_preset():
    """A subclass keeps its base's layer names (a user's UNet or DynUNet with another forward): the presets take it,
    directly and through layers_for; MONAI's own UNet, another network of the same name, does not pass for ours."""

    class MyUNet(UNet):
        pass

    class MyDynUNet(nets.DynUNet):
        pass

    mine, base = MyUNet(3, 1, 2, channels=(4, 8, 8)), UNet(3, 1, 2, channels=(4, 8, 8))
    for method in presets.METHODS:
        assert presets.unet_layers(mine, method) == presets.unet_layers(base, method)
        assert presets.layers_for(mine, method) == presets.unet_layers(base, method)
        assert presets.layers_for(_dynunet(MyDynUNet), method) == presets.dynunet_layers(_dynunet(), method)
    with pytest.raises(ValueError, match="no dsd preset for monai.networks.nets.unet.UNet: the presets cover "
                                         "fastseg3d's UNet"):
        presets.layers_for(nets.UNet(3, 1, 2, channels=(4, 8, 8), strides=(2, 2)), "dsd")
    with pytest.raises(ValueError, match="no selfreg preset for torch.nn.modules.conv.Conv3d"):
        presets.layers_for(nn.Conv3d(1, 2, 1), "selfreg")
