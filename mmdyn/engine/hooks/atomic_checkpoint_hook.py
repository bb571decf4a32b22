# Copyright (c) mmdyn contributors. All rights reserved.
"""A checkpoint hook that never leaves the run without a complete checkpoint.

mmengine's ``CheckpointHook`` writes ``epoch_N.pth`` in place, and with
``max_keep_ckpts=N`` deletes the oldest checkpoint *before* writing the new
one: a process killed (or a disk filling up) during the save kept no
complete checkpoint at all with ``N=1``. :class:`AtomicCheckpointHook`, a
``CheckpointHook`` under its own name that configs choose with
``default_hooks.checkpoint.type='AtomicCheckpointHook'``:

* writes every file through :class:`~mmdyn.engine.checkpoint_io.
  AtomicLocalBackend` (its default ``backend_args``): a temporary file
  renamed into place, so a final name only ever holds a complete file;
* records the content hash (:func:`~mmdyn.engine.checkpoint_io.
  add_content_hash`) in ``before_save_checkpoint``; with
  ``CheckpointHook``'s priority (``VERY_LOW``) the hash covers what hooks
  of higher priority add (e.g. :class:`ExactResumeHook`'s random state);
* holds back the removals of checkpoints that fell out of the
  ``max_keep_ckpts`` window (and of the previous best checkpoint for
  ``save_best``) until the new checkpoint is complete: a save that fails
  removes nothing;
* removes, when training starts again, the temporary files a killed save
  left in the checkpoint folder.

Only public parts of ``CheckpointHook`` are overridden (its hook methods
and ``file_backend``). Not covered: mmengine writes ``last_checkpoint``
with a plain ``open``; a kill inside that write (a few bytes) leaves it
empty, which ``tools/train.py --resume`` reports with the newest checkpoint
to resume from (:func:`mmdyn.engine.checkpoint.find_resume_checkpoint`).
A remote ``backend_args`` (``s3``, ``petrel``, ...) keeps that backend's
writes; the hash is recorded all the same.
"""
import contextlib
import os
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ..checkpoint_io import ATOMIC_BACKEND, add_content_hash

__all__ = ['AtomicCheckpointHook']


class _DeferredRemovals:
    """A file backend whose ``remove``/``rmtree`` wait for :meth:`flush`."""

    def __init__(self, backend):
        self.backend = backend
        self.pending = []

    def remove(self, path):
        self.pending.append(('remove', path))

    def rmtree(self, path):
        self.pending.append(('rmtree', path))

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def flush(self, keep=()):
        for action, path in self.pending:
            if path in keep:
                continue
            if action == 'remove' and self.backend.isfile(path):
                self.backend.remove(path)
            elif action == 'rmtree' and self.backend.isdir(path):
                self.backend.rmtree(path)
        self.pending = []


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with atomic, hashed saves that removes old
    checkpoints only after the new one is complete.

    Same arguments as mmengine's ``CheckpointHook``; ``backend_args``
    defaults to ``dict(backend='mmdyn_atomic_local')`` (local files written
    atomically).
    """

    def __init__(self,
                 *args,
                 backend_args=None,
                 file_client_args=None,
                 **kwargs):
        if backend_args is None and file_client_args is None:
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(
            *args,
            backend_args=backend_args,
            file_client_args=file_client_args,
            **kwargs)

    def before_train(self, runner):
        super().before_train(runner)
        if is_main_process() and osp.isdir(self.out_dir):
            self._remove_partial_saves(runner)

    def _remove_partial_saves(self, runner):
        """Remove ``.<name>.pth.<random>.tmp`` files of killed saves."""
        for name in os.listdir(self.out_dir):
            if name.startswith('.') and name.endswith('.tmp') and \
                    '.pth.' in name:
                os.remove(osp.join(self.out_dir, name))
                runner.logger.info(
                    f'removed {name}, left in {self.out_dir} by an '
                    'interrupted checkpoint save')

    def before_save_checkpoint(self, runner, checkpoint):
        add_content_hash(checkpoint)

    @contextlib.contextmanager
    def _removals_after_save(self):
        deferred = _DeferredRemovals(self.file_backend)
        self.file_backend = deferred
        try:
            yield
        finally:
            self.file_backend = deferred.backend
        # Reached only when the save succeeded; never remove what is now
        # the latest or a best checkpoint (a name may have been rewritten).
        current = {self.last_ckpt, getattr(self, 'best_ckpt_path', None)}
        current.update(getattr(self, 'best_ckpt_path_dict', {}).values())
        deferred.flush(keep=current)

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        with self._removals_after_save():
            super().after_train_iter(runner, batch_idx, data_batch, outputs)

    def after_train_epoch(self, runner):
        with self._removals_after_save():
            super().after_train_epoch(runner)

    def after_val_epoch(self, runner, metrics):
        with self._removals_after_save():
            super().after_val_epoch(runner, metrics)
