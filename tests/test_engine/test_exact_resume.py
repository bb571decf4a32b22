# Copyright (c) mmdyn contributors. All rights reserved.
"""An interrupted + resumed run equals the uninterrupted one, bit for bit.

Random state (dropout, augmentation, RPN sampling) and the sampler position
come back from the checkpoint (:class:`mmdyn.engine.ExactResumeHook`). The
demo configs run as shipped (dropout included) but shortened to 2 epochs of
one iteration on four images (two for detection); the uninterrupted run's
epoch-1 checkpoint is what an interrupted run would have left.
"""
import os
import os.path as osp
import shutil
import tempfile

import pytest
import torch
from mmengine.hooks import Hook
from toy_runner import make_runner

from mmdyn.datasets import make_demo_classification, make_demo_detection
from mmdyn.engine.launch import build_runner, load_config, set_resume

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class _Killed(Exception):
    pass


class KillAfterIter(Hook):
    """Stops training abruptly after iteration ``at`` (after its checkpoint:

    CheckpointHook has a higher priority).
    """

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


def _differing(expected, got):
    assert expected.keys() == got.keys()
    return [
        k for k in expected if
        not torch.equal(torch.as_tensor(expected[k]), torch.as_tensor(got[k]))
    ]


def _optimizer_tensors(runner):
    state = runner.optim_wrapper.optimizer.state_dict()['state']
    return {(k, name): v for k, s in state.items() for name, v in s.items()}


def _assert_same_run(straight, resumed):
    assert resumed.iter == straight.iter and resumed.epoch == straight.epoch
    assert not _differing(straight.model.state_dict(),
                          resumed.model.state_dict())
    assert not _differing(
        _optimizer_tensors(straight), _optimizer_tensors(resumed))


@pytest.mark.parametrize('by_epoch', [False, True], ids=['iters', 'epochs'])
def test_toy_resume_with_dropout_mid_epoch(tmp_path, by_epoch):
    # Epoch-based: 6 batches per epoch, killed after batch 4 of epoch 1 (a
    # by_epoch=False checkpoint); the resumed epoch must skip those 4.
    kwargs = dict(
        max_iters=12,
        ckpt_interval=4,
        dynamic=True,
        dropout=0.5,
        dataset_length=24)
    if by_epoch:
        kwargs['max_epochs'] = 2
    straight = make_runner(
        str(tmp_path / 'a'), f'straight_{by_epoch}', **kwargs)
    straight.train()
    assert straight.iter == 12

    killed = make_runner(
        str(tmp_path / 'b'),
        f'killed_{by_epoch}',
        custom_hooks=[KillAfterIter(4)],
        **kwargs)
    with pytest.raises(_Killed):
        killed.train()
    resumed = make_runner(
        str(tmp_path / 'b'), f'resumed_{by_epoch}', resume=True, **kwargs)
    resumed.train()
    _assert_same_run(straight, resumed)


def _demo_run(config, work_dir, options, resume=None):
    options = dict(options)
    if resume is not None:
        options['default_hooks.checkpoint'] = None  # no need: saves time
    cfg = load_config(osp.join(REPO, config), options, work_dir=work_dir)
    set_resume(cfg, resume)
    runner = build_runner(cfg)
    runner.train()
    return runner


SHORT = {
    'train_cfg.max_epochs': 2,
    'train_cfg.val_interval': 100,
    'train_dataloader.batch_size': 4,
    'train_dataloader.dataset.indices': 4,
    'default_hooks.checkpoint.interval': 1,
    'default_hooks.checkpoint.max_keep_ckpts': -1,
    'default_hooks.logger.interval': 1,
    'randomness.deterministic': True,
}
# Classification: the shipped pipeline's random flips run in the main
# process, so that Python's and NumPy's generators are restored too (in a
# worker they are re-seeded every epoch: the KW and DyConv demos, which
# have no dropout, resumed exactly before). Detection: workers that persist
# across epochs keep random streams no checkpoint can hold (ExactResumeHook
# warns about it): one worker, restarted every epoch.
CLS_SHORT = dict(SHORT, **{'train_dataloader.num_workers': 0})
DET_SHORT = dict(
    SHORT, **{
        'train_dataloader.persistent_workers': False,
        'train_dataloader.batch_size': 2,
        'train_dataloader.dataset.indices': 2
    })


