# Copyright (c) mmdyn contributors. All rights reserved.
"""Plug-in configs: dynamic layers put into a stock backbone that starts
from stock ImageNet weights.

Those weights have no value for the new layers (by design: they start from
their own initialisation, like DCN layers), which the shape check refuses
before the first iteration unless the config says so. The plug-in configs
say ``allow_partial_load = 'static_weights'``: a checkpoint of the static
network passes, one of another dynamic layer type (KernelWarehouse weights
for ODConv layers) is still refused.
"""
import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.registry import HOOKS, DefaultScope

from mmdyn.engine import CheckpointLoadError
from mmdyn.engine.checkpoint_io import save_checkpoint
from mmdyn.engine.launch import add_checkpoint_check, load_config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ODCONV_PLUG_IN = osp.join(
    REPO, 'configs/odconv/faster-rcnn_r50-odconv1x-c3-c5_fpn_1x_coco.py')
KW_PLUG_IN = osp.join(REPO,
                      'configs/plug_in/faster-rcnn_r50-kw-dcn_fpn_1x_coco.py')
STOCK = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
STOCK_WEIGHTS = ('torchvision://', 'open-mmlab://')


def _stock_based_configs():
    """(config, its stock mmdet base) of the configs whose backbone starts
    from the stock base's ImageNet weights (read from the file: loading
    every config here would slow down collecting the tests)."""
    found = []
    for path in sorted(
            glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                      recursive=True)):
        with open(path, encoding='utf-8') as f:
            text = f.read()
        base = re.search(r"^_base_ = '(mmdet::[^']*)'", text, re.M)
        # Configs over weights of their own method name a work_dirs file.
        if base is not None and 'work_dirs/' not in text:
            found.append((path, base.group(1)))
    return found


class _Runner:
    """What the shape check's ``before_train`` reads of a runner."""

    def __init__(self, model):
        self.model = model


def _backbone(config, pretrained=None):
    import mmdet.models  # noqa: F401
    from mmdet.registry import MODELS

    import mmdyn.models  # noqa: F401
    cfg = load_config(config).model.backbone
    cfg.init_cfg = None if pretrained is None else dict(
        type='Pretrained', checkpoint=pretrained)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def _save_weights_of(config, path):
    save_checkpoint(
        dict(state_dict=_backbone(config).state_dict(), meta={}), path)
    return path


def _shape_check_of(config, **overrides):
    """The config's CheckpointShapeCheckHook, as tools/train.py adds it."""
    cfg = load_config(config, cfg_options=overrides)
    add_checkpoint_check(cfg)
    [hook] = [
        h for h in cfg.custom_hooks if h['type'] == 'CheckpointShapeCheckHook'
    ]
    return HOOKS.build(hook)


@pytest.fixture(scope='module')
def stock_weights(tmp_path_factory):
    # Stock ResNet-50 weights (random values, the keys and shapes of the
    # torchvision checkpoint the config names).
    path = str(tmp_path_factory.mktemp('plug_in') / 'stock_r50.pth')
    return _save_weights_of(STOCK, path)


def test_plug_in_config_allows_static_weights_only():
    cfg = load_config(ODCONV_PLUG_IN)
    assert cfg.model.backbone.init_cfg.checkpoint == 'torchvision://resnet50'
    assert cfg.allow_partial_load == 'static_weights'


def test_stock_weights_are_refused_without_the_config_key(stock_weights):
    model = _backbone(ODCONV_PLUG_IN, stock_weights)
    hook = _shape_check_of(ODCONV_PLUG_IN, allow_partial_load=False)
    with pytest.raises(
            CheckpointLoadError,
            match='no value for 182 of the 182 ODConv tensors'):
        hook.before_train(_Runner(model))


def test_plug_in_config_trains_from_stock_weights(stock_weights):
    model = _backbone(ODCONV_PLUG_IN, stock_weights)
    # The stock tensors were loaded where the shapes fit ...
    stock = torch.load(stock_weights, weights_only=True)['state_dict']
    assert torch.equal(model.conv1.weight, stock['conv1.weight'])
    assert torch.equal(model.layer2[0].conv1.weight,
                       stock['layer2.0.conv1.weight'])
    # ... and the shape check lets training start.
    _shape_check_of(ODCONV_PLUG_IN).before_train(_Runner(model))


def test_plug_in_config_refuses_weights_of_another_dynamic_layer(tmp_path):
    kw_weights = _save_weights_of(KW_PLUG_IN, str(tmp_path / 'kw.pth'))
    model = _backbone(ODCONV_PLUG_IN, kw_weights)
    hook = _shape_check_of(ODCONV_PLUG_IN)
    with pytest.raises(CheckpointLoadError) as info:
        hook.before_train(_Runner(model))
    message = str(info.value)
    assert 'ODConv tensors' in message
    assert 'another layer type' in message
    assert 'layer2.0.conv2.warehouse.weights.0' in message
    # --allow-partial-load (True) still loads it, with a warning.
    _shape_check_of(
        ODCONV_PLUG_IN, allow_partial_load=True).before_train(_Runner(model))


@pytest.fixture(scope='module')
def stock_weights_of(tmp_path_factory):
    saved = {}

    def weights(base):
        if base not in saved:
            path = str(tmp_path_factory.mktemp('stock') / 'backbone.pth')
            saved[base] = _save_weights_of(base, path)
        return saved[base]

    return weights


@pytest.mark.slow
@pytest.mark.parametrize(
    'path,base',
    _stock_based_configs(),
    ids=lambda value: osp.relpath(value, REPO) if osp.isabs(value) else None)
def test_every_stock_based_config_starts_from_stock_weights(
        path, base, stock_weights_of):
    # Passes the shape check with its stock base's backbone weights; a
    # config that says allow_partial_load needs it (refused without).
    init_cfg = load_config(path).model.backbone.init_cfg
    assert init_cfg.checkpoint.startswith(STOCK_WEIGHTS)
    model = _backbone(path, stock_weights_of(base))
    _shape_check_of(path).before_train(_Runner(model))
    if load_config(path).get('allow_partial_load'):
        with pytest.raises(CheckpointLoadError, match='no value for'):
            _shape_check_of(
                path, allow_partial_load=False).before_train(_Runner(model))
