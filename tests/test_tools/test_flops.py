# Copyright (c) mmdyn contributors. All rights reserved.
"""Multiply-add counting: formulas against hand-computed values and static
convs of the same shape, whole models against reference counts of the
official implementations (the convention of docs/flops.md)."""
import os.path as osp

import pytest
import torch
from script_loading import load_script as load_tool  # noqa: E402
from torch import nn

from mmdyn.analysis.flops import (count_config_madds, count_madds,
                                  format_report, static_layer_madds)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

CONFIGS = osp.join(ROOT, 'configs')


def madds_of(model, x, num_images=None):
    model.eval()
    return count_madds(
        model, lambda: model(x), num_images=num_images or x.shape[0])


def test_static_conv_formula_hand_computed():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=True)
    x = torch.randn(3, 8, 10, 10)
    # output 3 x 16 x 5 x 5, each output sums (8 / 2) * 3 * 3 products
    assert static_layer_madds(conv, x, conv(x)) == 3 * 16 * 5 * 5 * 4 * 9
    linear = nn.Linear(10, 7)
    y = torch.randn(4, 10)
    assert static_layer_madds(linear, y, linear(y)) == 4 * 7 * 10
    deconv = nn.ConvTranspose2d(6, 4, 2, stride=2)
    z = torch.randn(1, 6, 5, 5)
    # every input element is scattered to C_out * k * k outputs
    assert static_layer_madds(deconv, z, deconv(z)) == 6 * 25 * 4 * 4
    assert static_layer_madds(nn.ReLU(), y, y) is None


def test_count_madds_per_image_and_repeated_calls():

    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = self.conv(x)
            x = self.conv(x[:, :3])  # called twice: both calls count
            return self.fc(x.mean((2, 3)))

    report = madds_of(Net(), torch.randn(2, 3, 6, 6))
    per_image = report.per_image()
    expected = 2 * (4 * 36 * 3 * 9) + 5 * 4
    assert per_image['conv'] == expected
    assert per_image['total'] == expected
    assert report.params == (4 * 3 * 9 + 4) + (5 * 4 + 5)
    conv_record = [r for r in report.layers if r.name == 'conv'][0]
    assert conv_record.calls == 2
    assert 'total' in format_report(report, per_layer=True)


def test_dynamic_layer_children_not_counted_twice():

    class FakeDynamic(nn.Module):

        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(3, 2)  # inside: must not count

        def forward(self, x):
            self.attention(x.mean((2, 3)))
            return x

        def madds_per_sample(self, input_hw):
            h, w = input_hw
            return dict(conv=h * w, att=7, agg=11, scal=13)

    model = nn.Sequential(FakeDynamic(), nn.Conv2d(3, 1, 1))
    report = madds_of(model, torch.randn(4, 3, 5, 6))
    per_image = report.per_image()
    assert per_image == dict(
        conv=30 + 30 * 3, att=7, agg=11, scal=13, total=30 + 90 + 31)


def _odconv_reference(c_in, c_out, k, groups, kernel_num, h, w, stride=1):
    """ODConv's cost by the rules of docs/flops.md, written out independently
    of the layer."""
    hidden = max(int(c_in / 16), 16)
    pad = k // 2
    h_out = (h + 2 * pad - k) // stride + 1
    w_out = (w + 2 * pad - k) // stride + 1
    depthwise = c_in == groups == c_out
    numel_w = c_out * (c_in // groups) * k * k
    att = c_in * hidden + hidden * c_in  # fc, channel_fc
    att += 0 if depthwise else hidden * c_out
    att += hidden * k * k if k > 1 else 0
    att += hidden * kernel_num if kernel_num > 1 else 0
    if kernel_num > 1:
        agg = kernel_num * numel_w
    else:
        agg = numel_w if k > 1 else 0
    scal = c_in * h * w + (0 if depthwise else c_out * h_out * w_out)
    return dict(att=att, agg=agg, scal=scal)


@pytest.mark.parametrize(
    'c_in,c_out,k,groups,kernel_num,stride',
    [
        (16, 32, 3, 1, 1, 1),
        (16, 32, 3, 1, 4, 2),
        (32, 64, 1, 1, 1, 1),
        (32, 64, 1, 1, 4, 1),
        (24, 24, 3, 24, 1, 1),  # depthwise: no filter attention
        (24, 48, 3, 2, 2, 1),
    ])
def test_odconv_layer_counts(c_in, c_out, k, groups, kernel_num, stride):
    from mmdyn.ops import ODConv2d
    h, w = 9, 7
    layer = ODConv2d(
        c_in,
        c_out,
        k,
        stride=stride,
        padding=k // 2,
        groups=groups,
        bias=False,
        kernel_num=kernel_num)
    static = nn.Conv2d(
        c_in,
        c_out,
        k,
        stride=stride,
        padding=k // 2,
        groups=groups,
        bias=False)
    x = torch.randn(2, c_in, h, w)
    dyn = madds_of(layer, x).per_image()
    # the conv part is one ordinary conv of the same shape
    assert dyn['conv'] == madds_of(static, x).per_image()['conv']
    ref = _odconv_reference(c_in, c_out, k, groups, kernel_num, h, w, stride)
    for column in ('att', 'agg', 'scal'):
        assert dyn[column] == ref[column], column


def test_dyconv_layer_counts():
    from mmdyn.ops import DyConv2d
    layer = DyConv2d(16, 32, 3, padding=1, bias=False, kernel_num=4)
    static = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 8, 8)
    dyn = madds_of(layer, x).per_image()
    assert dyn['conv'] == madds_of(static, x).per_image()['conv']
    assert dyn['agg'] == 4 * 32 * 16 * 9  # K * numel(W)
    hidden = int(16 * 0.25) + 1  # routing: GAP -> C_in->h -> h->K
    assert dyn['att'] == 16 * hidden + hidden * 4
    assert dyn['scal'] == 0


