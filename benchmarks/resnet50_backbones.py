# Copyright (c) mmdyn contributors. All rights reserved.
"""The ResNet-50 backbones the benchmarks compare, each with the convs its
paper replaces at the width of its 1x/4x configs (the ``configs/`` ResNet-50
models' backbones, without their heads).

Imported by the benchmark scripts of this folder (``python
benchmarks/<script>.py`` puts it on ``sys.path``).
"""
from mmdyn.models.backbones import DDFResNet, DynamicResNet, KWResNet
from mmdyn.models.backbones.kw_resnet import KW_1X_CFG


def _resnet50():
    from mmpretrain.models.backbones import ResNet
    return ResNet(50)


#: key -> (name, constructor) of the ResNet-50 backbones.
BACKBONES = {
    'r50': ('ResNet-50', _resnet50),
    'od1x': ('ODConv-1x ResNet-50', lambda: DynamicResNet(
        50, dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625))),
    'kw1x': ('KW-1x ResNet-50', lambda: KWResNet(50, kw_cfg=KW_1X_CFG)),
    'dy4x': ('DyConv-4x ResNet-50', lambda: DynamicResNet(
        50,
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True)),
    'ddf': ('DDF-mul ResNet-50', lambda: DDFResNet(50, combine='mul')),
}
