# Copyright (c) mmdyn contributors. All rights reserved.
"""The plug-in recipes of docs/plug_in.md (configs/plug_in/): each builds from
stock mmdet/mmpretrain bases + custom_imports, holds the dynamic layers it
promises (counts worked out by hand from the networks' layouts) and trains one
step on the demo data with a gradient reaching every dynamic layer.

Also the registered necks for what a stock neck cannot take from config
(DDFUpPAFPN, DDFUpNASFPN) and their errors.
"""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from mmdyn.datasets.demo_data import (CLS_CLASSES, DET_CLASSES,
                                      make_demo_classification,
                                      make_demo_detection)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PLUG_IN = osp.join(REPO, 'configs', 'plug_in')
DET_SCALE = (64, 64)

# config -> {dynamic layer class name: how many the model must hold}.
# FPN of ResNet C2-C5 (start_level 0): 3 top-down steps; RetinaNet, FCOS,
# ATSS start at C3: 2 steps. R-50 stages 2-4 hold 4 + 6 + 3 Bottlenecks,
# stages 3-4 hold 6 + 3; stage 4 holds 3.
DET_RECIPES = {
    'faster-rcnn_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=3),
    'retinanet_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=2),
    'fcos_r50-caffe_fpn-ddfup_gn-head_1x_coco.py': dict(DDFUpsample=2),
    'atss_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=2),
    'cascade-rcnn_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=3),
    # 3 in the FPN + 1 in the mask head.
    'mask-rcnn_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=4),
    # 3 in the FPN + 1 per cascade stage's mask head.
    'cascade-mask-rcnn_r50_fpn-ddfup_1x_coco.py': dict(DDFUpsample=6),
    'faster-rcnn_r50_pafpn-ddfup_1x_coco.py': dict(DDFUpsample=3),
    # 3 upsampling merges per stage (1 stage in the test: TEST_OPTIONS).
    'retinanet_r50_nasfpn-ddfup_crop640-50e_coco.py': dict(DDFUpsample=3),
    'cascade-rcnn_r50-odconv-dcn_fpn_1x_coco.py': dict(ODConv2d=13),
    'retinanet_r50-dyconv4x-dcn_fpn_1x_coco.py': dict(DyConv2d=13),
    'faster-rcnn_r50-kw-dcn_fpn_1x_coco.py': dict(KWConv2d=13),
    'mask-rcnn_r50-ddf-dcn_fpn-ddfup_1x_coco.py':
    dict(DDFConv2d=9, DDFUpsample=3),
    # ResNeXt (depth 50 in the test: TEST_OPTIONS) stages 2-4.
    'faster-rcnn_x101-32x4d-odconv-dcn_fpn_1x_coco.py': dict(ODConv2d=13),
    # Every conv: stem + 16 Bottlenecks x 3 + 4 shortcuts.
    'faster-rcnn_r50-odconv-convcfg_fpn_1x_coco.py': dict(ODConv2d=53),
    'faster-rcnn_r50-ddf-plugin_fpn_1x_coco.py': dict(DDFConv2d=3),
}
CLS_RECIPES = {
    'resnet50-odconv-convcfg_8xb32_in1k.py': dict(ODConv2d=53),
    # Block convs only: 16 Bottlenecks x 3.
    'resnet50-dynamicresnet-odconv4x_8xb32_in1k.py': dict(ODConv2d=48),
    # 8 BasicBlocks x 2.
    'resnet18-dynamicresnet-dyconv4x_8xb32_in1k.py': dict(DyConv2d=16),
    # 8 BasicBlocks x 2 + the 3 stride-2 shortcuts.
    'resnet18-kwresnet-kw1x_8xb32_in1k.py': dict(KWConv2d=19),
    'resnet50-ddfresnet-mul_8xb32_in1k.py': dict(DDFConv2d=16),
    # Stem + first block (depthwise, project) + 16 blocks x 3 + final 1x1.
    'mobilenet-v2-odconv-convcfg_8xb32_in1k.py': dict(ODConv2d=52),
}

# Smaller than the recipes for a fast test (same layer types).
TEST_OPTIONS = {
    'retinanet_r50_nasfpn-ddfup_crop640-50e_coco.py': {
        'model.neck.stack_times': 1,
        # The recipe pads every batch to its 640 x 640 crops.
        'model.data_preprocessor.batch_augments': None,
    },
    'faster-rcnn_x101-32x4d-odconv-dcn_fpn_1x_coco.py': {
        'model.backbone.depth': 50
    },
}