def test_kw_layer_counts():
    from mmdyn.ops import KWConv2d
    layer = KWConv2d(16, 32, 3, padding=1, bias=False)
    static = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 8, 8)
    dyn = madds_of(layer, x).per_image()
    assert dyn['conv'] == madds_of(static, x).per_image()['conv']
    # one private warehouse: cell [32, 16], m = 9 mixtures, n = 9 cells;
    # assembling is the [m x n] @ [n x cell] product = numel(W) * n
    assert dyn['agg'] == 32 * 16 * 9 * 9
    hidden = 16  # max(int(16 / 16), 16)
    assert dyn['att'] == 16 * hidden + hidden * 9 * (9 + 1)


def test_ddf_layer_counts():
    from mmdyn.ops import DDFConv2d
    layer = DDFConv2d(20, 20, 3, stride=2, padding=1)
    x = torch.randn(2, 20, 8, 8)
    dyn = madds_of(layer, x).per_image()
    # docs/flops.md: conv = C * Ho * Wo * k^2 (a depthwise conv's count)
    depthwise = nn.Conv2d(20, 20, 3, stride=2, padding=1, groups=20)
    assert dyn['conv'] == madds_of(depthwise, x).per_image()['conv']
    assert dyn['agg'] == 20 * 4 * 4 * 9  # combining the two filters
    mid = int(20 * 0.2)
    spatial = 20 * 9 * 4 * 4  # 1x1 conv C -> k^2 at output resolution
    channel = 20 * mid + mid * 20 * 9
    assert dyn['att'] == spatial + channel


def _config(pattern):
    import glob
    found = sorted(glob.glob(osp.join(CONFIGS, pattern)))
    assert found, f'no config matches {pattern}'
    return found[0]


# Millions of multiply-adds per 224x224 image, counted with the convention of
# docs/flops.md by forward hooks on the official implementations (a batch of
# two images, divided by two); a column left out has no single reference
# number.
REFERENCE_MADDS = {
    'odconv/resnet18-odconv1x_*in1k.py':
    dict(conv=1814.1, att=0.25, agg=11.0, scal=3.2, total=1828.5),
    'odconv/resnet18-odconv4x_*in1k.py':
    dict(conv=1814.1, att=0.25, agg=43.9, scal=3.2, total=1861.4),
    'odconv/resnet50-odconv1x_*in1k.py':
    dict(conv=4089.2, att=3.0, agg=11.3, scal=17.7, total=4121.2),
    'odconv/mobilenet-v2-odconv1x_*in1k.py':
    dict(conv=300.8, att=1.4, agg=0.06, scal=10.6, total=312.8),
    'odconv/mobilenet-v2-odconv4x_*in1k.py':
    dict(conv=300.8, att=1.4, agg=8.8, scal=10.6, total=321.5),
    'kernelwarehouse/resnet18-kw1x_*in1k.py':
    dict(conv=1814.1, agg=385, total=2199.2),
    'kernelwarehouse/mobilenet-v2-kw1x_*in1k.py':
    dict(conv=300.8, att=1.6, agg=157, total=459.0),
    'ddf/resnet50-ddf-mul_*in1k.py':
    dict(conv=2251.9, att=14.9, agg=12.4, total=2279.3),
    'dyconv/resnet18-dyconv4x_*in1k.py':
    dict(conv=1814.1, att=0.3, agg=44.6, total=1859.0),
}


def _close(value, reference):
    # 1 % of the reference, or half a unit of its last printed digit
    return abs(value - reference) <= max(0.01 * reference, 0.05)


@pytest.mark.parametrize('pattern', sorted(REFERENCE_MADDS))
def test_model_totals_match_reference_counts(pattern):
    report = count_config_madds(_config(pattern))
    ours = {k: v / 1e6 for k, v in report.per_image().items()}
    mismatched = {
        column: (round(ours[column], 2), reference)
        for column, reference in REFERENCE_MADDS[pattern].items()
        if not _close(ours[column], reference)
    }
    assert not mismatched, f'(ours, reference) in M: {mismatched}'


