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


@pytest.mark.parametrize('finished', [True, False])
def test_close_process_group(tmp_path, monkeypatch, finished):
    """A finished rank waits at a barrier for the others before the group is
    destroyed; a failed one does not wait (the others may never come).

    The group is gone afterwards; without a launcher nothing is touched.
    """
    import torch.distributed as dist
    from mmengine import Config

    from mmdyn.engine.launch import close_process_group
    close_process_group(Config(dict(launcher='none')), synchronize=True)
    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    calls = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, 'barrier',
                        lambda *a, **k: calls.append('barrier') or barrier())
    try:
        close_process_group(Config(dict(launcher='none')), synchronize=True)
        assert dist.is_initialized() and calls == []
        close_process_group(
            Config(dict(launcher='pytorch')), synchronize=finished)
        assert calls == (['barrier'] if finished else [])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
