# Copyright (c) mmdyn contributors. All rights reserved.
"""``mmdyn::`` config bases (mmengine's own lookup, with mmdyn.compat
applied by conftest as by the tools) and overlays
(mmdyn/engine/config_bases.py, tools/misc/overlay_config.py): stock mmdet
detectors (FCOS, ATSS, RetinaNet) put on the demo data, built and trained
for one step; detectors built around their own data refused."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config

from mmdyn.datasets import make_demo_detection
from mmdyn.engine.config_bases import (DEMO_DET_DATA, DEMO_DET_SCHEDULE,
                                       OverlayError, on_demo_data,
                                       overlay_config, resolve_config_path)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def write_config(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_mmdyn_scope_resolves(tmp_path):
    cfg = Config.fromfile(
        write_config(
            tmp_path, """
        _base_ = ['mmdyn::demo/_base_/demo_det_data.py']
        """))
    assert cfg.data_root == 'data/demo_det/'
    assert cfg.train_dataloader.dataset.ann_file == \
        'annotations/instances_train.json'
    # the checkout's file (editable install: mmdyn/.mim/configs links it)
    from mmengine.utils import get_installed_path
    assert osp.samefile(
        osp.join(
            get_installed_path('mmdyn'), '.mim', 'configs', 'demo', '_base_',
            'demo_det_data.py'),
        osp.join(REPO, 'configs', 'demo', '_base_', 'demo_det_data.py'))


def test_unknown_mmdyn_base_names_the_file(tmp_path):
    path = write_config(tmp_path, "_base_ = ['mmdyn::demo/_base_/nope.py']")
    with pytest.raises(FileNotFoundError, match='demo/_base_/nope.py'):
        Config.fromfile(path)


STOCK_DETECTORS = {
    'fcos': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    'atss': 'mmdet::atss/atss_r50_fpn_1x_coco.py',
    'retinanet': 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
}
NUM_CLASSES = {'model.bbox_head.num_classes': 3}


@pytest.mark.parametrize('name', sorted(STOCK_DETECTORS))
def test_stock_detector_on_demo_data_composes(name):
    stock = STOCK_DETECTORS[name]
    cfg = overlay_config(stock, [DEMO_DET_DATA, DEMO_DET_SCHEDULE],
                         NUM_CLASSES)
    assert cfg.model.bbox_head.num_classes == 3
    dataset = cfg.train_dataloader.dataset
    assert dataset.type == 'CocoDataset'
    assert dataset.data_root == 'data/demo_det/'
    assert dataset.metainfo.classes == ('circle', 'square', 'triangle')
    assert cfg.val_evaluator.ann_file == \
        'data/demo_det/annotations/instances_val.json'
    # the schedule replaced the stock one (SGD with momentum, 12 epochs)
    assert cfg.optim_wrapper.optimizer == dict(
        type='AdamW', lr=1e-3, weight_decay=1e-4)
    assert cfg.train_cfg.max_epochs == 10
    assert cfg.default_hooks.checkpoint.interval == 1
    assert cfg.default_scope == 'mmdet'


@pytest.mark.parametrize('name', sorted(STOCK_DETECTORS))
def test_stock_detector_trains_one_step_on_demo_data(tmp_path, name):
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    data_root = tmp_path / 'demo_det'
    make_demo_detection(
        str(data_root), num_train=2, num_val=1, min_size=64, max_size=80)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs')
    ]
    # the tool's --demo form: demo data and schedule, 3 classes, no
    # pretrained download
    cfg = on_demo_data(
        STOCK_DETECTORS[name], {
            'train_dataloader':
            dict(
                batch_size=2,
                num_workers=0,
                persistent_workers=False,
                dataset=dict(
                    data_root=f'{data_root}/', pipeline=train_pipeline))
        })
    assert cfg.model.backbone.init_cfg is None
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    losses = model.train_step(next(iter(loader)), optim_wrapper)
    total = sum(v.sum() for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    changed = [
        k for k, v in model.named_parameters()
        if not torch.equal(before[k], v)
    ]
    assert any(k.startswith('bbox_head.') for k in changed)
    assert any(k.startswith('backbone.') for k in changed)


def test_data_base_beside_a_complete_config_is_refused_by_mmengine(tmp_path):
    """Why overlays are applied by a tool: mmengine (unchanged) refuses a
    data base listed beside a config that defines its own data."""
    path = write_config(
        tmp_path, f"""
        _base_ = ['{STOCK_DETECTORS['retinanet']}', '{DEMO_DET_DATA}']
        """)
    with pytest.raises(KeyError, match='Duplicate key'):
        Config.fromfile(path)


def test_plain_duplicate_bases_still_refused(tmp_path):
    """Mmengine's rule between bases is unchanged."""
    write_config(tmp_path, "data_root = 'a'\n", 'a.py')
    write_config(tmp_path, "data_root = 'b'\n", 'b.py')
    path = write_config(tmp_path, "_base_ = ['./a.py', './b.py']\n")
    with pytest.raises(KeyError, match='Duplicate key'):
        Config.fromfile(path)


