# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse converters: MobileNetV2 (1/2x with its KW classifier, 1x,
4x), ConvNeXt-T, and ResNet-18/50 at every budget.

An official-layout state dict is made by renaming the built mmdyn model's
keys with this test's own mapping (the official names written out from the
official model definitions) and filling them with random values. The
official forward is then re-implemented here from that dict with plain
torch ops: each layer's warehouse is found by the official rule (layer
names fused by the sharing range, warehouses numbered in order of first
reservation), kernels are assembled with the official reshape/permute, and
the network is run as the official code runs it. The converted model must
give the same logits.
"""
import argparse
import math
import os.path as osp
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from mmdyn.analysis.converters import ConversionError, convert, convert_file
from mmdyn.analysis.models import build_model

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
KW = osp.join(ROOT, 'configs', 'kernelwarehouse')
MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
MBV2_KW_STAGES = [1, 2, 3, 4, 5, 6, 6]


def randomize(shapes, seed=0):
    """Random official-looking values: positive BN variances, small
    weights."""
    gen = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(10)
        elif key.endswith('running_var'):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith('running_mean'):
            out[key] = torch.randn(shape, generator=gen) * 0.1
        elif key.endswith('norm1.weight') or key.endswith('bn.weight'):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            fan = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan)
    return out


def official_dict(model, to_official):
    shapes = OrderedDict((to_official(k), tuple(v.shape))
                         for k, v in model.state_dict().items()
                         if not k.endswith('temperature'))
    return randomize(shapes)


def make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def fuse(name, sharing_range):
    """The official warehouse name of a layer name."""
    parts = []
    for sub in name.split('_'):
        for token in sharing_range:
            if sub.startswith(token):
                sub = token
        parts.append(sub)
    return '_'.join(parts)


def number_warehouses(layers, sharing_range):
    order = []
    for layer in layers:
        if layer['kw']:
            fused = fuse(layer['name'], sharing_range)
            if fused not in order:
                order.append(fused)
            layer['warehouse'] = order.index(fused)


def bn_eval(d, p, x):
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    return ((x - d[p + 'running_mean'].view(shape)) /
            torch.sqrt(d[p + 'running_var'].view(shape) + 1e-5) *
            d[p + 'weight'].view(shape) + d[p + 'bias'].view(shape))


def kw_forward(d, layer, x):
    """Official KWconvNd forward (temperature 0) of ``layer`` on ``x``."""
    p, groups = layer['key'] + '.', layer['groups']
    cells = d[f'warehouse_manager.weights.{layer["warehouse"]}']
    n, c_o, c_i = cells.shape[:3]
    b, c_in = x.shape[:2]
    c_out, k = layer['cout'], layer['k']
    g_out, g_in, g_sp = c_out // c_o, c_in // c_i // groups, k * k
    a = p + 'attention.'
    s = x.mean((2, 3)) @ d[a + 'fc1.weight'].t()
    if a + 'fc1.bias' in d:
        s = s + d[a + 'fc1.bias']
    if a + 'norm1.running_mean' in d:
        s = bn_eval(d, a + 'norm1.', s)
    else:
        s = F.layer_norm(s, s.shape[-1:], d[a + 'norm1.weight'],
                         d[a + 'norm1.bias'], 1e-5)
    z = s.clamp(min=0) @ d[a + 'fc2.weight'].t() + d[a + 'fc2.bias']
    z = z.reshape(-1, n + 1)
    z = (z / (z.abs().sum(1, keepdim=True) + 1e-3))[:, :-1]
    w = (z @ cells.reshape(n, -1)).reshape(b, g_sp, g_out, g_in, c_o, c_i, 1,
                                           1)
    w = w.permute(0, 2, 4, 3, 5, 1, 6, 7).reshape(-1, c_in // groups, k, k)
    out = F.conv2d(
        x.reshape(1, -1, *x.shape[2:]), w, None, layer['s'], layer['pad'], 1,
        groups * b)
    out = out.view(b, c_out, *out.shape[2:])
    if p + 'bias' in d:
        out = out + d[p + 'bias'].view(1, -1, 1, 1)
    return out


def conv_forward(d, layer, x):
    if layer['kw']:
        return kw_forward(d, layer, x)
    return F.conv2d(x, d[layer['key'] + '.weight'], None, layer['s'],
                    layer['pad'], 1, layer['groups'])


# ---- MobileNetV2 ----------------------------------------------------------


def conv(key, name, cin, cout, k, s=1, groups=1, kw=True, bn=None, act=True):
    return dict(
        key=key,
        name=name,
        cin=cin,
        cout=cout,
        k=k,
        s=s,
        pad=(k - 1) // 2,
        groups=groups,
        kw=kw,
        bn=bn,
        act=act)


def official_mbv2(width, kw1d2x, sharing):
    """The official KW_MobileNetV2 / KW1d2x_MobileNetV2 layers, in reservation
    order, grouped as (stem, blocks, last, classifier)."""
    c_in = make_divisible(32 * width)
    stem = conv(
        'features.0.0', 'stage0_conv0', 3, c_in, 3, 2, bn='features.0.1.')
    blocks, i, layer_idx = [], 1, 0
    for idx, (t, c, n, s) in enumerate(MBV2_SETTINGS):
        c_out = make_divisible(c * width)
        for j in range(n):
            handover = (
                j == 0 and idx > 0
                and MBV2_KW_STAGES[idx] != MBV2_KW_STAGES[idx - 1])
            stage = MBV2_KW_STAGES[idx] - 1 if handover else \
                MBV2_KW_STAGES[idx]
            pw_kw = not kw1d2x or stage >= 6
            prefix, hidden = f'features.{i}.conv.', int(round(c_in * t))
            name = f'stage{stage}_layer{layer_idx}_'
            layers = []
            if t != 1:
                layers.append(
                    conv(
                        prefix + '0.0',
                        name + 'pwconv0',
                        c_in,
                        hidden,
                        1,
                        kw=pw_kw,
                        bn=prefix + '0.1.'))
            dw = len(layers)
            layers.append(
                conv(
                    f'{prefix}{dw}.0',
                    name + 'dwconv0',
                    hidden,
                    hidden,
                    3,
                    s if j == 0 else 1,
                    hidden,
                    bn=f'{prefix}{dw}.1.'))
            layers.append(
                conv(
                    f'{prefix}{dw + 1}',
                    name + 'pwconv1',
                    hidden,
                    c_out,
                    1,
                    kw=pw_kw,
                    bn=f'{prefix}{dw + 2}.',
                    act=False))
            blocks.append((layers, (s if j == 0 else 1) == 1
                           and c_in == c_out))
            c_in, i = c_out, i + 1
            layer_idx = 0 if handover else layer_idx + 1
    last_c = make_divisible(1280 * max(1.0, width))
    last = conv(
        f'features.{i}.0',
        f'stage6_layer{layer_idx}_pwconv1',
        c_in,
        last_c,
        1,
        bn=f'features.{i}.1.')
    head = conv('classifier.1.conv', 'classifier', last_c, 1000, 1, kw=kw1d2x)
    everything = [stem] + [m for b, _ in blocks for m in b] + [last, head]
    number_warehouses(everything, sharing)
    return stem, blocks, last, head


def official_mbv2_forward(d, x, width, kw1d2x, sharing):
    stem, blocks, last, head = official_mbv2(width, kw1d2x, sharing)

    def cba(layer, x):
        x = bn_eval(d, layer['bn'], conv_forward(d, layer, x))
        return x.clamp(0, 6) if layer['act'] else x

    x = cba(stem, x)
    for layers, residual in blocks:
        y = x
        for layer in layers:
            y = cba(layer, y)
        x = x + y if residual else y
    x = cba(last, x).mean((2, 3))
    if kw1d2x:
        return kw_forward(d, head, x[:, :, None, None]).flatten(1)
    return x @ d['classifier.weight'].t() + d['classifier.bias']


def mbv2_to_official(num_backbone_warehouses,
                     kw_classifier,
                     classifier='classifier.'):
    """Mmdyn key -> official key for (KW) MobileNetV2 (``classifier`` is
    ODConv's ``classifier.1.``)."""
    block_of = {}
    i = 1
    for stage, (t, _, n, _) in enumerate(MBV2_SETTINGS, start=1):
        for b in range(n):
            block_of[stage, b] = (i, t != 1)
            i += 1

    def mapping(key):
        parts = key.split('.')
        if key.startswith('backbone.warehouse_manager.'):
            return key[len('backbone.'):]
        if key.startswith('head.warehouse_manager.weights.'):
            return f'warehouse_manager.weights.{num_backbone_warehouses}'
        if key.startswith('head.fc.'):
            rest = key[len('head.fc.'):]
            return ('classifier.1.conv.'
                    if kw_classifier else classifier) + rest
        if parts[1] in ('conv1', 'conv2'):
            index = 0 if parts[1] == 'conv1' else i
            sub = '0' if parts[2] == 'conv' else '1'
            return f'features.{index}.{sub}.' + '.'.join(parts[3:])
        stage, block, module, kind = (int(parts[1][5:]), int(parts[2]),
                                      int(parts[4]), parts[5])
        index, expands = block_of[stage, block]
        if expands:
            names = {
                (0, 'conv'): '0.0',
                (0, 'bn'): '0.1',
                (1, 'conv'): '1.0',
                (1, 'bn'): '1.1',
                (2, 'conv'): '2',
                (2, 'bn'): '3'
            }
        else:
            names = {
                (0, 'conv'): '0.0',
                (0, 'bn'): '0.1',
                (1, 'conv'): '1',
                (1, 'bn'): '2'
            }
        return (f'features.{index}.conv.{names[module, kind]}.' +
                '.'.join(parts[6:]))

    return mapping


MBV2_CASES = {
    # config: (width, 1/2x with KW classifier, backbone warehouses, sharing
    # range of the official model; the 1/2x model writes tuple("layer"))
    'mobilenet-v2-w0.5-kw1x_8xb32_in1k.py':
    (0.5, False, 13, ('layer', 'pwconv')),
    'mobilenet-v2-w0.5-kw1d2x_8xb32_in1k.py': (0.5, True, 9, tuple('layer')),
    'mobilenet-v2-w0.5-kw4x_8xb32_in1k.py': (0.5, False, 19, ('layer', )),
}


@pytest.fixture(scope='module')
def mbv2_models():
    return {name: build_model(osp.join(KW, name)) for name in MBV2_CASES}


@pytest.mark.parametrize('name', sorted(MBV2_CASES))
def test_kw_mobilenet_v2_matches_official_forward(name, mbv2_models):
    width, kw1d2x, warehouses, sharing = MBV2_CASES[name]
    model = mbv2_models[name]
    official = official_dict(model, mbv2_to_official(warehouses, kw1d2x))
    # no config given: found among the KW MobileNetV2 configs by shapes
    converted, config = convert(official, 'kw')
    assert osp.basename(config) == name
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official_mbv2_forward(official, x, width, kw1d2x, sharing)
        got = model(x, mode='tensor')
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- ConvNeXt ----------------------------------------------------------


def official_convnext(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)):
    stem = conv('downsample_layers.0.0', 'stagestem_conv0', 3, dims[0], 4, 4)
    stem['pad'] = 0
    downs = []
    for i in range(3):
        layer = conv(f'downsample_layers.{i + 1}.1', f'stage{i}_layerds_conv0',
                     dims[i], dims[i + 1], 2, 2)
        layer['pad'] = 0
        downs.append(layer)
    blocks = []
    for i, depth in enumerate(depths):
        stage = []
        for j in range(depth):
            p, name = f'stages.{i}.{j}.', f'stage{i}_layer{j}_'
            stage.append((conv(p + 'dwconv', name + 'dwconv0', dims[i],
                               dims[i], 7, 1, dims[i]),
                          conv(p + 'pwconv1', name + 'pwconv1', dims[i],
                               4 * dims[i], 1),
                          conv(p + 'pwconv2', name + 'pwconv2', 4 * dims[i],
                               dims[i], 1), p))
        blocks.append(stage)
    everything = [stem] + downs + [
        m for stage in blocks for block in stage for m in block[:3]
    ]
    number_warehouses(everything, ('layer', 'pwconv'))
    return stem, downs, blocks


