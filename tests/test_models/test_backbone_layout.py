# Copyright (c) mmdyn contributors. All rights reserved.
"""The backbones' state-dict layouts, and the behaviour of the KW backbones as
subclasses of mmpretrain's MobileNetV2 / ConvNeXt.

Checkpoints and the official-weight converters depend on the state-dict
keys, their shapes and their order (the order of ``parameters()`` is the
order of the optimizer state saved for resuming). The digests below were
recorded from the backbones as they were before they became thin
subclasses of the stock ones, so any change to a shipped layout fails here.
"""
import hashlib
import os.path as osp

import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmpretrain.models.backbones import ConvNeXt, MobileNetV2
from mmpretrain.registry import MODELS
from torch import nn

import mmdyn.engine  # noqa: F401  (Config.fromfile of 'mmpretrain::' bases)
import mmdyn.models  # noqa: F401
from mmdyn.models.backbones import (DDFResNet, DynamicMobileNetV2,
                                    DynamicResNet, KW1d2xMobileNetV2,
                                    KWConvNeXt, KWMobileNetV2, KWResNet)
from mmdyn.models.utils import register_first
from mmdyn.ops import KWConv2d

CONFIG_DIR = osp.join(osp.dirname(__file__), '..', '..', 'configs')

# config -> (first 16 hex digits of the sha256 of the backbone's
# '<key> <shape>' lines in state-dict order, number of keys). One config per
# distinct layout. The MobileNetV2 and ConvNeXt KW backbones, rebuilt on
# mmpretrain's, are checked in the fast tier; the others, whose conversion
# is unchanged, with the slow tests (each parses a chain of config bases and
# builds a full-size backbone).
LAYOUTS = {
    'kernelwarehouse/convnext-tiny-kw1x_32xb128_in1k.py': ('f18459b9c2f6286c',
                                                           540),
    'kernelwarehouse/mask-rcnn_mobilenet-v2-kw1x_fpn_1x_coco.py':
    ('d84982b4fe71987d', 741),
    'kernelwarehouse/mask-rcnn_mobilenet-v2-kw4x_fpn_1x_coco.py':
    ('ff2b7c658e4f7ba3', 747),
    'kernelwarehouse/mobilenet-v2-kw1d2x_8xb32_in1k.py': ('aa059c85dc4bfca9',
                                                          521),
    'kernelwarehouse/mobilenet-v2-w0.5-kw1d2x_8xb32_in1k.py':
    ('5e9996a5b910420d', 521),
    'kernelwarehouse/mobilenet-v2-w0.5-kw1x_8xb32_in1k.py':
    ('2be50938eea08229', 741),
    'kernelwarehouse/mobilenet-v2-w0.5-kw4x_8xb32_in1k.py':
    ('67e29546f91c16b8', 747),
}
SLOW_LAYOUTS = {
    'ddf/resnet50-ddf-add_8xb128-130e_in1k.py': ('5f25bfc0c9d65e5a', 414),
    'ddf/resnet101-ddf-add_8xb128-130e_in1k.py': ('b298b3fcc9f0e853', 822),
    'demo/faster-rcnn_r18-kw1x_fpn_demo.py': ('c50c3d861b140d7d', 276),
    'demo/faster-rcnn_r18-odconv1x_fpn_demo.py': ('189fa88a23f1adcd', 328),
    'demo/resnet18-dyconv4x_demo_cls.py': ('2313dfe29ec16a54', 196),
    'dyconv/faster-rcnn_r50-dyconv4x_fpn_1x_coco.py':
    ('7026eac348ad1ef4', 526),
    'kernelwarehouse/mask-rcnn_r50-kw1x_fpn_1x_coco.py':
    ('1fa9fe6db5e7bd45', 722),
    'kernelwarehouse/mask-rcnn_r50-kw4x_fpn_1x_coco.py': ('6385ef3d3405a03f',
                                                          722),
    'kernelwarehouse/resnet18-kw1d2x_8xb128-300e_in1k.py': ('7f21830ece969eaa',
                                                            276),
    'kernelwarehouse/resnet18-kw1d4x_8xb128-300e_in1k.py': ('aabaa97d3f9edc87',
                                                            276),
    'kernelwarehouse/resnet18-kw2x_8xb128-300e_in1k.py': ('d0652a87bc9517fc',
                                                          276),
    'kernelwarehouse/resnet18-kw4x_8xb128-300e_in1k.py': ('0cb58aea0f4b11cb',
                                                          276),
    'kernelwarehouse/resnet50-kw1d2x_8xb128-300e_in1k.py': ('33c61db661fb9325',
                                                            772),
    'odconv/faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py':
    ('cc276f446e5566bb', 873),
    'odconv/faster-rcnn_mobilenet-v2-odconv4x_fpn_1x_coco.py':
    ('37f58d6d6d61e688', 975),
    'odconv/faster-rcnn_r50-odconv1x_fpn_1x_coco.py': ('1a467538c1c685ea',
                                                       878),
    'odconv/faster-rcnn_r50-odconv4x_fpn_1x_coco.py': ('677bab15fc10ac37',
                                                       974),
    'odconv/mobilenet-v2-w0.5-odconv1x_8xb32_in1k.py': ('d24df3f97389c9e9',
                                                        873),
    'odconv/mobilenet-v2-w0.5-odconv4x_8xb32_in1k.py': ('dfd7ebc6f2aec0be',
                                                        975),
    'odconv/mobilenet-v2-w0.75-odconv1x_8xb32_in1k.py': ('65ab26592a9dda1f',
                                                         873),
    'odconv/mobilenet-v2-w0.75-odconv4x_8xb32_in1k.py': ('77b829b15c97e577',
                                                         975),
    'odconv/resnet101-odconv1x_8xb32_in1k.py': ('271df977dafbbbc8', 1779),
    'odconv/resnet101-odconv2x_8xb32_in1k.py': ('09dd1a07a63767a6', 1977),
    'odconv/resnet18-odconv4x_8xb32_in1k.py': ('e7f6a186ede7e785', 360),
}


