# Copyright (c) mmdyn contributors. All rights reserved.
"""DynamicMobileNetV2: placement (expansion, depthwise, projection, final 1x1;
static stem), geometry against mmpretrain's MobileNetV2, exact equivalence
with a static layer, options and argument checks."""
import pytest
import torch
from mmpretrain.models import MobileNetV2
from torch import nn

import mmdyn.models  # noqa: F401
from mmdyn.models.backbones import DynamicMobileNetV2
from mmdyn.ops import DyConv2d, ODConv2d

OD1 = dict(type='ODConv2d', kernel_num=1, reduction=0.0625)


def dynamic_names(model, cls=ODConv2d):
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def test_default_placement_and_geometry():
    ref = dict(MobileNetV2(widen_factor=0.5).named_modules())
    net = DynamicMobileNetV2(widen_factor=0.5, dyconv_cfg=OD1)
    names = dynamic_names(net)
    # 17 blocks: 16 expansions (not the t=1 block), 17 depthwise, 17
    # projections, plus the final 1x1.
    assert len(names) == 16 + 17 + 17 + 1
    assert 'conv2.conv' in names
    assert 'layer1.0.conv.0.conv' in names  # depthwise of the t=1 block
    assert type(net.conv1.conv) is nn.Conv2d
    for name in names:
        layer, static = dict(net.named_modules())[name], ref[name]
        assert isinstance(static, nn.Conv2d)
        assert (layer.in_channels, layer.out_channels,
                layer.groups) == (static.in_channels, static.out_channels,
                                  static.groups)
        assert tuple(layer.kernel_size) == tuple(static.kernel_size)
        assert tuple(layer.stride) == tuple(static.stride)
        assert tuple(layer.padding) == tuple(static.padding)
    # Depthwise ODConv has no filter attention: that is the op's rule, but
    # the backbone must hand it a true depthwise geometry.
    dw = net.layer2[0].conv[1].conv
    assert dw.in_channels == dw.out_channels == dw.groups


def test_static_replacement_is_the_plain_mobilenet_v2():
    ref = MobileNetV2(widen_factor=0.5, out_indices=(2, 7))
    ref.eval()  # mmpretrain's MobileNetV2.train() returns None
    net = DynamicMobileNetV2(
        widen_factor=0.5,
        out_indices=(2, 7),
        dyconv_cfg=dict(type='Conv2d'),
        dyconv_stem=True).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ref(x), net(x)):
            torch.testing.assert_close(a, b)


def test_selection_options_and_dyconv_variant():
    net = DynamicMobileNetV2(
        widen_factor=0.5,
        dyconv_cfg=dict(type='DyConv2d', kernel_num=2),
        dyconv_layers=('depthwise', ),
        dyconv_final=False)
    names = dynamic_names(net, DyConv2d)
    assert len(names) == 17
    assert all(dict(net.named_modules())[n].groups > 1 for n in names)
    assert type(net.conv2.conv) is nn.Conv2d
    stem = DynamicMobileNetV2(
        widen_factor=0.5, dyconv_cfg=OD1, dyconv_stem=True)
    assert isinstance(stem.conv1.conv, ODConv2d)


def test_forward_train_frozen_and_init():
    net = DynamicMobileNetV2(
        widen_factor=0.5,
        out_indices=(1, 2, 4, 7),
        frozen_stages=2,
        dyconv_cfg=OD1)
    net.init_weights()
    net.train()
    outs = net(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 8, 8), (2, 16, 4, 4),
                                              (2, 48, 2, 2), (2, 1280, 1, 1)]
    outs[-1].sum().backward()
    assert net.conv2.conv.weight.grad is not None
    assert not any(p.requires_grad for p in net.layer2.parameters())
    assert all(p.requires_grad for p in net.layer3.parameters())
    assert torch.all(net.layer3[0].conv[0].bn.weight == 1)


def test_argument_checks():
    with pytest.raises(ValueError, match='dyconv_layers'):
        DynamicMobileNetV2(dyconv_cfg=OD1, dyconv_layers=('stem', ))
    with pytest.raises(ValueError, match='dyconv_cfg'):
        DynamicMobileNetV2(dyconv_cfg='ODConv2d')