def official_convnext_forward(d, x):
    stem, downs, blocks = official_convnext()

    def ln_first(p, x):
        return F.layer_norm(
            x.permute(0, 2, 3, 1), x.shape[1:2], d[p + 'weight'],
            d[p + 'bias'], 1e-6).permute(0, 3, 1, 2)

    for i in range(4):
        if i == 0:
            x = ln_first('downsample_layers.0.1.', kw_forward(d, stem, x))
        else:
            x = kw_forward(d, downs[i - 1],
                           ln_first(f'downsample_layers.{i}.0.', x))
        for dw, pw1, pw2, p in blocks[i]:
            y = ln_first(p + 'norm.', kw_forward(d, dw, x))
            y = kw_forward(d, pw2, F.gelu(kw_forward(d, pw1, y)))
            x = x + d[p + 'gamma'] * y
    x = F.layer_norm(
        x.mean((2, 3)), (x.shape[1], ), d['norm.weight'], d['norm.bias'], 1e-6)
    return x @ d['head.weight'].t() + d['head.bias']


def convnext_to_official(key):
    if key.startswith('backbone.norm3.'):
        return 'norm.' + key[len('backbone.norm3.'):]
    if key.startswith('head.fc.'):
        return 'head.' + key[len('head.fc.'):]
    assert key.startswith('backbone.'), key
    return key[len('backbone.'):]


