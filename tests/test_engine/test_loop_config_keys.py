# Copyright (c) mmdyn contributors. All rights reserved.
"""The exact-resume loops over stock schedule bases.

mmdet's schedules write ``train_cfg = dict(type='EpochBasedTrainLoop',
...)``, mmpretrain's ``dict(by_epoch=True, ...)``. A config body over either
must end with an exact-resume loop that keeps the base's length; mmengine's
``Runner.build_train_loop`` (used as is here) refuses ``type`` beside
``by_epoch``. Built directly, the loops take ``by_epoch`` of their own kind
and refuse the other, naming the loop to use.
"""
import pytest
from mmengine.config import Config
from mmengine.registry import LOOPS
from toy_runner import make_runner

from mmdyn.engine.exact_resume_loops import (ExactResumeEpochBasedTrainLoop,
                                             ExactResumeIterBasedTrainLoop)

MMDET_BASE = ("train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=3, "
              'val_interval=2)\n')
MMPRETRAIN_BASE = 'train_cfg = dict(by_epoch=True, max_epochs=3, ' \
    'val_interval=2)\n'
# The bodies the configs in configs/ use over each kind of base.
MMDET_BODY = "train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')\n"
MMPRETRAIN_BODY = (
    "train_cfg = dict(_delete_=True, type='ExactResumeEpochBasedTrainLoop',"
    '\n                 max_epochs=3, val_interval=2)\n')


@pytest.fixture
def runner(tmp_path):
    return make_runner(str(tmp_path / 'wd'), 'loop_keys', max_iters=4)


def _config(tmp_path, base, body):
    (tmp_path / 'base.py').write_text(base)
    (tmp_path / 'child.py').write_text("_base_ = './base.py'\n" + body)
    return Config.fromfile(str(tmp_path / 'child.py'))


@pytest.mark.parametrize(
    'base,body', [(MMDET_BASE, MMDET_BODY),
                  (MMPRETRAIN_BASE, MMPRETRAIN_BODY)],
    ids=['mmdet', 'mmpretrain'])
def test_config_body_over_a_stock_base_builds_the_exact_loop(
        tmp_path, runner, base, body):
    cfg = _config(tmp_path, base, body)
    loop = runner.build_train_loop(cfg.train_cfg)
    assert type(loop) is ExactResumeEpochBasedTrainLoop
    assert loop.max_epochs == 3
    assert loop.val_interval == 2


def test_mmengine_refuses_a_type_beside_the_bases_by_epoch(tmp_path, runner):
    # Why configs over mmpretrain bases replace train_cfg with _delete_.
    cfg = _config(tmp_path, MMPRETRAIN_BASE, MMDET_BODY)
    with pytest.raises(RuntimeError, match='Only one of `type` or `by_epoch`'):
        runner.build_train_loop(cfg.train_cfg)


def _build(runner, **cfg):
    return LOOPS.build(
        cfg,
        default_args=dict(runner=runner, dataloader=runner._train_dataloader))


@pytest.mark.parametrize('loop,by_epoch,length', [
    (ExactResumeEpochBasedTrainLoop, True, dict(max_epochs=2)),
    (ExactResumeIterBasedTrainLoop, False, dict(max_iters=5)),
])
def test_loop_takes_by_epoch_of_its_kind(runner, loop, by_epoch, length):
    built = _build(runner, type=loop.__name__, by_epoch=by_epoch, **length)
    assert type(built) is loop
    [(key, value)] = length.items()
    assert getattr(built, key) == value


@pytest.mark.parametrize('loop,by_epoch,length,other', [
    (ExactResumeEpochBasedTrainLoop, False, dict(max_epochs=2),
     ExactResumeIterBasedTrainLoop),
    (ExactResumeIterBasedTrainLoop, True, dict(max_iters=5),
     ExactResumeEpochBasedTrainLoop),
])
def test_loop_refuses_by_epoch_of_the_other_kind_naming_its_loop(
        runner, loop, by_epoch, length, other):
    with pytest.raises(ValueError, match=f"type='{other.__name__}'") as info:
        _build(runner, type=loop.__name__, by_epoch=by_epoch, **length)
    assert f'by_epoch={by_epoch}' in str(info.value)