def layout_digest(module: nn.Module):
    lines = '\n'.join(f'{key} {tuple(value.shape)}'
                      for key, value in module.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16], len(
        module.state_dict())


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    'config',
    sorted(LAYOUTS) +
    [pytest.param(c, marks=pytest.mark.slow) for c in sorted(SLOW_LAYOUTS)])
def test_config_backbone_state_dict_layout_is_unchanged(config):
    backbone_cfg = Config.fromfile(osp.join(CONFIG_DIR, config)).model.backbone
    with DefaultScope.overwrite_default_scope('mmpretrain'), \
            torch.device('meta'):
        backbone = MODELS.build(backbone_cfg)
    expected = {**LAYOUTS, **SLOW_LAYOUTS}[config]
    assert layout_digest(backbone) == expected, (
        f'the backbone of {config} changed its state-dict keys, shapes or '
        'their order; existing checkpoints and the converters rely on them')


# ------------------------------------------------ thin subclasses


def test_kw_backbones_are_stock_backbones_with_kw_convs():
    mobilenet = KWMobileNetV2(widen_factor=0.35)
    assert isinstance(mobilenet, MobileNetV2)
    assert isinstance(mobilenet.conv1, ConvModule)
    assert isinstance(mobilenet.conv1.conv, KWConv2d)
    assert isinstance(mobilenet.layer7[0].conv[1].conv, KWConv2d)
    assert next(iter(mobilenet.state_dict())) == 'warehouse_manager.weights.0'

    convnext = KWConvNeXt(arch=dict(depths=[1, 2], channels=[16, 32]))
    assert isinstance(convnext, ConvNeXt)
    assert convnext.depths == [1, 2]
    assert [len(stage) for stage in convnext.stages] == [1, 2]
    assert isinstance(convnext.downsample_layers[1][1], KWConv2d)
    assert next(iter(convnext.state_dict())) == 'warehouse_manager.weights.0'


