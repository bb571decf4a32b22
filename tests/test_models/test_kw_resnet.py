# Copyright (c) mmdyn contributors. All rights reserved.
"""KW ResNet: parity with the official parameter counts and warehouses."""
import os.path as osp

import pytest
import torch
from torch import nn

import mmdyn.engine  # noqa: F401  (mmengine compat fixes, hooks)
import mmdyn.models  # noqa: F401
from mmdyn.models.backbones.kw_resnet import KW_1X_CFG, KWResNet
from mmdyn.ops import KWConv2d

CONFIG_DIR = osp.join(
    osp.dirname(__file__), '..', '..', 'configs', 'kernelwarehouse')
SUFFIX = '_8xb128-300e_in1k.py'

# Exact parameter counts of the models the official code builds (1000
# classes; https://github.com/OSVAI/KernelWarehouse) and their warehouses
# (cells x cell shape), numbered by stage.
PARITY = {
    'resnet18-kw1d4x': (4_031_768, [(56, 32), (47, 64), (47, 128), (27, 256)]),
    'resnet18-kw1d2x': (7_431_044, [(112, 32), (94, 64), (94, 128),
                                    (54, 256)]),
    'resnet18-kw1x': (11_932_148, [(56, 64), (47, 128), (47, 256), (27, 512)]),
    'resnet18-kw2x': (23_242_127, [(112, 64), (94, 128), (94, 256),
                                   (54, 512)]),
    'resnet18-kw4x': (45_862_085, [(224, 64), (188, 128), (188, 256),
                                   (108, 512)]),
    'resnet50-kw1d2x': (17_638_264, [(174, 32), (208, 64), (276, 128),
                                     (94, 256)]),
    'resnet50-kw1x': (28_052_310, [(87, 64), (104, 128), (138, 256),
                                   (47, 512)]),
    'resnet50-kw4x': (102_015_144, [(348, 64), (416, 128), (552, 256),
                                    (188, 512)]),
}


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # Small ops: two OpenMP threads on a loaded 2-core machine mostly wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(prefix, device='cpu'):
    from mmengine import Config
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(osp.join(CONFIG_DIR, prefix + SUFFIX))
    with torch.device(device):
        return MODELS.build(cfg.model), cfg


@pytest.mark.parametrize('prefix', sorted(PARITY))
def test_config_parity(prefix):
    params, warehouses = PARITY[prefix]
    model, cfg = _build(prefix, device='meta')
    assert sum(p.numel() for p in model.parameters()) == params
    manager = model.backbone.warehouse_manager
    assert [(w.shape[0], w.shape[1]) for w in manager.weights] == warehouses
    assert all(w.shape[1] == w.shape[2] and w.shape[3:] == (1, 1)
               for w in manager.weights)
    assert manager.warehouse_names == [
        f'stage{s}_layer_conv' for s in range(4)
    ]
    kw_layers = [m for m in model.modules() if isinstance(m, KWConv2d)]
    assert len(kw_layers) == (19 if prefix.startswith('resnet18') else 50)
    assert all(m.bias is None for m in kw_layers)
    assert cfg.custom_hooks == [dict(type='DynamicTemperatureHook', epochs=20)]
    assert model.head.fc.out_features == 1000


def test_hand_over_rule_and_plain_layers():
    r50 = KWResNet(50)
    # Bottleneck stage 0: first conv1 and stride-1 shortcut stay plain
    assert type(r50.layer1[0].conv1) is nn.Conv2d
    assert type(r50.layer1[0].downsample[0]) is nn.Conv2d
    assert isinstance(r50.layer1[0].conv2, KWConv2d)
    for stage in range(1, 4):
        block = getattr(r50, f'layer{stage + 1}')[0]
        # first conv1 and stride-2 shortcut go to the previous stage
        assert block.conv1.warehouse_id == stage - 1
        assert block.downsample[0].warehouse_id == stage - 1
        assert block.conv2.warehouse_id == stage
        assert block.conv3.warehouse_id == stage
        assert block.downsample[0].stride == (2, 2)
        assert block.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    r18 = KWResNet(18)
    # BasicBlock clamps the hand-over of stage 0 to stage 0
    assert r18.layer1[0].conv1.warehouse_id == 0
    assert r18.layer2[0].conv1.warehouse_id == 0
    assert r18.layer2[0].conv2.warehouse_id == 1
    assert type(r18.conv1) is nn.Conv2d  # static stem


