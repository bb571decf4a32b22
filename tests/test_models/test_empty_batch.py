# Copyright (c) mmdyn contributors. All rights reserved.
"""The DDF-Up neck and mask head on empty batches, as their stock counterparts
(mmdet's FPN and FCNMaskHead), and a DDF-Up Mask R-CNN training step on batches
with an image without ground truth."""
import copy
import os.path as osp

import pytest
import torch
from mmdet.models.necks import FPN
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS as DET_MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdyn.engine  # noqa: F401  (compat fixes needed by 'mmdet::' bases)
import mmdyn.models  # noqa: F401
from mmdyn.models.heads import DDFUpFCNMaskHead
from mmdyn.models.necks import DDFUpFPN

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
IN_CHANNELS = [8, 16, 32]

register_all_modules(init_default_scope=False)


def _features(batch, size=32):
    return tuple(
        torch.randn(batch, c, size // 2**i, size // 2**i, requires_grad=True)
        for i, c in enumerate(IN_CHANNELS))


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize(
    'upsample_cfg', [
        dict(type='ddf_up'),
        dict(type='ddf_up', guided=True),
    ],
    ids=['ddf_up', 'guided'])
def test_ddf_up_fpn_empty_batch_as_fpn(upsample_cfg, train):
    kwargs = dict(in_channels=IN_CHANNELS, out_channels=8, num_outs=4)
    neck = DDFUpFPN(upsample_cfg=upsample_cfg, **kwargs).train(train)
    stock = FPN(**kwargs).train(train)
    feats = _features(0)
    outs, expected = neck(feats), stock(_features(0))
    assert [o.shape for o in outs] == [e.shape for e in expected]
    sum(o.sum() for o in outs).backward()
    for feat in feats:
        assert feat.grad is not None and feat.grad.shape == feat.shape
    for name, param in neck.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_ddf_up_mask_head_no_rois_as_fcn_mask_head(train):
    kwargs = dict(
        num_convs=2, in_channels=16, conv_out_channels=16, num_classes=3)
    head = DDFUpFCNMaskHead(**kwargs).train(train)
    stock = FCNMaskHead(**kwargs).train(train)
    rois = torch.randn(0, 16, 14, 14, requires_grad=True)
    out = head(rois)
    assert out.shape == stock(rois.detach()).shape == (0, 3, 28, 28)
    out.sum().backward()
    assert rois.grad.shape == rois.shape
    for name, param in head.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


def _demo_detector(config):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo', config))
    cfg.model.train_cfg.rcnn.sampler.num = 32
    init_default_scope('mmdet')
    model = DET_MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    return model.train()


def _batch(num_items, size=64):
    return demo_mm_inputs(
        batch_size=len(num_items),
        image_shapes=[(3, size, size)] * len(num_items),
        num_items=num_items,
        num_classes=3,
        with_mask=True)


@pytest.mark.parametrize(
    'num_items', [[2, 0], [0]], ids=['one_image_without_gt', 'no_gt_at_all'])
@pytest.mark.parametrize(
    'config',
    ['mask-rcnn_r18_fpn_demo.py', 'mask-rcnn_r18-odconv1x_fpn-ddfup_demo.py'],
    ids=['stock', 'ddfup'])
def test_mask_rcnn_trains_through_images_without_ground_truth(
        config, num_items):
    torch.manual_seed(0)
    model = _demo_detector(config)
    data = model.data_preprocessor(_batch(num_items), True)
    for sample in data['data_samples']:
        assert len(sample.gt_instances) in num_items
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    assert 'loss_mask' in losses
    total.backward()
    if 'ddfup' in config:
        upsamplers = [model.neck.upsamplers, model.roi_head.mask_head.upsample]
        for module in upsamplers:
            for name, param in module.named_parameters():
                assert param.grad is not None, name
                assert torch.isfinite(param.grad).all(), name
