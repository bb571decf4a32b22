# Copyright (c) mmdyn contributors. All rights reserved.
"""DDFResNet: DDF replaces exactly the bottleneck 3x3 conv2 (stride
included), the rest is mmpretrain's ResNet with zero-init of the last BN."""
import pytest
import torch
from mmpretrain.models import ResNet
from torch import nn

import mmdyn.models  # noqa: F401
from mmdyn.models.backbones import DDFResNet
from mmdyn.ops import DDFConv2d

SMALL = dict(stem_channels=16, base_channels=16)


def test_placement_stride_and_static_parts():
    ref = dict(ResNet(50, **SMALL).named_modules())
    net = DDFResNet(50, combine='add', **SMALL)
    names = {n for n, m in net.named_modules() if isinstance(m, DDFConv2d)}
    blocks = (3, 4, 6, 3)
    assert names == {
        f'layer{s + 1}.{b}.conv2'
        for s in range(4)
        for b in range(blocks[s])
    }
    for name in names:
        layer = dict(net.named_modules())[name]
        assert layer.in_channels == layer.out_channels == ref[name].in_channels
        assert tuple(layer.stride) == tuple(ref[name].stride)
        assert tuple(layer.kernel_size) == (3, 3)
    assert tuple(net.layer3[0].conv2.stride) == (2, 2)
    for name in ('conv1', 'layer1.0.conv1', 'layer1.0.conv3',
                 'layer2.0.downsample.0'):
        assert type(dict(net.named_modules())[name]) is nn.Conv2d


def test_zero_init_and_forward():
    net = DDFResNet(50, out_indices=(0, 3), **SMALL)
    net.init_weights()
    assert all(
        torch.all(b.norm3.weight == 0)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        for b in layer)
    outs = net.eval()(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 16), (1, 512, 2, 2)]


def test_argument_checks():
    with pytest.raises(ValueError, match='depth'):
        DDFResNet(18)
    with pytest.raises(ValueError, match='combine'):
        DDFResNet(50, combine='sum')
    with pytest.raises(ValueError, match='dyconv_cfg'):
        DDFResNet(50, dyconv_cfg=dict(type='ODConv2d'))
