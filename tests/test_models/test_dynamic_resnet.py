# Copyright (c) mmdyn contributors. All rights reserved.
"""DynamicResNet: which convolutions become dynamic, their geometry against
mmpretrain's plain ResNet, checkpoint compatibility of the static parts,
freezing, init and argument checks."""
import pytest
import torch
from mmpretrain.models import ResNet
from torch import nn

import mmdyn.models  # noqa: F401
from mmdyn.models.backbones import DynamicResNet
from mmdyn.ops import DyConv2d, ODConv2d

OD1 = dict(type='ODConv2d', kernel_num=1, reduction=0.0625)
# A quarter of the channels keeps the tests fast; the layout is unchanged.
SMALL = dict(stem_channels=16, base_channels=16)


def as_pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def named_types(model, cls):
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


def test_odconv_default_placement_resnet18_and_50():
    r18 = DynamicResNet(18, dyconv_cfg=OD1, **SMALL)
    expected = {
        f'layer{s}.{b}.conv{c}'
        for s in range(1, 5)
        for b in range(2)
        for c in (1, 2)
    }
    assert named_types(r18, ODConv2d) == expected
    # Static: stem and shortcuts.
    assert type(r18.conv1) is nn.Conv2d
    for s in (2, 3, 4):
        assert type(getattr(r18, f'layer{s}')[0].downsample[0]) is nn.Conv2d

    r50 = DynamicResNet(50, dyconv_cfg=OD1, **SMALL)
    blocks = (3, 4, 6, 3)
    expected = {
        f'layer{s + 1}.{b}.conv{c}'
        for s in range(4)
        for b in range(blocks[s])
        for c in (1, 2, 3)
    }
    assert named_types(r50, ODConv2d) == expected
    assert all(
        type(getattr(r50, f'layer{s}')[0].downsample[0]) is nn.Conv2d
        for s in range(1, 5))


def test_geometry_matches_plain_resnet():
    """Every replaced layer mirrors the static conv of mmpretrain's ResNet at
    the same name (channels, kernel, stride, padding, dilation, groups)."""
    plain = dict(
        ResNet(50, dilations=(1, 1, 2, 2), strides=(1, 2, 1, 1),
               **SMALL).named_modules())
    dyn = DynamicResNet(
        50,
        dilations=(1, 1, 2, 2),
        strides=(1, 2, 1, 1),
        dyconv_cfg=dict(type='DyConv2d', kernel_num=2),
        dyconv_downsample=True,
        **SMALL)
    replaced = named_types(dyn, DyConv2d)
    assert len(replaced) == 16 * 3 + 4
    for name in replaced:
        ref = plain[name]
        layer = dict(dyn.named_modules())[name]
        for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride',
                     'padding', 'dilation', 'groups'):
            assert as_pair(getattr(layer,
                                   attr)) == as_pair(getattr(ref,
                                                             attr)), (name,
                                                                      attr)


def test_static_replacement_is_the_plain_resnet():
    """With a plain Conv2d as the 'dynamic' layer the network must be
    mmpretrain's ResNet exactly: same state-dict keys, same outputs."""
    ref = ResNet(18, out_indices=(0, 1, 2, 3), **SMALL)
    ref.eval()  # mmpretrain's ResNet.train() returns None
    dyn = DynamicResNet(
        18,
        out_indices=(0, 1, 2, 3),
        dyconv_cfg=dict(type='Conv2d'),
        dyconv_downsample=True,
        dyconv_stem=True,
        **SMALL).eval()
    dyn.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ref(x), dyn(x)):
            torch.testing.assert_close(a, b)


def test_static_parts_load_from_resnet_checkpoint():
    ref = ResNet(50, **SMALL)
    dyn = DynamicResNet(50, dyconv_cfg=OD1, **SMALL)
    replaced = named_types(dyn, ODConv2d)
    static = {
        k: v
        for k, v in ref.state_dict().items()
        if k.rsplit('.', 1)[0] not in replaced
    }
    missing, unexpected = dyn.load_state_dict(static, strict=False)
    assert not unexpected
    # Only the dynamic layers' own tensors are missing.
    assert all(k.startswith(tuple(r + '.' for r in replaced)) for k in missing)
    torch.testing.assert_close(dyn.conv1.weight, ref.conv1.weight)
    torch.testing.assert_close(dyn.layer2[0].downsample[0].weight,
                               ref.layer2[0].downsample[0].weight)
    torch.testing.assert_close(dyn.layer4[2].bn3.running_var,
                               ref.layer4[2].bn3.running_var)


