# Copyright (c) mmdyn contributors. All rights reserved.
"""tools/dist_train.sh: 2-process PyTorch DDP (gloo on CPU) on demo data.

With ``find_unused_parameters=False`` DDP fails in the second iteration if a
parameter got no gradient in the first: running two iterations per rank with
the ODConv, KernelWarehouse (shared warehouses) and DyConv backbones checks
that no dynamic layer leaves a parameter unused.
"""
import os
import os.path as osp
import socket
import subprocess

import pytest

from mmdyn.datasets import make_demo_classification

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize('config', [
    'resnet18_demo_cls.py', 'resnet18-odconv1x_demo_cls.py',
    'resnet18-kw1x_demo_cls.py', 'resnet18-dyconv4x_demo_cls.py'
])
def test_dist_train_two_processes(tmp_path, config):
    cwd = str(tmp_path)
    make_demo_classification(
        osp.join(cwd, 'data', 'demo_cls'), num_train=4, num_val=1)
    env = dict(os.environ, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    proc = subprocess.run([
        'bash',
        osp.join(REPO, 'tools/dist_train.sh'),
        osp.join(REPO, 'configs/demo',
                 config), '2', '--work-dir', 'wd', '--cfg-options',
        'train_cfg.max_epochs=1', 'train_dataloader.batch_size=4',
        'val_dataloader.batch_size=4', 'default_hooks.logger.interval=1'
    ],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # 16 images, 2 ranks x batch 4: 2 iterations per rank per epoch.
    assert 'Epoch(train) [1][2/2]' in output
    assert 'Distributed training: True' in output
    assert 'accuracy/top1' in output
    dumped = [f for f in os.listdir(osp.join(cwd, 'wd')) if f.endswith('.py')]
    cfg_text = open(osp.join(cwd, 'wd', dumped[0])).read()
    assert "backend='gloo'" in cfg_text
    assert 'find_unused_parameters=False' in cfg_text
    assert osp.isfile(osp.join(cwd, 'wd', 'epoch_1.pth'))
