# Copyright (c) mmdyn contributors. All rights reserved.
"""The limits of stock ResNets' ``dcn=`` slot are what docs/dcn_slot.md says
(errors raised by mmdet and mmpretrain themselves: mmdyn does not patch them),
and the slot works where it exists."""
import os.path as osp

import pytest
import torch

import mmdyn.models  # noqa: F401  (registers the dynamic convs)

DOC = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'docs',
    'dcn_slot.md')


def doc_text():
    with open(DOC, encoding='utf-8') as f:
        return f.read()


@pytest.mark.parametrize('depth', [18, 34])
def test_mmdet_basic_block_resnet_refuses_dcn_as_documented(depth):
    from mmdet.models.backbones import ResNet
    with pytest.raises(AssertionError, match='Not implemented yet.'):
        ResNet(
            depth=depth,
            dcn=dict(type='ODConv2d', kernel_num=1),
            stage_with_dcn=(False, True, True, True))
    # without dcn= the BasicBlock ResNets build as before
    assert ResNet(depth=depth).depth == depth
    assert 'Not implemented yet.' in doc_text()
    assert "type='mmpretrain.DynamicResNet', depth=18" in doc_text()


def test_mmpretrain_resnet_has_no_dcn_argument_as_documented():
    from mmpretrain.models.backbones import ResNet
    with pytest.raises(TypeError, match="unexpected keyword argument 'dcn'"):
        ResNet(depth=50, dcn=dict(type='ODConv2d'))
    assert "unexpected keyword argument 'dcn'" in doc_text()


def test_dcn_slot_of_bottleneck_resnet_builds_the_dynamic_conv():
    from mmdet.models.backbones import ResNet

    from mmdyn.ops import ODConv2d
    model = ResNet(
        depth=50,
        dcn=dict(type='ODConv2d', kernel_num=1, fallback_on_stride=False),
        stage_with_dcn=(False, False, False, True),
        base_channels=8,
        out_indices=(3, ))
    model.eval()  # mmdet's ResNet.train() returns None
    convs = [m for m in model.layer4.modules() if isinstance(m, ODConv2d)]
    assert len(convs) == 3  # the 3x3 conv of each Bottleneck of stage 4
    assert all(c.kernel_size == (3, 3) for c in convs)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 256, 2, 2)