@pytest.fixture
def fast_tmp(tmp_path):
    """A temporary folder in memory where there is one (/dev/shm): the demo
    checkpoints are ~100-300 MB with their optimizer state."""
    if not os.access('/dev/shm', os.W_OK):
        yield tmp_path
        return
    folder = tempfile.mkdtemp(prefix='mmdyn-resume-', dir='/dev/shm')
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # two short trainings each, 100-500 MB checkpoints
@pytest.mark.parametrize(
    'config,kind', [
        ('configs/demo/resnet18-odconv1x_demo_cls.py', 'cls'),
        ('configs/demo/resnet18-kw1x_demo_cls.py', 'cls'),
        ('configs/demo/resnet18-dyconv4x_demo_cls.py', 'cls'),
        ('configs/demo/faster-rcnn_r18-odconv1x_fpn_demo.py', 'det'),
    ],
    ids=lambda v: osp.basename(v).split('_')[0] if '/' in v else None)
def test_demo_resume_is_bitwise(fast_tmp, monkeypatch, config, kind):
    monkeypatch.chdir(fast_tmp)
    if kind == 'cls':
        make_demo_classification('data/demo_cls', num_train=1, num_val=1)
        options = CLS_SHORT
    else:
        make_demo_detection('data/demo_det', num_train=2, num_val=1)
        options = DET_SHORT
    straight = _demo_run(config, 'straight', options)
    assert straight.iter == 2
    resumed = _demo_run(
        config, 'resumed', options, resume='straight/epoch_1.pth')
    _assert_same_run(straight, resumed)


def test_validation_leaves_training_randomness_alone(tmp_path):
    # Validation (whose dataloader draws a torch seed) between iterations:
    # training must be the same as without it, so that a resumed run, which
    # does not repeat the validations before the interruption, is exact.
    kwargs = dict(max_iters=6, ckpt_interval=6, dynamic=True, dropout=0.5)
    plain = make_runner(str(tmp_path / 'a'), 'no_val', **kwargs)
    plain.train()
    validated = make_runner(
        str(tmp_path / 'b'), 'val', val_interval=2, **kwargs)
    validated.train()
    _assert_same_run(plain, validated)


@pytest.mark.parametrize(
    'config', [
        'configs/demo/resnet18_demo_cls.py',
        'configs/demo/faster-rcnn_r18_fpn_demo.py',
        'configs/demo/mask-rcnn_r18_fpn_demo.py',
    ],
    ids=lambda v: osp.basename(v).split('_')[0])
def test_demo_configs_choose_exact_resume_and_atomic_saves(config):
    # Chosen in the configs (importing mmdyn changes no default of
    # mmengine's): the configs deriving from these inherit both.
    cfg = load_config(osp.join(REPO, config))
    assert cfg.train_cfg.type == 'ExactResumeEpochBasedTrainLoop'
    assert 'by_epoch' not in cfg.train_cfg
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'


def test_mmengine_loop_resumes_mid_epoch_with_a_warning(tmp_path):
    # With mmengine's own EpochBasedTrainLoop a mid-epoch checkpoint cannot
    # continue with its random state: the hook says so instead of
    # pretending (the run goes on as mmengine resumes it).
    kwargs = dict(
        max_iters=12,
        ckpt_interval=4,
        dynamic=True,
        dropout=0.5,
        dataset_length=24,
        max_epochs=2)
    killed = make_runner(
        str(tmp_path),
        'killed_plain',
        custom_hooks=[KillAfterIter(4)],
        **kwargs)
    with pytest.raises(_Killed):
        killed.train()
    resumed = make_runner(
        str(tmp_path), 'resumed_plain', resume=True, **kwargs)
    resumed._train_loop = dict(by_epoch=True, max_epochs=2)
    warnings = []
    real_warning = resumed.logger.warning
    resumed.logger.warning = lambda msg, *a, **k: (warnings.append(msg),
                                                   real_warning(msg, *a, **k))
    resumed.train()
    assert any('EpochBasedTrainLoop cannot continue with the random state' in w
               and 'ExactResumeEpochBasedTrainLoop' in w for w in warnings)
