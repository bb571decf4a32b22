# Copyright (c) mmdyn contributors. All rights reserved.
"""CondConv2d / DyConv2d against an independent reference: routing weights
recomputed from the layer's parameters, the mixed kernel and bias built by an
explicit sum, one F.conv2d per sample."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmdyn.ops import CondConv2d, DyConv2d

IMPLS = ('loop', 'grouped', 'unfold', 'auto')

# (C_in, C_out, kernel, stride, padding, dilation, groups, K, bias)
CASES = {
    'regular': (8, 12, 3, 1, 1, 1, 1, 4, True),
    'groups_stride_dilation': (8, 12, 3, 2, 2, 2, 4, 3, False),
    'depthwise': (6, 6, 3, 1, 1, 1, 6, 4, True),
    'pointwise': (8, 16, 1, 1, 0, 1, 1, 2, False),
    'rgb_stem': (3, 8, (3, 5), 2, (1, 2), 1, 1, 4, False),
}


def build(cls, case, **kwargs):
    c_in, c_out, k, s, p, d, g, num, bias = case
    return cls(
        c_in,
        c_out,
        k,
        stride=s,
        padding=p,
        dilation=d,
        groups=g,
        bias=bias,
        kernel_num=num,
        **kwargs)


def randomise(layer):
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn_like(layer.bias))
    return layer


def reference_routing(layer, x):
    """CondConv: sigmoid(fc(GAP)/T); DyConv: softmax(fc2(relu(fc1))/T)."""
    att = layer.attention
    temp = float(layer.temperature)
    pooled = x.mean(dim=(2, 3))

    def fc(conv, v):
        out = v @ conv.weight.reshape(conv.weight.shape[0], -1).t()
        return out if conv.bias is None else out + conv.bias

    if isinstance(layer, CondConv2d):
        return torch.sigmoid(fc(att.fc, pooled) / temp)
    return torch.softmax(
        fc(att.fc2, torch.relu(fc(att.fc1, pooled))) / temp, dim=1)


def reference_forward(layer, x):
    pi = reference_routing(layer, x)
    outs = []
    for b in range(x.shape[0]):
        w_b = sum(pi[b, i] * layer.weight[i] for i in range(pi.shape[1]))
        bias_b = None
        if layer.bias is not None:
            bias_b = sum(pi[b, i] * layer.bias[i] for i in range(pi.shape[1]))
        outs.append(
            F.conv2d(x[b:b + 1], w_b, bias_b, layer.stride, layer.padding,
                     layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('name', list(CASES))
def test_forward_matches_reference(cls, name):
    layer = randomise(build(cls, CASES[name]))
    x = torch.randn(3, layer.in_channels, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('impl', IMPLS)
def test_every_impl_forward_backward(cls, impl):
    layer = randomise(build(cls, CASES['regular'], impl=impl))
    x = torch.randn(4, 8, 7, 9, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    params = [layer.weight, layer.bias] + list(layer.attention.parameters())
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x_ref] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
def test_gradcheck_float64(cls):
    layer = randomise(build(cls, (4, 4, 3, 1, 1, 1, 2, 3, True))).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    names = ['weight', 'bias'] + [
        'attention.' + n for n, _ in layer.attention.named_parameters()
    ]
    params = dict(layer.named_parameters())
    inputs = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, ))

    # Each per-sample conv implementation has its own gradcheck in
    # test_per_sample_conv.py; here the routing and mixing are checked.
    assert torch.autograd.gradcheck(fn, (x, *inputs), fast_mode=True)


@pytest.mark.parametrize('name', ['regular', 'groups_stride_dilation'])
def test_single_kernel_equals_static_conv(name):
    """K=1: softmax routing is exactly 1 (DyConv); sigmoid saturated by a large
    bias (CondConv).

    Both are then nn.Conv2d.
    """
    c_in, c_out, k, s, p, d, g, _, bias = CASES[name]
    case = (c_in, c_out, k, s, p, d, g, 1, bias)
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias=bias)
    x = torch.randn(2, c_in, 9, 8)
    for cls in (DyConv2d, CondConv2d):
        layer = randomise(build(cls, case))
        with torch.no_grad():
            if cls is CondConv2d:
                layer.attention.fc.weight.zero_()
                layer.attention.fc.bias.fill_(100.0)
            conv.weight.copy_(layer.weight[0])
            if bias:
                conv.bias.copy_(layer.bias[0])
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_temperature():
    assert DyConv2d.TEMPERATURE_SCHEDULE == dict(
        start=30.0, end=1.0, epochs=10)
    # CondConv has no temperature in its paper: a constant schedule.
    assert CondConv2d.TEMPERATURE_SCHEDULE['start'] == 1.0
    assert CondConv2d.TEMPERATURE_SCHEDULE['end'] == 1.0
    for cls in (DyConv2d, CondConv2d):
        layer = randomise(build(cls, CASES['regular']))
        assert float(layer.temperature) == 1.0
        assert 'temperature' in layer.state_dict()
        layer.update_temperature(7.0)
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)


def test_structure_and_parameter_count():
    # Unofficial DyConv (kaijieshi7/Dynamic-convolution-Pytorch):
    # h = int(C_in * 0.25) + 1, or K for RGB.
    layer = DyConv2d(64, 128, 3, bias=False)
    h = int(64 * 0.25) + 1
    assert layer.attention.fc1.out_channels == h
    assert layer.attention.fc1.bias is None
    assert layer.weight.shape == (4, 128, 64, 3, 3)
    assert sum(p.numel() for p in layer.parameters()) == (4 * 128 * 64 * 9 +
                                                          64 * h + h * 4 + 4)
    assert DyConv2d(3, 8, 3, kernel_num=5).attention.fc1.out_channels == 5
    assert DyConv2d(64, 8, 1, bias=True).bias.shape == (4, 8)
    cond = CondConv2d(64, 128, 3, kernel_num=8)
    assert sum(p.numel() for p in cond.parameters()) == (8 * 128 * 64 * 9 +
                                                         8 * 128 + 64 * 8 + 8)


def _dy_resnet_params(depth):
    """Torchvision ResNet, every block conv and downsample conv DyConv."""
    import torchvision
    with torch.device('meta'):
        model = getattr(torchvision.models, f'resnet{depth}')()
        for block in [
                b for s in range(1, 5) for b in getattr(model, f'layer{s}')
        ]:
            for name in ('conv1', 'conv2', 'conv3'):
                conv = getattr(block, name, None)
                if conv is not None:
                    setattr(block, name, _to_dyconv(conv))
            if block.downsample is not None:
                block.downsample[0] = _to_dyconv(block.downsample[0])
    return sum(p.numel() for p in model.parameters())


def _to_dyconv(conv):
    return DyConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=False,
        kernel_num=4)


@pytest.mark.parametrize('depth,expected', [(18, 45_475_008),
                                            (50, 100_895_176)])
def test_unofficial_resnet_parameter_counts(depth, expected):
    assert _dy_resnet_params(depth) == expected


def test_madds_hand_computed():
    dy = DyConv2d(64, 64, 3, padding=1, bias=False)
    assert dy.madds_per_sample((56, 56)) == dict(
        conv=115_605_504, att=17 * 64 + 17 * 4, agg=4 * 36_864, scal=0)
    cond = CondConv2d(32, 16, 1, stride=2, kernel_num=8)
    assert cond.madds_per_sample((15, 15)) == dict(
        conv=16 * 8 * 8 * 32, att=32 * 8, agg=8 * 512, scal=0)


def test_batch_one_training_and_bf16_autocast():
    for cls in (DyConv2d, CondConv2d):
        layer = build(cls, CASES['regular']).train()
        x = torch.randn(1, 8, 9, 9, requires_grad=True)
        layer(x).square().mean().backward()
        assert torch.isfinite(x.grad).all()
        x = torch.randn(2, 8, 9, 9)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        assert torch.isfinite(out).all()
        with torch.no_grad():
            high = layer(x)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                low = layer(x).float()
        assert (low - high).abs().max() <= 0.05 * high.abs().max()


def test_non_contiguous_input():
    layer = randomise(build(DyConv2d, CASES['groups_stride_dilation']))
    x = torch.randn(3, 8, 10, 11)
    with torch.no_grad():
        ref = layer(x)
        for xv in (x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3)):
            torch.testing.assert_close(layer(xv), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('kwargs,name', [
    (dict(kernel_num=0), 'kernel_num'),
    (dict(kernel_num=2.0), 'kernel_num'),
    (dict(groups=3), 'groups'),
    (dict(out_channels=10, groups=4, in_channels=8), 'out_channels'),
    (dict(dilation=0), 'dilation'),
])
def test_invalid_arguments_name_the_argument(cls, kwargs, name):
    args = dict(in_channels=8, out_channels=12, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        cls(**args)


def test_invalid_dyconv_ratio():
    for ratio in (0, -0.5):
        with pytest.raises(ValueError, match='ratio'):
            DyConv2d(8, 8, 3, ratio=ratio)


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('bias', [True, False])
def test_chunked_inference_path_matches_reference(monkeypatch, cls, bias):
    """Deep-layer CPU inference builds the kernels into the reused workspace,
    then one batch-1 conv per sample (the batch-as-groups path, tried before
    it, off)."""
    from mmdyn.ops.accel.paths import THRESHOLDS, uses_chunked_kernels
    monkeypatch.setitem(THRESHOLDS['mixture'], 'grouped_max_kernel_to_maps', 0)
    layer = randomise(build(cls, (16, 24, 3, 1, 1, 1, 1, 4, bias)))
    x = torch.randn(3, 16, 4, 5)
    with torch.no_grad():
        assert uses_chunked_kernels(x, layer.weight[0].numel(), 24, (4, 5))
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)
        assert layer.last_path == 'chunked'


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize(
    'name', ['regular', 'groups_stride_dilation', 'depthwise', 'pointwise'])
def test_conv_then_mix_training_path_matches_reference(cls, name):
    """CPU training on small maps: K static convs, outputs mixed per
    sample; forward and backward against the per-sample reference."""
    layer = randomise(build(cls, CASES[name]))
    x = torch.randn(3, layer.in_channels, 4, 5, requires_grad=True)
    assert layer.conv_then_mix(x)
    out = layer(x)
    assert layer.last_path == 'conv_then_mix'
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    params = [layer.weight] + list(layer.attention.parameters())
    if layer.bias is not None:
        params.append(layer.bias)
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x_ref] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # Large maps, inference and explicit implementations keep the
    # per-sample kernel.
    assert not layer.conv_then_mix(torch.randn(1, layer.in_channels, 32, 32))
    with torch.no_grad():
        assert not layer.conv_then_mix(x)
    layer.impl = 'loop'
    assert not layer.conv_then_mix(x)
    # Forced by impl on a map where 'auto' would not take it.
    layer.impl = 'conv_then_mix'
    big = torch.randn(2, layer.in_channels, 12, 12)
    torch.testing.assert_close(
        layer(big), reference_forward(layer, big), rtol=1e-4, atol=1e-5)
    assert layer.last_path == 'conv_then_mix'


@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('bias', [True, False])
def test_winograd_inference_path_matches_reference(small_winograd, monkeypatch,
                                                   cls, bias):
    """Deep 3x3 stride-1 CPU inference runs Winograd F(2x2, 3x3) on the routing
    weights (thresholds lowered so that a small layer takes it, the batch-as-
    groups path tried before it off; odd output size: cropped tiles)."""
    from mmdyn.ops.accel.paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['mixture'], 'grouped_max_kernel_to_maps', 0)
    layer = randomise(build(cls, (16, 24, 3, 1, 1, 1, 1, 4, bias)))
    x = torch.randn(3, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert layer.last_path == 'winograd'
    # The same path forced with the default thresholds.
    layer.impl = 'winograd'
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert layer.last_path == 'winograd'


def test_winograd_at_resnet_stage3_size():
    """The default thresholds send a ResNet-50 stage-3 layer (256 -> 256,
    14x14) to the Winograd path; it matches the per-sample reference."""
    from mmdyn.ops.accel.paths import uses_winograd
    layer = randomise(DyConv2d(256, 256, 3, padding=1, bias=False))
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        assert uses_winograd(x, layer)
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
