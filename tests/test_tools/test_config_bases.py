"""``mmdyn::`` config bases and overlay bases (mmdyn/engine/config_bases.py):
stock mmdet detectors (FCOS, ATSS, RetinaNet) put on the demo data by
composing bases, built and trained for one step."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config

import mmdyn.engine  # noqa: F401  (registers mmdyn:: bases and overlays)
from mmdyn.datasets import make_demo_detection
from mmdyn.engine.config_bases import mmdyn_config_root

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

STOCK_DETECTORS = {
    'fcos': ('mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
             "model = dict(bbox_head=dict(num_classes=3))"),
    'atss': ('mmdet::atss/atss_r50_fpn_1x_coco.py',
             "model = dict(bbox_head=dict(num_classes=3))"),
    'retinanet': ('mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
                  "model = dict(bbox_head=dict(num_classes=3))"),
}


def write_config(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_mmdyn_scope_resolves(tmp_path):
    cfg = Config.fromfile(write_config(tmp_path, """
        _base_ = ['mmdyn::demo/_base_/demo_det_data.py']
        """))
    assert cfg.data_root == 'data/demo_det/'
    assert cfg.train_dataloader.dataset.ann_file == \
        'annotations/instances_train.json'
    # an overlay with nothing to replace leaves no `_delete_` behind
    assert '_delete_' not in cfg.train_dataloader
    assert '__overlay__' not in cfg
    assert osp.samefile(mmdyn_config_root(), osp.join(REPO, 'configs'))


def test_unknown_mmdyn_base_names_the_file(tmp_path):
    path = write_config(tmp_path, "_base_ = ['mmdyn::demo/_base_/nope.py']")
    with pytest.raises(FileNotFoundError, match='demo/_base_/nope.py'):
        Config.fromfile(path)


@pytest.mark.parametrize('name', sorted(STOCK_DETECTORS))
def test_stock_detector_on_demo_data_composes(tmp_path, name):
    stock, body = STOCK_DETECTORS[name]
    cfg = Config.fromfile(write_config(tmp_path, f"""
        _base_ = [
            '{stock}',
            'mmdyn::demo/_base_/demo_det_data.py',
            'mmdyn::demo/_base_/demo_det_schedule.py',
        ]
        {body}
        """))
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

    stock, body = STOCK_DETECTORS[name]
    data_root = tmp_path / 'demo_det'
    make_demo_detection(str(data_root), num_train=2, num_val=1,
                        min_size=64, max_size=80)
    cfg = Config.fromfile(write_config(tmp_path, f"""
        _base_ = [
            '{stock}',
            'mmdyn::demo/_base_/demo_det_data.py',
            'mmdyn::demo/_base_/demo_det_schedule.py',
        ]
        {body}
        image_scale = (64, 64)
        train_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=image_scale, keep_ratio=True),
            dict(type='PackDetInputs')
        ]
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(data_root='{data_root}/', pipeline=train_pipeline))
        """))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    losses = model.train_step(next(iter(loader)), optim_wrapper)
    total = sum(v.sum() for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    changed = [k for k, v in model.named_parameters()
               if not torch.equal(before[k], v)]
    assert any(k.startswith('bbox_head.') for k in changed)
    assert any(k.startswith('backbone.') for k in changed)


def test_overlay_must_follow_ordinary_bases(tmp_path):
    path = write_config(tmp_path, """
        _base_ = ['mmdyn::demo/_base_/demo_det_data.py',
                  'mmdet::_base_/default_runtime.py']
        """)
    with pytest.raises(ValueError, match='after all other bases'):
        Config.fromfile(path)


def test_plain_duplicate_bases_still_refused(tmp_path):
    """Without `__overlay__`, mmengine's rule is unchanged."""
    write_config(tmp_path, "data_root = 'a'\n", 'a.py')
    write_config(tmp_path, "data_root = 'b'\n", 'b.py')
    path = write_config(tmp_path, "_base_ = ['./a.py', './b.py']\n")
    with pytest.raises(KeyError, match='Duplicate key'):
        Config.fromfile(path)


@pytest.mark.parametrize('config', [
    'faster-rcnn_r18_fpn_demo.py', 'faster-rcnn_r18-odconv1x_fpn_demo.py',
    'mask-rcnn_r18_fpn_demo.py'
])
def test_demo_configs_load_the_same_without_overlay_support(
        config, monkeypatch):
    """The demo configs' overlays have disjoint keys and nothing below them
    to replace, so plain mmengine (mmdyn.engine not imported before the
    config is read, e.g. mmdet's inferencers in a fresh script) reads them
    to the same config."""
    from mmdyn.engine import config_bases
    path = osp.join(REPO, 'configs', 'demo', config)
    with_overlays = Config.fromfile(path, import_custom_modules=False)
    monkeypatch.setattr(Config, '_file2dict', staticmethod(
        config_bases._ORIGINAL['file2dict']))
    monkeypatch.setattr(Config, '_get_cfg_path', staticmethod(
        config_bases._ORIGINAL['get_cfg_path']))
    plain = Config.fromfile(path, import_custom_modules=False)
    assert plain.to_dict() == with_overlays.to_dict()
    assert plain.default_hooks.checkpoint.interval == 1


def test_body_overrides_overlay_and_reads_its_variables(tmp_path):
    cfg = Config.fromfile(write_config(tmp_path, """
        _base_ = ['mmdet::_base_/default_runtime.py',
                  'mmdyn::demo/_base_/demo_ins_data.py']
        train_dataloader = dict(batch_size=3)
        scale = {{_base_.image_scale}}
        """))
    assert cfg.train_dataloader.batch_size == 3
    assert cfg.scale == (128, 128)
    # demo_ins_data extends demo_det_data (an overlay of an overlay)
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.train_dataloader.dataset.pipeline[1].with_mask


@pytest.mark.slow
def test_non_editable_install_ships_configs(tmp_path):
    """`pip install .` (not editable) puts the configs in mmdyn/.mim, where
    `mmdyn::` bases find them without the checkout."""
    source = tmp_path / 'src'
    source.mkdir()
    for item in ('setup.py', 'setup.cfg', 'MANIFEST.in', 'README.md'):
        shutil.copy(osp.join(REPO, item), source / item)
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.mim')
    for item in ('mmdyn', 'configs'):
        shutil.copytree(osp.join(REPO, item), source / item, ignore=ignore)
    target = tmp_path / 'site'
    subprocess.run([
        sys.executable, '-m', 'pip', 'install', '--no-deps',
        '--no-build-isolation', '--no-index', '--target',
        str(target), str(source)
    ], check=True, capture_output=True, cwd=str(tmp_path))
    assert (target / 'mmdyn/.mim/configs/demo/_base_/demo_det_data.py'
            ).is_file()
    cfg = write_config(tmp_path,
                       "_base_ = ['mmdyn::demo/_base_/demo_det_data.py']\n")
    check = ('import mmdyn, mmdyn.engine; from mmengine.config import Config;'
             'from mmdyn.engine.config_bases import mmdyn_config_root;'
             f'c = Config.fromfile({cfg!r}); print(mmdyn.__file__);'
             'print(mmdyn_config_root()); print(c.data_root)')
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, '-c', check], check=True,
                         capture_output=True, text=True, env=env,
                         cwd=str(tmp_path)).stdout.split()
    assert out[0].startswith(str(target))
    assert out[1] == str(target / 'mmdyn' / '.mim' / 'configs')
    assert out[2] == 'data/demo_det/'