@pytest.mark.parametrize('config', [
    'faster-rcnn_r18_fpn_demo.py', 'faster-rcnn_r18-odconv1x_fpn_demo.py',
    'mask-rcnn_r18_fpn_demo.py'
])
def test_demo_configs_load_the_same_without_mmdyn(config):
    """The demo configs are plain mmengine configs: an interpreter that
    never imports mmdyn (mmdet's inferencers in a fresh script) reads them
    to the same config."""
    path = osp.join(REPO, 'configs', 'demo', config)
    ours = Config.fromfile(path, import_custom_modules=False)
    check = ('import json, sys; from mmengine.config import Config; '
             f'c = Config.fromfile({path!r}, import_custom_modules=False); '
             "assert not any(m.startswith('mmdyn') for m in sys.modules); "
             'print(c.dump())')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    plain = subprocess.run([sys.executable, '-c', check],
                           check=True,
                           capture_output=True,
                           text=True,
                           env=env).stdout
    assert plain.strip() == ours.dump().strip()
    assert ours.default_hooks.checkpoint.interval == 1


def test_body_overrides_a_data_base_and_reads_its_variables(tmp_path):
    cfg = Config.fromfile(
        write_config(
            tmp_path, """
        _base_ = ['mmdet::_base_/default_runtime.py',
                  'mmdyn::demo/_base_/demo_ins_data.py']
        train_dataloader = dict(batch_size=3)
        scale = {{_base_.image_scale}}
        """))
    assert cfg.train_dataloader.batch_size == 3
    assert cfg.scale == (128, 128)
    # demo_ins_data extends demo_det_data
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.train_dataloader.dataset.pipeline[1].with_mask


@pytest.mark.slow
def test_non_editable_install_ships_configs(tmp_path):
    """`pip install .` (not editable) puts the configs in mmdyn/.mim, where
    mmengine finds `mmdyn::` bases without the checkout."""
    source = tmp_path / 'src'
    source.mkdir()
    # model-index.yml: mmengine reads it for every `package::` base
    for item in ('setup.py', 'setup.cfg', 'MANIFEST.in', 'README.md',
                 'model-index.yml'):
        shutil.copy(osp.join(REPO, item), source / item)
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.mim')
    for item in ('mmdyn', 'configs'):
        shutil.copytree(osp.join(REPO, item), source / item, ignore=ignore)
    target = tmp_path / 'site'
    subprocess.run([
        sys.executable, '-m', 'pip', 'install', '--no-deps',
        '--no-build-isolation', '--no-index', '--target',
        str(target),
        str(source)
    ],
                   check=True,
                   capture_output=True,
                   cwd=str(tmp_path))
    assert (target /
            'mmdyn/.mim/configs/demo/_base_/demo_det_data.py').is_file()
    cfg = write_config(tmp_path,
                       "_base_ = ['mmdyn::demo/_base_/demo_det_data.py']\n")
    check = ('import mmdyn, mmdyn.compat; mmdyn.compat.apply();'
             'from mmengine.config import Config;'
             'from mmengine.utils import get_installed_path;'
             f'c = Config.fromfile({cfg!r}); print(mmdyn.__file__);'
             "print(get_installed_path('mmdyn') + '/.mim/configs');"
             'print(c.data_root)')
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, '-c', check],
                         check=True,
                         capture_output=True,
                         text=True,
                         env=env,
                         cwd=str(tmp_path)).stdout.split()
    assert out[0].startswith(str(target))
    assert out[1] == str(target / 'mmdyn' / '.mim' / 'configs')
    assert out[2] == 'data/demo_det/'


@pytest.mark.parametrize('stock, hook', [
    ('mmdet::yolox/yolox_s_8xb8-300e_coco.py', 'YOLOXModeSwitchHook'),
    ('mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py', 'PipelineSwitchHook'),
])
def test_detectors_built_around_their_data_are_refused(stock, hook):
    """YOLOX (MultiImageMixDataset + YOLOXModeSwitchHook) failed in training
    with "'CocoDataset' object has no attribute 'update_skip_type_keys'";
    RTMDet's PipelineSwitchHook would put its own pipeline back."""
    with pytest.raises(OverlayError, match=hook):
        on_demo_data(stock)
    with pytest.raises(OverlayError, match='model base'):
        overlay_config(stock, [DEMO_DET_DATA])
    # the schedule alone replaces no data: allowed
    cfg = overlay_config(stock, [DEMO_DET_SCHEDULE])
    assert cfg.train_cfg.max_epochs == 10