def test_kw_convnext_tiny_matches_official_forward(tmp_path):
    """Through a file as KernelWarehouse's main.py saves it when trained with
    EMA (``model``, ``model_ema``, ``args``, ...), EMA weights chosen."""
    config = osp.join(KW, 'convnext-tiny-kw1x_32xb128_in1k.py')
    model = build_model(config)
    official = official_dict(model, convnext_to_official)
    for key in [k for k in official if k.endswith('gamma')]:
        official[key] = torch.rand(official[key].shape) * 0.5 + 0.5
    src, dst = str(tmp_path / 'checkpoint-best.pth'), str(tmp_path / 'o.pth')
    torch.save(
        dict(
            model={
                k: v * 0.5
                for k, v in official.items()
            },
            model_ema=official,
            epoch=299,
            optimizer=dict(state={}, param_groups=[]),
            scaler=dict(scale=65536.0),
            args=argparse.Namespace(
                model='kw_convnext_tiny',
                model_ema=True,
                drop_path=0.3,
                sharing_range=['layer', 'pwconv'])), src)
    used = convert_file('kw', src, dst, weights='ema', log=None)
    assert osp.basename(used) == osp.basename(config)
    converted = torch.load(dst, weights_only=True)['state_dict']
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = official_convnext_forward(official, x)
        got = model(x, mode='tensor')
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- ResNet: every budget found by shapes ------------------------------


