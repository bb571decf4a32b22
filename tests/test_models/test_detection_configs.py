# Copyright (c) mmdyn contributors. All rights reserved.
"""Every detection config under configs/ builds; a representative subset runs a
loss forward + backward; the paper configs have the published sizes; an
ImageNet checkpoint of a dynamic backbone loads into a detector."""
import copy
import functools
import glob
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdyn.engine  # noqa: F401  (compat fixes needed by 'mmdet::' bases)
import mmdyn.models  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_PREFIXES = ('faster-rcnn', 'mask-rcnn', 'retinanet', 'cascade-rcnn')


def detection_configs():
    # configs/plug_in (stock detectors with one mmdyn part swapped in, other
    # necks included) has its own tests: tests/test_tools/test_plug_in.py.
    paths = glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
    return sorted(
        osp.relpath(p, ROOT) for p in paths
        if osp.basename(p).startswith(DET_PREFIXES)
        and osp.basename(osp.dirname(p)) != 'plug_in' and (
            p.endswith('_coco.py') or p.endswith('_demo.py')))


DETECTION_CONFIGS = detection_configs()

register_all_modules(init_default_scope=False)


def load(path):
    """A fresh copy of the parsed config (parsing is the slow part)."""
    return copy.deepcopy(_parse(path))


@functools.lru_cache(maxsize=None)
def _parse(path):
    return Config.fromfile(osp.join(ROOT, path))


def build_detector(model_cfg):
    init_default_scope('mmdet')
    return DET_MODELS.build(copy.deepcopy(model_cfg))


@pytest.fixture
def meta_build(monkeypatch):
    """Build on the meta device (no memory, no init).

    mmpretrain's ResNet
    calls ``.item()`` on a ``torch.linspace`` (drop-path rates), which must
    then be a real tensor.
    """
    linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        kwargs.setdefault('device', 'cpu')
        return linspace(*args, **kwargs)

    monkeypatch.setattr(torch, 'linspace', cpu_linspace)

    def build(model_cfg):
        with torch.device('meta'):
            return build_detector(model_cfg)

    return build


def test_the_paper_configs_exist():
    expected = {
        'configs/odconv/faster-rcnn_r50-odconv1x_fpn_1x_coco.py',
        'configs/odconv/faster-rcnn_r50-odconv4x_fpn_1x_coco.py',
        'configs/odconv/mask-rcnn_r50-odconv1x_fpn_1x_coco.py',
        'configs/odconv/mask-rcnn_r50-odconv4x_fpn_1x_coco.py',
        'configs/odconv/faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py',
        'configs/odconv/faster-rcnn_mobilenet-v2-odconv4x_fpn_1x_coco.py',
        'configs/odconv/mask-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py',
        'configs/odconv/mask-rcnn_mobilenet-v2-odconv4x_fpn_1x_coco.py',
        'configs/kernelwarehouse/mask-rcnn_r50-kw1x_fpn_1x_coco.py',
        'configs/kernelwarehouse/mask-rcnn_r50-kw4x_fpn_1x_coco.py',
        'configs/kernelwarehouse/mask-rcnn_mobilenet-v2-kw1x_fpn_1x_coco.py',
        'configs/kernelwarehouse/mask-rcnn_mobilenet-v2-kw4x_fpn_1x_coco.py',
        'configs/dyconv/faster-rcnn_r50-dyconv4x_fpn_1x_coco.py',
        'configs/ddf/faster-rcnn_r50_fpn-ddfup_1x_coco.py',
        'configs/ddf/faster-rcnn_r50_fpn-carafe_1x_coco.py',
        'configs/ddf/mask-rcnn_r50_fpn-ddfup_1x_coco.py',
        'configs/ddf/retinanet_r50_fpn-ddfup_1x_coco.py',
        'configs/ddf/cascade-rcnn_r50_fpn-ddfup_1x_coco.py',
    }
    assert expected <= set(DETECTION_CONFIGS)


