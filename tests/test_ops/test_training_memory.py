# Copyright (c) mmdyn contributors. All rights reserved.
"""The ``'recompute'`` training path: per-sample kernels rebuilt in the
backward instead of kept (:mod:`mmdyn.ops.accel.recompute`).

* :func:`conv2d_recomputed_kernel` against plain autograd through a loop
  of ``F.conv2d`` (output and every gradient), odd channel counts, stride,
  dilation, groups, depthwise, batch 1 and 3; fp64 ``gradcheck`` of each
  family's kernel builder.
* ODConv, DyConv/CondConv and KernelWarehouse with ``impl='recompute'``
  against their ``forward_reference`` (output and the gradients of the
  input, the kernel banks/warehouses and every attention parameter); under
  autocast; double backward refused; empty batch.
* Activation memory (:class:`~mmdyn.analysis.memory.SavedTensorBytes`):
  a training step of ODConv-1x / KW-1x / DyConv-4x ResNet-50 at batch 8
  saves within 1.15x of the static ResNet-50.
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdyn.analysis.memory import SavedTensorBytes, saved_bytes_of_step
from mmdyn.ops import CondConv2d, DyConv2d, KWConv2d, ODConv2d
from mmdyn.ops.accel import recompute
from mmdyn.ops.accel.recompute import conv2d_recomputed_kernel
from mmdyn.ops.accel.thresholds import THRESHOLDS

# (batch, C_in, C_out, k, stride, padding, dilation, groups, H, W)
GEOMETRIES = [
    (3, 5, 7, 3, 1, 1, 1, 1, 9, 8),
    (3, 6, 10, 3, 2, 2, 2, 2, 11, 9),
    (1, 7, 5, 3, 2, 1, 1, 1, 8, 8),
    (3, 6, 6, 3, 1, 1, 1, 6, 7, 7),  # depthwise
    (1, 9, 13, 1, 1, 0, 1, 1, 5, 6),
    (3, 4, 6, 5, 1, 2, 1, 2, 6, 7),
]


def _loop_conv(x, kernel, stride, padding, dilation, groups):
    """The independent reference: one F.conv2d per sample, plain
    autograd."""
    return torch.cat([
        F.conv2d(x[b:b + 1], kernel[b], None, stride, padding, dilation,
                 groups) for b in range(x.shape[0])
    ])


def _mixture(bank, pi):
    return torch.einsum('bk,koipq->boipq', pi, bank)


@pytest.mark.parametrize('form', ['loop', 'grouped'])
@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('bias_kind', [None, 'shared', 'per_sample'])
def test_conv2d_recomputed_kernel_matches_loop(geometry, bias_kind, form,
                                               monkeypatch):
    """Both forms of the per-sample conv: one batch-1 conv per sample
    (CPU) and the batch folded into the groups (accelerators; forced here
    on CPU)."""
    monkeypatch.setattr(recompute, '_grouped',
                        lambda x: form == 'grouped' and x.shape[0] > 1)
    batch, c_in, c_out, k, s, p, d, g, h, w = geometry
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, h, w, requires_grad=True)
    bank = torch.randn(4, c_out, c_in // g, k, k, requires_grad=True)
    logits = torch.randn(batch, 4, requires_grad=True)
    bias = None
    if bias_kind == 'shared':
        bias = torch.randn(c_out, requires_grad=True)
    elif bias_kind == 'per_sample':
        bias = torch.randn(batch, c_out, requires_grad=True)
    leaves = [t for t in (x, bank, logits, bias) if t is not None]

    pi = logits.softmax(1)
    out = conv2d_recomputed_kernel(x, _mixture, (bank, pi), bias, (s, s),
                                   (p, p), (d, d), g)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)

    expected = _loop_conv(x, _mixture(bank, logits.softmax(1)), s, p, d, g)
    if bias is not None:
        expected = expected + (bias if bias.dim() == 2 else bias.expand(
            batch, -1))[:, :, None, None]
    want = torch.autograd.grad(expected, leaves, grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_the_kernel_inputs_are_saved():
    """The kernels are not kept: the saved storages are x, the bank and the
    routing weights."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 6, 6, requires_grad=True)
    bank = torch.randn(4, 16, 8, 3, 3, requires_grad=True)
    pi = torch.randn(3, 4, requires_grad=True).softmax(1)
    with SavedTensorBytes() as saved:
        conv2d_recomputed_kernel(x, _mixture, (bank, pi), padding=(1, 1))
    item = 4
    assert saved.total == item * (x.numel() + bank.numel() + pi.numel())
    with SavedTensorBytes() as plain:
        _loop_conv(x, _mixture(bank, pi), 1, 1, 1, 1)
    assert plain.total >= item * 3 * bank[0].numel()  # the kernels


