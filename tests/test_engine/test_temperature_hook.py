# Copyright (c) mmdyn contributors. All rights reserved.
"""DynamicTemperatureHook: the annealing formula, a real mmengine Runner
(fresh run, resume from a checkpoint, iteration-based loop) and the no-op
warning. Expected values are written out from the official formula
T = end + max(0, (start - end) * (N - it) / N), it = iteration index + 1."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmdyn.engine  # noqa: F401 (registers the hook, applies compat fixes)
import mmdyn.models  # noqa: F401
from mmdyn.engine.hooks import DynamicTemperatureHook
from mmdyn.engine.hooks.temperature_hook import (annealed_value,
                                                 find_temperature_layers)
from mmdyn.ops import DyConv2d, ODConv2d


def test_annealed_value_matches_official_formula():
    # ODConv: T0 = 30, N = 100 -> 1 + 29 * (100 - it) / 100.
    assert annealed_value(30., 1., 100, 0) == pytest.approx(30.)
    assert annealed_value(30., 1., 100, 1) == pytest.approx(29.71)
    assert annealed_value(30., 1., 100, 50) == pytest.approx(15.5)
    assert annealed_value(30., 1., 100, 100) == 1.
    assert annealed_value(30., 1., 100, 250) == 1.
    # KernelWarehouse: tau0 = 1 -> 0.
    assert annealed_value(1., 0., 20, 5) == pytest.approx(0.75)
    assert annealed_value(1., 0., 20, 21) == 0.
    # N is clamped to 1 as KW's max(1, N).
    assert annealed_value(1., 0., 0, 1) == 0.


def test_hook_argument_checks():
    for kwargs in (dict(epochs=0), dict(epochs=-1), dict(iters=0),
                   dict(iters=2.5), dict(start='30'), dict(end=True)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            DynamicTemperatureHook(**kwargs)


class ToyDataset(Dataset):

    def __len__(self):
        return 6

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return dict(
            inputs=torch.rand(3, 8, 8, generator=generator),
            target=torch.tensor(float(index % 2)))


class ToyModel(BaseModel):
    """Two dynamic layers; records the temperatures seen by each forward."""

    def __init__(self, dynamic=True):
        super().__init__()
        if dynamic:
            self.od = ODConv2d(3, 4, 3, padding=1, kernel_num=2)
            self.dy = DyConv2d(4, 4, 1, kernel_num=2)
        else:
            self.od = nn.Conv2d(3, 4, 3, padding=1)
            self.dy = nn.Conv2d(4, 4, 1)
        self.seen = []

    def forward(self, inputs, target=None, mode='tensor'):
        if mode == 'loss' and hasattr(self.od, 'temperature'):
            self.seen.append(
                (float(self.od.temperature), float(self.dy.temperature)))
        out = self.dy(self.od(inputs)).mean(dim=(1, 2, 3))
        if mode == 'loss':
            return dict(loss=((out - target)**2).mean())
        return out


def make_runner(tmp_path,
                model,
                hook_cfg,
                train_cfg,
                resume=False,
                load_from=None):
    return Runner(
        model=model,
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(ToyDataset(), batch_size=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=train_cfg,
        custom_hooks=[hook_cfg],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        resume=resume,
        load_from=load_from,
        default_scope='mmengine',
        log_level='WARNING')


def expected_od(its, n=6):
    return [1 + 29 * max(0, n - it) / n for it in its]


def test_runner_anneals_and_resumes(tmp_path):
    # 3 iterations per epoch; epochs=2 -> N = 6 for both classes.
    model = ToyModel()
    runner = make_runner(tmp_path, model,
                         dict(type='DynamicTemperatureHook', epochs=2),
                         dict(by_epoch=True, max_epochs=3))
    runner.train()
    od_seen = [od for od, _ in model.seen]
    assert od_seen == pytest.approx(expected_od(range(1, 10)))
    # DyConv follows the same 30 -> 1 schedule here.
    assert [dy for _, dy in model.seen] == pytest.approx(od_seen)
    assert runner.message_hub.get_scalar(
        'train/temperature').current() == pytest.approx(1.)

    # The temperature is a buffer: the epoch-1 checkpoint holds the value of
    # its last iteration (it = 3).
    ckpt = torch.load(
        tmp_path / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert float(ckpt['state_dict']['od.temperature']) == pytest.approx(15.5)

    # Resume from epoch 1 into a fresh model: the schedule continues at
    # it = 4, it does not restart from 30.
    resumed = ToyModel()
    runner2 = make_runner(
        tmp_path / 'resumed',
        resumed,
        dict(type='DynamicTemperatureHook', epochs=2),
        dict(by_epoch=True, max_epochs=3),
        resume=True,
        load_from=str(tmp_path / 'epoch_1.pth'))
    runner2.train()
    assert [od for od, _ in resumed.seen
            ] == pytest.approx(expected_od(range(4, 10)))


def test_before_train_sets_start_or_resumed_value():
    model = ToyModel()
    model.od.update_temperature(123.)
    runner = SimpleNamespace(
        model=model,
        iter=0,
        train_dataloader=[None] * 3,
        message_hub=MessageHub.get_instance('test_temperature_hook'))
    hook = DynamicTemperatureHook(start=5., end=2., iters=4)
    hook.before_train(runner)
    assert float(model.od.temperature) == 5.
    assert float(model.dy.temperature) == 5.
    # Resumed at iteration 2: the value set by the last completed iteration.
    runner.iter = 2
    hook.before_train(runner)
    assert float(model.od.temperature) == pytest.approx(2 + 3 * 2 / 4)
    hook.before_train_iter(runner, batch_idx=2)
    assert float(model.od.temperature) == pytest.approx(2 + 3 * 1 / 4)
    assert runner.message_hub.get_scalar(
        'train/temperature').current() == pytest.approx(2.75)


def test_iteration_based_loop(tmp_path):
    model = ToyModel()
    runner = make_runner(
        tmp_path, model,
        dict(type='DynamicTemperatureHook', start=3., end=1., iters=4),
        dict(by_epoch=False, max_iters=6))
    runner.train()
    assert [od for od, _ in model.seen] == pytest.approx(
        [1 + 2 * max(0, 4 - it) / 4 for it in range(1, 7)])

    # epochs with an iteration-based loop: one epoch = len(dataloader) = 3.
    model = ToyModel()
    runner = make_runner(tmp_path / 'epochs', model,
                         dict(type='DynamicTemperatureHook', epochs=1),
                         dict(by_epoch=False, max_iters=4))
    runner.train()
    assert [od for od, _ in model.seen] == pytest.approx(
        [1 + 29 * max(0, 3 - it) / 3 for it in range(1, 5)])


def test_no_dynamic_layers_warns(tmp_path):
    model = ToyModel(dynamic=False)
    runner = make_runner(tmp_path, model, dict(type='DynamicTemperatureHook'),
                         dict(by_epoch=True, max_epochs=1))
    with pytest.warns(UserWarning, match='no layer'):
        runner.train()


def test_find_layers_unwraps_model_wrappers():
    model = ToyModel()
    layers = find_temperature_layers(nn.DataParallel(model))
    assert layers == [model.od, model.dy]
