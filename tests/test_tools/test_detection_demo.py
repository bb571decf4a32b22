# Copyright (c) mmdyn contributors. All rights reserved.
"""A shortened demo run of the ODConv + DDF-Up Mask R-CNN through
tools/train.py and tools/test.py: one epoch on four tiny images, then COCO bbox
and segm evaluation."""
import glob
import os.path as osp

import pytest
import torch
from script_loading import load_script

import mmdyn.engine  # noqa: F401
from mmdyn.datasets.demo_data import make_demo_detection

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(ROOT, 'configs', 'demo',
                  'mask-rcnn_r18-odconv1x_fpn-ddfup_demo.py')


def load_tool(name):
    return load_script(f'tools/{name}.py')


def tiny_data_options(data_root):
    ann = osp.join(data_root, 'annotations')
    options = [
        'train_cfg.max_epochs=1',
        'train_dataloader.batch_size=2',
        'val_dataloader.batch_size=2',
        'test_dataloader.batch_size=2',
        f'val_evaluator.ann_file={ann}/instances_val.json',
        f'test_evaluator.ann_file={ann}/instances_val.json',
        'default_hooks.checkpoint.interval=1',
    ]
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [
            f'{loader}.dataset.data_root={data_root}/',
            f'{loader}.num_workers=0',
            f'{loader}.persistent_workers=False',
        ]
    return options


@pytest.mark.slow
def test_train_then_test_odconv_ddfup_mask_rcnn(tmp_path):
    data_root = str(tmp_path / 'demo_det')
    make_demo_detection(
        data_root, num_train=4, num_val=2, min_size=96, max_size=128)
    options = tiny_data_options(data_root)
    work_dir = str(tmp_path / 'work')

    load_tool('train').main(
        [CONFIG, '--work-dir', work_dir, '--cfg-options', *options])
    checkpoints = glob.glob(osp.join(work_dir, 'epoch_1.pth'))
    assert checkpoints
    state = torch.load(
        checkpoints[0], map_location='cpu', weights_only=False)['state_dict']
    assert any(k.startswith('neck.upsamplers.') for k in state)
    assert any(k.startswith('roi_head.mask_head.upsample.') for k in state)
    # The temperature hook annealed the ODConv temperature below its start.
    temperatures = [v for k, v in state.items() if k.endswith('temperature')]
    assert temperatures and all(float(t) < 30 for t in temperatures)

    metrics = load_tool('test').main([
        CONFIG, checkpoints[0], '--work-dir',
        str(tmp_path / 'test'), '--cfg-options', *options
    ])
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                'coco/segm_mAP_50'):
        assert key in metrics
        assert 0.0 <= metrics[key] <= 1.0
