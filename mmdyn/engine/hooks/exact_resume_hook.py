# Copyright (c) mmdyn contributors. All rights reserved.
"""Resume a training run where it stopped, bit for bit.

mmengine restores weights, optimizer, schedulers and counters on
``resume``, but not the random state: a resumed run drew other dropout
masks, augmentations and RPN samples than the uninterrupted one (the
ODConv classification demo: 278 of 330 state tensors differed after one
resumed epoch). :class:`ExactResumeHook` (added by ``tools/train.py``)
with one of the training loops of :mod:`mmdyn.engine.exact_resume_loops`
(``train_cfg.type='ExactResumeEpochBasedTrainLoop'`` or
``'ExactResumeIterBasedTrainLoop'``) makes the two equal on CPU with
deterministic settings:

* **Random state.** Every checkpoint gets ``resume_state``: the Python,
  NumPy and torch CPU generators (and CUDA's, where available) as they were
  at the save, and the training position. On ``resume`` they are restored
  at the point where the uninterrupted run went on from the save: before
  the next epoch's hooks, or right before the next batch is read.
* **Sampler position.** A checkpoint written in the middle of an epoch
  (``CheckpointHook(by_epoch=False)`` in an epoch-based loop) records how
  many batches of the epoch were used; the resumed epoch reads and drops
  them, as mmengine's iteration-based loop does, instead of training on
  them again. (At epoch boundaries the epoch number is the position:
  mmengine's samplers shuffle by ``seed + epoch``.) With mmengine's own
  loops the hook restores the random state at epoch boundaries only, and
  says in the log that a mid-epoch or iteration-based resume is not exact.
* **Validation leaves training randomness alone.** The random state is
  saved before validation and restored after it, so a resumed run, which
  does not repeat the validation done before the interruption, continues
  with the same random streams (and training no longer depends on how
  often it validates).

Not covered, said in the log on resume: dataloader workers with
``persistent_workers=True`` and random transforms (their random streams
live in the worker processes and continue across epochs; use
``persistent_workers=False`` for exact resume), and the other ranks' random
states under ``randomness.diff_rank_seed=True`` in distributed training
(rank 0's states are saved).
"""
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from ..exact_resume_loops import get_random_state, set_random_state

__all__ = ['ExactResumeHook', 'get_random_state', 'set_random_state']

STATE_KEY = 'resume_state'


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Save the random state and the sampler position in checkpoints and
    restore them on ``resume`` (see the module docstring)."""

    priority = 'VERY_HIGH'

    def __init__(self):
        self._loaded = None  # resume_state of the checkpoint just loaded
        self._pending = None  # random state to restore at the next epoch
        self._epoch_in_progress = None  # epoch index while its batches run
        self._epoch_start_iter = 0
        self._resumed_skip = 0
        self._before_val = None

    # --- saving -------------------------------------------------------

    def before_save_checkpoint(self, runner, checkpoint):
        meta = checkpoint.get('meta', {})
        epoch = int(meta.get('epoch', runner.epoch))
        iteration = int(meta.get('iter', runner.iter))
        loop = runner.train_loop if runner._train_loop is not None and \
            not isinstance(runner._train_loop, dict) else None
        batch_in_epoch = None
        if isinstance(loop, EpochBasedTrainLoop):
            # mmengine resumes at the start of meta['epoch']: the batches
            # of that epoch already trained on must be skipped.
            batch_in_epoch = iteration - self._epoch_start_iter \
                if epoch == self._epoch_in_progress else 0
        checkpoint[STATE_KEY] = dict(
            random=get_random_state(),
            epoch=epoch,
            iter=iteration,
            batch_in_epoch=batch_in_epoch)

    # --- loading ------------------------------------------------------

    def after_load_checkpoint(self, runner, checkpoint):
        self._loaded = checkpoint.get(STATE_KEY) if isinstance(
            checkpoint, dict) else None

    def before_train(self, runner):
        loaded, self._loaded = self._loaded, None
        if runner.iter == 0:
            return  # a fresh run, or load_from: nothing to restore
        if loaded is None:
            runner.logger.warning(
                'the resumed checkpoint holds no random state (saved '
                'without ExactResumeHook): the run continues with fresh '
                'random streams and will not repeat an uninterrupted run '
                'exactly')
            return
        if loaded['iter'] != runner.iter:
            runner.logger.warning(
                f"resume_state was saved at iteration {loaded['iter']} but "
                f'the run resumes at {runner.iter}: not restored')
            return
        self._warn_unrestorable(runner)
        loop = runner.train_loop
        state = loaded['random']
        skip = loaded.get('batch_in_epoch') or 0
        if isinstance(loop, IterBasedTrainLoop):
            skip = runner.iter  # the loop reads and drops these first
        if isinstance(loop, IterBasedTrainLoop) or skip > 0:
            if not hasattr(loop, 'resume_at_batch'):
                runner.logger.warning(
                    f'{type(loop).__name__} cannot continue with the random '
                    'state at a batch inside an epoch: the resumed run will '
                    'not repeat an uninterrupted one exactly; set '
                    "train_cfg.type='ExactResumeEpochBasedTrainLoop' (or "
                    "'ExactResumeIterBasedTrainLoop')")
                return
            loop.resume_at_batch(skip, state)
            if isinstance(loop, EpochBasedTrainLoop):
                self._resumed_skip = skip
        elif isinstance(loop, EpochBasedTrainLoop):
            self._pending = state
        else:
            runner.logger.warning(
                f'{type(loop).__name__} is neither an epoch- nor an '
                'iteration-based mmengine loop: random state not restored')
            return
        runner.logger.info('random state restored from the checkpoint' + (
            f' (skipping the {skip} batches of the epoch already used)'
            if skip else ''))

    def before_train_epoch(self, runner):
        self._epoch_in_progress = runner.epoch
        self._epoch_start_iter = runner.iter - self._resumed_skip
        self._resumed_skip = 0
        if self._pending is not None:
            set_random_state(self._pending)
            self._pending = None

    def after_train_epoch(self, runner):
        # Runs before CheckpointHook's save: an epoch-end checkpoint
        # resumes at the start of the next epoch.
        self._epoch_in_progress = None

    @staticmethod
    def _warn_unrestorable(runner):
        loader = runner.train_dataloader
        if getattr(loader, 'num_workers', 0) > 0 and getattr(
                loader, 'persistent_workers', False):
            runner.logger.warning(
                'train_dataloader has persistent_workers=True: random '
                'transforms in its workers continue across epochs and are '
                'not in the checkpoint, so the resumed run may differ from '
                'an uninterrupted one; set persistent_workers=False for an '
                'exact resume')
        if get_world_size() > 1 and runner._randomness_cfg.get(
                'diff_rank_seed', False):
            runner.logger.warning(
                'randomness.diff_rank_seed=True: only rank 0 random state '
                'is saved, so the other ranks do not resume exactly')

    # --- validation leaves the training random streams alone ----------

    def before_val(self, runner):
        if self._is_training(runner):
            self._before_val = get_random_state()

    def after_val_epoch(self, runner, metrics=None):
        if self._before_val is not None:
            set_random_state(self._before_val)
            self._before_val = None

    @staticmethod
    def _is_training(runner):
        loop = runner._train_loop
        return loop is not None and not isinstance(loop, dict)
