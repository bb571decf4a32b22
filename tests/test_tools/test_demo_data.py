# Copyright (c) mmdyn contributors. All rights reserved.
"""The synthetic demo data: deterministic, valid COCO, race-safe."""
import hashlib
import json
import os
import os.path as osp
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmdyn.datasets import (CLS_CLASSES, ensure_demo_data,
                            make_demo_classification, make_demo_detection)

SMALL = dict(num_train=12, num_val=4)


def _digest(root):
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = osp.join(folder, name)
            h.update(osp.relpath(path, root).encode())
            h.update(open(path, 'rb').read())
    return h.hexdigest()


@pytest.fixture(scope='module')
def det_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('det') / 'demo_det')
    assert make_demo_detection(root, **SMALL)
    return root


def test_detection_is_deterministic(det_root, tmp_path):
    again = str(tmp_path / 'demo_det')
    make_demo_detection(again, **SMALL)
    assert _digest(again) == _digest(det_root)
    other = str(tmp_path / 'other')
    make_demo_detection(other, seed=1, **SMALL)
    assert _digest(other) != _digest(det_root)


def test_detection_annotations_are_valid(det_root):
    coco = COCO(osp.join(det_root, 'annotations', 'instances_train.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
        ['circle', 'square', 'triangle']
    assert len(coco.getImgIds()) == SMALL['num_train']
    labels = set()
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        assert osp.isfile(osp.join(det_root, 'train', info['file_name']))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            labels.add(ann['category_id'])
            x, y, w, h = ann['bbox']
            assert x >= 0 and y >= 0 and w > 4 and h > 4
            assert x + w <= info['width'] and y + h <= info['height']
            # The rasterised polygon's extent matches the box (pycocotools'
            # own rasteriser, independent of the generator's).
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            extent = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            np.testing.assert_allclose(extent, (x, y, x + w, y + h), atol=1.5)
            assert abs(mask.sum() - ann['area']) <= 0.15 * ann['area'] + 4
    assert labels == {1, 2, 3}


def test_generation_is_idempotent_and_race_safe(tmp_path):
    root = str(tmp_path / 'demo_det')
    with ThreadPoolExecutor(3) as pool:
        made = list(
            pool.map(lambda _: make_demo_detection(root, **SMALL), range(3)))
    assert sum(made) == 1  # one writer won, the others found it complete
    assert not [n for n in os.listdir(str(tmp_path)) if '.tmp-' in n]
    assert make_demo_detection(root, **SMALL) is False
    os.remove(osp.join(root, '.mmdyn_demo_complete'))
    with pytest.raises(RuntimeError, match='not a complete'):
        make_demo_detection(root, **SMALL)


def test_classification_layout(tmp_path):
    root = str(tmp_path / 'demo_cls')
    make_demo_classification(root, num_train=3, num_val=2)
    assert sorted(os.listdir(osp.join(root, 'train'))) == list(CLS_CLASSES)
    for split, count in (('train', 3), ('val', 2)):
        for name in CLS_CLASSES:
            assert len(os.listdir(osp.join(root, split, name))) == count
    from mmpretrain.datasets import CustomDataset
    dataset = CustomDataset(data_root=root, data_prefix='val')
    assert len(dataset) == 8
    assert dataset.metainfo['classes'] == CLS_CLASSES


def test_ensure_demo_data_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dict(
        train_dataloader=dict(dataset=dict(data_root='data/demo_cls')),
        val_dataloader=dict(dataset=dict(data_root='data/coco/')))
    calls = []
    monkeypatch.setattr('mmdyn.datasets.demo_data.make_demo_classification',
                        lambda root: calls.append(root) or True)
    assert ensure_demo_data(cfg) == ['data/demo_cls']
    assert calls == ['data/demo_cls']


@pytest.mark.parametrize('kwargs', [dict(num_train=0), dict(min_size=8)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        make_demo_detection(str(tmp_path / 'x'), **kwargs)


def test_annotation_json_is_plain(det_root):
    data = json.load(
        open(osp.join(det_root, 'annotations', 'instances_val.json')))
    assert len(data['images']) == SMALL['num_val']
    assert all(a['iscrowd'] == 0 for a in data['annotations'])
