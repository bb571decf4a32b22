# Copyright (c) mmdyn contributors. All rights reserved.
"""Resume exactness: N iterations straight == N/2, kill, resume, N/2.

On CPU with deterministic settings the two runs must agree bitwise: model
weights and buffers (BN statistics, the ODConv temperature), optimizer state
(SGD momentum) and the learning-rate schedule.
"""
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from toy_runner import make_runner

N = 8


class _Killed(Exception):
    pass


class KillAfterIter(Hook):
    """Stops training abruptly after iteration ``at`` (after its checkpoint
    was written: CheckpointHook has a higher priority)."""

    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.at:
            raise _Killed


def _optimizer_tensors(runner):
    state = runner.optim_wrapper.optimizer.state_dict()['state']
    return {(k, name): v for k, s in state.items() for name, v in s.items()}


@pytest.mark.parametrize('dynamic', [False, True], ids=['static', 'odconv'])
def test_resume_is_bitwise_exact(tmp_path, dynamic):
    straight = make_runner(
        str(tmp_path / 'a'),
        f'straight_{dynamic}',
        max_iters=N,
        ckpt_interval=N,
        dynamic=dynamic)
    straight.train()

    killed = make_runner(
        str(tmp_path / 'b'),
        f'killed_{dynamic}',
        max_iters=N,
        ckpt_interval=N // 2,
        dynamic=dynamic,
        custom_hooks=[KillAfterIter(N // 2)])
    with pytest.raises(_Killed):
        killed.train()
    ckpt = osp.join(str(tmp_path / 'b'), f'iter_{N // 2}.pth')
    assert osp.isfile(ckpt)
    del killed

    resumed = make_runner(
        str(tmp_path / 'b'),
        f'resumed_{dynamic}',
        max_iters=N,
        ckpt_interval=N // 2,
        dynamic=dynamic,
        resume=True,
        load_from=ckpt)
    resumed.train()
    assert resumed.iter == straight.iter == N

    expected = straight.model.state_dict()
    got = resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    if dynamic:
        temperature = got['conv.temperature']
        # Annealed 30 -> 1 over N iterations: the last value is not 30.
        assert float(temperature) < 30
        assert torch.equal(temperature, expected['conv.temperature'])

    opt_a, opt_b = _optimizer_tensors(straight), _optimizer_tensors(resumed)
    assert opt_a.keys() == opt_b.keys() and opt_a
    for key in opt_a:
        assert torch.equal(
            torch.as_tensor(opt_a[key]), torch.as_tensor(opt_b[key])), key
    assert [g['lr'] for g in straight.optim_wrapper.param_groups] == \
        [g['lr'] for g in resumed.optim_wrapper.param_groups]