def _smaller_roi_heads(node):
    """Fewer proposals and sampled RoIs in every (cascade) train_cfg, and
    narrow RoI box heads (their 1024-wide fcs dominate a step)."""
    if isinstance(node, (list, tuple)):
        for item in node:
            _smaller_roi_heads(item)
    elif isinstance(node, dict):
        if 'rpn_proposal' in node:
            node['rpn_proposal'].update(nms_pre=200, max_per_img=64)
        if isinstance(node.get('sampler'), dict) and 'num' in node['sampler']:
            node['sampler']['num'] = min(node['sampler']['num'], 32)
        if 'fc_out_channels' in node:
            node['fc_out_channels'] = 64
        for value in node.values():
            _smaller_roi_heads(value)


def test_every_recipe_is_tested():
    import os
    on_disk = {f for f in os.listdir(PLUG_IN) if f.endswith('.py')}
    assert on_disk == set(DET_RECIPES) | set(CLS_RECIPES)


@pytest.fixture(scope='module')
def demo_datasets(tmp_path_factory):
    """(detection, classification) demo datasets, two images used."""
    from mmdet.registry import DATASETS as DET_DATASETS
    from mmpretrain.registry import DATASETS as CLS_DATASETS
    root = tmp_path_factory.mktemp('plug_in_demo')
    det = str(root / 'demo_det')
    cls = str(root / 'demo_cls')
    make_demo_detection(det, num_train=2, num_val=1, min_size=64, max_size=80)
    make_demo_classification(cls, num_train=1, num_val=1, size=64)
    init_default_scope('mmdet')  # the pipelines' transforms
    det_dataset = DET_DATASETS.build(_det_dataset(det))
    init_default_scope('mmpretrain')
    return det_dataset, CLS_DATASETS.build(_cls_dataset(cls))


def _det_dataset(root):
    return dict(
        type='CocoDataset',
        serialize_data=False,
        data_root=root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes=DET_CLASSES),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='Resize', scale=DET_SCALE, keep_ratio=True),
            dict(type='PackDetInputs')
        ])


def _cls_dataset(root):
    return dict(
        type='CustomDataset',
        serialize_data=False,
        data_root=root,
        data_prefix='train',
        classes=CLS_CLASSES,
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='PackInputs')])


def _count(model, name):
    return sum(type(m).__name__ == name for m in model.modules())


