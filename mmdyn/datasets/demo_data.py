# Copyright (c) mmdyn contributors. All rights reserved.
"""A small synthetic data set for demos and tests, generated on first use.

Two layouts, both made of coloured circles, squares and triangles drawn on
varied backgrounds by a seeded numpy generator (same seed, same bytes):

* ``data/demo_det``: COCO instance segmentation (boxes + polygon masks),
  3 categories, ``train/*.png``, ``val/*.png`` and
  ``annotations/instances_{train,val}.json``. Shapes in one image do not
  overlap, so each polygon is exactly the visible object.
* ``data/demo_cls``: an mmpretrain ``CustomDataset`` image folder,
  ``{train,val}/<class>/*.png`` with 4 classes (circle, square, triangle,
  cross), one centred-ish shape per image.

Nothing is committed: ``tools/train.py`` and ``tools/test.py`` call
:func:`ensure_demo_data` on the config, which generates a folder when a
dataset's ``data_root`` ends in ``demo_det`` or ``demo_cls`` and the folder
is missing; ``python tools/misc/make_demo_data.py`` does it by hand.
Generation is idempotent and safe when several processes (DDP ranks) start
at once: each writes into its own temporary folder, then renames it into
place atomically; a loser of that race discards its copy.
"""
import json
import os
import os.path as osp
import shutil
import uuid

import cv2
import numpy as np

__all__ = [
    'DET_CLASSES', 'CLS_CLASSES', 'make_demo_detection',
    'make_demo_classification', 'ensure_demo_data', 'demo_kind'
]

DET_CLASSES = ('circle', 'square', 'triangle')
CLS_CLASSES = ('circle', 'cross', 'square', 'triangle')
DET_DIRNAME = 'demo_det'
CLS_DIRNAME = 'demo_cls'
# Written last into a finished folder; its presence means "complete".
MARKER = '.mmdyn_demo_complete'
GENERATOR_VERSION = 1

_SPLIT_IDS = {'train': 0, 'val': 1}


def _rng(seed, split, index):
    """Independent stream per image: results don't depend on order."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _background(rng, height, width):
    """A smooth two-colour gradient plus mild noise, uint8 HxWx3 (BGR)."""
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs * np.cos(angle) + ys * np.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _contrasting_colour(rng, background_mean):
    """A colour far (in RGB distance) from the local background."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background_mean) > 120:
            return colour
    return 255 - background_mean


def _shape_polygon(rng, kind, cx, cy, size):
    """Polygon (N, 2) float of a shape of bounding radius ``size / 2``."""
    r = size / 2
    rot = rng.uniform(0, 2 * np.pi)
    if kind == 'circle':
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    elif kind == 'square':
        angles = rot + np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
    elif kind == 'triangle':
        angles = rot + np.array([0, 2 / 3, 4 / 3]) * np.pi
    else:
        raise ValueError(f'kind must be one of {DET_CLASSES}, got {kind!r}')
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)


