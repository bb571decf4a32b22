# Copyright (c) mmdyn contributors. All rights reserved.
"""Every demo config trains under ``--amp`` (bf16 autocast on CPU) without
NaN/inf: two iterations of the real config through the tools' runner path, on
two images, checking the logged loss and every parameter afterwards."""
import glob
import math
import os.path as osp

import pytest
import torch

from mmdyn.engine.launch import build_runner, enable_amp, load_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIGS = sorted(
    osp.relpath(p, ROOT)
    for p in glob.glob(osp.join(ROOT, 'configs', 'demo', '*.py')))


def test_demo_configs_found():
    assert len(DEMO_CONFIGS) >= 6


@pytest.mark.parametrize('config', DEMO_CONFIGS)
def test_demo_config_trains_under_amp(config, tmp_path):
    cfg = load_config(
        osp.join(ROOT, config),
        cfg_options={
            'train_dataloader.batch_size': 2,
            'train_dataloader.num_workers': 0,
            'train_dataloader.persistent_workers': False,
            'train_dataloader.dataset.indices': 4,
            'train_cfg.max_epochs': 1,
            'train_cfg.val_interval': 100,
            'default_hooks.logger.interval': 1,
        },
        work_dir=str(tmp_path))
    enable_amp(cfg)
    assert cfg.optim_wrapper.type in ('CPUAmpOptimWrapper', 'AmpOptimWrapper')
    cfg.pop('val_dataloader', None)
    cfg.pop('val_evaluator', None)
    cfg.pop('val_cfg', None)
    cfg.pop('test_dataloader', None)
    cfg.pop('test_evaluator', None)
    cfg.pop('test_cfg', None)
    runner = build_runner(cfg)
    runner.train()
    assert runner.iter == 2
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert math.isfinite(loss), f'{config}: loss {loss} under --amp'
    for name, param in runner.model.named_parameters():
        assert torch.isfinite(param).all(), f'{config}: {name} not finite'
