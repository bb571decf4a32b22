# Copyright (c) mmdyn contributors. All rights reserved.
"""Mmdet's DetInferencer / init_detector + inference_detector and mmpretrain's
ImageClassificationInferencer with mmdyn configs and checkpoints (saved from
freshly built models) on demo images."""
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import save_checkpoint
from PIL import Image

from mmdyn.datasets.demo_data import (CLS_CLASSES, DET_CLASSES,
                                      make_demo_classification,
                                      make_demo_detection)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_CONFIG = osp.join(REPO, 'configs', 'plug_in',
                      'mask-rcnn_r50_fpn-ddfup_1x_coco.py')
CLS_CONFIG = osp.join(REPO, 'configs', 'plug_in',
                      'resnet18-dynamicresnet-dyconv4x_8xb32_in1k.py')


def _save(cfg, path, classes):
    """Build the config's model (seed 0), save it as an mmengine checkpoint
    with the dataset's class names; return its state dict."""
    from mmengine.registry import MODELS
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # Non-zero running statistics, so that a missed load shows.
    for name, buffer in model.named_buffers():
        if name.endswith('running_mean'):
            buffer.normal_()
    state = model.state_dict()
    save_checkpoint(
        dict(meta=dict(dataset_meta=dict(classes=classes)), state_dict=state),
        path)
    return state


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    """(config path, checkpoint path, state dict, image path)."""
    root = tmp_path_factory.mktemp('infer_det')
    make_demo_detection(
        str(root / 'demo_det'),
        num_train=1,
        num_val=1,
        min_size=64,
        max_size=80)
    cfg = Config.fromfile(DET_CONFIG)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs')
    ]
    cfg.model.roi_head.bbox_head.num_classes = len(DET_CLASSES)
    cfg.model.roi_head.mask_head.num_classes = len(DET_CLASSES)
    # An untrained model scores every class about equally: keep them all.
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    cfg.model.test_cfg.rcnn.max_per_img = 10
    cfg.model.test_cfg.rpn.update(nms_pre=100, max_per_img=20)
    config = str(root / 'det.py')
    cfg.dump(config)
    checkpoint = str(root / 'det.pth')
    state = _save(cfg, checkpoint, DET_CLASSES)
    image = str(root / 'demo_det' / 'val' / '00000.png')
    return config, checkpoint, state, image


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp('infer_cls')
    make_demo_classification(
        str(root / 'demo_cls'), num_train=1, num_val=1, size=64)
    cfg = Config.fromfile(CLS_CONFIG)
    cfg.model.head.num_classes = len(CLS_CLASSES)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='PackInputs')
    ]
    config = str(root / 'cls.py')
    cfg.dump(config)
    checkpoint = str(root / 'cls.pth')
    state = _save(cfg, checkpoint, CLS_CLASSES)
    image = str(root / 'demo_cls' / 'val' / 'square' / '0000.png')
    return config, checkpoint, state, image


def _assert_loaded(model, state):
    own = model.state_dict()
    for key in ('neck.upsamplers.0.channel_branch.0.1.weight',
                'backbone.layer1.0.bn1.running_mean',
                'backbone.layer4.1.conv2.attention.fc2.weight'):
        if key in state:
            torch.testing.assert_close(own[key].cpu(), state[key])


def test_det_inferencer_and_inference_detector_agree(detector, tmp_path):
    from mmdet.apis import DetInferencer, inference_detector, init_detector
    config, checkpoint, state, image = detector
    inferencer = DetInferencer(
        model=config, weights=checkpoint, device='cpu', show_progress=False)
    model = inferencer.model
    assert sum(type(m).__name__ == 'DDFUpsample'
               for m in model.modules()) == 4  # 3 in the FPN + mask head
    _assert_loaded(model, state)
    assert tuple(model.dataset_meta['classes']) == DET_CLASSES
    out_dir = str(tmp_path / 'out')
    result = inferencer(
        image, out_dir=out_dir, no_save_pred=False, pred_score_thr=0.0)
    pred = result['predictions'][0]
    assert len(pred['scores']) == 10
    assert os.listdir(osp.join(out_dir, 'vis'))
    assert os.listdir(osp.join(out_dir, 'preds'))

    detector_model = init_detector(config, checkpoint, device='cpu')
    _assert_loaded(detector_model, state)
    sample = inference_detector(detector_model, image)
    instances = sample.pred_instances
    np.testing.assert_allclose(
        pred['bboxes'], instances.bboxes.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        pred['scores'], instances.scores.numpy(), rtol=1e-4, atol=1e-6)
    assert pred['labels'] == instances.labels.tolist()
    # Masks (through the DDF-Up mask head) at the original image size.
    height, width = Image.open(image).size[::-1]
    assert tuple(instances.masks.shape) == (10, height, width)


def test_image_classification_inferencer(classifier):
    from mmpretrain.apis import ImageClassificationInferencer
    config, checkpoint, state, image = classifier
    inferencer = ImageClassificationInferencer(
        model=config, pretrained=checkpoint, device='cpu')
    model = inferencer.model
    assert sum(type(m).__name__ == 'DyConv2d' for m in model.modules()) == 16
    _assert_loaded(model, state)
    (result, ) = inferencer(image)
    assert result['pred_class'] in CLS_CLASSES
    # By hand: RGB image normalised with ImageNet's mean/std, the saved
    # weights, softmax of the logits.
    from mmengine.registry import MODELS
    init_default_scope('mmpretrain')
    reference = MODELS.build(Config.fromfile(config).model).eval()
    reference.load_state_dict(state)
    rgb = np.asarray(Image.open(image).convert('RGB'), dtype=np.float32)
    mean = np.array([123.675, 116.28, 103.53], dtype=np.float32)
    std = np.array([58.395, 57.12, 57.375], dtype=np.float32)
    x = torch.from_numpy((rgb - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        scores = torch.softmax(reference(x, mode='tensor'), dim=1)[0]
    np.testing.assert_allclose(
        result['pred_scores'], scores.numpy(), rtol=1e-4, atol=1e-6)
    assert result['pred_label'] == int(scores.argmax())
    assert result['pred_class'] == CLS_CLASSES[int(scores.argmax())]