def _cross_polygon(rng, cx, cy, size):
    """A plus sign (12 vertices), rotated."""
    a, b = size / 2, size / 6
    pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                    [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    rot = rng.uniform(0, np.pi / 2)
    rmat = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    return pts @ rmat.T + np.array([cx, cy])


def _fill(img, polygon, colour):
    """Rasterise ``polygon`` (pixel-centre coordinates) into ``img``."""
    # 4 bits of sub-pixel precision keep the raster close to the polygon.
    pts = np.round(polygon * 16).astype(np.int32)
    cv2.fillPoly(img, [pts], colour.tolist(), lineType=cv2.LINE_8, shift=4)


def _polygon_area(polygon):
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 *
                 abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _det_image(rng, min_size, max_size):
    """One detection image and its objects, with no overlapping shapes."""
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    img = _background(rng, height, width)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            size = rng.uniform(0.18, 0.45) * min(height, width)
            cx = rng.uniform(size / 2 + 1, width - size / 2 - 2)
            cy = rng.uniform(size / 2 + 1, height - size / 2 - 2)
            label = int(rng.integers(len(DET_CLASSES)))
            poly = _shape_polygon(rng, DET_CLASSES[label], cx, cy, size)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            # 2 px of clearance so rasterised shapes never touch.
            if all(x0 > bx1 + 2 or x1 < bx0 - 2 or y0 > by1 + 2 or y1 < by0 - 2
                   for bx0, by0, bx1, by1 in boxes):
                break
        else:
            continue
        local = img[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
        _fill(img, poly, _contrasting_colour(rng,
                                             local.reshape(-1, 3).mean(0)))
        boxes.append((x0, y0, x1, y1))
        objects.append((label, poly))
    return img, objects


def _coco_annotation(ann_id, image_id, label, poly):
    # cv2 puts pixel centres on integers; COCO puts pixel i on [i, i + 1).
    poly = poly + 0.5
    x0, y0 = poly.min(0)
    x1, y1 = poly.max(0)
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=label + 1,
        bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        area=round(_polygon_area(poly), 2),
        segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
        iscrowd=0)


def _write_png(path, img):
    if not cv2.imwrite(path, img):
        raise OSError(f'could not write {path}')


def _atomic_build(root, build):
    """Run ``build(tmp_dir)``, then rename ``tmp_dir`` to ``root``.

    Returns:
        bool: True if this call created ``root``; False if it already
        existed complete (possibly made by a concurrent process).
    """
    if osp.isfile(osp.join(root, MARKER)):
        return False
    if osp.exists(root):
        raise RuntimeError(
            f'{root} exists but is not a complete mmdyn demo data folder '
            f'(no {MARKER}); delete it to regenerate')
    parent = osp.dirname(osp.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = osp.join(parent, f'.{osp.basename(root)}.tmp-{uuid.uuid4().hex}')
    try:
        os.makedirs(tmp)
        build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process renamed its copy first.
            if osp.isfile(osp.join(root, MARKER)):
                return False
            raise
        return True
    finally:
        if osp.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder, **info):
    with open(osp.join(folder, MARKER), 'w') as f:
        json.dump(dict(version=GENERATOR_VERSION, **info), f)


def make_demo_detection(root,
                        seed=0,
                        num_train=300,
                        num_val=100,
                        min_size=128,
                        max_size=192):
    """Generate the COCO-format demo detection set under ``root``.

    Args:
        root (str): folder to create (e.g. ``'data/demo_det'``).
        seed (int): generator seed. Defaults to 0.
        num_train (int): train images. Defaults to 300.
        num_val (int): validation images. Defaults to 100.
        min_size (int): smallest image side in pixels. Defaults to 128.
        max_size (int): largest image side in pixels. Defaults to 192.

    Returns:
        bool: True if generated now, False if ``root`` was already complete.
    """
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if int(value) < 1:
            raise ValueError(f'{name} must be >= 1, got {value}')
    if not 32 <= min_size <= max_size:
        raise ValueError('need 32 <= min_size <= max_size, got '
                         f'min_size={min_size}, max_size={max_size}')

    def build(folder):
        os.makedirs(osp.join(folder, 'annotations'))
        for split, count in (('train', num_train), ('val', num_val)):
            os.makedirs(osp.join(folder, split))
            images, annotations = [], []
            for index in range(count):
                img, objects = _det_image(
                    _rng(seed, split, index), min_size, max_size)
                file_name = f'{index:05d}.png'
                _write_png(osp.join(folder, split, file_name), img)
                image_id = index + 1
                images.append(
                    dict(
                        id=image_id,
                        file_name=file_name,
                        height=img.shape[0],
                        width=img.shape[1]))
                for label, poly in objects:
                    annotations.append(
                        _coco_annotation(
                            len(annotations) + 1, image_id, label, poly))
            coco = dict(
                images=images,
                annotations=annotations,
                categories=[
                    dict(id=i + 1, name=n, supercategory='shape')
                    for i, n in enumerate(DET_CLASSES)
                ])
            with open(
                    osp.join(folder, 'annotations', f'instances_{split}.json'),
                    'w') as f:
                json.dump(coco, f)
        _write_marker(
            folder,
            kind='det',
            seed=seed,
            num_train=num_train,
            num_val=num_val)

    return _atomic_build(root, build)


def make_demo_classification(root, seed=0, num_train=80, num_val=20, size=64):
    """Generate the image-folder demo classification set under ``root``.

    Args:
        root (str): folder to create (e.g. ``'data/demo_cls'``).
        seed (int): generator seed. Defaults to 0.
        num_train (int): train images per class. Defaults to 80.
        num_val (int): validation images per class. Defaults to 20.
        size (int): image side in pixels. Defaults to 64.

    Returns:
        bool: True if generated now, False if ``root`` was already complete.
    """
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if int(value) < 1:
            raise ValueError(f'{name} must be >= 1, got {value}')
    if size < 16:
        raise ValueError(f'size must be >= 16, got {size}')

    def build(folder):
        for split, count in (('train', num_train), ('val', num_val)):
            for label, name in enumerate(CLS_CLASSES):
                os.makedirs(osp.join(folder, split, name))
                for index in range(count):
                    rng = _rng(seed, split, index * len(CLS_CLASSES) + label)
                    img = _background(rng, size, size)
                    shape_size = rng.uniform(0.4, 0.8) * size
                    cx, cy = rng.uniform(size / 2 - size / 8,
                                         size / 2 + size / 8, 2)
                    if name == 'cross':
                        poly = _cross_polygon(rng, cx, cy, shape_size)
                    else:
                        poly = _shape_polygon(rng, name, cx, cy, shape_size)
                    _fill(img, poly,
                          _contrasting_colour(rng,
                                              img.reshape(-1, 3).mean(0)))
                    _write_png(
                        osp.join(folder, split, name, f'{index:04d}.png'), img)
        _write_marker(
            folder,
            kind='cls',
            seed=seed,
            num_train=num_train,
            num_val=num_val)

    return _atomic_build(root, build)


def demo_kind(data_root):
    """``'det'``, ``'cls'`` or None for a dataset's ``data_root``."""
    if not isinstance(data_root, str):
        return None
    name = osp.basename(osp.normpath(data_root))
    return {DET_DIRNAME: 'det', CLS_DIRNAME: 'cls'}.get(name)


def _data_roots(node):
    """Every ``data_root`` string found anywhere in a config (sub)tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'data_root' and isinstance(value, str):
                yield value
            else:
                yield from _data_roots(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _data_roots(value)


def ensure_demo_data(cfg):
    """Generate the demo folders a config's datasets point at, if missing.

    Args:
        cfg (dict | mmengine.Config): a full config; every ``data_root``
            whose last component is ``demo_det`` or ``demo_cls`` is made
            (with the default generator settings) when absent.

    Returns:
        list[str]: the folders generated by this call.
    """
    made = []
    for root in sorted(set(_data_roots(dict(cfg)))):
        kind = demo_kind(root)
        if kind == 'det' and make_demo_detection(osp.normpath(root)):
            made.append(root)
        elif kind == 'cls' and make_demo_classification(osp.normpath(root)):
            made.append(root)
    return made
