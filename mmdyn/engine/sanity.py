"""Stop early, with the config key named, when a data set is empty.

An empty training set (a wrong ``data_root``/``ann_file``, or every image
dropped by ``filter_cfg``) made mmengine train for zero iterations and
report success with an epoch-based loop, and spin forever in
``InfiniteSampler`` with an iteration-based one. :class:`EmptyDatasetCheckHook`
(added by ``tools/train.py`` and ``tools/test.py``) raises instead, before
the first iteration and before anything but the log is written.
"""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ['EmptyDatasetCheckHook']


def _check(loader, key):
    dataset = getattr(loader, 'dataset', None)
    if dataset is None:
        return
    if len(dataset) == 0:
        where = {name: getattr(dataset, name) for name in
                 ('data_root', 'ann_file', 'data_prefix')
                 if getattr(dataset, name, None)}
        raise ValueError(f'{key}.dataset is empty ({where}); check its '
                         'data_root, ann_file, data_prefix and filter_cfg')


@HOOKS.register_module()
class EmptyDatasetCheckHook(Hook):
    """Raise ``ValueError`` naming the dataloader whose dataset is empty."""

    priority = 'VERY_HIGH'

    def before_train(self, runner):
        _check(runner.train_dataloader, 'train_dataloader')

    def before_val(self, runner):
        _check(runner.val_dataloader, 'val_dataloader')

    def before_test(self, runner):
        _check(runner.test_dataloader, 'test_dataloader')
