# Copyright (c) mmdyn contributors. All rights reserved.
"""Every load path refuses a checkpoint of another method, and reaches the
checked loader.

A KernelWarehouse checkpoint given to an ODConv model used to load its few
matching keys with a log warning and leave the ODConv layers random, for
``init_cfg=dict(type='Pretrained')``, ``vis_dynamic`` and the inferencers.
Now each path raises :class:`CheckpointLoadError` naming the missing
ODConv tensors (``load_from``/``tools/test.py``:
``test_checkpoint_integrity.py``).
"""
import os.path as osp

import pytest
import torch
from mmengine.registry import DefaultScope
from toy_runner import ToyNet, make_runner

from mmdyn.engine import CheckpointLoadError
from mmdyn.engine.checkpoint import checked_path, load_model_weights
from mmdyn.engine.checkpoint_io import save_checkpoint
from mmdyn.engine.launch import load_config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ODCONV_CFG = osp.join(REPO, 'configs/demo/resnet18-odconv1x_demo_cls.py')
KW_CFG = osp.join(REPO, 'configs/demo/resnet18-kw1x_demo_cls.py')
OTHER_METHOD = r'no value for \d+ of the \d+ ODConv tensors'


@pytest.fixture(scope='module')
def kw_checkpoint(tmp_path_factory):
    import mmpretrain.models  # noqa: F401
    from mmpretrain.registry import MODELS

    import mmdyn.models  # noqa: F401
    path = str(tmp_path_factory.mktemp('load_paths') / 'kw.pth')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(load_config(KW_CFG).model)
    save_checkpoint(dict(state_dict=model.state_dict(), meta={}), path)
    return path


def _odconv_model():
    import mmpretrain.models  # noqa: F401
    from mmpretrain.registry import MODELS

    import mmdyn.models  # noqa: F401
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(load_config(ODCONV_CFG).model)


def test_init_cfg_pretrained_of_another_method_is_refused(tmp_path):
    # ODConv ToyNet; the "pretrained" file has every tensor but the ODConv
    # layer's (as a KernelWarehouse checkpoint would for it).
    torch.manual_seed(0)
    source = ToyNet(dynamic=True)
    path = str(tmp_path / 'other.pth')
    save_checkpoint(
        dict(
            state_dict={
                k: v
                for k, v in source.state_dict().items()
                if not k.startswith('conv.')
            }), path)
    model = ToyNet(dynamic=True)
    model.init_cfg = dict(type='Pretrained', checkpoint=path)
    runner = make_runner(
        str(tmp_path / 'wd'),
        'pretrained_other',
        max_iters=1,
        dynamic=True,
        model=model)
    with pytest.raises(
            CheckpointLoadError,
            match=r'init_cfg Pretrained .*other\.pth.* has no '
            r'value for \d+ of the \d+ ODConv tensors'):
        runner.train()
    assert runner.iter == 0
    # The same file through the checked loader's scheme: refused as well.
    model = ToyNet(dynamic=True)
    model.init_cfg = dict(type='Pretrained', checkpoint=checked_path(path))
    runner = make_runner(
        str(tmp_path / 'wd2'),
        'pretrained_other2',
        max_iters=1,
        dynamic=True,
        model=model)
    with pytest.raises(CheckpointLoadError, match='ODConv tensors'):
        runner.train()


def test_init_cfg_pretrained_that_fits_trains(tmp_path):
    torch.manual_seed(1)
    source = ToyNet(dynamic=True)
    path = str(tmp_path / 'same.pth')
    save_checkpoint(dict(state_dict=source.state_dict()), path)
    model = ToyNet(dynamic=True)
    model.init_cfg = dict(type='Pretrained', checkpoint=path)
    runner = make_runner(
        str(tmp_path / 'wd'),
        'pretrained_same',
        max_iters=1,
        dynamic=True,
        model=model,
        ckpt_interval=100)
    runner.train()
    assert runner.iter == 1


def test_vis_dynamic_refuses_another_method(kw_checkpoint):
    from mmdyn.analysis.vis_dynamic import build_model
    with pytest.raises(CheckpointLoadError, match=OTHER_METHOD):
        build_model(ODCONV_CFG, kw_checkpoint)


def test_model_of_an_inferencer_refuses_another_method(kw_checkpoint):
    from mmpretrain.apis import ImageClassificationInferencer
    inferencer = ImageClassificationInferencer(
        model=ODCONV_CFG, pretrained=False, device='cpu')
    before = {k: v.clone() for k, v in inferencer.model.state_dict().items()}
    with pytest.raises(CheckpointLoadError, match=OTHER_METHOD):
        load_model_weights(inferencer.model, kw_checkpoint)
    for key, value in inferencer.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inferencer_pretrained_reaches_the_checked_loader(
        kw_checkpoint, tmp_path):
    from mmpretrain.apis import ImageClassificationInferencer
    damaged = str(tmp_path / 'damaged.pth')
    with open(kw_checkpoint, 'rb') as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF  # inside some tensor's record
    with open(damaged, 'wb') as f:
        f.write(bytes(data))
    with pytest.raises(CheckpointLoadError, match=r'damaged\.pth is damaged'):
        ImageClassificationInferencer(
            model=KW_CFG, pretrained=checked_path(damaged), device='cpu')


def test_load_model_weights_loads_a_fitting_checkpoint(kw_checkpoint):
    model = _odconv_model()
    path = kw_checkpoint.replace('kw.pth', 'od.pth')
    torch.manual_seed(3)
    reference = _odconv_model()
    save_checkpoint(dict(state_dict=reference.state_dict()), path)
    load_model_weights(model, path)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_init_cfg_static_weights_for_plugged_layers_need_partial_load(
        tmp_path):
    # Static weights (conv.weight of another shape) for an ODConv layer:
    # PretrainedInit skips the mismatched tensor, the layer stays at its own
    # initialisation. Refused unless the config says allow_partial_load.
    torch.manual_seed(0)
    path = str(tmp_path / 'static.pth')
    save_checkpoint(dict(state_dict=ToyNet(dynamic=False).state_dict()), path)
    for allow in (False, True):
        model = ToyNet(dynamic=True)
        model.init_cfg = dict(type='Pretrained', checkpoint=path)
        runner = make_runner(
            str(tmp_path / f'wd{allow}'),
            f'static_{allow}',
            max_iters=1,
            dynamic=True,
            model=model,
            ckpt_interval=100,
            custom_hooks=[
                dict(
                    type='CheckpointShapeCheckHook', allow_partial_load=allow)
            ])
        if allow:
            # make_runner's default hook would still refuse: drop it.
            runner._hooks = [
                h for h in runner._hooks
                if not (type(h).__name__ == 'CheckpointShapeCheckHook'
                        and not h.allow_partial_load)
            ]
            runner.train()
            assert runner.iter == 1
        else:
            with pytest.raises(CheckpointLoadError, match='ODConv tensors'):
                runner.train()
