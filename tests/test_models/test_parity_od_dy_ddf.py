"""Parity of the ODConv / DyConv / DDF classification configs with the
official models: building each config's ``model`` (1000 classes) must give
the exact parameter count measured on the official code (spec.md section 5).
Every config of configs/odconv, configs/dyconv and configs/ddf is also built
for real and run on a tiny input."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmpretrain.registry import MODELS
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import mmdyn.engine  # noqa: F401 (Config.fromfile of 'mmpretrain::' bases)
import mmdyn.models  # noqa: F401

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')

# (config prefix, exact parameter count of the official model, 1000 classes)
PARITY = [
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
]


class ParamsOnMeta(TorchFunctionMode):
    """Create tensors on the meta device, except ``torch.linspace``:
    mmpretrain's ResNet calls ``.item()`` on it (drop-path rates), which a
    meta tensor cannot do. Counting parameters then allocates nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _device_constructors() and func is not torch.linspace
                and kwargs.get('device') is None):
            kwargs['device'] = 'meta'
        return func(*args, **kwargs)


def config_path(prefix):
    folder, name = prefix.split('/')
    matches = glob.glob(osp.join(CONFIG_ROOT, folder, f'{name}_*_in1k.py'))
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


@pytest.mark.parametrize('prefix,expected', PARITY, ids=[p for p, _ in PARITY])
def test_parameter_count_matches_official(prefix, expected):
    cfg = Config.fromfile(config_path(prefix))
    assert cfg.model.head.num_classes == 1000
    with ParamsOnMeta():
        model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_every_parity_row_has_a_config_and_every_config_a_row():
    configs = set()
    for folder in ('odconv', 'dyconv', 'ddf'):
        configs |= {
            f'{folder}/' + osp.basename(p).split('_')[0]
            for p in glob.glob(osp.join(CONFIG_ROOT, folder, '*_in1k.py'))
        }
    assert configs == {p for p, _ in PARITY}


CLS_CONFIGS = sorted(
    p for folder in ('odconv', 'dyconv', 'ddf')
    for p in glob.glob(osp.join(CONFIG_ROOT, folder, '*_in1k.py')))


@pytest.mark.parametrize(
    'path', CLS_CONFIGS, ids=[osp.basename(p) for p in CLS_CONFIGS])
def test_config_builds_and_runs(path):
    cfg = Config.fromfile(path)
    assert dict(type='DynamicTemperatureHook') in cfg.get(
        'custom_hooks', []) or cfg.model.backbone.type == 'DDFResNet'
    cfg.model.head.num_classes = 7
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 32, 32), mode='tensor')
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()