def test_v1_count_reproduces_the_published_resnet50_madds():
    """The ODConv README counts ResNet-50 with the stride on the first 1x1
    (v1); with that placement (style='caffe') our count gives its static
    baseline, 3858M, and ODConv 1x within 1 % of its 3916M."""
    report = count_config_madds(
        _config('odconv/resnet50-odconv1x_*in1k.py'),
        cfg_options={'model.backbone.style': 'caffe'})
    ours = {k: v / 1e6 for k, v in report.per_image().items()}
    assert abs(ours['conv'] - 3858.0) < 0.1
    assert _close(ours['total'], 3916)


def test_static_resnet18_and_detector(tmp_path):
    cfg = tmp_path / 'r18.py'
    cfg.write_text("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n")
    report = count_config_madds(str(cfg))
    assert abs(report.per_image()['total'] / 1e6 - 1814.1) < 0.1
    assert report.params == 11_689_512


def test_get_flops_cli_markdown(tmp_path, capsys):
    cfg = tmp_path / 'r18.py'
    cfg.write_text("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n")
    load_tool('tools/analysis_tools/get_flops.py').main(
        [str(cfg), '--shape', '128', '--markdown'])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith('| r18')][0]
    # 224 -> 112 -> 56 ... -> 7 becomes 128 -> 64 ... -> 4: every conv map
    # has (4/7)^2 of the positions, the classifier is unchanged
    fc = 512 * 1000
    expected_g = ((1814.07e6 - fc) * 16 / 49 + fc) / 1e9
    assert abs(float(row.split('|')[-2]) - expected_g) < 0.001
    assert '11.69' in row


# Two-stage detectors: the RoI heads are counted on a fixed number of
# proposals (the config's test_cfg.rpn.max_per_img: 300 for the demo
# configs), whatever a randomly initialised RPN keeps. On a 32x32 image the
# RPN has only (8^2 + 4^2 + 2^2 + 1 + 1) * 3 = 258 anchors, so counting the
# proposals it keeps would see fewer than 300.
DEMO_FASTER = osp.join(CONFIGS, 'demo', 'faster-rcnn_r18_fpn_demo.py')
DEMO_MASK = osp.join(CONFIGS, 'demo', 'mask-rcnn_r18_fpn_demo.py')
TINY = (32, 32)


def _head_madds(report, prefix):
    return sum(
        layer.total for layer in report.layers
        if layer.name.startswith(prefix)) / report.num_images


def _box_head_per_roi(channels=64, roi=7, fc=256, classes=3):
    # Shared2FCBBoxHead: fc1 (C*7*7 -> fc), fc2 (fc -> fc), fc_cls
    # (fc -> classes + 1), fc_reg (fc -> 4 * classes, class-specific)
    return (channels * roi * roi * fc + fc * fc + fc * (classes + 1) +
            fc * 4 * classes)


def _mask_head_per_roi(channels=64, classes=3):
    # FCNMaskHead: four 3x3 convs C -> C on 14x14, a 2x2 stride-2 deconv
    # C -> C (14x14 in), a 1x1 conv C -> classes on 28x28
    return (4 * 14 * 14 * channels * channels * 9 +
            14 * 14 * channels * channels * 4 + 28 * 28 * channels * classes)


def test_two_stage_heads_counted_on_a_fixed_number_of_proposals():
    faster = count_config_madds(DEMO_FASTER, shape=TINY)
    mask = count_config_madds(DEMO_MASK, shape=TINY)
    box = 300 * _box_head_per_roi()
    assert _head_madds(faster, 'roi_head.bbox_head.') == box
    assert _head_madds(mask, 'roi_head.bbox_head.') == box
    # the mask head sees the first 100 proposals (the detections kept at
    # test time, test_cfg.rcnn.max_per_img = 100)
    per_mask = _mask_head_per_roi()
    assert _head_madds(mask, 'roi_head.mask_head.') == 100 * per_mask
    # Faster and Mask R-CNN differ by exactly the mask head
    assert mask.per_image()['total'] - faster.per_image()['total'] == \
        100 * per_mask
    # an explicit proposal number
    fifty = count_config_madds(DEMO_FASTER, shape=TINY, num_proposals=50)
    assert _head_madds(fifty, 'roi_head.bbox_head.') == \
        50 * _box_head_per_roi()


def test_get_flops_cli_proposals(capsys):
    tool = load_tool('tools/analysis_tools/get_flops.py')
    tool.main([DEMO_FASTER, '--shape', '32', '--proposals', '10'])
    out = capsys.readouterr().out
    assert 'RoI heads on 10 proposals per image' in out