def test_static_state_dict_names_and_drop_path():
    from mmcv.cnn.bricks import DropPath
    from mmpretrain.models import ResNet
    plain_keys = set(ResNet(18).state_dict())
    model = KWResNet(18, drop_path_rate=0.1)
    kw_keys = set(model.state_dict())
    replaced = {
        name + '.weight'
        for name, m in model.named_modules() if isinstance(m, KWConv2d)
    }
    assert replaced and replaced <= plain_keys
    assert plain_keys - replaced <= kw_keys
    blocks = [
        b for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
        for b in layer
    ]
    assert all(
        isinstance(b.drop_path, DropPath) and b.drop_path.drop_prob == 0.1
        for b in blocks)


def test_slice_init_after_network_init():
    model = KWResNet(18)
    model.init_weights()
    cells = model.warehouse_manager.weights[0]
    # layer1.0.conv1 owns cells [0, 9): 9 cells of [64, 64], fan_out 9 * 64
    first = cells[:9]
    assert abs(first.std().item() - (2 / (9 * 64))**0.5) < 0.003
    # the stride-2 shortcut of stage 1 (64 -> 128, 1x1) owns the last 2
    last = cells[-2:]
    assert abs(last.std().item() - (2 / (2 * 64))**0.5) < 0.01
    assert torch.all(model.norm1.weight == 1)
    assert torch.all(model.layer1[0].bn2.weight == 1)  # no zero-init


@pytest.mark.parametrize('batch_size', [1, 2])
def test_training_step(batch_size):
    from mmpretrain.structures import DataSample
    model, _ = _build('resnet18-kw1d4x')
    model.init_weights()
    model.train()
    for m in model.modules():
        if isinstance(m, KWConv2d):
            m.update_temperature(0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(batch_size, 3, 64, 64)
    samples = [DataSample().set_gt_label(3) for _ in range(batch_size)]
    before = model.backbone.warehouse_manager.weights[3].detach().clone()
    losses = model(inputs, samples, mode='loss')
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = model.backbone.warehouse_manager.weights[3]
    assert not torch.equal(before, after)
    model.eval()
    with torch.no_grad():
        assert model(inputs, mode='tensor').shape == (batch_size, 1000)


def test_drop_in_for_stock_mmdet_resnet():
    from mmdet.models.backbones import ResNet
    backbone = ResNet(
        50,
        out_indices=(3, ),
        dcn=dict(type='KWConv2d', fallback_on_stride=False),
        stage_with_dcn=(False, False, False, True))
    assert isinstance(backbone.layer4[0].conv2, KWConv2d)
    backbone.init_weights()
    out = backbone(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 2048, 2, 2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match='drop_path_rate'):
        KWResNet(18, drop_path_rate=-0.1)
    with pytest.raises(ValueError, match='cell_num_ratio'):
        KWResNet(18, kw_cfg=dict(cell_num_ratio=1.5))


@pytest.mark.parametrize(
    'frozen_stages, trainable',
    [
        (-1, [True, True, True, True]),
        (1, [True, True, True, True]),
        # stage 0's warehouse also holds layer2's first conv1 and shortcut
        # (the hand-over rule): it freezes only with layer2; stage 1's holds
        # layer3's.
        (2, [False, True, True, True]),
        (3, [False, False, True, True]),
    ])
def test_frozen_stages_freeze_their_warehouses(frozen_stages, trainable):
    model = KWResNet(depth=18, frozen_stages=frozen_stages)
    for _ in range(2):  # after construction and after train()
        assert [w.requires_grad
                for w in model.warehouse_manager.weights] == trainable
        model.train()
    # A training step leaves the frozen warehouses unchanged.
    before = [w.detach().clone() for w in model.warehouse_manager.weights]
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.sum() for o in model(torch.randn(2, 3, 32, 32))).backward()
    optimizer.step()
    for cells, old, train_it in zip(model.warehouse_manager.weights, before,
                                    trainable):
        assert torch.equal(cells, old) != train_it


def test_kw_1x_cfg_is_the_configs_kw_cfg():
    """``KW_1X_CFG`` (the benchmarks' and tests' KW-1x options) is what the
    KW-1x ResNet configs build."""
    from mmengine.config import Config
    for depth in (18, 50):
        cfg = Config.fromfile(f'configs/kernelwarehouse/resnet{depth}-'
                              'kw1x_8xb128-300e_in1k.py')
        assert cfg.model.backbone.kw_cfg.to_dict() == KW_1X_CFG
