# Copyright (c) mmdyn contributors. All rights reserved.
"""Official-checkpoint converters.

The official layouts are recreated here as plain dicts of random tensors, from
the key names and shapes of the official model definitions; nothing official is
imported. Layer tests compute the official forward from such a dict with plain
torch ops and compare with our layer loaded through the converter's checks;
model tests convert a whole official-layout dict, load it strictly and check
every tensor against an independent key mapping written in the test.
"""
import glob
import math
import os.path as osp
import runpy
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from mmdyn.analysis.converters import (ConversionError, convert, convert_file,
                                       match_target, unwrap_state_dict)
from mmdyn.analysis.models import build_model

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _bn(prefix, c, d):
    d[prefix + 'weight'] = torch.rand(c) + 0.5
    d[prefix + 'bias'] = torch.randn(c) * 0.1
    d[prefix + 'running_mean'] = torch.randn(c) * 0.1
    d[prefix + 'running_var'] = torch.rand(c) + 0.5
    d[prefix + 'num_batches_tracked'] = torch.tensor(7)


def od_layer(prefix, c_in, c_out, k, groups, kernel_num, d):
    """Official ODConv2d keys (modules/odconv.py layout)."""
    h = max(int(c_in * 0.0625), 16)
    d[prefix +
      'weight'] = torch.randn(kernel_num, c_out, c_in // groups, k, k) * 0.2
    a = prefix + 'attention.'
    d[a + 'fc.weight'] = torch.randn(h, c_in, 1, 1) * 0.3
    _bn(a + 'bn.', h, d)
    d[a + 'channel_fc.weight'] = torch.randn(c_in, h, 1, 1) * 0.3
    d[a + 'channel_fc.bias'] = torch.randn(c_in) * 0.1
    if not (c_in == groups == c_out):
        d[a + 'filter_fc.weight'] = torch.randn(c_out, h, 1, 1) * 0.3
        d[a + 'filter_fc.bias'] = torch.randn(c_out) * 0.1
    if k > 1:
        d[a + 'spatial_fc.weight'] = torch.randn(k * k, h, 1, 1) * 0.3
        d[a + 'spatial_fc.bias'] = torch.randn(k * k) * 0.1
    if kernel_num > 1:
        d[a + 'kernel_fc.weight'] = torch.randn(kernel_num, h, 1, 1) * 0.3
        d[a + 'kernel_fc.bias'] = torch.randn(kernel_num) * 0.1
    return d


def official_odconv_forward(d, x, stride, padding, groups):
    """The ODConv forward (eval-mode BN, T = 1) from an official dict."""
    bank = d['weight']
    kernel_num, c_out, _, k, _ = bank.shape
    a = 'attention.'
    pooled = x.mean((2, 3))
    s = pooled @ d[a + 'fc.weight'].flatten(1).t()
    s = (s - d[a + 'bn.running_mean']) / torch.sqrt(
        d[a + 'bn.running_var'] + 1e-5) * d[a + 'bn.weight'] + \
        d[a + 'bn.bias']
    s = s.clamp(min=0)

    def head(name):
        return s @ d[a + name + '.weight'].flatten(1).t() + d[a + name +
                                                              '.bias']

    ch = torch.sigmoid(head('channel_fc'))
    fi = torch.sigmoid(head('filter_fc')) if a + 'filter_fc.weight' in d \
        else torch.ones(x.shape[0], c_out)
    sp = torch.sigmoid(head('spatial_fc')) if k > 1 else torch.ones(
        x.shape[0], 1)
    ke = torch.softmax(head('kernel_fc'), 1) if kernel_num > 1 else \
        torch.ones(x.shape[0], 1)
    outs = []
    for b in range(x.shape[0]):
        w = sum(ke[b, i] * bank[i] * sp[b].view(1, 1, k, k)
                for i in range(kernel_num))
        y = F.conv2d(x[b:b + 1] * ch[b].view(1, -1, 1, 1), w, None, stride,
                     padding, 1, groups)
        outs.append(y * fi[b].view(1, -1, 1, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    'c_in,c_out,k,groups,kernel_num,stride',
    [
        (16, 24, 3, 1, 4, 2),
        (32, 32, 3, 32, 1, 1),  # depthwise: no filter attention
        (24, 40, 1, 1, 1, 1),  # 1x1, K = 1: the fast path
    ])
def test_odconv_layer_matches_official_forward(c_in, c_out, k, groups,
                                               kernel_num, stride):
    from mmdyn.ops import ODConv2d
    official = od_layer('', c_in, c_out, k, groups, kernel_num, {})
    layer = ODConv2d(
        c_in,
        c_out,
        k,
        stride,
        k // 2,
        groups=groups,
        bias=False,
        kernel_num=kernel_num)
    layer.load_state_dict(match_target(official, layer.state_dict()))
    layer.eval()
    x = torch.randn(3, c_in, 9, 8)
    expected = official_odconv_forward(official, x, stride, k // 2, groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def kw_layer_official(prefix, c_in, m, n, d, bias_fc1=False):
    """Official KW attention keys (modules/kernel_warehouse.py)."""
    h = max(int(c_in * 0.0625), 16)
    a = prefix + 'attention.'
    d[a + 'fc1.weight'] = torch.randn(h, c_in) * 0.3
    if bias_fc1:
        d[a + 'fc1.bias'] = torch.randn(h) * 0.1
    _bn(a + 'norm1.', h, d)
    d[a + 'fc2.weight'] = torch.randn(m * (n + 1), h) * 0.3
    d[a + 'fc2.bias'] = torch.randn(m * (n + 1)) * 0.1
    return d


def official_kw_forward(d, cells, x, c_out, k, padding):
    """KW attention and kernel assembly at tau = 0, from an official dict and
    warehouse."""
    n, c_o, c_i = cells.shape[:3]
    c_in = x.shape[1]
    g_o, g_i = c_out // c_o, c_in // c_i
    m = k * k * g_o * g_i
    a = 'attention.'
    s = x.mean((2, 3)) @ d[a + 'fc1.weight'].t()
    s = (s - d[a + 'norm1.running_mean']
         ) / torch.sqrt(d[a + 'norm1.running_var'] +
                        1e-5) * d[a + 'norm1.weight'] + d[a + 'norm1.bias']
    z = (s.clamp(min=0) @ d[a + 'fc2.weight'].t() + d[a + 'fc2.bias'])
    z = z.view(-1, m, n + 1)
    z = z / (z.abs().sum(-1, keepdim=True) + 1e-3)
    alpha = z[..., :n]
    outs = []
    for b in range(x.shape[0]):
        w = torch.zeros(c_out, c_in, k, k)
        for s_pos in range(k * k):
            for o in range(g_o):
                for c in range(g_i):
                    i = (s_pos * g_o + o) * g_i + c
                    mix = (alpha[b, i].view(n, 1, 1) *
                           cells[:, :, :, 0, 0]).sum(0)
                    w[o * c_o:(o + 1) * c_o, c * c_i:(c + 1) * c_i, s_pos // k,
                      s_pos % k] = mix
        outs.append(F.conv2d(x[b:b + 1], w, None, 1, padding))
    return torch.cat(outs)


def test_kw_layer_matches_official_forward():
    from mmdyn.ops import KWConv2d
    c_in, c_out, k = 16, 32, 3
    # private warehouse with ratios 1/2: cells [16, 8], m = 9 * 2 * 2 = 36
    layer = KWConv2d(
        c_in,
        c_out,
        k,
        padding=1,
        bias=False,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5)
    m = n = 36
    official = kw_layer_official('', c_in, m, n, {})
    cells = torch.randn(n, 16, 8, 1, 1) * 0.3
    ours = dict(official)
    [warehouse_key] = [k for k in layer.state_dict() if 'weights.' in k]
    ours[warehouse_key] = cells
    layer.load_state_dict(match_target(ours, layer.state_dict()))
    layer.eval()
    x = torch.randn(2, c_in, 6, 7)
    expected = official_kw_forward(official, cells, x, c_out, k, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def ddf_layer_official(prefix, c, d):
    """Official DDFPack keys (ddf/ddf.py)."""
    mid = int(c * 0.2)
    d[prefix + 'spatial_branch.0.weight'] = torch.randn(9, c, 1, 1) * 0.3
    d[prefix + 'spatial_branch.0.bias'] = torch.randn(9) * 0.1
    d[prefix + 'channel_branch.1.weight'] = torch.randn(mid, c, 1, 1) * 0.3
    d[prefix + 'channel_branch.1.bias'] = torch.randn(mid) * 0.1
    d[prefix + 'channel_branch.3.weight'] = torch.randn(9 * c, mid, 1, 1) * 0.3
    d[prefix + 'channel_branch.3.bias'] = torch.randn(9 * c) * 0.1
    d[prefix + 'channel_branch.4.std'] = torch.randn(9 * c) * math.sqrt(2) / 3
    return d


def official_ddf_forward(d, x, stride, combine):
    """DDF: filters from the branches, then the explicit tap sum."""
    b, c, h, w = x.shape
    sf = F.conv2d(x, d['spatial_branch.0.weight'], d['spatial_branch.0.bias'],
                  stride)
    sf = sf - sf.mean(1, keepdim=True)
    sf = sf / (sf.std(1, keepdim=True) + 1e-10) * (math.sqrt(2) / 3)
    p = x.mean((2, 3), keepdim=True)
    p = F.relu(
        F.conv2d(p, d['channel_branch.1.weight'], d['channel_branch.1.bias']))
    cf = F.conv2d(p, d['channel_branch.3.weight'],
                  d['channel_branch.3.bias']).view(b, c, 9)
    cf = cf - cf.mean(2, keepdim=True)
    cf = cf / (cf.std(2, keepdim=True) + 1e-10)
    cf = cf * d['channel_branch.4.std'].view(1, c, 9)
    ho, wo = sf.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros(b, c, ho, wo)
    for i in range(3):
        for j in range(3):
            tap = padded[:, :, i:i + stride * ho:stride,
                         j:j + stride * wo:stride]
            c_f = cf[:, :, i * 3 + j].view(b, c, 1, 1)
            s_f = sf[:, i * 3 + j].view(b, 1, ho, wo)
            filt = c_f * s_f if combine == 'mul' else c_f + s_f
            out += tap * filt
    return out


@pytest.mark.parametrize('combine,stride', [('mul', 1), ('add', 2)])
def test_ddf_layer_matches_official_forward(combine, stride):
    from mmdyn.ops import DDFConv2d
    c = 20
    layer = DDFConv2d(c, c, 3, stride=stride, padding=1, combine=combine)
    official = ddf_layer_official('', c, {})
    layer.load_state_dict(match_target(official, layer.state_dict()))
    layer.eval()
    x = torch.randn(2, c, 8, 8)
    expected = official_ddf_forward(official, x, stride, combine)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def dyconv_layer_unofficial(prefix, c_in, c_out, k, d, kernel_num=4):
    """Dynamic_conv2d keys of kaijieshi7/Dynamic-convolution-Pytorch:

    kernel bank, 1x1-conv attention (fc1 without bias, fc2 with bias), hidden
    width int(C_in * 0.25) + 1, or K for a 3-channel input.
    """
    h = kernel_num if c_in == 3 else int(c_in * 0.25) + 1
    d[prefix + 'weight'] = torch.randn(kernel_num, c_out, c_in, k, k) * 0.2
    d[prefix + 'attention.fc1.weight'] = torch.randn(h, c_in, 1, 1) * 0.3
    d[prefix + 'attention.fc2.weight'] = torch.randn(kernel_num, h, 1, 1) * 0.3
    d[prefix + 'attention.fc2.bias'] = torch.randn(kernel_num) * 0.1
    return d


def unofficial_dyconv_forward(d, x, stride, padding, temperature=1.0):
    """Its forward: GAP -> fc1 -> ReLU -> fc2 -> softmax(z / T), then one
    grouped conv over the batch with the mixed kernels."""
    bank = d['weight']
    b = x.shape[0]
    z = F.relu(
        F.conv2d(x.mean((2, 3), keepdim=True), d['attention.fc1.weight']))
    z = F.conv2d(z, d['attention.fc2.weight'], d['attention.fc2.bias'])
    pi = torch.softmax(z.view(b, -1) / temperature, 1)
    w = (pi @ bank.view(bank.shape[0], -1)).view(-1, *bank.shape[2:])
    out = F.conv2d(x.view(1, -1, *x.shape[2:]), w, None, stride, padding, 1, b)
    return out.view(b, bank.shape[1], *out.shape[2:])


@pytest.mark.parametrize('c_in,c_out,k,stride', [(16, 24, 3, 2), (3, 8, 3, 1),
                                                 (20, 12, 1, 1)])
def test_dyconv_layer_matches_unofficial_forward(c_in, c_out, k, stride):
    from mmdyn.ops import DyConv2d
    official = dyconv_layer_unofficial('', c_in, c_out, k, {})
    layer = DyConv2d(c_in, c_out, k, stride, k // 2, bias=False)
    # its temperature is a plain attribute: filled with the inference T = 1
    layer.load_state_dict(match_target(official, layer.state_dict()))
    layer.eval()
    x = torch.randn(3, c_in, 9, 8)
    expected = unofficial_dyconv_forward(official, x, stride, k // 2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


# ---- whole models --------------------------------------------------------


def resnet_official(depth, conv_keys, num_classes=1000):
    """torchvision-v1.5 ResNet keys with ``conv_keys(prefix, name, c_in, c_out,
    k, stride, d)`` filling each block conv (and shortcut)."""
    d = OrderedDict()
    d['conv1.weight'] = torch.randn(64, 3, 7, 7) * 0.1
    _bn('bn1.', 64, d)
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth >= 50
    c_in = 64
    for stage, (count, planes) in enumerate(zip(blocks, [64, 128, 256, 512])):
        for j in range(count):
            p = f'layer{stage + 1}.{j}.'
            stride = 2 if stage > 0 and j == 0 else 1
            if bottleneck:
                convs = [('conv1', c_in, planes, 1, 1),
                         ('conv2', planes, planes, 3, stride),
                         ('conv3', planes, planes * 4, 1, 1)]
            else:
                convs = [('conv1', c_in, planes, 3, stride),
                         ('conv2', planes, planes, 3, 1)]
            for i, (name, ci, co, k, s) in enumerate(convs):
                conv_keys(p, name, ci, co, k, s, d)
                _bn(p + f'bn{i + 1}.', co, d)
            c_out = convs[-1][2]
            if j == 0 and (stride != 1 or c_in != c_out):
                conv_keys(p, 'downsample.0', c_in, c_out, 1, stride, d)
                _bn(p + 'downsample.1.', c_out, d)
            c_in = c_out
    d['fc.weight'] = torch.randn(num_classes, c_in) * 0.01
    d['fc.bias'] = torch.zeros(num_classes)
    return d


def plain_conv(prefix, name, ci, co, k, s, d):
    d[prefix + name + '.weight'] = torch.randn(co, ci, k, k) * 0.1


def resnet_mapping(key):
    """The test's own official -> mmdyn key mapping for ResNets."""
    if key.startswith('fc.'):
        return 'head.' + key
    return 'backbone.' + key


def check_converted(official, converted, model, mapping):
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    for key, value in official.items():
        assert torch.equal(state[mapping(key)], value), key
    # everything else is a temperature buffer at its inference value
    others = set(state) - {mapping(k) for k in official}
    assert others and all(k.endswith('temperature') for k in others)


def test_odconv_resnet18_whole_model():

    def od(prefix, name, ci, co, k, s, d):
        if name.startswith('downsample'):
            return plain_conv(prefix, name, ci, co, k, s, d)
        od_layer(prefix + name + '.', ci, co, k, 1, 1, d)

    official = resnet_official(18, od)
    config = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    converted, _ = convert(official, 'odconv', config=config)
    model = build_model(config)
    check_converted(official, converted, model, resnet_mapping)
    for key in [k for k in converted if k.endswith('temperature')]:
        assert float(converted[key]) == 1.0


def make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def test_odconv_mobilenet_v2_whole_model():
    width, kernel_num = 0.5, 1
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    d = OrderedDict()
    c_in = make_divisible(32 * width)
    d['features.0.0.weight'] = torch.randn(c_in, 3, 3, 3) * 0.1
    _bn('features.0.1.', c_in, d)
    mapping = {
        'features.0.0.': 'backbone.conv1.conv.',
        'features.0.1.': 'backbone.conv1.bn.'
    }
    i = 1
    for stage, (t, c, n, s) in enumerate(table, start=1):
        c_out = make_divisible(c * width)
        for j in range(n):
            hidden = int(round(c_in * t))
            p, q = f'features.{i}.conv.', f'backbone.layer{stage}.{j}.conv.'
            mods = []
            if t != 1:
                mods.append(('0.0', '0.1', c_in, hidden, 1, 1))
            mods.append(('dw', None, hidden, hidden, 3, hidden))
            mods.append(('pw', None, hidden, c_out, 1, 1))
            names = (['0.0', '0.1', '1.0', '1.1', '2', '3']
                     if t != 1 else ['0.0', '0.1', '1', '2'])
            for m_idx, (_, _, ci, co, k, g) in enumerate(mods):
                conv_name, bn_name = names[2 * m_idx], names[2 * m_idx + 1]
                od_layer(p + conv_name + '.', ci, co, k, g, kernel_num, d)
                _bn(p + bn_name + '.', co, d)
                mapping[p + conv_name + '.'] = q + f'{m_idx}.conv.'
                mapping[p + bn_name + '.'] = q + f'{m_idx}.bn.'
            c_in = c_out
            i += 1
    od_layer(f'features.{i}.0.', c_in, 1280, 1, 1, kernel_num, d)
    _bn(f'features.{i}.1.', 1280, d)
    mapping[f'features.{i}.0.'] = 'backbone.conv2.conv.'
    mapping[f'features.{i}.1.'] = 'backbone.conv2.bn.'
    d['classifier.1.weight'] = torch.randn(1000, 1280) * 0.01
    d['classifier.1.bias'] = torch.zeros(1000)
    mapping['classifier.1.'] = 'head.fc.'

    def map_key(key):
        # longest official prefix wins (features.1.conv.1. vs .1.1.)
        best = max((p for p in mapping if key.startswith(p)), key=len)
        return mapping[best] + key[len(best):]

    # no config given: found among the MobileNetV2 ODConv configs by shapes
    converted, config = convert(d, 'odconv')
    assert osp.basename(config).startswith('mobilenet-v2-w0.5-odconv1x')
    check_converted(d, converted, build_model(config), map_key)


def test_kw_resnet18_whole_model():
    # kw1x_resnet18: cells [64,64]/[128,128]/[256,256]/[512,512]
    sizes = [56, 47, 47, 27]
    cell = [64, 128, 256, 512]

    def kw(prefix, name, ci, co, k, s, d):
        stage = int(prefix[5]) - 1
        first = prefix.endswith('.0.')
        # hand-over: first-block conv1 and the shortcut use stage S - 1
        if first and name in ('conv1', 'downsample.0'):
            stage = max(stage - 1, 0)
        c = cell[stage]
        m = (co // c) * (ci // c) * k * k
        kw_layer_official(prefix + name + '.', ci, m, sizes[stage], d)

    official = resnet_official(18, kw)
    for i, (n, c) in enumerate(zip(sizes, cell)):
        official[f'warehouse_manager.weights.{i}'] = torch.randn(
            n, c, c, 1, 1) * 0.05
    config = osp.join(ROOT, 'configs/kernelwarehouse',
                      'resnet18-kw1x_8xb128-300e_in1k.py')
    converted, _ = convert(official, 'kw', config=config)
    model = build_model(config)
    check_converted(official, converted, model, resnet_mapping)
    for key in [k for k in converted if k.endswith('temperature')]:
        assert float(converted[key]) == 0.0


def test_ddf_resnet50_whole_model_and_ambiguity():

    def ddf(prefix, name, ci, co, k, s, d):
        if name == 'conv2':
            return ddf_layer_official(prefix + 'conv2.', ci, d)
        plain_conv(prefix, name, ci, co, k, s, d)

    official = resnet_official(50, ddf)
    # mul and add have the same weights: refuse to guess
    with pytest.raises(ConversionError, match="several configs"):
        convert(official, 'ddf')
    config = osp.join(ROOT, 'configs/ddf/resnet50-ddf-add_8xb128-130e_in1k.py')
    converted, used = convert(official, 'ddf', config=config)
    model = build_model(used)
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    for key, value in official.items():
        assert torch.equal(state[resnet_mapping(key)], value), key
    assert set(state) == {resnet_mapping(k) for k in official}


def test_dyconv_resnet18_whole_model_from_plain_state_dict(tmp_path):

    def dy(prefix, name, ci, co, k, s, d):
        # every block conv and the downsample 1x1 are Dynamic_conv2d
        dyconv_layer_unofficial(prefix + name + '.', ci, co, k, d)

    official = resnet_official(18, dy)
    src, dst = tmp_path / 'dy_resnet18.pth', tmp_path / 'out.pth'
    torch.save(official, src)  # torch.save(model.state_dict(), ...)
    # no config given: the one DyConv ResNet-18 config, found by shapes
    used = convert_file('dyconv', str(src), str(dst), log=None)
    assert osp.basename(used) == 'resnet18-dyconv4x_8xb32_in1k.py'
    converted = unwrap_state_dict(torch.load(dst, weights_only=True))
    model = build_model(used)
    check_converted(official, converted, model, resnet_mapping)
    for key in [k for k in converted if k.endswith('temperature')]:
        assert float(converted[key]) == 1.0


def test_refusals():
    official = od_layer('', 16, 16, 3, 1, 4, {})
    from mmdyn.ops import ODConv2d
    target = ODConv2d(
        16, 16, 3, padding=1, bias=False, kernel_num=4).state_dict()
    broken = dict(official)
    del broken['attention.kernel_fc.bias']
    with pytest.raises(ConversionError, match='kernel_fc.bias'):
        match_target(broken, target)
    extra = dict(official, **{'attention.extra.weight': torch.zeros(1)})
    with pytest.raises(ConversionError, match='attention.extra.weight'):
        match_target(extra, target)
    wrong = dict(official, weight=torch.zeros(2, 16, 16, 3, 3))
    with pytest.raises(ConversionError, match='shape'):
        match_target(wrong, target)
    with pytest.raises(ConversionError, match='needs no conversion'):
        convert({'backbone.conv1.weight': torch.zeros(1)}, 'odconv')
    with pytest.raises(ConversionError, match='no official layout'):
        convert({'stem.weight': torch.zeros(1)}, 'odconv')
    with pytest.raises(
            ConversionError, match='not part of the layout.*avgpool.extra'):
        convert(
            {
                'layer1.0.conv1.weight': torch.zeros(1),
                'avgpool.extra': torch.zeros(1)
            }, 'kw')


@pytest.mark.parametrize('family,folder', [('odconv', 'odconv'),
                                           ('kw', 'kernelwarehouse'),
                                           ('ddf', 'ddf'),
                                           ('dyconv', 'dyconv')])
def test_architecture_without_config_lists_the_supported_models(
        family, folder):
    """An official ResNet-34 (e.g. ODConv's od_resnet34): no config of the
    family has it; the refusal names it and lists the models that have one,
    instead of an empty 'closest:'."""
    state = {'layer1.0.conv1.weight': torch.zeros(1)}
    state.update(
        {f'layer3.{i}.conv1.weight': torch.zeros(1)
         for i in range(6)})  # 6 basic blocks in layer3: depth 34
    with pytest.raises(ConversionError) as info:
        convert(state, family)
    message = str(info.value)
    assert not message.rstrip().endswith(':'), message
    assert 'ResNet-34' in message
    shipped = {
        osp.basename(path).split('_')[0]
        for path in glob.glob(osp.join(ROOT, 'configs', folder, '*_in1k.py'))
    }
    assert shipped and all(name in message for name in shipped), message


def test_cli_roundtrip(tmp_path, monkeypatch):

    def od(prefix, name, ci, co, k, s, d):
        if name.startswith('downsample'):
            return plain_conv(prefix, name, ci, co, k, s, d)
        od_layer(prefix + name + '.', ci, co, k, 1, 1, d)

    official = resnet_official(18, od)
    src, dst = tmp_path / 'od.pth', tmp_path / 'out.pth'
    # official checkpoints are DataParallel saves: 'module.' prefixes
    torch.save({'state_dict': {
        'module.' + k: v
        for k, v in official.items()
    }}, src)
    config = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    # the script itself, run in-process
    monkeypatch.setattr(
        sys, 'argv',
        ['odconv2mmdyn.py',
         str(src), str(dst), '--config', config])
    runpy.run_path(
        osp.join(ROOT, 'tools/model_converters/odconv2mmdyn.py'),
        run_name='__main__')
    out = unwrap_state_dict(torch.load(dst, weights_only=True))
    assert torch.equal(out['backbone.layer2.0.conv1.weight'],
                       official['layer2.0.conv1.weight'])
    # a missing tensor is refused with its name
    del official['layer4.1.conv2.attention.spatial_fc.weight']
    torch.save(official, src)
    with pytest.raises(ConversionError, match='spatial_fc.weight'):
        convert_file('odconv', str(src), str(dst), config, log=None)
