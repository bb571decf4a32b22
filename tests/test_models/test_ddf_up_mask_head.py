# Copyright (c) mmdyn contributors. All rights reserved.
"""DDFUpFCNMaskHead: FCNMaskHead whose upsampler can be DDF-Up."""
import copy
import os.path as osp

import mmdet
import pytest
import torch
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs, demo_mm_proposals
from mmengine.config import Config

import mmdyn.models  # noqa: F401
from mmdyn.models.heads import DDFUpFCNMaskHead

CHANNELS = 16
NUM_CLASSES = 3


def build_head(**kwargs):
    cfg = dict(
        type='DDFUpFCNMaskHead',
        num_convs=2,
        in_channels=CHANNELS,
        conv_out_channels=CHANNELS,
        num_classes=NUM_CLASSES)
    cfg.update(kwargs)
    return MODELS.build(cfg)


def test_default_is_ddf_up_and_output_is_28x28():
    head = build_head()
    head.init_weights()
    assert head.upsample_cfg['type'] == 'ddf_up'
    assert type(head.upsample).__name__ == 'DDFUpsample'
    rois = torch.randn(5, CHANNELS, 14, 14)
    out = head(rois)
    assert out.shape == (5, NUM_CLASSES, 28, 28)
    # conv_logits follows the upsampler directly, as for carafe.
    with torch.no_grad():
        x = rois
        for conv in head.convs:
            x = conv(x)
        expected = head.conv_logits(head.upsample(x))
    torch.testing.assert_close(out.detach(), expected)


def test_class_agnostic_and_no_convs():
    head = build_head(num_convs=0, class_agnostic=True)
    out = head(torch.randn(2, CHANNELS, 14, 14))
    assert out.shape == (2, 1, 28, 28)


def test_stock_upsamplers_behave_like_fcn_mask_head():
    kwargs = dict(
        num_convs=2,
        in_channels=CHANNELS,
        conv_out_channels=CHANNELS,
        num_classes=NUM_CLASSES)
    for upsample_cfg in [
            dict(type='deconv', scale_factor=2),
            dict(type='bilinear', scale_factor=2), None
    ]:
        cfg = {} if upsample_cfg is None else dict(upsample_cfg=upsample_cfg)
        ours = DDFUpFCNMaskHead(**kwargs, **copy.deepcopy(cfg))
        stock = FCNMaskHead(**kwargs, **copy.deepcopy(cfg))
        if upsample_cfg is None:  # both defaults differ: ours is ddf_up
            assert type(ours.upsample).__name__ == 'DDFUpsample'
            assert stock.upsample_method == 'deconv'
            continue
        stock.load_state_dict(ours.state_dict(), strict=True)
        rois = torch.randn(3, CHANNELS, 14, 14)
        with torch.no_grad():
            torch.testing.assert_close(ours(rois), stock(rois))


def test_other_upsampler_conventions():
    head = build_head(upsample_cfg=dict(type='pixel_shuffle', scale_factor=2))
    assert head(torch.randn(2, CHANNELS, 14, 14)).shape[-2:] == (28, 28)


def test_init_weights_runs_the_upsampler_own_init(monkeypatch):
    head = build_head()
    calls = []
    upsample_cls = type(head.upsample)
    if hasattr(upsample_cls, 'init_weights'):
        original = upsample_cls.init_weights

        def spy(self):
            calls.append(self)
            return original(self)

        monkeypatch.setattr(upsample_cls, 'init_weights', spy)
    head.init_weights()
    assert head.upsample is not None
    if hasattr(upsample_cls, 'init_weights'):
        assert calls and calls[-1] is head.upsample


def test_errors():
    with pytest.raises(ValueError, match='guided'):
        build_head(upsample_cfg=dict(type='ddf_up', guided=True))
    with pytest.raises(ValueError, match='upsample_cfg'):
        build_head(upsample_cfg='ddf_up')
    with pytest.raises(ValueError, match='scale_factor'):
        build_head(upsample_cfg=dict(type='ddf_up', scale_factor=0))


def test_roi_head_loss_forward_backward():
    """Mask R-CNN's StandardRoIHead with our mask head: mask loss and gradients
    into the DDF-Up upsampler."""
    cfg = Config.fromfile(
        osp.join(
            osp.dirname(mmdet.__file__), '.mim', 'configs', 'mask_rcnn',
            'mask-rcnn_r50_fpn_1x_coco.py'))
    roi_head = copy.deepcopy(cfg.model.roi_head)
    roi_head.bbox_roi_extractor.out_channels = CHANNELS
    roi_head.mask_roi_extractor.out_channels = CHANNELS
    roi_head.bbox_head.update(
        in_channels=CHANNELS, fc_out_channels=32, num_classes=NUM_CLASSES)
    roi_head.mask_head = dict(
        type='DDFUpFCNMaskHead',
        num_convs=2,
        in_channels=CHANNELS,
        conv_out_channels=CHANNELS,
        num_classes=NUM_CLASSES,
        upsample_cfg=dict(type='ddf_up', scale_factor=2))
    roi_head.train_cfg = cfg.model.train_cfg.rcnn
    roi_head.test_cfg = cfg.model.test_cfg.rcnn
    head = MODELS.build(roi_head)
    head.init_weights()

    shape = (3, 64, 64)
    packed = demo_mm_inputs(
        batch_size=2,
        image_shapes=[shape, shape],
        num_items=[2, 3],
        num_classes=NUM_CLASSES,
        with_mask=True)
    samples = [p for p in packed['data_samples']]
    feats = tuple(
        torch.randn(2, CHANNELS, 64 // s, 64 // s, requires_grad=True)
        for s in (4, 8, 16, 32, 64))
    proposals = demo_mm_proposals([shape, shape], 50)
    losses = head.loss(feats, proposals, samples)
    assert losses['loss_mask'].item() > 0
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    for name, param in head.mask_head.upsample.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), (
            name)

    head.eval()
    with torch.no_grad():
        results = head.predict(
            feats,
            demo_mm_proposals([shape, shape], 20),
            samples,
            rescale=False)
    assert len(results) == 2
    masks = results[0].masks
    assert masks.dim() == 3 and masks.shape[0] == len(results[0].bboxes)
