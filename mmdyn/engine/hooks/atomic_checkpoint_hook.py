"""mmengine's ``CheckpointHook``, never without a complete checkpoint.

With ``max_keep_ckpts=N`` mmengine deletes the oldest checkpoint *before*
writing the new one, and writes ``last_checkpoint`` in place: a process
killed during the save kept no complete checkpoint at all (with ``N=1``),
and could leave ``last_checkpoint`` empty. :class:`AtomicCheckpointHook`
saves first (atomically, see :mod:`mmdyn.engine.checkpoint_io`), then
rewrites ``last_checkpoint`` atomically, and only then removes the
checkpoints that fell out of the ``max_keep_ckpts`` window (the previous
best checkpoint too, for ``save_best``). A save that fails removes nothing.
Temporary files left in the checkpoint folder by a killed save are removed
when training starts again.

``import mmdyn.engine`` registers it under its own name and as
``CheckpointHook`` in mmengine's root ``HOOKS`` registry, so every config's
``default_hooks.checkpoint=dict(type='CheckpointHook', ...)`` (mmdet's and
mmpretrain's included) builds it.
"""
import contextlib
import os
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ..checkpoint_io import atomic_write_text

__all__ = ['AtomicCheckpointHook', 'register_as_default_checkpoint_hook']


class _DeferredRemovals:
    """A file backend whose ``remove``/``rmtree`` wait for :meth:`flush`."""

    def __init__(self, backend):
        self._backend = backend
        self.pending = []

    def remove(self, path):
        self.pending.append(('remove', path))

    def rmtree(self, path):
        self.pending.append(('rmtree', path))

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def flush(self, keep=()):
        for action, path in self.pending:
            if path in keep:
                continue
            if action == 'remove' and self._backend.isfile(path):
                self._backend.remove(path)
            elif action == 'rmtree' and self._backend.isdir(path):
                self._backend.rmtree(path)
        self.pending = []


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that removes old checkpoints only after the new
    one is complete. Same arguments as mmengine's ``CheckpointHook``."""

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

    @contextlib.contextmanager
    def _removals_after_save(self):
        if isinstance(self.file_backend, _DeferredRemovals):
            yield  # nested (save_best -> save): the outer call removes
            return
        deferred = _DeferredRemovals(self.file_backend)
        self.file_backend = deferred
        try:
            yield
        finally:
            self.file_backend = deferred._backend
        # Reached only when the save succeeded; never remove what is now
        # the latest or a best checkpoint (a name may have been rewritten).
        current = {self.last_ckpt, getattr(self, 'best_ckpt_path', None)}
        current.update(getattr(self, 'best_ckpt_path_dict', {}).values())
        deferred.flush(keep=current)

    def _save_checkpoint_with_step(self, runner, step, meta):
        with self._removals_after_save():
            self._save_and_point_to(runner, step, meta)

    def _save_best_checkpoint(self, runner, metrics):
        with self._removals_after_save():
            super()._save_best_checkpoint(runner, metrics)

    def _save_and_point_to(self, runner, step, meta):
        """mmengine's ``_save_checkpoint_with_step``, with removals deferred
        by the caller and ``last_checkpoint`` written atomically."""
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale = self.keep_ckpt_ids.popleft()
                if is_main_process():
                    path = self.file_backend.join_path(
                        self.out_dir, self.filename_tmpl.format(stale))
                    if self.file_backend.isfile(path):
                        self.file_backend.remove(path)
                    elif self.file_backend.isdir(path):
                        # checkpoints saved by deepspeed are folders
                        self.file_backend.rmtree(path)
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir,
                                                     ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        atomic_write_text(self.last_ckpt,
                          osp.join(runner.work_dir, 'last_checkpoint'))


def register_as_default_checkpoint_hook():
    """Make ``type='CheckpointHook'`` build :class:`AtomicCheckpointHook`."""
    HOOKS.register_module(name='CheckpointHook', module=AtomicCheckpointHook,
                          force=True)