def test_selection_options():
    r50 = DynamicResNet(
        50,
        dyconv_cfg=OD1,
        dyconv_layers=('conv2', ),
        stage_with_dyconv=(False, True, False, True),
        **SMALL)
    assert named_types(r50, ODConv2d) == {
        f'layer{s}.{b}.conv2'
        for s, n in ((2, 4), (4, 3))
        for b in range(n)
    }
    dy18 = DynamicResNet(
        18, dyconv_cfg=dict(type='DyConv2d'), dyconv_downsample=True, **SMALL)
    assert named_types(dy18, DyConv2d) >= {
        'layer2.0.downsample.0', 'layer3.0.downsample.0',
        'layer4.0.downsample.0'
    }
    assert len(named_types(dy18, DyConv2d)) == 16 + 3
    stem = DynamicResNet(18, dyconv_cfg=OD1, dyconv_stem=True, **SMALL)
    assert isinstance(stem.conv1, ODConv2d)
    deep = DynamicResNet(
        18,
        dyconv_cfg=OD1,
        dyconv_stem=True,
        deep_stem=True,
        stage_with_dyconv=(False, ) * 4,
        **SMALL)
    assert all(isinstance(m.conv, ODConv2d) for m in deep.stem)


def test_forward_shapes_and_batch1_training():
    net = DynamicResNet(
        18,
        out_indices=(0, 1, 2, 3),
        dyconv_cfg=dict(type='ODConv2d', kernel_num=2),
        **SMALL)
    net.init_weights()
    net.train()
    # 64x64 so that the network's own BN sees > 1 value at batch 1; the
    # attention branches see one pooled vector per channel and must cope.
    outs = net(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 16), (1, 32, 8, 8),
                                              (1, 64, 4, 4), (1, 128, 2, 2)]
    sum(o.sum() for o in outs).backward()
    assert net.layer1[0].conv1.weight.grad is not None


def test_init_and_frozen_stages():
    net = DynamicResNet(18, dyconv_cfg=OD1, frozen_stages=1, **SMALL)
    net.init_weights()
    # Official ODConv init: BN weights 1, no zero-init of the residual BN.
    assert torch.all(net.layer1[0].norm2.weight == 1)
    assert torch.all(net.conv1.weight.std() > 0)
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    zero = DynamicResNet(18, dyconv_cfg=OD1, zero_init_residual=True, **SMALL)
    zero.init_weights()
    assert torch.all(zero.layer1[0].norm2.weight == 0)


def test_argument_checks():
    with pytest.raises(ValueError, match='dyconv_layers'):
        DynamicResNet(18, dyconv_cfg=OD1, dyconv_layers=('conv4', ))
    with pytest.raises(ValueError, match='stage_with_dyconv'):
        DynamicResNet(18, dyconv_cfg=OD1, stage_with_dyconv=(True, ))
    with pytest.raises(ValueError, match='dyconv_cfg'):
        DynamicResNet(18, dyconv_cfg=dict(kernel_num=1))


def test_usable_from_mmdet_as_mmpretrain_backbone():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    net = MMDET_MODELS.build(
        dict(
            type='mmpretrain.DynamicResNet',
            depth=18,
            out_indices=(0, 1, 2, 3),
            dyconv_cfg=OD1,
            norm_eval=True,
            frozen_stages=1,
            **SMALL))
    assert isinstance(net, DynamicResNet)
    outs = net.eval()(torch.rand(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]


def test_builds_on_meta_device():
    cpu = DynamicResNet(18, dyconv_cfg=OD1, **SMALL)
    with torch.device('meta'):
        meta = DynamicResNet(18, dyconv_cfg=OD1, **SMALL)
    assert {p.device.type for p in meta.parameters()} == {'meta'}
    assert sum(p.numel()
               for p in meta.parameters()) == sum(p.numel()
                                                  for p in cpu.parameters())
