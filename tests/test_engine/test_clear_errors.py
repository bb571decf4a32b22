# Copyright (c) mmdyn contributors. All rights reserved.
"""Errors that used to confuse now name the file or key and what to do.

* an empty ``last_checkpoint`` ("checkpoint  can not be found.", with an
  empty name) or one naming a missing file;
* an empty or truncated COCO annotation file (a bare ``JSONDecodeError``);
* a COCO file with ``images: []``, or whose annotations' category ids are
  all outside ``metainfo.classes`` ("need at least one array to
  concatenate": the dataset failed before any empty-dataset check ran).

The annotation files are checked by ``check_annotation_files``, which the
tools call before building anything (mmdyn does not wrap mmengine's or
pycocotools' classes).
"""
import importlib.util
import json
import os.path as osp

import pytest
from toy_runner import make_runner

from mmdyn.datasets import make_demo_detection
from mmdyn.engine import CheckpointLoadError
from mmdyn.engine.sanity import check_annotation_files

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_CFG = osp.join(REPO, 'configs/demo/faster-rcnn_r18_fpn_demo.py')


def test_empty_last_checkpoint_is_named(tmp_path):
    work_dir = str(tmp_path)
    make_runner(work_dir, 'src', max_iters=2, ckpt_interval=2).train()
    save_file = osp.join(work_dir, 'last_checkpoint')
    open(save_file, 'w').close()
    # make_runner resolves resume=True as tools/train.py --resume does.
    with pytest.raises(CheckpointLoadError) as info:
        make_runner(work_dir, 'empty_last', max_iters=4, resume=True)
    message = str(info.value)
    assert f'{save_file} is empty' in message
    assert '--resume PATH' in message and 'iter_2.pth' in message

    with open(save_file, 'w') as f:
        f.write(osp.join(work_dir, 'gone.pth'))
    with pytest.raises(
            FileNotFoundError,
            match=r'last_checkpoint names .*gone\.pth, which '
            'does not exist'):
        make_runner(work_dir, 'missing_last', max_iters=4, resume=True)


def _build_coco(ann_file, filter_empty_gt=True):
    """What the tools do with a config of this dataset: check its files,
    then build it."""
    import mmdet.datasets  # noqa: F401
    from mmdet.registry import DATASETS
    dataset = dict(
        type='CocoDataset',
        ann_file=ann_file,
        data_prefix=dict(img=''),
        metainfo=dict(classes=('circle', 'square', 'triangle')),
        filter_cfg=dict(filter_empty_gt=filter_empty_gt),
        pipeline=[])
    check_annotation_files(dict(train_dataloader=dict(dataset=dataset)))
    return DATASETS.build(dataset)


def _coco(images, annotations):
    return dict(
        images=images,
        annotations=annotations,
        categories=[
            dict(id=1, name='circle'),
            dict(id=2, name='square'),
            dict(id=3, name='triangle'),
            dict(id=9, name='other')
        ])


IMAGE = dict(id=1, file_name='a.png', height=32, width=32)
BOX = dict(id=1, image_id=1, bbox=[2, 2, 10, 10], area=100, iscrowd=0)


@pytest.mark.parametrize(
    'content,match', [
        ('', r'empty\.json is empty'),
        ('{"images": [{"id": 1', r'trunc\.json is not valid JSON .*truncated'),
    ],
    ids=['empty', 'truncated'])
def test_broken_annotation_file_is_named(tmp_path, content, match):
    name = 'empty.json' if not content else 'trunc.json'
    path = str(tmp_path / name)
    with open(path, 'w') as f:
        f.write(content)
    with pytest.raises(ValueError, match=match):
        _build_coco(path)


@pytest.mark.parametrize(
    'coco', [
        _coco([], []),
        _coco([IMAGE], [dict(BOX, category_id=9)]),
    ],
    ids=['no_images', 'unknown_categories'])
def test_dataset_without_samples_is_named(tmp_path, coco):
    path = str(tmp_path / 'instances.json')
    with open(path, 'w') as f:
        json.dump(coco, f)
    with pytest.raises(ValueError) as info:
        _build_coco(path)
    message = str(info.value)
    assert message.startswith('train_dataloader.dataset.ann_file: '
                              f'annotation file {path} has no samples')
    if coco['images']:
        assert "classes ('circle', 'square', 'triangle')" in message
        assert 'filter_empty_gt' in message
    else:
        assert '"images" list is empty' in message


def test_coco_file_with_samples_passes_the_check(tmp_path):
    path = str(tmp_path / 'instances.json')
    with open(path, 'w') as f:
        json.dump(_coco([IMAGE], [dict(BOX, category_id=2)]), f)
    assert len(_build_coco(path)) == 1


def test_tools_name_the_empty_annotation_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo_detection('data/demo_det', num_train=1, num_val=1)
    open('data/demo_det/annotations/instances_train.json', 'w').close()
    spec = importlib.util.spec_from_file_location(
        'mmdyn_tools_train', osp.join(REPO, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(
            ValueError,
            match=r'^train_dataloader\.dataset\.ann_file: '
            r'annotation file .*instances_train\.json is empty'):
        train.main([DET_CFG, '--work-dir', 'wd'])
