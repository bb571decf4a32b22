# Copyright (c) mmdyn contributors. All rights reserved.
"""Every config in configs/ loads (with its custom_imports) and chooses mmdyn's
atomic checkpoints and exact-resume training loop."""
import functools
import glob
import os.path as osp

import pytest
from mmengine.config import Config

import mmdyn.engine  # noqa: F401  (pkg_resources-free 'mmdet::' bases)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    p for p in glob.glob(
        osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p.split(osp.sep))

EXACT_RESUME_LOOPS = ('ExactResumeEpochBasedTrainLoop',
                      'ExactResumeIterBasedTrainLoop')


@functools.lru_cache(maxsize=None)
def _load(path):
    return Config.fromfile(path)


def test_configs_found():
    names = [osp.basename(p) for p in CONFIGS]
    for name in ('faster-rcnn_r18_fpn_demo.py', 'mask-rcnn_r18_fpn_demo.py',
                 'resnet18_demo_cls.py'):
        assert name in names


@pytest.mark.parametrize(
    'path', CONFIGS, ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_loads(path):
    cfg = _load(path)
    assert 'model' in cfg and 'type' in cfg.model
    imports = cfg.get('custom_imports', {}).get('imports', [])
    for module in imports:
        assert isinstance(module, str)


@pytest.mark.parametrize(
    'path', CONFIGS, ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_chooses_atomic_checkpoints_and_exact_resume(path):
    cfg = _load(path)
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    # The base's checkpoint settings stay.
    assert cfg.default_hooks.checkpoint.interval >= 1
    assert cfg.train_cfg.type in EXACT_RESUME_LOOPS
    # mmengine's Runner refuses a loop type beside by_epoch.
    assert 'by_epoch' not in cfg.train_cfg
    length = 'max_epochs' if cfg.train_cfg.type == EXACT_RESUME_LOOPS[0] \
        else 'max_iters'
    assert cfg.train_cfg[length] >= 1
    assert 'mmdyn.engine' in cfg.custom_imports.imports


def test_demo_configs_content():
    det = Config.fromfile(
        osp.join(REPO, 'configs/demo/'
                 'mask-rcnn_r18_fpn_demo.py'))
    assert det.default_scope == 'mmdet'
    assert det.model.backbone.depth == 18
    assert det.model.roi_head.bbox_head.num_classes == 3
    assert det.model.roi_head.mask_head.num_classes == 3
    assert det.val_evaluator.type == 'CocoMetric'
    assert list(det.val_evaluator.metric) == ['bbox', 'segm']
    assert det.train_dataloader.dataset.data_root == 'data/demo_det/'
    cls = Config.fromfile(osp.join(REPO, 'configs/demo/resnet18_demo_cls.py'))
    assert cls.default_scope == 'mmpretrain'
    assert cls.model.head.num_classes == 4
    assert cls.val_evaluator.type == 'Accuracy'