def test_demo_form_sets_every_head_and_masks():
    """Cascade R-CNN's three bbox heads get 3 classes; a mask head brings the
    demo set with masks."""
    cfg = on_demo_data(
        'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py')
    heads = cfg.model.roi_head.bbox_head
    assert [h.num_classes for h in heads] == [3, 3, 3]
    assert cfg.model.roi_head.mask_head.num_classes == 3
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.model.backbone.init_cfg is None
    kept = on_demo_data(
        'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
        keep_pretrained=True)
    assert kept.model.backbone.init_cfg.type == 'Pretrained'


def test_overlay_tool_writes_a_plain_config(tmp_path):
    """The tool's file reads back, with plain mmengine, to the overlaid config;
    the stock hooks are kept."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'overlay_tool', osp.join(REPO, 'tools', 'misc', 'overlay_config.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / 'fcos_demo.py')
    tool.main([
        STOCK_DETECTORS['fcos'], '--demo', '--cfg-options',
        'train_dataloader.batch_size=4', '--out', out
    ])
    written = Config.fromfile(out)
    expected = on_demo_data(STOCK_DETECTORS['fcos'],
                            {'train_dataloader.batch_size': 4})
    assert written.to_dict() == expected.to_dict()
    assert written.train_dataloader.batch_size == 4
    assert written.model.bbox_head.num_classes == 3
    assert written.model.backbone.init_cfg is None
    stock = Config.fromfile(resolve_config_path(STOCK_DETECTORS['fcos']))
    assert written.default_hooks == stock.default_hooks


def test_sparse_rcnn_demo_form_sets_all_six_heads():
    cfg = on_demo_data('mmdet::sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py')
    heads = cfg.model.roi_head.bbox_head
    assert len(heads) == 6 and all(h.num_classes == 3 for h in heads)
    assert cfg.model.rpn_head.get('num_classes', 3) == 3


def test_custom_hooks_append_form_keeps_the_stock_hooks(tmp_path):
    """docs/plug_in.md: the append form keeps YOLOX's own hooks; the plain list
    replaces them (mmengine's rule)."""
    stock = 'mmdet::yolox/yolox_s_8xb8-300e_coco.py'
    appended = Config.fromfile(
        write_config(
            tmp_path, f"""
        _base_ = ['{stock}']
        custom_hooks = _base_.custom_hooks + [
            dict(type='DynamicTemperatureHook')]
        """, 'appended.py'))
    assert [h.type for h in appended.custom_hooks] == [
        'YOLOXModeSwitchHook', 'SyncNormHook', 'EMAHook',
        'DynamicTemperatureHook'
    ]
    replaced = Config.fromfile(
        write_config(
            tmp_path, f"""
        _base_ = ['{stock}']
        custom_hooks = [dict(type='DynamicTemperatureHook')]
        """, 'replaced.py'))
    assert [h.type
            for h in replaced.custom_hooks] == ['DynamicTemperatureHook']
    with open(osp.join(REPO, 'docs', 'plug_in.md')) as f:
        assert 'custom_hooks = _base_.custom_hooks + [' in f.read()


def test_dropped_stock_hooks_are_warned_about(tmp_path):
    """A temperature hook set as a plain list on top of YOLOX drops its
    hooks: the tools' loader says so; the append form and the demo configs
    load without a warning."""
    import warnings

    from mmdyn.engine.config_bases import load_config
    stock = 'mmdet::yolox/yolox_s_8xb8-300e_coco.py'
    replaced = write_config(
        tmp_path, f"""
        _base_ = ['{stock}']
        custom_imports = dict(imports=['mmdyn.engine'])
        custom_hooks = [dict(type='DynamicTemperatureHook')]
        """, 'replaced.py')
    with pytest.warns(UserWarning, match='EMAHook') as record:
        load_config(replaced)
    assert 'custom_hooks = _base_.custom_hooks + [' in str(record[0].message)
    appended = write_config(
        tmp_path, f"""
        _base_ = ['{stock}']
        custom_imports = dict(imports=['mmdyn.engine'])
        custom_hooks = _base_.custom_hooks + [
            dict(type='DynamicTemperatureHook')]
        """, 'appended.py')
    for path in (appended,
                 osp.join(REPO, 'configs', 'demo',
                          'faster-rcnn_r18-odconv1x_fpn_demo.py')):
        with warnings.catch_warnings():
            warnings.simplefilter('error', UserWarning)
            warnings.filterwarnings('ignore', message='.*pkg_resources')
            load_config(path)