# Parameter counts of the official classification models (their code at 1000
# classes) minus the classifier our detection backbones do not carry, plus
# the FPN + heads measured with mmdet 3.3.
FC_R50, FC_MBV2 = 2048 * 1000 + 1000, 1280 * 1000 + 1000
HEADS = {
    ('faster', 'r50'): 18_245_024,
    ('faster', 'mbv2'): 17_628_576,
    ('mask', 'r50'): 20_888_304,
    ('mask', 'mbv2'): 20_271_856,
}
# config -> (classifier parameters, detector, backbone)
EXPECTED_SIZES = {
    'odconv/faster-rcnn_r50-odconv1x_fpn_1x_coco.py': (28_635_112, 'faster',
                                                       'r50'),
    'odconv/faster-rcnn_r50-odconv4x_fpn_1x_coco.py': (90_670_888, 'faster',
                                                       'r50'),
    'odconv/mask-rcnn_r50-odconv1x_fpn_1x_coco.py': (28_635_112, 'mask',
                                                     'r50'),
    'odconv/mask-rcnn_r50-odconv4x_fpn_1x_coco.py': (90_670_888, 'mask',
                                                     'r50'),
    'odconv/faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py':
    (4_940_185, 'faster', 'mbv2'),
    'odconv/faster-rcnn_mobilenet-v2-odconv4x_fpn_1x_coco.py':
    (11_512_149, 'faster', 'mbv2'),
    'odconv/mask-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py': (4_940_185,
                                                              'mask', 'mbv2'),
    'odconv/mask-rcnn_mobilenet-v2-odconv4x_fpn_1x_coco.py': (11_512_149,
                                                              'mask', 'mbv2'),
    'kernelwarehouse/mask-rcnn_r50-kw1x_fpn_1x_coco.py': (28_052_310, 'mask',
                                                          'r50'),
    'kernelwarehouse/mask-rcnn_r50-kw4x_fpn_1x_coco.py': (102_015_144, 'mask',
                                                          'r50'),
    'kernelwarehouse/mask-rcnn_mobilenet-v2-kw1x_fpn_1x_coco.py':
    (5_168_146, 'mask', 'mbv2'),
    'kernelwarehouse/mask-rcnn_mobilenet-v2-kw4x_fpn_1x_coco.py':
    (11_379_382, 'mask', 'mbv2'),
    'dyconv/faster-rcnn_r50-dyconv4x_fpn_1x_coco.py': (100_895_176, 'faster',
                                                       'r50'),
    'dyconv/mask-rcnn_r50-dyconv4x_fpn_1x_coco.py': (100_895_176, 'mask',
                                                     'r50'),
}


