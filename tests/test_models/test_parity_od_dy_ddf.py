# Copyright (c) mmdyn contributors. All rights reserved.
"""Parity of the ODConv / DyConv / DDF classification configs with the
official models: building each config's ``model`` (1000 classes) must give
the exact parameter count of the model the official code builds.
Each config's model also runs a forward pass on a tiny input."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmpretrain.registry import MODELS

import mmdyn.engine  # noqa: F401 (Config.fromfile of 'mmpretrain::' bases)
import mmdyn.models  # noqa: F401

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')

# (config prefix, exact parameter count of the official model, 1000 classes)
PARITY = dict([
    ('odconv/resnet18-odconv1x', 11_943_944),
    ('odconv/resnet18-odconv4x', 44_901_640),
    ('odconv/resnet50-odconv1x', 28_635_112),
    ('odconv/resnet50-odconv4x', 90_670_888),
    ('odconv/resnet101-odconv1x', 50_818_769),
    ('odconv/resnet101-odconv2x', 90_441_623),
    ('odconv/mobilenet-v2-odconv1x', 4_940_185),
    ('odconv/mobilenet-v2-odconv4x', 11_512_149),
    ('odconv/mobilenet-v2-w0.75-odconv1x', 3_507_113),
    ('odconv/mobilenet-v2-w0.75-odconv4x', 7_496_013),
    ('odconv/mobilenet-v2-w0.5-odconv1x', 2_425_537),
    ('odconv/mobilenet-v2-w0.5-odconv4x', 4_435_501),
    ('ddf/resnet50-ddf-mul', 16_843_748),
    ('ddf/resnet50-ddf-add', 16_843_748),
    ('ddf/resnet101-ddf-mul', 28_146_912),
    ('ddf/resnet101-ddf-add', 28_146_912),
    ('dyconv/resnet18-dyconv4x', 45_475_008),
    ('dyconv/resnet50-dyconv4x', 100_895_176),
])

CLS_CONFIGS = sorted(
    p for folder in ('odconv', 'dyconv', 'ddf')
    for p in glob.glob(osp.join(CONFIG_ROOT, folder, '*_in1k.py')))


@pytest.fixture
def skip_init(monkeypatch):
    """Turn ``torch.nn.init``'s in-place initialisers into no-ops: building the
    big models then costs an allocation, not minutes of random-number
    generation.

    Parameters are filled explicitly where values matter.
    """
    for name in dir(torch.nn.init):
        if name.endswith('_') and not name.startswith('_'):
            monkeypatch.setattr(torch.nn.init, name,
                                lambda tensor, *args, **kwargs: tensor)


def test_every_parity_row_has_a_config_and_every_config_a_row():
    configs = {osp.relpath(p, CONFIG_ROOT).split('_')[0] for p in CLS_CONFIGS}
    assert configs == set(PARITY)


@pytest.mark.parametrize(
    'path', CLS_CONFIGS, ids=[osp.basename(p) for p in CLS_CONFIGS])
def test_config_parameter_count_and_forward(path, skip_init):
    cfg = Config.fromfile(path)
    assert cfg.model.head.num_classes == 1000
    # Every config anneals the temperature of its dynamic layers (DDF has
    # none).
    if cfg.model.backbone.type != 'DDFResNet':
        assert dict(type='DynamicTemperatureHook') in cfg.custom_hooks
    model = MODELS.build(cfg.model)
    prefix = osp.relpath(path, CONFIG_ROOT).split('_')[0]
    assert sum(p.numel() for p in model.parameters()) == PARITY[prefix]

    # A tiny forward pass through the built model, in training mode so that
    # batch statistics keep the activations of the randomly filled network
    # bounded.
    # Constants per tensor (cheap for 100M parameters) break enough symmetry
    # for a smoke test.
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.fill_(0.01 * (i % 7 - 3) + 0.005)
        logits = model.train()(torch.rand(2, 3, 32, 32), mode='tensor')
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