def resnet_to_official(key):
    if key.startswith('head.fc.'):
        return 'fc.' + key[len('head.fc.'):]
    return key[len('backbone.'):]


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    'resnet18-kw1d4x_8xb128-300e_in1k.py',
    'resnet18-kw1d2x_8xb128-300e_in1k.py',
    'resnet18-kw1x_8xb128-300e_in1k.py',
    'resnet18-kw2x_8xb128-300e_in1k.py',
    'resnet18-kw4x_8xb128-300e_in1k.py',
    'resnet50-kw1d2x_8xb128-300e_in1k.py',
    'resnet50-kw1x_8xb128-300e_in1k.py',
    'resnet50-kw4x_8xb128-300e_in1k.py',
])
def test_kw_resnet_every_budget_found_by_shapes(name):
    """The official kw_resnet keys of every budget convert to their config
    (found among the same-depth KW configs by the warehouse shapes) with the
    tensors in place.

    Built on the meta device: only names and shapes.
    """
    from mmdyn.analysis.converters import target_shapes
    shapes = target_shapes(osp.join(KW, name))
    official = OrderedDict((resnet_to_official(k), torch.zeros(s))
                           for k, s in shapes.items()
                           if not k.endswith('temperature'))
    for i, key in enumerate(official):
        official[key] = torch.full(official[key].shape, float(i))
    converted, used = convert(official, 'kw', build=lambda c: _MetaModel(c))
    assert osp.basename(used) == name
    for i, (key, value) in enumerate(official.items()):
        target = 'head.' + key if key.startswith('fc.') else 'backbone.' + key
        assert converted[target].shape == value.shape
        assert float(converted[target].flatten()[0]) == i, key


