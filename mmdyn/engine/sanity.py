r"""Stop early, with the file or config key named, when data are missing.

* An empty training set (a wrong ``data_root``/``ann_file``, or every image
  dropped by ``filter_cfg``) made mmengine train for zero iterations and
  report success with an epoch-based loop, and spin forever in
  ``InfiniteSampler`` with an iteration-based one.
  :class:`EmptyDatasetCheckHook` (added by ``tools/train.py`` and
  ``tools/test.py``) raises instead, before the first iteration and before
  anything but the log is written.
* Most datasets never got that far: mmengine's ``BaseDataset`` serialises
  its samples while it is built and failed on none with numpy's "need at
  least one array to concatenate" (a COCO file with ``images: []``, or whose
  annotations all have category ids outside ``metainfo.classes`` with
  ``filter_empty_gt=True``). :func:`patch_empty_dataset_error` makes that a
  ``ValueError`` naming the dataset's annotation file and what to check.
* An empty or truncated COCO annotation file raised ``JSONDecodeError``
  without the file's name (from pycocotools, for the dataset and for
  ``CocoMetric``); :func:`patch_empty_dataset_error` names it, and
  :func:`check_annotation_files` (called by the tools) refuses empty
  annotation files of any format before anything is built.
"""
import functools
import json
import os.path as osp

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = [
    'EmptyDatasetCheckHook', 'check_annotation_files',
    'patch_empty_dataset_error'
]


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


def _describe(dataset):
    return ', '.join(f'{name}={getattr(dataset, name)!r}' for name in
                     ('ann_file', 'data_root', 'data_prefix', 'filter_cfg')
                     if getattr(dataset, name, None))


def _empty_dataset_error(dataset):
    classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
    return ValueError(
        f'{type(dataset).__name__} ({_describe(dataset)}) has no samples '
        'after loading and filtering: check that the annotation file lists '
        'images (COCO: a non-empty "images" list), that their annotations '
        'use category ids of metainfo classes '
        f'{tuple(classes) if classes else "(all)"} (images without any are '
        'dropped by filter_empty_gt=True), and the data_prefix folders')


def _annotation_json_error(annotation_file, err):
    size = osp.getsize(annotation_file) if osp.isfile(annotation_file) \
        else None
    what = 'is empty' if size == 0 else \
        f'is not valid JSON ({err.msg} at line {err.lineno} column ' \
        f'{err.colno}; truncated?)'
    return ValueError(f'annotation file {annotation_file} {what}: '
                      'regenerate or re-download it, or point ann_file at '
                      'a complete one')


_ORIGINAL = {}


def patch_empty_dataset_error():
    """Name the dataset (resp. file) in the two errors described above
    (idempotent)."""
    from mmengine.dataset import BaseDataset
    if 'serialize' not in _ORIGINAL:
        _ORIGINAL['serialize'] = BaseDataset._serialize_data

        @functools.wraps(_ORIGINAL['serialize'])
        def _serialize_data(self):
            if len(self.data_list) == 0:
                raise _empty_dataset_error(self)
            return _ORIGINAL['serialize'](self)

        BaseDataset._serialize_data = _serialize_data
    try:
        from pycocotools.coco import COCO
    except ImportError:  # pragma: no cover - pycocotools is installed
        return
    if 'coco_init' not in _ORIGINAL:
        _ORIGINAL['coco_init'] = COCO.__init__

        @functools.wraps(_ORIGINAL['coco_init'])
        def __init__(self, annotation_file=None):
            try:
                _ORIGINAL['coco_init'](self, annotation_file)
            except json.JSONDecodeError as err:
                raise _annotation_json_error(annotation_file, err) from None

        COCO.__init__ = __init__


def _ann_files(node, key):
    """``(config key, path)`` of every ``ann_file`` under ``node``."""
    if isinstance(node, dict):
        ann_file = node.get('ann_file')
        if isinstance(ann_file, str) and ann_file:
            data_root = node.get('data_root')
            if isinstance(data_root, str) and data_root and \
                    not osp.isabs(ann_file) and '://' not in ann_file:
                ann_file = osp.join(data_root, ann_file)
            yield f'{key}.ann_file', ann_file
        for name, value in node.items():
            if name != 'ann_file':
                yield from _ann_files(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _ann_files(value, f'{key}[{index}]')


def check_annotation_files(cfg):
    """Refuse empty annotation files before a runner is built.

    Args:
        cfg (dict | mmengine.Config): the full config; the ``ann_file`` of
            every dataloader's dataset and of every evaluator is checked.

    Raises:
        ValueError: an existing ``ann_file`` is empty or blank, naming the
            config key and the file. (Missing files are left to the dataset,
            which names them.)
    """
    for top in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        for key, path in _ann_files(cfg.get(top), top):
            if '://' in path or not osp.isfile(path):
                continue
            with open(path, 'rb') as f:
                head = f.read(4096)
            if not head.strip() and osp.getsize(path) <= len(head):
                raise ValueError(
                    f'{key}: annotation file {path} is empty: regenerate or '
                    're-download it, or point ann_file at a complete one')
