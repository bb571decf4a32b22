"""tools/train.py and tools/test.py end to end on the demo configs.

Shortened by --cfg-options to a couple of images and iterations: these check
the plumbing (metrics keys, checkpoints, resume, --amp, --out, --show-dir),
not accuracy. Each run is a fresh process in a temporary folder, so the demo
data is generated there ("created on first use").
"""
import glob
import math
import os.path as osp
import pickle
import re
import subprocess
import sys

import pytest

from mmdyn.datasets import make_demo_classification, make_demo_detection

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_CFG = osp.join(REPO, 'configs/demo/faster-rcnn_r18_fpn_demo.py')
CLS_CFG = osp.join(REPO, 'configs/demo/resnet18_demo_cls.py')


def run_tool(args, cwd, timeout=600):
    proc = subprocess.run([sys.executable] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def losses(output):
    return [float(v) for v in re.findall(r'\bloss: ([-\w.+]+)', output)]


DET_SMALL = [
    'train_dataloader.batch_size=2', 'train_dataloader.dataset.indices=2',
    'val_dataloader.batch_size=2', 'val_dataloader.dataset.indices=2',
    'test_dataloader.batch_size=2', 'test_dataloader.dataset.indices=2',
    'default_hooks.logger.interval=1'
]


@pytest.mark.slow
def test_detection_train_resume_test(tmp_path):
    cwd = str(tmp_path)
    # Small demo set made up front; the tools find it complete.
    make_demo_detection(osp.join(cwd, 'data', 'demo_det'), num_train=4,
                        num_val=2)
    train = [osp.join(REPO, 'tools/train.py'), DET_CFG, '--work-dir', 'wd']
    out = run_tool(train + ['--amp', '--cfg-options',
                            'train_cfg.max_epochs=1'] + DET_SMALL, cwd)
    assert 'CPUAmpOptimWrapper' in out or 'AmpOptimWrapper' in out
    values = losses(out)
    assert values and all(math.isfinite(v) for v in values), values
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75'):
        assert key in out
    assert osp.isfile(osp.join(cwd, 'wd', 'epoch_1.pth'))

    out = run_tool(train + ['--resume', '--cfg-options',
                            'train_cfg.max_epochs=2'] + DET_SMALL, cwd)
    assert 'resumed epoch: 1, iter: 1' in out
    assert 'Epoch(train) [2]' in out and 'Epoch(train) [1]' not in out
    assert osp.isfile(osp.join(cwd, 'wd', 'epoch_2.pth'))

    out = run_tool([osp.join(REPO, 'tools/test.py'), DET_CFG, 'wd/epoch_2.pth',
                    '--work-dir', 'wd_test', '--out', 'preds.pkl',
                    '--show-dir', 'vis', '--cfg-options'] + DET_SMALL, cwd)
    assert 'coco/bbox_mAP' in out
    with open(osp.join(cwd, 'preds.pkl'), 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 2 and 'pred_instances' in preds[0]
    assert glob.glob(osp.join(cwd, 'wd_test', '*', 'vis', '*.png'))


@pytest.mark.slow
def test_classification_amp_train_and_test(tmp_path):
    cwd = str(tmp_path)
    make_demo_classification(osp.join(cwd, 'data', 'demo_cls'), num_train=4,
                             num_val=2)
    small = ['train_cfg.max_epochs=1', 'train_dataloader.batch_size=8',
             'val_dataloader.batch_size=8', 'test_dataloader.batch_size=8',
             'default_hooks.logger.interval=1']
    out = run_tool([osp.join(REPO, 'tools/train.py'), CLS_CFG, '--work-dir',
                    'wd', '--amp', '--cfg-options'] + small, cwd)
    values = losses(out)
    assert values and all(math.isfinite(v) for v in values), values
    assert 'accuracy/top1' in out
    out = run_tool([osp.join(REPO, 'tools/test.py'), CLS_CFG, 'wd/epoch_1.pth',
                    '--work-dir', 'wd', '--out', 'preds.pkl',
                    '--cfg-options'] + small, cwd)
    assert 'accuracy/top1' in out
    with open(osp.join(cwd, 'preds.pkl'), 'rb') as f:
        assert len(pickle.load(f)) == 8


def test_resume_and_amp_flags(tmp_path):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import train
    finally:
        sys.path.pop(0)
    assert train.parse_args(['c.py', '--resume']).resume == 'auto'
    assert train.parse_args(['c.py', '--resume', 'x.pth']).resume == 'x.pth'
    assert train.parse_args(['c.py']).resume is None
    from mmdyn.engine.launch import enable_amp, load_config, set_resume
    cfg = load_config(DET_CFG, launcher='pytorch',
                      work_dir=str(tmp_path))
    enable_amp(cfg)
    assert cfg.optim_wrapper.type in ('CPUAmpOptimWrapper', 'AmpOptimWrapper')
    set_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from is None
    import torch
    if not torch.cuda.is_available():
        assert cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert cfg.model_wrapper_cfg.device_ids is None
        assert cfg.model_wrapper_cfg.find_unused_parameters is False