class _MetaModel:
    """Stands in for a built model in shape-only tests: temperatures 0."""

    def __init__(self, config):
        from mmdyn.analysis.converters import target_shapes
        self.shapes = target_shapes(osp.abspath(config))

    def state_dict(self):
        return OrderedDict((k, torch.zeros(s)) for k, s in self.shapes.items())


@pytest.mark.slow
def test_kw_mobilenet_v2_x1_budgets_found_by_shapes():
    from mmdyn.analysis.converters import target_shapes
    for name, warehouses in [('mobilenet-v2-kw1d2x_8xb32_in1k.py', 9),
                             ('mobilenet-v2-kw1x_8xb32_in1k.py', 13),
                             ('mobilenet-v2-kw4x_8xb32_in1k.py', 19)]:
        shapes = target_shapes(osp.join(KW, name))
        mapping = mbv2_to_official(warehouses, warehouses == 9)
        official = OrderedDict((mapping(k), torch.zeros(s))
                               for k, s in shapes.items()
                               if not k.endswith('temperature'))
        converted, used = convert(
            official, 'kw', build=lambda c: _MetaModel(c))
        assert osp.basename(used) == name


def test_wrong_budget_names_first_mismatch_with_both_shapes():
    from mmdyn.analysis.converters import target_shapes
    shapes = target_shapes(osp.join(KW, 'resnet18-kw1x_8xb128-300e_in1k.py'))
    official = OrderedDict((resnet_to_official(k), torch.zeros(s))
                           for k, s in shapes.items()
                           if not k.endswith('temperature'))
    config = osp.join(KW, 'resnet18-kw4x_8xb128-300e_in1k.py')
    with pytest.raises(ConversionError) as info:
        convert(official, 'kw', config=config, build=_MetaModel)
    message = str(info.value)
    assert '\n' not in message
    # the config, the first mismatching key by its official and its mmdyn
    # names, and both shapes (1x: 56 cells -> 9 * 57 outputs; 4x: 224)
    assert message.startswith(
        'the checkpoint does not fit the model for resnet18-kw4x_8xb128-300e_'
        'in1k.py: first shape mismatch layer1.0.conv1.attention.fc2.weight '
        '(-> backbone.layer1.0.conv1.attention.fc2.weight): checkpoint '
        '(513, 16) vs model (2025, 16)'), message


def test_checkpoint_of_another_method_is_named():
    from mmdyn.analysis.converters import target_shapes
    shapes = target_shapes(osp.join(KW, 'resnet18-kw1x_8xb128-300e_in1k.py'))
    official = OrderedDict((resnet_to_official(k), torch.zeros(s))
                           for k, s in shapes.items()
                           if not k.endswith('temperature'))
    with pytest.raises(
            ConversionError,
            match='KernelWarehouse checkpoint, not ODConv: convert '
            'it with python tools/model_converters/kw2mmdyn.py'):
        convert(official, 'odconv')
