"""The limits of stock ResNets' ``dcn=`` slot raise mmdyn's clear error
(mmdyn/engine/dcn_slot.py; docs/dcn_slot.md), and the slot still works
where it exists."""
import pytest
import torch

import mmdyn.engine  # noqa: F401  (applies the checks)
import mmdyn.models  # noqa: F401  (registers the dynamic convs)
from mmdyn.engine.dcn_slot import DcnSlotError


@pytest.mark.parametrize('depth', [18, 34])
def test_mmdet_basic_block_resnet_names_the_alternatives(depth):
    from mmdet.models.backbones import ResNet
    with pytest.raises(DcnSlotError, match='mmpretrain.DynamicResNet') as e:
        ResNet(depth=depth, dcn=dict(type='ODConv2d', kernel_num=1),
               stage_with_dcn=(False, True, True, True))
    assert 'ODConv2d' in str(e.value) and 'depth=50' in str(e.value)
    # without dcn= the BasicBlock ResNets build as before
    assert ResNet(depth=depth).depth == depth


def test_mmpretrain_resnet_has_no_dcn_argument():
    from mmpretrain.models.backbones import ResNet
    with pytest.raises(DcnSlotError, match="type='mmdet.ResNet'"):
        ResNet(depth=50, dcn=dict(type='ODConv2d'))


def test_dcn_slot_of_bottleneck_resnet_builds_the_dynamic_conv():
    from mmdet.models.backbones import ResNet

    from mmdyn.ops import ODConv2d
    model = ResNet(depth=50, dcn=dict(type='ODConv2d', kernel_num=1,
                                      fallback_on_stride=False),
                   stage_with_dcn=(False, False, False, True),
                   base_channels=8, out_indices=(3, ))
    model.eval()  # mmdet's ResNet.train() returns None
    convs = [m for m in model.layer4.modules() if isinstance(m, ODConv2d)]
    assert len(convs) == 3  # the 3x3 conv of each Bottleneck of stage 4
    assert all(c.kernel_size == (3, 3) for c in convs)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 256, 2, 2)