@pytest.mark.parametrize('make', [
    lambda: KWMobileNetV2(widen_factor=0.35),
    lambda: KW1d2xMobileNetV2(widen_factor=0.35),
    lambda: KWConvNeXt(arch=dict(depths=[1, 1], channels=[16, 32])),
    lambda: KWResNet(18, base_channels=8),
    lambda: DynamicResNet(18, base_channels=8),
    lambda: DDFResNet(50, base_channels=8),
    lambda: DynamicMobileNetV2(widen_factor=0.35),
])
def test_train_and_eval_return_the_backbone(make):
    backbone = make()
    assert backbone.train() is backbone
    assert backbone.eval() is backbone


def test_register_first_puts_the_child_first_in_state_dict():
    parent = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    register_first(parent, 'extra', nn.Linear(1, 1))
    assert list(parent.state_dict()) == [
        'extra.weight', 'extra.bias', '0.weight', '0.bias', '1.weight',
        '1.bias'
    ]
    assert [n for n, _ in parent.named_children()] == ['extra', '0', '1']


def test_kw_mobilenet_v2_final_width_rounds_to_a_multiple_of_8():
    # 1280 * 1.01 = 1292.8 -> 1296 (mmpretrain's MobileNetV2 truncates to
    # 1292).
    with torch.device('meta'):
        backbone = KWMobileNetV2(widen_factor=1.01)
    assert backbone.out_channel == 1296
    assert backbone.conv2.conv.out_channels == 1296
    assert backbone.conv2.bn.num_features == 1296
    assert backbone.conv2.conv.in_channels == backbone.layer7[0].conv[
        -1].conv.out_channels


def test_kw_mobilenet_v2_frozen_stem_norm_stays_in_eval():
    backbone = KWMobileNetV2(widen_factor=0.35, frozen_stages=0).train()
    # mmpretrain's MobileNetV2 freezes the stem's parameters only.
    assert not backbone.conv1.bn.training
    assert backbone.layer1.training
    assert not any(p.requires_grad for p in backbone.conv1.parameters())
    # The stem has its own warehouse (the first one).
    grads = [w.requires_grad for w in backbone.warehouse_manager.weights]
    assert grads == [False] + [True] * 12


def test_kw_convnext_frozen_stages_freeze_their_warehouses():
    backbone = KWConvNeXt(
        arch=dict(depths=[1, 1, 2, 1], channels=[16, 32, 48, 64]),
        frozen_stages=1).train()
    # Warehouses: stem, 3 downsample convs, then (dw, pw) per stage; the
    # stem and stage 0 are frozen.
    grads = [w.requires_grad for w in backbone.warehouse_manager.weights]
    assert grads == [False, True, True, True, False, False] + [True] * 6
    assert not backbone.downsample_layers[0].training
    assert not backbone.stages[0].training and backbone.stages[1].training
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    assert all(p.requires_grad for p in backbone.stages[1].parameters())


@pytest.mark.parametrize('make', [
    lambda cp: KWMobileNetV2(widen_factor=0.35, with_cp=cp),
    lambda cp: KWConvNeXt(
        arch=dict(depths=[1, 1], channels=[16, 32]), with_cp=cp),
])
def test_kw_gradient_checkpointing_gives_the_plain_gradients(make):
    torch.manual_seed(0)
    plain = make(False).train()
    torch.manual_seed(0)
    checkpointed = make(True).train()
    checkpointed.load_state_dict(plain.state_dict())
    for module in (plain, checkpointed):
        for m in module.modules():
            if isinstance(m, KWConv2d):
                m.update_temperature(0.5)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    grads = []
    for module in (plain, checkpointed):
        module(x)[-1].square().sum().backward()
        grads.append({
            n: p.grad.clone()
            for n, p in module.named_parameters() if p.grad is not None
        })
    assert grads[0].keys() == grads[1].keys()
    assert any('warehouse_manager' in n for n in grads[0])
    for name, grad in grads[0].items():
        # Recomputation sums in another order: compare to the grad's scale.
        atol = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=atol)
