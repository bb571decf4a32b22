# Copyright (c) mmdyn contributors. All rights reserved.
r"""Stop early, with the file or config key named, when data are missing.

* An empty training set (a wrong ``data_root``/``ann_file``, or every image
  dropped by ``filter_cfg``) made mmengine train for zero iterations and
  report success with an epoch-based loop, and spin forever in
  ``InfiniteSampler`` with an iteration-based one.
  :class:`EmptyDatasetCheckHook` (added by ``tools/train.py`` and
  ``tools/test.py``) raises instead, before the first iteration and before
  anything but the log is written.
* Most datasets never get that far: mmengine's ``BaseDataset`` serialises
  its samples while it is built and fails on none with numpy's "need at
  least one array to concatenate" (a COCO file with ``images: []``, or whose
  annotations all have category ids outside ``metainfo.classes`` with
  ``filter_empty_gt=True``), and an empty or truncated COCO file raises
  pycocotools' ``JSONDecodeError`` without the file's name.
  :func:`check_annotation_files`, which the tools call before anything is
  built, refuses these files naming the config key, the file and what to
  check.

What is not covered (mmdyn no longer wraps mmengine's ``BaseDataset`` or
pycocotools' ``COCO``): a dataset or ``CocoMetric`` built outside the tools
gives those libraries' own errors; JSON annotation files above
:data:`MAX_PARSED_BYTES` are not parsed ahead (only checked for being
empty), and the category check covers COCO-style files only.
"""
import json
import os.path as osp

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ['EmptyDatasetCheckHook', 'check_annotation_files']

# JSON annotation files up to this size are parsed by
# check_annotation_files (COCO train2017's 448 MB file is not).
MAX_PARSED_BYTES = 64 * 1024**2


def _check(loader, key):
    dataset = getattr(loader, 'dataset', None)
    if dataset is None:
        return
    if len(dataset) == 0:
        where = {
            name: getattr(dataset, name)
            for name in ('data_root', 'ann_file', 'data_prefix')
            if getattr(dataset, name, None)
        }
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


def _ann_files(node, key):
    """``(config key, path, config node)`` of every ``ann_file`` under
    ``node``."""
    if isinstance(node, dict):
        ann_file = node.get('ann_file')
        if isinstance(ann_file, str) and ann_file:
            data_root = node.get('data_root')
            if isinstance(data_root, str) and data_root and \
                    not osp.isabs(ann_file) and '://' not in ann_file:
                ann_file = osp.join(data_root, ann_file)
            yield f'{key}.ann_file', ann_file, node
        for name, value in node.items():
            if name != 'ann_file':
                yield from _ann_files(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _ann_files(value, f'{key}[{index}]')


def _redo(key, path, what):
    return ValueError(f'{key}: annotation file {path} {what}: regenerate or '
                      're-download it, or point ann_file at a complete one')


def _read_json(key, path):
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise _redo(
            key, path, f'is not valid JSON ({err.msg} at line '
            f'{err.lineno} column {err.colno}; truncated?)') from None
    except UnicodeDecodeError as err:
        raise _redo(key, path, f'is not UTF-8 JSON ({err.reason})') from None


def _check_coco_samples(key, path, coco, dataset):
    """A COCO file that would leave ``dataset`` (its config) no samples."""
    images = coco.get('images')
    if not isinstance(images, list):
        return
    if not images:
        raise ValueError(
            f'{key}: annotation file {path} has no samples: its "images" '
            'list is empty; check that it is the right file')
    filter_cfg = dataset.get('filter_cfg') or {}
    if not filter_cfg.get('filter_empty_gt', False):
        return
    classes = (dataset.get('metainfo') or {}).get('classes')
    categories = coco.get('categories') or []
    wanted = {
        c.get('id')
        for c in categories if isinstance(c, dict) and (
            classes is None or c.get('name') in classes)
    }
    if any(
            isinstance(a, dict) and a.get('category_id') in wanted
            for a in coco.get('annotations') or []):
        return
    names = tuple(classes) if classes is not None else '(all)'
    raise ValueError(
        f'{key}: annotation file {path} has no samples for this dataset: '
        f'no annotation has a category of metainfo classes {names} '
        f'(category ids {sorted(i for i in wanted if i is not None)}), and '
        'filter_cfg.filter_empty_gt=True drops the images without one; '
        'check metainfo.classes against the file\'s "categories"')


def check_annotation_files(cfg):
    """Refuse annotation files that cannot give a dataset samples, before a
    runner is built.

    Args:
        cfg (dict | mmengine.Config): the full config; the ``ann_file`` of
            every dataloader's dataset and of every evaluator is checked.

    Raises:
        ValueError: naming the config key and the file, for an existing
            ``ann_file`` that is empty or blank, or a JSON file (up to
            :data:`MAX_PARSED_BYTES`) that is not valid JSON, or a COCO file
            of a dataset that lists no images or (with
            ``filter_empty_gt=True``) no annotation of the dataset's
            classes. (Missing files are left to the dataset, which names
            them.)
    """
    for top in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        for key, path, node in _ann_files(cfg.get(top), top):
            if '://' in path or not osp.isfile(path):
                continue
            size = osp.getsize(path)
            with open(path, 'rb') as f:
                head = f.read(4096)
            if not head.strip() and size <= len(head):
                raise _redo(key, path, 'is empty')
            if not path.endswith('.json') or size > MAX_PARSED_BYTES:
                continue
            content = _read_json(key, path)
            if isinstance(content, dict) and top.endswith('_dataloader'):
                _check_coco_samples(key, path, content, node)
