# Copyright (c) mmdyn contributors. All rights reserved.
"""KW-MobileNetV2 (kw1d2x / kw1x / kw4x, x1.0 / x0.5) and KW-ConvNeXt-T.

References: the exact parameter counts and warehouses of the models built
by the official code (https://github.com/OSVAI/KernelWarehouse, 1000 classes;
the paper rounds the counts to 0.01M), mmpretrain's own MobileNetV2 /
ConvNeXt (at temperature 1 every KW kernel is its one-to-one cells, so the KW
networks must compute the same function as the static networks carrying
those kernels), and the paper's init rules.
"""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmpretrain.models.backbones import ConvNeXt, MobileNetV2
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import mmdyn.engine  # noqa: F401
import mmdyn.models  # noqa: F401
from mmdyn.models.backbones import KW1d2xMobileNetV2, KWConvNeXt, KWMobileNetV2
from mmdyn.models.heads import KWLinearClsHead
from mmdyn.ops import KWConv2d, KWLinear

CONFIG_DIR = osp.join(
    osp.dirname(__file__), '..', '..', 'configs', 'kernelwarehouse')

# Parameter counts of the models the official code builds (1000 classes).
PARITY = {
    'mobilenet-v2-kw1d2x_8xb32_in1k.py': 2_654_396,
    'mobilenet-v2-kw1x_8xb32_in1k.py': 5_168_146,
    'mobilenet-v2-kw4x_8xb32_in1k.py': 11_379_382,
    'mobilenet-v2-w0.5-kw1d2x_8xb32_in1k.py': 1_466_888,
    'mobilenet-v2-w0.5-kw1x_8xb32_in1k.py': 2_854_522,
    'mobilenet-v2-w0.5-kw4x_8xb32_in1k.py': 4_648_587,
    'convnext-tiny-kw1x_32xb128_in1k.py': 39_370_674,
}


def build_from_config(name, device=None, overrides=None):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, name))
    for key, value in (overrides or {}).items():
        cfg.model[key].update(value)
    # As mmengine's Runner does.
    cfg.model.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        if device is None:
            return cfg, MODELS.build(cfg.model)
        with torch.device(device):
            return cfg, MODELS.build(cfg.model)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def kw_layers(module):
    return [m for m in module.modules() if isinstance(m, (KWConv2d, KWLinear))]


def set_temperature(module, value):
    for m in kw_layers(module):
        m.update_temperature(value)


def warehouse_table(manager):
    """[(cells, c_out, c_in)] in warehouse order; all cells are 1x1."""
    table = []
    for cells in manager.weights:
        assert all(k == 1 for k in cells.shape[3:])
        table.append(tuple(cells.shape[:3]))
    return table


def one_to_one_kernel(layer):
    """The static kernel a KW layer computes at temperature 1 (cell_num_ratio
    1): mixture i = (s * G_o + o) * G_i + c is its own cell t0 + i, placed at
    output block o, input block c, spatial position s, as the official kernel
    assembly orders them."""
    cells = layer.warehouse_manager.weights[layer.warehouse_id].detach()
    c_o, c_i = cells.shape[1:3]
    out_channels, in_per_group, kh, kw = layer.weight_shape
    g_o, g_i = out_channels // c_o, in_per_group // c_i
    start = layer.cell_range[0]
    kernel = torch.empty(out_channels, in_per_group, kh, kw)
    for y in range(kh):
        for x in range(kw):
            for o in range(g_o):
                for c in range(g_i):
                    i = ((y * kw + x) * g_o + o) * g_i + c
                    kernel[o * c_o:(o + 1) * c_o, c * c_i:(c + 1) * c_i, y,
                           x] = cells[start + i, :, :, 0, 0]
    return kernel


