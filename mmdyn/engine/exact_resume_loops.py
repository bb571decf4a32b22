# Copyright (c) mmdyn contributors. All rights reserved.
"""Mmengine's training loops, able to continue from a batch inside an epoch
with the random state of the interrupted run.

Configs choose them with
``train_cfg=dict(type='ExactResumeEpochBasedTrainLoop', max_epochs=...)`` (or
``'ExactResumeIterBasedTrainLoop'``, ``max_iters=...``);
:class:`~mmdyn.engine.hooks.ExactResumeHook` tells them where to continue
(:meth:`resume_at_batch`). Without a resume point they run exactly as
mmengine's loops.

Over a stock base:

* mmdet's schedules name a loop type, so
  ``train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')`` keeps the
  base's ``max_epochs`` and ``val_interval``;
* mmpretrain's say ``by_epoch=True`` instead, and mmengine's
  ``Runner.build_train_loop`` refuses a ``train_cfg`` with both ``type`` and
  ``by_epoch``: such a config replaces the base's ``train_cfg``,
  ``dict(_delete_=True, type='ExactResumeEpochBasedTrainLoop',
  max_epochs=..., val_interval=...)``.

Built directly (``LOOPS.build``), the loops take ``by_epoch`` of their own
kind and refuse the other.
"""
import random

import numpy as np
import torch
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

__all__ = [
    'ExactResumeEpochBasedTrainLoop', 'ExactResumeIterBasedTrainLoop',
    'get_random_state', 'set_random_state'
]


def get_random_state():
    """The global random generators' states, in a weights-only form.

    Returns:
        dict: ``python``, ``numpy``, ``torch`` and, with CUDA, ``cuda``.
    """
    numpy_state = np.random.get_state(legacy=False)
    state = dict(
        python=random.getstate(),
        numpy=dict(
            bit_generator=numpy_state['bit_generator'],
            key=torch.from_numpy(numpy_state['state']['key'].astype(np.int64)),
            pos=int(numpy_state['state']['pos']),
            has_gauss=int(numpy_state['has_gauss']),
            gauss=float(numpy_state['gauss'])),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state):
    """Restore what :func:`get_random_state` returned."""
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state['numpy']
    np.random.set_state(
        dict(
            bit_generator=numpy['bit_generator'],
            state=dict(
                key=numpy['key'].numpy().astype(np.uint32), pos=numpy['pos']),
            has_gauss=numpy['has_gauss'],
            gauss=numpy['gauss']))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[0])


def _check_by_epoch(loop, by_epoch, expected, other):
    """Refuse a ``by_epoch`` of the other loop kind, naming that loop."""
    if by_epoch is None or bool(by_epoch) == expected:
        return
    unit = 'iterations' if expected else 'epochs'
    raise ValueError(
        f'{loop} got by_epoch={by_epoch!r}; for a training length in {unit} '
        f"use train_cfg.type='{other}'")


@LOOPS.register_module()
class ExactResumeEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` whose first epoch after a resume can start at a
    batch inside the epoch.

    Same arguments, plus ``by_epoch`` (only
    ``True``, as stock schedules write it).
    """

    def __init__(self, *args, by_epoch=None, **kwargs):
        _check_by_epoch('ExactResumeEpochBasedTrainLoop', by_epoch, True,
                        'ExactResumeIterBasedTrainLoop')
        super().__init__(*args, **kwargs)
        self._resume_point = None

    def resume_at_batch(self, skip, random_state):
        """Make the next epoch read and drop its first ``skip`` batches (as
        mmengine's iteration-based loop does after a resume), then restore
        ``random_state`` before reading the next one."""
        self._resume_point = (int(skip), random_state)

    def run_epoch(self):
        if self._resume_point is None:
            return super().run_epoch()
        skip, state = self._resume_point
        self._resume_point = None
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        batches = iter(self.dataloader)
        for _ in range(skip):
            next(batches, None)
        set_random_state(state)
        for idx, data_batch in enumerate(batches, start=skip):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


class _RestoreAfterSkip:
    """Iterator proxy: once told to, passes ``skip`` items through, then
    restores a random state before reading the next one."""

    def __init__(self, iterator):
        self.iterator = iterator
        self._skip = 0
        self._state = None

    def restore_after(self, skip, state):
        self._skip, self._state = int(skip), state

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
        elif self._state is not None:
            set_random_state(self._state)
            self._state = None
        return next(self.iterator)

    def __getattr__(self, name):
        return getattr(self.iterator, name)


@LOOPS.register_module()
class ExactResumeIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that restores the interrupted run's random state
    right after skipping the batches already trained on.

    Same
    arguments, plus ``by_epoch`` (only ``False``).
    """

    def __init__(self, *args, by_epoch=None, **kwargs):
        _check_by_epoch('ExactResumeIterBasedTrainLoop', by_epoch, False,
                        'ExactResumeEpochBasedTrainLoop')
        super().__init__(*args, **kwargs)
        self.dataloader_iterator = _RestoreAfterSkip(self.dataloader_iterator)

    def resume_at_batch(self, skip, random_state):
        """Restore ``random_state`` after ``skip`` batches were read (the loop
        reads and drops ``runner.iter`` batches on resume)."""
        self.dataloader_iterator.restore_after(skip, random_state)