@pytest.mark.parametrize('path', DETECTION_CONFIGS)
def test_config_builds(path, meta_build):
    cfg = load(path)
    if any(key in path for key in ('odconv', 'kw', 'dyconv', 'ddfup')):
        assert {'mmdyn.models',
                'mmdyn.engine'} <= set(cfg.custom_imports['imports'])
    model = meta_build(cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    key = path[len('configs/'):]
    if key in EXPECTED_SIZES:
        classifier_params, detector, backbone = EXPECTED_SIZES[key]
        fc = FC_R50 if backbone == 'r50' else FC_MBV2
        assert num_params == (
            classifier_params - fc + HEADS[(detector, backbone)])
    if 'ddfup' in path:
        assert type(model.neck).__name__ == 'DDFUpFPN'
        assert type(model.neck.upsamplers[0]).__name__ == 'DDFUpsample'
    if 'ddfup' in path and 'mask-rcnn' in path:
        assert type(model.roi_head.mask_head.upsample).__name__ == \
            'DDFUpsample'
    if 'odconv' in path:
        assert any(type(m).__name__ == 'ODConv2d' for m in model.modules())
    if '-kw' in path:
        assert any(type(m).__name__ == 'KWConv2d' for m in model.modules())
    if 'dyconv' in path:
        assert any(type(m).__name__ == 'DyConv2d' for m in model.modules())


def packed_inputs(with_mask, size=64):
    packed = demo_mm_inputs(
        batch_size=2,
        image_shapes=[(3, size, size), (3, size - 3, size + 5)],
        num_items=[2, 1],
        num_classes=3,
        with_mask=with_mask)
    return packed


DYNAMIC_LAYERS = ('ODConv2d', 'KWConv2d', 'DyConv2d', 'DDFUpsample')

# One of each kind of component, kept cheap: the heavy R-50 4x variants only
# differ from these by kernel_num / cell_num_ratio and are built above.
LOSS_CONFIGS = [
    'configs/odconv/faster-rcnn_r50-odconv1x-c3-c5_fpn_1x_coco.py',
    'configs/odconv/faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py',
    'configs/kernelwarehouse/mask-rcnn_mobilenet-v2-kw1x_fpn_1x_coco.py',
    'configs/ddf/mask-rcnn_r50_fpn-ddfup_1x_coco.py',
    'configs/ddf/retinanet_r50_fpn-ddfup_1x_coco.py',
    'configs/demo/mask-rcnn_r18-odconv1x_fpn-ddfup_demo.py',
]


@pytest.mark.parametrize('path', LOSS_CONFIGS)
def test_loss_forward_backward(path):
    cfg = load(path)
    # Random weights stand in for the ImageNet checkpoint: BN in eval mode
    # with fresh running statistics would saturate ReLU6 and zero the
    # gradients, so every stage trains here. Fewer sampled RoIs keep the
    # R-CNN heads cheap; the architecture is unchanged.
    cfg.model.backbone.update(norm_eval=False, frozen_stages=-1)
    rcnn_train_cfg = cfg.model.get('train_cfg', {}).get('rcnn')
    if isinstance(rcnn_train_cfg, dict):
        rcnn_train_cfg.sampler.num = 64
    model = build_detector(cfg.model)
    model.train()
    with_mask = 'mask-rcnn' in path
    data = model.data_preprocessor(packed_inputs(with_mask), True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    if with_mask:
        assert 'loss_mask' in losses
    total.backward()
    dynamic = [
        m for m in model.modules() if type(m).__name__ in DYNAMIC_LAYERS
    ]
    assert dynamic
    for layer in dynamic:
        params = [p for p in layer.parameters() if p.requires_grad]
        if params:  # layers of frozen stages have none
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for p in params), type(layer).__name__
    for name, p in model.named_parameters():
        if 'warehouse_manager' in name and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if 'ddfup' in path:
        for name, p in model.neck.upsamplers.named_parameters():
            assert p.grad is not None, name


def test_stock_resnet_with_odconv_as_dcn():
    """Mmdet's ResNet builds its 3x3 through the ``dcn`` hook: the ODConv
    layers replace exactly the c3-c5 Bottleneck conv2 and train."""
    cfg = load('configs/odconv/faster-rcnn_r50-odconv1x-c3-c5_fpn_1x_coco.py')
    backbone_cfg = dict(cfg.model.backbone, init_cfg=None)
    init_default_scope('mmdet')
    backbone = DET_MODELS.build(backbone_cfg)
    stages = [getattr(backbone, name) for name in backbone.res_layers]
    for index, stage in enumerate(stages):
        for block in stage:
            assert (type(block.conv2).__name__ == 'ODConv2d') == (index > 0)
            assert type(block.conv1).__name__ == 'Conv2d'
    backbone.train()
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    sum(f.mean() for f in feats).backward()
    od = stages[1][0].conv2
    assert od.weight.grad is not None and od.weight.grad.abs().sum() > 0


def test_imagenet_checkpoint_loads_into_detector(tmp_path):
    """init_cfg=Pretrained(prefix='backbone.') copies every backbone tensor of
    an mmpretrain classifier checkpoint into the detector backbone."""
    from mmpretrain.registry import MODELS as CLS_MODELS
    cls_cfg = load('configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    init_default_scope('mmpretrain')
    classifier = CLS_MODELS.build(cls_cfg.model)
    with torch.no_grad():  # make every tensor distinguishable from an init
        for p in classifier.parameters():
            p.add_(torch.randn_like(p))
    checkpoint = tmp_path / 'resnet18-odconv1x_in1k.pth'
    torch.save({'state_dict': classifier.state_dict()}, checkpoint)

    det_cfg = load('configs/demo/faster-rcnn_r18-odconv1x_fpn_demo.py')
    det_cfg.model.backbone.init_cfg = dict(
        type='Pretrained', checkpoint=str(checkpoint), prefix='backbone.')
    detector = build_detector(det_cfg.model)
    detector.init_weights()

    source = classifier.backbone.state_dict()
    loaded = detector.backbone.state_dict()
    assert set(loaded) == set(source)
    assert any('ODConv' in type(m).__name__
               for m in detector.backbone.modules())
    for key, value in source.items():
        torch.testing.assert_close(loaded[key], value, msg=key)