def _train_one_step(cfg_name, dataset, expected, cfg=None):
    """Build the recipe (or ``cfg``, a form of it), check its dynamic layers,
    run one training step on two demo images; return the model."""
    if cfg is None:
        cfg = Config.fromfile(osp.join(PLUG_IN, cfg_name))
    cfg.merge_from_dict(TEST_OPTIONS.get(cfg_name, {}))
    _smaller_roi_heads(cfg.model)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    from mmengine.registry import MODELS
    model = MODELS.build(cfg.model)
    for name, number in expected.items():
        assert _count(model, name) == number, (cfg_name, name)
    batch = pseudo_collate([dataset[0], dataset[1]])
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    optim_wrapper.backward(loss)
    dynamic = [m for m in model.modules() if type(m).__name__ in expected]
    for layer in dynamic:
        grads = [
            p.grad for p in layer.parameters(recurse=True) if p.requires_grad
        ]
        if not grads:  # a frozen stage (frozen_stages=1: stem, stage 1)
            continue
        assert all(g is not None for g in grads), (cfg_name, layer)
        assert any(g.abs().sum() > 0 for g in grads), (cfg_name, layer)
    before = [p.detach().clone() for p in dynamic[-1].parameters()]
    optim_wrapper.step()
    after = list(dynamic[-1].parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    return model


@pytest.mark.parametrize('cfg_name', sorted(DET_RECIPES))
def test_detection_recipe_trains_one_step(cfg_name, demo_datasets):
    torch.manual_seed(0)
    _train_one_step(cfg_name, demo_datasets[0], DET_RECIPES[cfg_name])


@pytest.mark.parametrize('cfg_name', sorted(CLS_RECIPES))
def test_classification_recipe_trains_one_step(cfg_name, demo_datasets):
    torch.manual_seed(0)
    _train_one_step(cfg_name, demo_datasets[1], CLS_RECIPES[cfg_name])


# --------------------------------------------------------------------------
# The registered necks for what a stock neck cannot take from config
# --------------------------------------------------------------------------
def _features(channels, sizes, batch=1):
    torch.manual_seed(1)
    return tuple(torch.randn(batch, c, s, s) for c, s in zip(channels, sizes))


@pytest.mark.parametrize('extra', [False, 'on_input', 'on_output'])
def test_ddf_up_pafpn_with_nearest_is_pafpn(extra):
    """With upsample_cfg nearest, DDFUpPAFPN computes exactly mmdet's PAFPN
    (same weights, loaded strictly): only the upsampler differs."""
    from mmdet.models.necks import PAFPN

    import mmdyn.models  # noqa: F401
    from mmdyn.models.necks import DDFUpPAFPN
    args = dict(
        in_channels=[8, 16, 32],
        out_channels=8,
        num_outs=5,
        add_extra_convs=extra,
        relu_before_extra_convs=True)
    stock = PAFPN(**args).eval()
    ours = DDFUpPAFPN(upsample_cfg=dict(type='nearest'), **args).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    feats = _features([8, 16, 32], [16, 8, 4])
    with torch.no_grad():
        for a, b in zip(stock(feats), ours(feats)):
            torch.testing.assert_close(a, b)


def test_ddf_up_pafpn_guided_ddf_up_is_used():
    from mmdyn.models.necks import DDFUpPAFPN
    neck = DDFUpPAFPN([8, 16, 32], 8, 3).eval()
    assert [type(u).__name__ for u in neck.upsamplers] == ['DDFUpsample'] * 2
    assert all(u.guided for u in neck.upsamplers)
    calls = []
    neck.upsamplers[0].register_forward_hook(
        lambda m, args, out: calls.append([a.shape for a in args]))
    outs = neck(_features([8, 16, 32], [15, 8, 4]))  # odd size: 15 vs 8
    assert [tuple(o.shape[-2:]) for o in outs] == [(15, 15), (8, 8), (4, 4)]
    # Step 0 upsamples the 8x8 level, guided by the 15x15 lateral padded to
    # 16x16.
    assert calls == [[torch.Size([1, 8, 8, 8]), torch.Size([1, 8, 16, 16])]]


def test_ddf_up_nas_fpn_with_nearest_is_nas_fpn():
    from mmdet.models.necks import NASFPN

    from mmdyn.models.necks import DDFUpNASFPN
    args = dict(
        in_channels=[8, 16, 32], out_channels=8, num_outs=5, stack_times=2)
    stock = NASFPN(**args).eval()
    ours = DDFUpNASFPN(upsample_cfg=dict(type='nearest'), **args).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    feats = _features([8, 16, 32], [32, 16, 8])
    with torch.no_grad():
        for a, b in zip(stock(feats), ours(feats)):
            torch.testing.assert_close(a, b)
    ddf = DDFUpNASFPN(**args)
    assert [u.scale_factor for u in ddf.upsamplers[0].values()] == [4, 2, 2]


@pytest.mark.parametrize('neck, kwargs, key', [
    ('DDFUpPAFPN', dict(out_channels=[8, 16, 32]), 'neck.out_channels'),
    ('DDFUpPAFPN',
     dict(upsample_cfg=dict(type='ddf_up', guided=True, guide_channels=16)),
     'neck.upsample_cfg.guide_channels'),
    ('DDFUpPAFPN', dict(upsample_cfg='ddf_up'), 'neck.upsample_cfg'),
    ('DDFUpNASFPN', dict(upsample_cfg=dict(type='ddf_up', guided=True)),
     'neck.upsample_cfg.guided'),
    ('DDFUpNASFPN', dict(num_outs=4), 'neck.num_outs'),
])
def test_neck_errors_name_the_key(neck, kwargs, key):
    from mmdyn.models import necks
    args = dict(in_channels=[8, 16, 32], out_channels=8, num_outs=5)
    if neck == 'DDFUpNASFPN':
        args['stack_times'] = 1
    args.update(kwargs)
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        getattr(necks, neck)(**args)


def test_ddf_conv_in_a_channel_changing_slot_is_refused():
    """conv_cfg=DDFConv2d on stock ResNet reaches 1x1 convs that change the
    channel count: DDF cannot run there and says so (the guide points to
    dcn= instead)."""
    from mmdet.models.backbones import ResNet

    import mmdyn.models  # noqa: F401
    with pytest.raises(ValueError, match='in_channels == out_channels'):
        ResNet(50, conv_cfg=dict(type='DDFConv2d'))


def _num_classes(node):
    if isinstance(node, dict):
        own = [node['num_classes']] if 'num_classes' in node else []
        return own + [n for v in node.values() for n in _num_classes(v)]
    if isinstance(node, (list, tuple)):
        return [n for v in node for n in _num_classes(v)]
    return []


@pytest.mark.parametrize('cfg_name', sorted(DET_RECIPES))
def test_detection_recipe_demo_form(cfg_name):
    """The demo form of docs/plug_in.md (tools/misc/overlay_config.py
    --demo): the demo data and schedule, 3 classes in every head (lists of
    heads included), no pretrained download; the recipe's model otherwise
    unchanged."""
    from mmdyn.engine.config_bases import on_demo_data
    recipe = Config.fromfile(osp.join(PLUG_IN, cfg_name))
    cfg = on_demo_data(recipe)
    assert _num_classes(cfg.model) and \
        set(_num_classes(cfg.model)) == {3}, cfg_name
    assert cfg.train_dataloader.dataset.data_root == 'data/demo_det/'
    assert cfg.train_dataloader.dataset.metainfo.classes == DET_CLASSES
    assert cfg.model.backbone.init_cfg is None
    masks = 'mask_head' in str(recipe.model)
    assert cfg.train_dataloader.dataset.pipeline[1].get('with_mask',
                                                        False) == masks
    assert cfg.model.neck == recipe.model.neck
    assert cfg.custom_imports == recipe.custom_imports
    doc = open(osp.join(REPO, 'docs', 'plug_in.md')).read()
    assert 'tools/misc/overlay_config.py' in doc and '--demo' in doc


@pytest.mark.parametrize('cfg_name', sorted(CLS_RECIPES))
def test_classification_recipe_demo_form(cfg_name, demo_datasets):
    """The classifiers' demo form: the data and schedule of
    configs/demo/resnet18_demo_cls.py, 4 classes; it trains one step on the
    demo images with the recipe's dynamic layers."""
    from mmdyn.engine.config_bases import on_demo_data
    recipe = Config.fromfile(osp.join(PLUG_IN, cfg_name))
    cfg = on_demo_data(recipe)
    assert set(_num_classes(cfg.model)) == {len(CLS_CLASSES)}
    assert cfg.data_preprocessor.num_classes == len(CLS_CLASSES)
    assert cfg.train_dataloader.dataset.data_root == 'data/demo_cls'
    assert cfg.model.backbone == dict(recipe.model.backbone, init_cfg=None)
    # the demo's training loop is mmdyn's: the config imports it
    assert cfg.train_cfg.type == 'ExactResumeEpochBasedTrainLoop'
    assert 'mmdyn.engine' in cfg.custom_imports.imports
    torch.manual_seed(0)
    _train_one_step(cfg_name, demo_datasets[1], CLS_RECIPES[cfg_name], cfg)


def test_demo_form_with_lists_of_heads_trains_one_step(demo_datasets):
    """Cascade Mask R-CNN (three bbox and three mask heads) in its demo form,
    written by the tool and read back by plain mmengine."""
    import importlib.util
    import tempfile
    spec = importlib.util.spec_from_file_location(
        'overlay_tool', osp.join(REPO, 'tools', 'misc', 'overlay_config.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    name = 'cascade-mask-rcnn_r50_fpn-ddfup_1x_coco.py'
    with tempfile.TemporaryDirectory() as tmp:
        out = osp.join(tmp, 'demo.py')
        tool.main([osp.join(PLUG_IN, name), '--demo', '--out', out])
        cfg = Config.fromfile(out)
    assert [h.num_classes for h in cfg.model.roi_head.bbox_head] == [3] * 3
    torch.manual_seed(0)
    model = _train_one_step(name, demo_datasets[0], DET_RECIPES[name], cfg)
    assert model.roi_head.bbox_head[0].fc_cls.out_features == 3 + 1
