# Copyright (c) mmdyn contributors. All rights reserved.
"""ODConv2d against an independent reference written from the ODConv paper:
attentions recomputed from the layer's parameters with plain tensor ops, a
per-sample kernel built by an explicit sum, one F.conv2d per sample."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmdyn.ops import ODConv2d

IMPLS = ('loop', 'grouped', 'unfold', 'auto')

# (C_in, C_out, kernel, stride, padding, dilation, groups, K, bias)
CASES = {
    'regular': (8, 12, 3, 1, 1, 1, 1, 4, False),
    'groups_stride': (8, 12, 3, 2, 1, 1, 2, 4, False),
    'depthwise': (8, 8, 3, 1, 2, 2, 8, 4, False),
    'depthwise_k1': (8, 8, 3, 2, 1, 1, 8, 1, True),
    'pointwise_1x': (8, 16, 1, 1, 0, 1, 1, 1, False),
    'pointwise_4x_stride': (8, 16, 1, 2, 0, 1, 1, 4, True),
    'non_square': (6, 10, (1, 3), 1, (0, 1), 1, 1, 2, False),
    'single_kernel_3x3': (8, 12, 3, 1, 1, 1, 1, 1, False),
    'wide_hidden': (40, 24, 3, 1, 1, 1, 1, 3, False),  # hidden > 16
}


def build(case, **kwargs):
    c_in, c_out, k, s, p, d, g, num, bias = case
    return ODConv2d(
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
    """Non-trivial attention weights, biases and BN statistics."""
    with torch.no_grad():
        for name, p in layer.attention.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if 'weight' in name else 1))
        bn = layer.attention.bn
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn_like(layer.bias))
    return layer.eval()


def reference_forward(layer, x):
    """The paper's ODConv, computed independently of the layer's forward."""
    att = layer.attention
    temp = float(layer.temperature)
    c_in, c_out = layer.in_channels, layer.out_channels
    kh, kw = layer.kernel_size
    batch = x.shape[0]

    def fc(conv, v):
        out = v @ conv.weight.reshape(conv.weight.shape[0], -1).t()
        return out if conv.bias is None else out + conv.bias

    pooled = x.mean(dim=(2, 3))
    bn = att.bn
    s = (fc(att.fc, pooled) - bn.running_mean
         ) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    s = torch.relu(s)
    channel = torch.sigmoid(fc(att.channel_fc, s) / temp)
    depthwise = c_in == layer.groups == c_out
    filt = (
        torch.ones(batch, c_out) if depthwise else torch.sigmoid(
            fc(att.filter_fc, s) / temp))
    spatial = (
        torch.ones(batch, kh * kw) if kh *
        kw == 1 else torch.sigmoid(fc(att.spatial_fc, s) / temp))
    num = layer.weight.shape[0]
    kernel = (
        torch.ones(batch, 1) if num == 1 else torch.softmax(
            fc(att.kernel_fc, s) / temp, dim=1))
    outs = []
    for b in range(batch):
        w_b = sum(kernel[b, i] * spatial[b].view(kh, kw) * layer.weight[i]
                  for i in range(num))
        y = F.conv2d(x[b:b + 1] * channel[b].view(1, -1, 1, 1), w_b, None,
                     layer.stride, layer.padding, layer.dilation, layer.groups)
        y = y * filt[b].view(1, -1, 1, 1)
        if layer.bias is not None:
            y = y + layer.bias.view(1, -1, 1, 1)
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('fold', [True, False])
def test_forward_matches_reference(name, fold):
    """Both ways of applying alpha_c/alpha_f (on the feature maps: the
    reference path, or folded into the per-sample kernel), with and without
    autograd, selected by impl."""
    path = 'folded' if fold else 'reference'
    layer = randomise(build(CASES[name], impl=path))
    x = torch.randn(3, layer.in_channels, 9, 10)
    with torch.no_grad():
        ref = reference_forward(layer, x)
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)
        assert layer.last_path == path
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)
    assert layer.last_path == path
    torch.testing.assert_close(
        layer.forward_reference(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['single_kernel_3x3', 'non_square'])
def test_scaled_columns_path(name):
    """K == 1: the static kernel times alpha_s/alpha_c-scaled im2col columns,
    against the reference, forward and backward."""
    case = CASES[name][:7] + (1, True)
    layer = randomise(build(case, impl='scaled_columns'))
    x = torch.randn(3, layer.in_channels, 9, 10, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)
    out = layer(x)
    assert layer.last_path == 'scaled_columns'
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    params = [
        layer.weight, layer.attention.fc.weight,
        layer.attention.spatial_fc.weight, layer.attention.channel_fc.bias
    ]
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x_ref] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fold_choice_follows_tensor_sizes():
    # Deep layer, one kernel: scaled im2col columns instead of a kernel.
    deep = ODConv2d(512, 512, 3, padding=1, kernel_num=1)
    assert deep.use_scaled_columns((7, 7))
    assert not deep.use_scaled_columns((28, 28))
    assert not ODConv2d(512, 512, 3, padding=1).use_scaled_columns((7, 7))
    # Stage-1 shape: the kernel is smaller than the feature maps.
    assert ODConv2d(64, 64, 3, padding=1).fold_attentions((56, 56))
    assert ODConv2d(96, 96, 3, groups=96).fold_attentions((14, 14))
    # Stage-3 shape: the feature maps are smaller.
    assert not ODConv2d(256, 256, 3, padding=1).fold_attentions((14, 14))


@pytest.mark.parametrize('impl', IMPLS + ('folded', 'reference'))
@pytest.mark.parametrize('case', ['groups_stride', 'regular'])
def test_every_impl_forward_backward(impl, case):
    layer = randomise(build(CASES[case], impl=impl))
    x = torch.randn(4, 8, 11, 9, requires_grad=True)
    out = layer(x)
    if impl != 'auto':
        assert layer.last_path == ('folded'
                                   if impl == 'folded' else 'reference')
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    params = [
        layer.weight, layer.attention.fc.weight,
        layer.attention.spatial_fc.weight
    ]
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x_ref] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_temperature_divides_every_logit():
    layer = randomise(build(CASES['regular']))
    assert float(layer.temperature) == 1.0
    assert 'temperature' in layer.state_dict()
    assert ODConv2d.TEMPERATURE_SCHEDULE == dict(
        start=30.0, end=1.0, epochs=10)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        before = layer(x)
        layer.update_temperature(4.0)
        after = layer(x)
        torch.testing.assert_close(
            after, reference_forward(layer, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(
    'name',
    ['regular', 'groups_stride', 'depthwise_k1', 'pointwise_1x', 'non_square'])
def test_saturated_attentions_equal_static_conv(name):
    """Attentions forced to exactly 1 (and one-hot kernel attention): the layer
    is nn.Conv2d with the selected kernel, in train mode too."""
    layer = build(CASES[name])
    att = layer.attention
    chosen = layer.weight.shape[0] - 1
    with torch.no_grad():
        for fc_name in ('channel_fc', 'filter_fc', 'spatial_fc'):
            if hasattr(att, fc_name):
                getattr(att, fc_name).weight.zero_()
                getattr(att, fc_name).bias.fill_(100.0)  # sigmoid -> 1.0
        if hasattr(att, 'kernel_fc'):
            att.kernel_fc.weight.zero_()
            att.kernel_fc.bias.fill_(-100.0)
            att.kernel_fc.bias[chosen] = 100.0  # softmax -> one-hot
    c_in, c_out, k, s, p, d, g, _, bias = CASES[name]
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[chosen])
        if bias:
            conv.bias.copy_(layer.bias)
    x = torch.randn(2, c_in, 8, 9)
    torch.testing.assert_close(layer.train()(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl,num', [('loop', 2), ('folded', 2),
                                      ('grouped', 2), ('unfold', 2),
                                      ('grouped', 1), ('folded', 1)])
def test_gradcheck_float64(impl, num):
    layer = build((4, 4, 3, 1, 1, 1, 2, num, True), impl=impl)
    layer = randomise(layer).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    names = [
        'weight', 'attention.fc.weight', 'attention.spatial_fc.bias',
        'attention.filter_fc.weight'
    ]
    if num > 1:
        names.append('attention.kernel_fc.weight')
    params = dict(layer.named_parameters())
    inputs = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, ))

    assert torch.autograd.gradcheck(fn, (x, *inputs), fast_mode=True)


def closed_form_params(c_in, c_out, k, groups, num, r=1 / 16, min_ch=16):
    """The closed form of the ODConv parameter count."""
    h = max(int(c_in * r), min_ch)
    numel_w = c_out * (c_in // groups) * k * k
    depthwise = c_in == groups == c_out
    return (num * numel_w + c_in * h + 2 * h + (h * c_in + c_in) +
            (0 if depthwise else h * c_out + c_out) +
            (h * k * k + k * k if k > 1 else 0) +
            (h * num + num if num > 1 else 0))


@pytest.mark.parametrize('c_in,c_out,k,groups,num', [(64, 64, 3, 1, 1),
                                                     (64, 64, 3, 1, 4),
                                                     (256, 1024, 1, 1, 4),
                                                     (2048, 512, 1, 1, 1),
                                                     (96, 96, 3, 96, 4),
                                                     (96, 96, 3, 96, 1),
                                                     (384, 64, 1, 1, 1),
                                                     (24, 48, 5, 4, 2),
                                                     (960, 1280, 1, 1, 4)])
def test_parameter_count_matches_closed_form(c_in, c_out, k, groups, num):
    layer = ODConv2d(c_in, c_out, k, groups=groups, kernel_num=num, bias=False)
    count = sum(p.numel() for p in layer.parameters())
    assert count == closed_form_params(c_in, c_out, k, groups, num)
    with_bias = ODConv2d(c_in, c_out, k, groups=groups, kernel_num=num)
    assert sum(p.numel() for p in with_bias.parameters()) == count + c_out


def _od_resnet_params(depth, num):
    """Torchvision ResNet with the ODConv placement of the official code."""
    import torchvision
    with torch.device('meta'):
        model = getattr(torchvision.models, f'resnet{depth}')()
        for block in [
                b for s in range(1, 5) for b in getattr(model, f'layer{s}')
        ]:
            for name in ('conv1', 'conv2', 'conv3'):
                conv = getattr(block, name, None)
                if conv is not None:
                    setattr(
                        block, name,
                        ODConv2d(
                            conv.in_channels,
                            conv.out_channels,
                            conv.kernel_size,
                            conv.stride,
                            conv.padding,
                            groups=conv.groups,
                            bias=False,
                            kernel_num=num))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('depth,num,expected', [(18, 4, 44_901_640),
                                                (50, 1, 28_635_112)])
def test_official_resnet_parameter_counts(depth, num, expected):
    assert _od_resnet_params(depth, num) == expected


def test_structure_special_cases():
    att = build(CASES['depthwise']).attention
    assert not hasattr(att, 'filter_fc') and hasattr(att, 'spatial_fc')
    att = build(CASES['pointwise_1x']).attention
    assert not hasattr(att, 'spatial_fc') and not hasattr(att, 'kernel_fc')
    # groups == C_in but C_out != C_in is not depthwise: filter attention.
    assert hasattr(ODConv2d(8, 16, 3, groups=8).attention, 'filter_fc')
    assert build(CASES['wide_hidden']).attention.hidden_channels == 16
    assert ODConv2d(512, 8, 1).attention.hidden_channels == 32
    assert ODConv2d(512, 8, 1, reduction=0.25).attention.fc.out_channels == 128
    bank = ODConv2d(16, 32, 3, kernel_num=4).weight
    assert bank.shape == (4, 32, 16, 3, 3)
    # fan_out kaiming per kernel: std sqrt(2 / (C_out * k * k)).
    big = ODConv2d(64, 256, 3, kernel_num=2, bias=False).weight
    std = math.sqrt(2 / (256 * 9))
    for i in range(2):
        assert abs(big[i].std().item() / std - 1) < 0.02


def test_madds_hand_computed():
    od = ODConv2d(64, 64, 3, padding=1, kernel_num=4, bias=False)
    assert od.madds_per_sample((56, 56)) == dict(
        conv=115_605_504, att=3280, agg=147_456, scal=401_408)
    pw = ODConv2d(64, 256, 1, kernel_num=1, bias=False)
    assert pw.madds_per_sample((56, 56)) == dict(
        conv=51_380_224, att=6144, agg=0, scal=1_003_520)
    dw = ODConv2d(32, 32, 3, stride=2, padding=1, groups=32, kernel_num=1)
    # Depthwise: no filter attention, so only alpha_c * x (32 * 112 * 112).
    assert dw.madds_per_sample((112, 112)) == dict(
        conv=903_168, att=1168, agg=288, scal=401_408)


def test_batch_one_training_and_bf16_autocast():
    layer = build(CASES['regular']).train()
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.attention.fc.weight.grad).all()
    for name in ('regular', 'pointwise_1x', 'depthwise'):
        layer = build(CASES[name]).train()
        x = torch.randn(2, layer.in_channels, 9, 9)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(layer.weight.grad).all()
        layer.eval()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            low = layer(x).float()
        with torch.no_grad():
            high = layer(x)
        assert (low - high).abs().max() <= 0.05 * high.abs().max()


def test_non_contiguous_input():
    layer = randomise(build(CASES['groups_stride']))
    x = torch.randn(3, 8, 10, 11)
    with torch.no_grad():
        ref = layer(x)
        for xv in (x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3)):
            torch.testing.assert_close(layer(xv), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs,name', [
    (dict(kernel_num=0), 'kernel_num'),
    (dict(kernel_num=-2), 'kernel_num'),
    (dict(kernel_num=1.5), 'kernel_num'),
    (dict(reduction=0), 'reduction'),
    (dict(reduction=-0.25), 'reduction'),
    (dict(min_channels=0), 'min_channels'),
    (dict(groups=3), 'groups'),
    (dict(attention_norm='group'), 'attention_norm'),
    (dict(stride=0), 'stride'),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    args = dict(in_channels=8, out_channels=12, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ODConv2d(**args)


def test_wrong_input_is_reported():
    layer = ODConv2d(8, 12, 3)
    with pytest.raises(ValueError, match='in_channels'):
        layer(torch.randn(2, 6, 9, 9))


@pytest.mark.parametrize(
    'name', ['regular', 'single_kernel_3x3', 'pointwise_1x', 'depthwise'])
def test_traced_graph_does_not_bake_the_batch_size(name):
    """The export path (ONNX/tracing): traced at batch 2, run at batch 5."""
    layer = randomise(build(CASES[name]))
    with torch.no_grad():
        traced = torch.jit.trace(
            layer, torch.randn(2, layer.in_channels, 9, 10), check_trace=False)
        x = torch.randn(5, layer.in_channels, 9, 10)
        torch.testing.assert_close(
            traced(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('bias', [True, False])
def test_chunked_pointwise_inference_matches_reference(bias):
    """A 1x1 ODConv with K kernels (no spatial attention) takes the chunked
    path too, its kernels a plain mixture written into the workspace."""
    from mmdyn.ops.accel.paths import uses_chunked_kernels
    layer = randomise(ODConv2d(16, 24, 1, bias=bias, kernel_num=4))
    x = torch.randn(4, 16, 1, 2)
    with torch.no_grad():
        assert uses_chunked_kernels(x, layer.weight[0].numel(), 24, (1, 2))
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)
        assert layer.last_path == 'chunked'


@pytest.mark.parametrize('num', [1, 4])
@pytest.mark.parametrize('bias', [True, False])
def test_chunked_inference_path_matches_reference(num, bias):
    """Deep-layer CPU inference builds the kernels into the reused workspace,
    then one batch-1 conv per sample."""
    from mmdyn.ops.accel.paths import uses_chunked_kernels

    # impl: a one-kernel layer this deep would take the scaled columns.
    layer = randomise(
        ODConv2d(
            16,
            24,
            3,
            stride=2,
            padding=1,
            bias=bias,
            kernel_num=num,
            impl='chunked'))
    x = torch.randn(3, 16, 5, 6)
    with torch.no_grad():
        assert uses_chunked_kernels(x, layer.weight[0].numel(), 24,
                                    layer.output_hw(5, 6))
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-5)
        assert layer.last_path == 'chunked'
    with pytest.raises(ValueError, match="impl='chunked' cannot run"):
        layer(x)  # autograd on
    # Not with autograd, not for one sample, not for an explicit impl.
    assert not uses_chunked_kernels(x, layer.weight[0].numel(), 24, (3, 3))
    with torch.no_grad():
        assert not uses_chunked_kernels(x[:1], 10**6, 24, (3, 3))
        assert not uses_chunked_kernels(x, 10**6, 24, (3, 3), impl='loop')
        assert not uses_chunked_kernels(x, 100, 24, (3, 3))


@pytest.mark.parametrize('num', [1, 4])
@pytest.mark.parametrize('bias', [True, False])
def test_winograd_inference_path_matches_reference(small_winograd, num, bias):
    """Deep 3x3 stride-1 CPU inference runs Winograd F(2x2, 3x3) with the
    spatial and kernel attentions folded into the transformed kernels
    (thresholds lowered so that a small layer takes it; odd output size);
    impl='winograd' forces it with the default thresholds."""
    layer = randomise(
        ODConv2d(16, 24, 3, padding=1, bias=bias, kernel_num=num))
    x = torch.randn(3, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert layer.last_path == 'winograd'


@pytest.mark.parametrize('num', [1, 4])
def test_winograd_forced_by_impl(num):
    layer = randomise(
        ODConv2d(16, 24, 3, padding=1, kernel_num=num, impl='winograd'))
    x = torch.randn(3, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert layer.last_path == 'winograd'
    with pytest.raises(ValueError, match="impl='winograd' cannot run"):
        layer(x)  # autograd on
    with pytest.raises(ValueError, match='impl must be one of'):
        ODConv2d(16, 24, 3, impl='fast')


@pytest.mark.parametrize('num', [1, 4])
def test_winograd_at_resnet_stage3_size(num):
    """The default thresholds send a ResNet-50 stage-3 layer (256 -> 256,
    14x14) to the Winograd path, or with one kernel to the tap GEMM with the C
    tap sum (the scaled columns without it), which come first in the table; it
    matches the per-sample reference."""
    from mmdyn.ops.accel import tap_sum_cpu
    from mmdyn.ops.accel.paths import uses_winograd
    layer = randomise(
        ODConv2d(256, 256, 3, padding=1, bias=False, kernel_num=num))
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        assert uses_winograd(x, layer)
        torch.testing.assert_close(
            layer(x), reference_forward(layer, x), rtol=1e-4, atol=1e-4)
        one_kernel = 'tap_gemm' if tap_sum_cpu.load() else 'scaled_columns'
        assert layer.last_path == (one_kernel if num == 1 else 'winograd')