# fp64 gradcheck of each family's kernel builder through the conv.


def _gradcheck(make_kernel, x, inputs, groups=1, stride=2, dilation=1):

    def fn(x, *inputs):
        return conv2d_recomputed_kernel(x, make_kernel, inputs, None,
                                        (stride, stride), (1, 1),
                                        (dilation, dilation), groups)

    assert torch.autograd.gradcheck(fn, (x, *inputs), eps=1e-6, atol=1e-5)


def _rand(*shape):
    return torch.rand(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize('groups', [1, 2])
def test_gradcheck_odconv_kernel(groups):
    torch.manual_seed(0)
    b, c_in, c_out = 2, 4, 6
    make = functools.partial(recompute.odconv_kernel, groups)
    bank = _rand(3, c_out, c_in // groups, 3, 3)
    _gradcheck(make, _rand(b, c_in, 5, 5),
               (bank, _rand(b, c_in), _rand(b, c_out), _rand(b, 9), _rand(
                   b, 3)), groups)
    # One kernel, no filter attention (depthwise), no spatial (1x1).
    _gradcheck(
        make,
        _rand(b, c_in, 5, 5),
        (_rand(1, c_out, c_in // groups, 3, 3), _rand(
            b, c_in), None, _rand(b, 9), None),
        groups,
        stride=1,
        dilation=2)


def test_gradcheck_scaled_maps_conv():
    """ODConv with one 1x1 kernel: the static conv of the scaled input."""
    torch.manual_seed(0)

    def fn(x, channel, filt, weight):
        return recompute._ScaledMapsConv2d.apply(x, channel, filt, weight,
                                                 ((2, 2), (0, 0), (1, 1), 1))

    assert torch.autograd.gradcheck(
        fn,
        (_rand(2, 4, 5, 5), _rand(2, 4), _rand(2, 6) + 0.5, _rand(6, 4, 1, 1)),
        eps=1e-6,
        atol=1e-5)


def test_gradcheck_mixture_kernel():
    torch.manual_seed(0)
    _gradcheck(recompute.mixture_kernel, _rand(2, 3, 5, 5),
               (_rand(3, 4, 3, 3, 3), _rand(2, 3)))


def test_gradcheck_kernel_warehouse_kernel():
    torch.manual_seed(0)
    # A [4, 6, 3, 3] kernel from 2x3 cells: g_s=9, g_o=2, g_i=2, m=36.
    layout = (9, 2, 2, 2, 3)
    make = functools.partial(recompute.kernel_warehouse_kernel, layout,
                             (4, 6, 3, 3))
    _gradcheck(make, _rand(2, 6, 5, 5), (_rand(5, 6), _rand(2, 36, 5)))


# The layers with impl='recompute' against their forward_reference.


def _kw(c_in, c_out, k, **kw):
    layer = KWConv2d(c_in, c_out, k, **kw)
    layer.temperature.fill_(0.3)  # attention not one-hot
    return layer


LAYERS = {
    'odconv_k4':
    lambda: ODConv2d(6, 10, 3, padding=1, kernel_num=4),
    'odconv_k1_stride2':
    lambda: ODConv2d(7, 9, 3, stride=2, padding=1, kernel_num=1, bias=False),
    'odconv_groups_dilation':
    lambda: ODConv2d(6, 10, 3, padding=2, dilation=2, groups=2),
    'odconv_depthwise':
    lambda: ODConv2d(6, 6, 3, padding=1, groups=6),
    'odconv_pointwise_1x_depthwise':
    lambda: ODConv2d(6, 6, 1, groups=6, kernel_num=1),
    'odconv_pointwise_1x':
    lambda: ODConv2d(6, 10, 1, kernel_num=1),
    'dyconv':
    lambda: DyConv2d(6, 10, 3, stride=2, padding=1, groups=2),
    'condconv_dilation':
    lambda: CondConv2d(5, 7, 3, padding=2, dilation=2),
    'kwconv':
    lambda: _kw(6, 10, 3, padding=1, stride=2),
    'kwconv_pointwise':
    lambda: _kw(8, 12, 1, bias=False),
    'kwconv_groups':
    lambda: _kw(8, 8, 3, padding=1, groups=2),
    'kwconv_split_cells':
    lambda: _kw(
        8, 12, 3, padding=1, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
}


def _gradients(layer, x, forward):
    x = x.clone().requires_grad_()
    out = forward(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grad = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    return out, torch.autograd.grad(out, [x, *params], grad, allow_unused=True)


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_recompute_matches_reference(name, batch):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    layer.train()
    x = torch.randn(batch, layer.in_channels, 9, 8)
    expected, want = _gradients(layer, x, layer.forward_reference)
    layer.impl = 'recompute'
    out, got = _gradients(layer, x, layer)
    assert layer.last_path == 'recompute'
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    names = ['input'
             ] + [n for n, p in layer.named_parameters() if p.requires_grad]
    assert sum(g is not None for g in want) > 3
    for n, a, b in zip(names, got, want):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', ['odconv_k4', 'dyconv', 'kwconv'])
def test_layer_recompute_channels_last(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    layer.train()
    x = torch.randn(3, layer.in_channels, 9, 8)
    expected, want = _gradients(layer, x, layer.forward_reference)
    layer.impl = 'recompute'
    out, got = _gradients(layer, x.to(memory_format=torch.channels_last),
                          layer)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    'name', ['odconv_k4', 'odconv_pointwise_1x', 'dyconv', 'kwconv'])
def test_layer_recompute_under_autocast(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    layer.train()
    x = torch.randn(3, layer.in_channels, 9, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected, want = _gradients(layer, x, layer.forward_reference)
        layer.impl = 'recompute'
        out, got = _gradients(layer, x, layer)
    assert layer.last_path == 'recompute'
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), expected.float(), rtol=0.05, atol=0.05)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            scale = b.float().abs().max().clamp(min=1e-3)
            assert (a.float() - b.float()).abs().max() <= 0.05 * scale


def test_double_backward_is_refused():
    torch.manual_seed(0)
    layer = DyConv2d(4, 4, 3, padding=1, impl='recompute')
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    (grad, ) = torch.autograd.grad(
        layer(x).square().sum(), x, create_graph=False)
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match='double backward'):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize('name', ['odconv_k4', 'dyconv', 'kwconv'])
def test_empty_batch(name):
    layer = LAYERS[name]()
    layer.impl = 'recompute'
    x = torch.randn(0, layer.in_channels, 9, 8, requires_grad=True)
    out = layer(x)
    assert out.shape[0] == 0
    out.sum().backward()
    assert x.grad.shape == x.shape


def _recompute_everywhere(monkeypatch):
    """The accelerators' policy on CPU: every family's threshold infinite."""
    for family in list(THRESHOLDS['recompute']):
        monkeypatch.setitem(THRESHOLDS['recompute'], family, math.inf)


def test_auto_takes_recompute_in_training_only(monkeypatch):
    _recompute_everywhere(monkeypatch)
    torch.manual_seed(0)
    for layer in (ODConv2d(8, 8, 3, padding=1), DyConv2d(8, 8, 3, padding=1),
                  _kw(8, 8, 3, padding=1)):
        x = torch.randn(2, 8, 16, 16)
        layer.train()
        layer(x)
        assert layer.last_path == 'recompute', type(layer).__name__
        with torch.no_grad():
            layer(x)
        assert layer.last_path != 'recompute', type(layer).__name__


def test_cpu_default_rebuilds_only_where_cheap():
    """On CPU the rebuild must be small next to the conv: a one-kernel
    ODConv (three products per kernel element) recomputes on maps of
    ``3 / THRESHOLDS['recompute']['odconv']`` pixels and more only; DyConv
    on a 4x4 map keeps its K static convs and recomputes on 8x8."""
    torch.manual_seed(0)
    odconv = ODConv2d(8, 8, 3, padding=1, kernel_num=1)
    odconv.train()
    odconv(torch.randn(2, 8, 2, 2))
    assert odconv.last_path != 'recompute'
    side = math.ceil(math.sqrt(3 / THRESHOLDS['recompute']['odconv']))
    odconv(torch.randn(2, 8, side, side))
    assert odconv.last_path == 'recompute'
    dyconv = DyConv2d(8, 8, 3, padding=1)
    dyconv.train()
    dyconv(torch.randn(2, 8, 4, 4))
    assert dyconv.last_path == 'conv_then_mix'
    dyconv(torch.randn(2, 8, 8, 8))
    assert dyconv.last_path == 'recompute'


# Activation memory of a training step: ResNet-50s at batch 8.


def _resnet50(kind):
    from mmpretrain.models.backbones import ResNet

    from mmdyn.models.backbones import DynamicResNet, KWResNet
    from mmdyn.models.backbones.kw_resnet import KW_1X_CFG
    if kind == 'static':
        return ResNet(50)
    if kind == 'odconv1x':
        return DynamicResNet(
            50,
            dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625))
    if kind == 'kw1x':
        return KWResNet(50, kw_cfg=KW_1X_CFG)
    return DynamicResNet(
        50,
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True)


@pytest.fixture(scope='module')
def static_resnet50_saved_bytes():
    torch.manual_seed(0)
    model = _resnet50('static')
    model.train()
    return saved_bytes_of_step(model, torch.rand(8, 3, 64, 64))


@pytest.mark.parametrize('kind', ['odconv1x', 'kw1x', 'dyconv4x'])
def test_resnet50_training_step_saves_like_static(kind,
                                                  static_resnet50_saved_bytes,
                                                  monkeypatch):
    """Every dynamic layer on the recompute path, as ``impl='auto'`` does
    in training on accelerators (on CPU the default thresholds leave the
    layers of a 64x64 input only a few pixels wide on paths that are faster
    there: ODConv's scaled columns, DyConv's K static convs, KW's stored
    mixtures): within 1.15x of
    ResNet-50's saved activations. The old paths keep the per-sample
    kernels or scaled maps: 2.5x (ODConv-1x), 15x (KW-1x), 2.4x
    (DyConv-4x)."""
    _recompute_everywhere(monkeypatch)
    monkeypatch.setitem(THRESHOLDS['odconv'], 'scaled_columns_out_per_pixel',
                        math.inf)
    monkeypatch.setitem(THRESHOLDS['mixture'], 'conv_then_mix_max_work', -1)
    torch.manual_seed(0)
    model = _resnet50(kind)
    model.train()
    saved = saved_bytes_of_step(model, torch.rand(8, 3, 64, 64))
    ratio = saved / static_resnet50_saved_bytes
    assert ratio <= 1.15, f'{kind}: {ratio:.2f}x the static ResNet-50'
    # KW's groups=1 CPU layers rebuild their mixtures on the GEMM path
    # ('mixture_gemm', kw_train.py) that comes before 'recompute'.
    assert any(
        getattr(m, 'last_path', None) in ('recompute', 'mixture_gemm')
        for m in model.modules())


def test_saved_tensor_counter_counts_unique_storages():
    """The counter itself: views of one storage count once, parameters
    are excluded."""
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    with SavedTensorBytes(exclude=conv.parameters()) as saved:
        y = conv(x)
        z = y * y[:, :1]  # saves y and a view of y: one storage
    assert saved.count == 2  # x, y
    assert saved.total == 4 * (x.numel() + y.numel())
    assert z.shape == y.shape


def test_forced_recompute_compiles_as_the_reference():
    """Under graph capture the path gives way to the reference (its backward
    calls torch.autograd.grad): a compiled training step of a layer built with
    impl='recompute' runs and equals eager."""
    import torch._dynamo
    torch.manual_seed(0)
    layer = DyConv2d(4, 6, 3, padding=1, impl='recompute')
    x = torch.randn(2, 4, 6, 6)
    expected, want = _gradients(layer, x, layer)
    assert layer.last_path == 'recompute'
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='aot_eager')
    out, got = _gradients(layer, x, compiled)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