def randomize_norms_and_biases(module):
    """Non-trivial norm statistics/affines and biases, so that copying them (or
    not) shows in the outputs."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, (KWConv2d, KWLinear)) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize('name', sorted(PARITY))
def test_config_parameter_count_matches_official(name):
    _, model = build_from_config(name, device='meta')
    assert num_params(model) == PARITY[name]


def test_kw1x_mobilenet_v2_warehouses_match_official_table():
    manager = KWMobileNetV2(widen_factor=1.0).warehouse_manager
    # stem; S1 dw, pw; S2 pw, dw; S3..S6 pw, dw (the official model's)
    assert warehouse_table(manager) == [(9, 32, 3), (36, 32, 1), (34, 8, 16),
                                        (78, 8, 24), (18, 144, 1),
                                        (42, 32, 32), (27, 192, 1),
                                        (102, 32, 64), (36, 384, 1),
                                        (120, 32, 96), (27, 576, 1),
                                        (58, 160, 160), (27, 960, 1)]


def test_kw4x_mobilenet_v2_warehouses_match_official_examples():
    manager = KWMobileNetV2(
        widen_factor=1.0, cell_num_ratio=4,
        sharing_range=('layer', )).warehouse_manager
    table = warehouse_table(manager)
    assert len(table) == 19
    assert table[0] == (36, 32, 3)
    # Stage 6 holds the last three warehouses: expansion, dw, projection.
    assert table[-3:] == [(12, 960, 160), (108, 960, 1), (80, 160, 320)]


def test_kw1d2x_mobilenet_v2_warehouses_match_official_table():
    backbone = KW1d2xMobileNetV2(widen_factor=1.0)
    head = KWLinearClsHead(num_classes=1000, in_channels=1280)
    assert warehouse_table(backbone.warehouse_manager) + warehouse_table(
        head.warehouse_manager) == [(9, 32, 3), (36, 32, 1), (18, 144, 1),
                                    (27, 192, 1), (36, 384, 1), (27, 576, 1),
                                    (6, 480, 80), (27, 960, 1), (40, 80, 160),
                                    (20, 1000, 32)]
    # KW: stem, 17 depthwise, 6 stage-6 1x1 convs, final 1x1; the 27 other
    # 1x1 convs (stages 1-5) are plain.
    assert len(kw_layers(backbone)) == 25
    plain = [m for m in backbone.modules() if type(m) is nn.Conv2d]
    assert len(plain) == 27
    assert all(m.kernel_size == (1, 1) for m in plain)
    assert isinstance(head.fc, KWLinear) and head.fc.bias is not None


def test_kw_convnext_tiny_warehouses_match_official_table():
    backbone = KWConvNeXt(arch='tiny')
    # stem, 3 downsample convs, then per stage (dw, pw) in reservation order
    assert warehouse_table(backbone.warehouse_manager) == [(16, 96, 3),
                                                           (4, 192, 96),
                                                           (4, 384, 192),
                                                           (4, 768, 384),
                                                           (147, 96, 1),
                                                           (24, 96, 96),
                                                           (147, 192, 1),
                                                           (24, 192, 192),
                                                           (441, 384, 1),
                                                           (72, 384, 384),
                                                           (147, 768, 1),
                                                           (24, 768, 768)]
    layers = kw_layers(backbone)
    assert len(layers) == 1 + 3 + 3 * 18
    assert all(m.bias is not None for m in layers)
    attention = layers[0].attention
    assert isinstance(attention.norm1, nn.LayerNorm)
    assert attention.fc1.bias is not None


def test_kw_mobilenet_v2_attention_is_biasless_fc1_with_bn():
    layers = kw_layers(KWMobileNetV2(widen_factor=0.5))
    assert len(layers) == 52
    for layer in layers:
        assert layer.bias is None
        assert isinstance(layer.attention.norm1, nn.BatchNorm1d)
        assert layer.attention.fc1.bias is None


# ------------------------------------------------- same function as static


def test_kw_mobilenet_v2_at_temperature_1_equals_static_mobilenet_v2():
    kw = KWMobileNetV2(widen_factor=0.5, out_indices=(1, 4, 7)).eval()
    ref = MobileNetV2(widen_factor=0.5, out_indices=(1, 4, 7))
    ref.eval()  # mmpretrain's train() returns None
    set_temperature(kw, 1.0)
    randomize_norms_and_biases(kw)
    kw_modules = dict(kw.named_modules())
    copied = 0
    with torch.no_grad():
        for name, ref_module in ref.named_modules():
            if isinstance(ref_module, nn.Conv2d):
                layer = kw_modules[name]
                assert isinstance(layer, KWConv2d), name
                ref_module.weight.copy_(one_to_one_kernel(layer))
                copied += 1
            elif isinstance(ref_module, nn.BatchNorm2d):
                ref_module.load_state_dict(kw_modules[name].state_dict())
    assert copied == 52
    x = torch.randn(2, 3, 64, 64)
    outs, ref_outs = kw(x), ref(x)
    assert [o.shape for o in outs] == [(2, 16, 16, 16), (2, 48, 4, 4),
                                       (2, 1280, 2, 2)]
    for out, ref_out in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_kw_convnext_at_temperature_1_equals_static_convnext():
    arch = dict(depths=[1, 1, 2, 1], channels=[16, 32, 48, 64])
    kw = KWConvNeXt(arch=arch, out_indices=(1, 3)).eval()
    ref = ConvNeXt(arch=arch, out_indices=[1, 3], linear_pw_conv=False)
    ref.eval()
    set_temperature(kw, 1.0)
    randomize_norms_and_biases(kw)
    with torch.no_grad():
        for block in (b for stage in kw.stages for b in stage):
            block.gamma.uniform_(0.5, 1.0)

        def copy_conv(dst, layer):
            dst.weight.copy_(one_to_one_kernel(layer))
            dst.bias.copy_(layer.bias)

        for i in range(4):
            stem_or_ds = kw.downsample_layers[i]
            conv_idx, norm_idx = (0, 1) if i == 0 else (1, 0)
            copy_conv(ref.downsample_layers[i][conv_idx], stem_or_ds[conv_idx])
            ref.downsample_layers[i][norm_idx].load_state_dict(
                stem_or_ds[norm_idx].state_dict())
            for block, ref_block in zip(kw.stages[i], ref.stages[i]):
                copy_conv(ref_block.depthwise_conv, block.dwconv)
                copy_conv(ref_block.pointwise_conv1, block.pwconv1)
                copy_conv(ref_block.pointwise_conv2, block.pwconv2)
                ref_block.norm.load_state_dict(block.norm.state_dict())
                ref_block.gamma.copy_(block.gamma.flatten())
        for i in (1, 3):
            getattr(ref, f'norm{i}').load_state_dict(
                getattr(kw, f'norm{i}').state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs, ref_outs = kw(x), ref(x)
    assert [o.shape for o in outs] == [(2, 32), (2, 64)]
    for out, ref_out in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ training


def train_one_step(model, size):
    model.train()
    set_temperature(model, 0.5)  # both the attention and beta contribute
    data = dict(
        inputs=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8)],
        data_samples=[DataSample().set_gt_label(7)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    log_vars = model.train_step(data, wrapper)
    assert torch.isfinite(log_vars['loss'])
    params = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], params[n])}
    warehouses = {n for n in before if 'warehouse_manager.weights' in n}
    attention = {n for n in before if '.attention.fc2.weight' in n}
    assert warehouses and warehouses <= changed
    assert attention and attention <= changed
    return model


def test_kw_mobilenet_v2_trains_at_batch_size_1():
    _, model = build_from_config('mobilenet-v2-w0.5-kw1d2x_8xb32_in1k.py')
    model = train_one_step(model, 64)
    assert 'head.warehouse_manager.weights.0' in dict(model.named_parameters())


def test_kw_convnext_trains_at_batch_size_1():
    # The tiny config's model (LN attention, mixup/cutmix) on a narrower,
    # shallower network to keep the test fast; no drop path, which could
    # drop a whole block of this one-sample batch.
    overrides = dict(
        backbone=dict(
            arch=dict(depths=[1, 1, 3, 1], channels=[32, 64, 96, 128]),
            drop_path_rate=0.),
        head=dict(in_channels=128))
    _, model = build_from_config(
        'convnext-tiny-kw1x_32xb128_in1k.py', overrides=overrides)
    with torch.no_grad():
        # Layer scale 1 (the paper's detection setting) instead of 1e-6, so
        # that every block's update is large enough to show.
        for stage in model.backbone.stages:
            for block in stage:
                block.gamma.fill_(1.0)
    train_one_step(model, 32)


# ------------------------------------------------------- init and config


def test_kw_convnext_init_weights_keeps_kaiming_attention():
    """Mmpretrain's ConvNeXt classifier init draws every Linear from N(0,
    0.02); the KW attention linears must keep the paper's fan-out Kaiming init
    (std sqrt(2 / out_features))."""
    overrides = dict(
        backbone=dict(
            arch=dict(depths=[1, 1, 1, 3], channels=[32, 64, 96, 128])),
        head=dict(in_channels=128))
    _, model = build_from_config(
        'convnext-tiny-kw1x_32xb128_in1k.py', overrides=overrides)
    model.init_weights()
    fc2 = model.backbone.stages[3][2].pwconv2.attention.fc2
    expected = (2 / fc2.out_features)**0.5
    assert abs(fc2.weight.std().item() / expected - 1) < 0.1
    head = model.head.fc.weight
    assert abs(head.std().item() / 0.02 - 1) < 0.1


def test_configs_follow_the_paper_recipes():
    cfg = Config.fromfile(
        osp.join(CONFIG_DIR, 'mobilenet-v2-kw1x_8xb32_in1k.py'))
    assert cfg.train_cfg.max_epochs == 150
    assert cfg.optim_wrapper.optimizer.lr == 0.05
    assert cfg.optim_wrapper.optimizer.weight_decay == 4e-5
    assert cfg.custom_hooks == [dict(type='DynamicTemperatureHook', epochs=15)]
    assert cfg.model.head.loss.label_smooth_val == 0.1
    smoothing_off = ('mobilenet-v2-w0.5-kw1x_8xb32_in1k.py',
                     'mobilenet-v2-kw1d2x_8xb32_in1k.py',
                     'mobilenet-v2-w0.5-kw1d2x_8xb32_in1k.py')
    for name in smoothing_off:
        cfg = Config.fromfile(osp.join(CONFIG_DIR, name))
        assert cfg.model.head.loss.type == 'CrossEntropyLoss', name
    cfg = Config.fromfile(
        osp.join(CONFIG_DIR, 'mobilenet-v2-w0.5-kw4x_'
                 '8xb32_in1k.py'))
    assert cfg.model.head.loss.label_smooth_val == 0.1
    cfg = Config.fromfile(
        osp.join(CONFIG_DIR, 'convnext-tiny-kw1x_32xb128_in1k.py'))
    assert cfg.model.backbone.drop_path_rate == 0.3
    assert [h['type'] for h in cfg.custom_hooks
            ] == ['EMAHook', 'DynamicTemperatureHook']


# --------------------------------------------------- interface behaviour


def test_frozen_stages_freeze_only_warehouses_of_frozen_layers():
    backbone = KWMobileNetV2(widen_factor=0.5, frozen_stages=2)
    # conv1, layer1 and layer2 are frozen: the stem and KW stage 1
    # warehouses (stage 1 also holds layer2's first block); layer2's second
    # block shares the stage-2 warehouses with layer3's first block.
    grads = [w.requires_grad for w in backbone.warehouse_manager.weights]
    assert grads == [False] * 3 + [True] * 10
    assert not any(p.requires_grad for p in backbone.layer2.parameters())
    assert all(p.requires_grad for p in backbone.layer3.parameters())
    backbone.train()
    assert not backbone.layer1.training and backbone.layer3.training

    # norm_eval also stops the attention-branch BNs, as the paper's
    # detection backbone does.
    backbone = KWMobileNetV2(widen_factor=0.5, norm_eval=True).train()
    norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in norms)
    assert not any(m.training for m in norms)
    assert backbone.layer3.training


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match='out_indices'):
        KWMobileNetV2(out_indices=(8, ))
    with pytest.raises(ValueError, match='frozen_stages'):
        KWMobileNetV2(frozen_stages=8)
    with pytest.raises(ValueError, match='widen_factor'):
        KWMobileNetV2(widen_factor=0)
    with pytest.raises(ValueError, match='cell_num_ratio'):
        KW1d2xMobileNetV2(cell_num_ratio=2)
    with pytest.raises(ValueError, match='arch'):
        KWConvNeXt(arch='tiniest')
    with pytest.raises(ValueError, match='out_indices'):
        KWConvNeXt(
            arch=dict(depths=[1, 1], channels=[16, 32]), out_indices=(2, ))
    with pytest.raises(ValueError, match='dropout_ratio'):
        KWLinearClsHead(10, 32, dropout_ratio=1.5)
