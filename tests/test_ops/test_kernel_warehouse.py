# Copyright (c) mmdyn contributors. All rights reserved.
"""Tests of the KernelWarehouse operator against independent references.

The references below are written from the method's definition (the
KernelWarehouse paper): attention recomputed from the layer's submodules, each
mixture assembled cell by cell with Python loops, then ``F.conv2d`` per
sample.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdyn.ops import KWConv2d, KWLinear, WarehouseManager
from mmdyn.ops.kernel_warehouse import contrasting_attention


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # These tests run many tiny ops; with two OpenMP threads on a loaded
    # 2-core machine each op can wait ~100x longer on its thread barrier.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def c_loop_always(monkeypatch):
    """The C cell product for every width (its threshold in the public dispatch
    table lowered), so that small layers take it."""
    from mmdyn.ops.accel.paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        1)


def _set_tau(module, tau):
    for m in module.modules():
        if isinstance(m, (KWConv2d, KWLinear)):
            m.update_temperature(tau)


def _reference_attention(layer, pooled, tau):
    """Logits from the submodules, the basis rebuild and CAF, by hand."""
    att = layer.attention
    hidden = torch.relu(att.norm1(att.fc1(pooled)))
    m, n = att.num_mixtures, att.num_cells
    if att.num_basis is None:
        logits = att.fc2(hidden).reshape(-1, m, n + 1)
    else:
        raw = att.fc2(hidden).reshape(-1, m,
                                      att.num_local_cells + att.num_basis + 1)
        rows = []
        for i in range(m):
            local = raw[:, i, :att.num_local_cells]
            mapped = raw[:, i, att.num_local_cells:-1] @ att.fc3.weight.t()
            t0 = att.start_cell
            rows.append(
                torch.cat(
                    [mapped[:, :t0], local, mapped[:, t0:], raw[:, i, -1:]],
                    1))
        logits = torch.stack(rows, 1) + att.basis_bias.reshape(m, n + 1)
    normalised = logits / (logits.abs().sum(-1, keepdim=True) + 1e-3)
    alpha = (1 - tau) * normalised + tau * layer.beta.to(logits.dtype)
    return alpha[..., :n]


def _reference_kernel(layer, alpha_b):
    """Assemble one sample's kernel mixture by mixture."""
    cells = layer.warehouse_manager.weights[layer.warehouse_id]
    c_out, c_in_g = layer.weight_shape[:2]
    k_shape = layer.weight_shape[2:]
    k_w = k_shape[-1]
    c_o, c_i = cells.shape[1], cells.shape[2]
    g_o, g_i = c_out // c_o, c_in_g // c_i
    kernel = torch.zeros(layer.weight_shape, dtype=cells.dtype)
    for s in range(int(torch.tensor(k_shape).prod())):
        for o in range(g_o):
            for c in range(g_i):
                i = (s * g_o + o) * g_i + c
                # M_i = sum_j alpha_ij E_j
                mixture = torch.tensordot(
                    alpha_b[i], cells.reshape(-1, c_o, c_i), dims=1)
                index = (slice(o * c_o,
                               (o + 1) * c_o), slice(c * c_i, (c + 1) * c_i))
                if len(k_shape) == 2:
                    index += (s // k_w, s % k_w)
                else:
                    index += (0, )
                kernel[index] = mixture
    return kernel


def _reference_conv(layer, x, tau):
    alpha = _reference_attention(layer, x.mean((2, 3)), tau)
    outs = []
    for b in range(x.shape[0]):
        kernel = _reference_kernel(layer, alpha[b])
        outs.append(
            F.conv2d(x[b:b + 1], kernel, layer.bias, layer.stride,
                     layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


class _Net(nn.Module):
    """Layers reserved from one manager, registered, then finalised."""

    def __init__(self, specs, **manager_kwargs):
        super().__init__()
        manager = WarehouseManager(**manager_kwargs)
        self.layers = nn.ModuleList(
            manager.reserve(name, *args, **kwargs)
            for name, args, kwargs in specs)
        self.warehouse_manager = manager
        manager.finalize(self)


SPECS = {
    'plain': [('stage0_layer0_conv0', (8, 16, 3), dict(padding=1)),
              ('stage0_layer1_conv1', (16, 8, 1), dict(stride=2, bias=True))],
    'grouped_dilated': [
        ('stage0_layer0_conv0', (8, 8, (3, 2)),
         dict(padding=(2, 1), dilation=2, groups=2, bias=True)),
        ('stage0_layer1_conv1', (8, 16, 3), dict(stride=2, groups=4)),
    ],
}


@pytest.mark.parametrize('spec', ['plain', 'grouped_dilated'])
@pytest.mark.parametrize('budget', [
    dict(cell_num_ratio=1),
    dict(cell_num_ratio=2, cell_inplane_ratio=0.5),
    dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
    dict(
        cell_num_ratio=0.5,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5,
        nonlocal_basis_ratio=1 / 16),
])
def test_matches_naive_reference(spec, budget):
    net = _Net(SPECS[spec], **budget).double()
    net.eval()
    _set_tau(net, 0.3)
    for layer in net.layers:
        with torch.no_grad():  # non-trivial biases so that all terms count
            for p in layer.attention.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            if layer.bias is not None:
                layer.bias.normal_()
        x = torch.randn(2, layer.in_channels, 7, 6, dtype=torch.float64)
        expected = _reference_conv(layer, x, 0.3)
        for impl in ('auto', 'loop', 'grouped', 'unfold'):
            layer.impl = impl
            torch.testing.assert_close(
                layer(x), expected, rtol=1e-9, atol=1e-9)


def test_matches_reference_in_training_mode():
    net = _Net(SPECS['plain']).double()
    net.train()
    layer = net.layers[0]
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    expected = _reference_conv(layer, x, 0.0)
    torch.testing.assert_close(layer(x), expected)


def _expected_cells(layers, ratio):
    """Cell index (or None) of every mixture at tau = 1, per the rule."""
    cursor, result = 0, []
    for layer in layers:
        m = layer.attention.num_mixtures
        picks = []
        for i in range(m):
            if ratio >= 1:
                picks.append(cursor + i * int(ratio))
            elif i % int(1 / ratio) == (i // int(1 / ratio)) % int(1 / ratio):
                picks.append(cursor + sum(p is not None for p in picks))
            else:
                picks.append(None)
        cursor += m * int(ratio) if ratio >= 1 else sum(p is not None
                                                        for p in picks)
        result.append(picks)
    return result


@pytest.mark.parametrize('ratio', [1 / 4, 1 / 2, 1, 2, 4])
def test_tau_one_gives_assigned_cells(ratio):
    specs = [('stage0_layer0_conv0', (16, 16, 2), dict()),
             ('stage0_layer1_conv1', (16, 32, 1), dict())]
    net = _Net(
        specs,
        cell_num_ratio=ratio,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5)
    cells = net.warehouse_manager.weights[0]
    assert cells.shape == (int(24 * ratio), 8, 8, 1, 1)
    _set_tau(net, 1.0)
    net.eval()
    for layer, picks in zip(net.layers, _expected_cells(net.layers, ratio)):
        kernel = torch.zeros(layer.weight_shape)
        g_o, g_i = layer.out_channels // 8, layer.in_channels // 8
        k_w = layer.kernel_size[1]
        for i, cell in enumerate(picks):
            s, rest = divmod(i, g_o * g_i)
            o, c = divmod(rest, g_i)
            if cell is not None:
                kernel[o * 8:(o + 1) * 8, c * 8:(c + 1) * 8, s // k_w,
                       s % k_w] = cells[cell, :, :, 0, 0]
        conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            bias=False)
        conv.weight.data.copy_(kernel)
        x = torch.randn(2, layer.in_channels, 5, 5)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        if ratio < 1:  # some mixtures point at the zero cell
            assert any(p is None for p in picks)


def test_gradcheck_conv_and_linear():
    conv = KWConv2d(
        4, 6, 3, padding=1, groups=2, bias=True, cell_num_ratio=2).double()
    linear = KWLinear(6, 4, cell_inplane_ratio=0.5).double()
    for layer in (conv, linear):
        layer.eval()
        layer.update_temperature(0.4)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    cells = conv.warehouse.weights[0].detach().clone().requires_grad_()
    fc2 = conv.attention.fc2.weight.detach().clone().requires_grad_()

    def conv_fn(x, cells, fc2):
        return torch.func.functional_call(conv, {
            'warehouse.weights.0': cells,
            'attention.fc2.weight': fc2
        }, (x, ))

    assert torch.autograd.gradcheck(conv_fn, (x, cells, fc2), fast_mode=True)
    v = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    lcells = linear.warehouse.weights[0].detach().clone().requires_grad_()

    def linear_fn(v, lcells):
        return torch.func.functional_call(linear,
                                          {'warehouse.weights.0': lcells},
                                          (v, ))

    assert torch.autograd.gradcheck(linear_fn, (v, lcells), fast_mode=True)


def test_linear_matches_reference():
    layer = KWLinear(
        12, 10, bias=True, cell_inplane_ratio=0.5, cell_num_ratio=2).double()
    layer.eval()
    layer.update_temperature(0.2)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    alpha = _reference_attention(layer, x, 0.2)
    expected = torch.stack([
        _reference_kernel(layer, alpha[b])[..., 0] @ x[b] + layer.bias
        for b in range(3)
    ])
    torch.testing.assert_close(layer(x), expected)
    # token inputs [B, L, C]: one kernel per sample, pooled attention
    tokens = torch.randn(2, 5, 12, dtype=torch.float64)
    alpha = _reference_attention(layer, tokens.mean(1), 0.2)
    expected = torch.stack([
        tokens[b] @ _reference_kernel(layer, alpha[b])[..., 0].t() + layer.bias
        for b in range(2)
    ])
    torch.testing.assert_close(layer(tokens), expected)


def test_standalone_layer_structure():
    layer = KWConv2d(16, 32, 3, padding=1, bias=False)
    # one private warehouse of whole-channel cells, one mixture per tap
    assert layer.warehouse.weights[0].shape == (9, 32, 16, 1, 1)
    assert layer.attention.fc1.out_features == 16  # max(16 / 16, 16)
    assert layer.attention.fc1.bias is None  # BN norm: no fc1 bias
    assert layer.attention.fc2.out_features == 9 * 10
    assert float(layer.temperature) == 0.0
    assert KWConv2d.TEMPERATURE_SCHEDULE == dict(start=1.0, end=0.0, epochs=20)
    keys = layer.state_dict().keys()
    assert 'temperature' in keys and 'beta' not in keys
    ln = KWConv2d(16, 32, 3, attention_norm='ln')
    assert ln.attention.fc1.bias is not None
    # slice init: fan_out kaiming over the slice, std sqrt(2 / (9 * 32))
    big = KWConv2d(64, 128, 3)
    std = big.warehouse.weights[0].std().item()
    assert abs(std - (2 / (9 * 128))**0.5) < 0.05 * std


def test_madds_per_sample():
    layer = KWConv2d(16, 32, 3, stride=2, padding=1, groups=2)
    # 9 cells [32, 8]: conv = 4*4*32*8*9, agg = numel * n, att = fc1 + fc2
    assert layer.madds_per_sample((8, 8)) == dict(
        conv=4 * 4 * 32 * 8 * 9,
        att=16 * 16 + 16 * 9 * 10,
        agg=32 * 8 * 9 * 9,
        scal=0)
    linear = KWLinear(32, 10)
    assert linear.madds_per_sample() == dict(
        conv=320, att=32 * 16 + 16 * 1 * 2, agg=320, scal=0)


def test_spec_warehouse_grouping():
    manager = WarehouseManager(sharing_range=('layer', 'conv'))
    assert manager.fuse_name('stage2_layer3_conv1') == 'stage2_layer_conv'
    # tokens are matched by prefix: 'pwconv0' does not start with 'conv'
    assert manager.fuse_name('stage1_layer0_pwconv0') == \
        'stage1_layer_pwconv0'
    assert WarehouseManager(sharing_range=(
        'layer', 'pwconv')).fuse_name('stage1_layer0_pwconv0') == \
        'stage1_layer_pwconv'


def test_caf_is_safe():
    beta = torch.zeros(2, 4)
    beta[:, 0] = 1
    zero = contrasting_attention(torch.zeros(1, 2, 4), beta, 0.0)
    assert torch.equal(zero, torch.zeros(1, 2, 3))
    const = contrasting_attention(torch.full((1, 2, 4), 7.0), beta, 0.0)
    torch.testing.assert_close(const, torch.full((1, 2, 3), 7 / 28.001))
    huge = torch.tensor([[[3e38, -3e38, 3e38, 1.0]]])
    out = contrasting_attention(huge, beta[:1], 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, torch.tensor([[[0.5 + 0.5 / 3, -0.5 / 3, 0.5 / 3]]]))


def test_bf16_autocast_cpu():
    net = _Net(SPECS['plain'])
    net.train()
    _set_tau(net, 0.5)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = net.layers[1](net.layers[0](x))
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    grad = net.warehouse_manager.weights[0].grad
    assert grad is not None and torch.isfinite(grad).all()
    with torch.no_grad():
        net.eval()
        ref = net.layers[1](net.layers[0](x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = net.layers[1](net.layers[0](x)).float()
    torch.testing.assert_close(low, ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize('kernel_size,stride', [(3, 1), (1, 2)])
def test_trace_is_batch_size_independent(kernel_size, stride):
    layer = KWConv2d(4, 8, kernel_size, stride, padding=kernel_size // 2)
    layer.eval()
    with warnings.catch_warnings():  # tracer warnings about shape checks
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(layer, torch.randn(2, 4, 5, 5))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(traced(x), layer(x))


def test_works_as_drop_in_conv():
    from mmcv.cnn import ConvModule, build_conv_layer

    import mmdyn.models  # noqa: F401  (registers KWConv2d)
    conv = build_conv_layer(dict(type='KWConv2d'), 8, 16, 3, padding=1)
    assert conv(torch.randn(2, 8, 6, 6)).shape == (2, 16, 6, 6)
    module = ConvModule(
        8,
        16,
        3,
        padding=1,
        conv_cfg=dict(type='KWConv2d'),
        norm_cfg=dict(type='BN'))
    module.init_weights()
    assert module(torch.randn(1, 8, 6, 6)).shape == (1, 16, 6, 6)


def test_errors():
    manager = WarehouseManager()
    layer = manager.reserve('stage0_layer0_conv0', 8, 8, 3)
    with pytest.raises(ValueError, match='finalize'):
        layer(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match='not submodules'):
        manager.finalize(nn.Sequential())
    net = nn.Sequential(layer)
    net.warehouse_manager = manager
    manager.finalize(net)
    with pytest.raises(ValueError, match='already'):
        manager.finalize(net)
    with pytest.raises(ValueError, match='already finalized'):
        manager.reserve('stage0_layer1_conv0', 8, 8, 3)
    with pytest.raises(ValueError, match='before any layer'):
        WarehouseManager().finalize(nn.Sequential())
    with pytest.raises(ValueError, match='cell_outplane_ratio'):
        KWConv2d(12, 12, 3, cell_outplane_ratio=0.7)
    with pytest.raises(ValueError, match='cell_inplane_ratio'):
        KWConv2d(12, 12, 3, cell_inplane_ratio=0.7)
    with pytest.raises(ValueError, match='cell_num_ratio'):
        KWConv2d(8, 8, 3, cell_num_ratio=1.5)
    with pytest.raises(ValueError, match='cell_num_ratio'):
        KWConv2d(8, 8, 1, cell_num_ratio=0)
    with pytest.raises(ValueError, match='attention_norm'):
        WarehouseManager(attention_norm='gn')
    with pytest.raises(ValueError, match='sharing_range'):
        WarehouseManager(sharing_range=('layer_conv', ))
    with pytest.raises(ValueError, match='reduction'):
        WarehouseManager(reduction=(0.1, -1))
    with pytest.raises(ValueError, match='layer_type'):
        WarehouseManager().reserve('a', 4, 4, layer_type='conv3d')
    with pytest.raises(ValueError, match='warehouse options'):
        KWConv2d(
            8,
            8,
            3,
            warehouse_manager=WarehouseManager(),
            warehouse_name='a',
            cell_num_ratio=2)
    with pytest.raises(ValueError, match='warehouses'):
        _Net(
            SPECS['plain'] + [('stage1_layer0_conv0', (8, 8, 1), {})],
            cell_num_ratio=(1, 2, 4))
    with pytest.raises(ValueError, match='in_channels'):
        KWConv2d(8, 8, 3)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match='in_features'):
        KWLinear(8, 4)(torch.randn(2, 5))


@pytest.mark.parametrize('kernel_size', [3, 1])
def test_chunked_inference_path_matches_reference(kernel_size):
    """Deep grouped layers in CPU inference (the position-major path takes
    groups == 1) build the kernels into the reused workspace, then one batch-1
    conv per sample."""
    net = _Net([('stage0_layer0_conv0', (16, 32, kernel_size),
                 dict(padding=kernel_size // 2, bias=True, groups=2))],
               cell_num_ratio=1,
               cell_inplane_ratio=0.5).double().eval()
    layer = net.layers[0]
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        layer.bias.normal_()
        x = torch.randn(3, 16, 2, 1, dtype=torch.float64)
        assert not layer.uses_position_major(x)
        torch.testing.assert_close(
            layer(x), _reference_conv(layer, x, 0.0), rtol=1e-9, atol=1e-9)
    assert layer.last_path == 'chunked'


@pytest.mark.parametrize('kernel_size,stride,padding,dilation',
                         [(3, 1, 1, 1), (3, 2, 2, 2), ((3, 1), 1, (1, 0), 1),
                          (1, 2, 1, 1), (1, 1, 0, 1)])
@pytest.mark.parametrize('inplane', [1, 0.5])
def test_position_major_path_matches_reference(request, kernel_size, stride,
                                               padding, dilation, inplane):
    """Deep CPU layers convolve from the position-major mixtures; forward and
    backward against the naive reference, mixtures spanning all or half of the
    input channels."""
    net = _Net([
        ('stage0_layer0_conv0', (16, 32, kernel_size),
         dict(stride=stride, padding=padding, dilation=dilation, bias=True))
    ],
               cell_num_ratio=1,
               cell_inplane_ratio=inplane,
               cell_outplane_ratio=0.5).double().train()
    layer = net.layers[0]
    _set_tau(net, 0.4)
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        layer.bias.normal_()
    hw = (2, 3) if kernel_size == 1 else (5, 4)
    x = torch.randn(3, 16, *hw, dtype=torch.float64, requires_grad=True)
    assert layer.uses_position_major(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = _reference_conv(layer, x_ref, 0.4)
    grad = torch.randn_like(ref)
    cells = layer.warehouse_manager.weights[layer.warehouse_id]
    params = [cells, layer.attention.fc1.weight, layer.bias]
    want = torch.autograd.grad(ref, [x_ref] + params, grad, retain_graph=True)
    # Training: 'auto' takes the GEMM-backward path from the mixtures
    # (kw_train.py); the autograd form of the position-major conv forced.
    for impl, path in (('auto', 'mixture_gemm'), ('position_major',
                                                  'position_major')):
        layer.impl = impl
        out = layer(x)
        assert layer.last_path == path
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        got = torch.autograd.grad(out, [x] + params, grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    # Inference, 'auto': larger kernels take the mixtures' GEMMs (faster
    # than the position-major conv on the deep 3x3 layers), 1x1 layers on
    # maps this small the position-major conv.
    layer.impl = 'auto'
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)
    assert layer.last_path == ('position_major'
                               if kernel_size == 1 else 'mixture_gemm')
    # Inference: output-major mixtures against position-major columns (one
    # matmul), by torch.matmul in float64, then by the C loop in float32.
    layer.impl = 'position_major'
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)
        assert layer.last_mixture_product == 'matmul'
        request.getfixturevalue('c_loop_always')
        net.float()
        torch.testing.assert_close(
            layer(x.float()), ref.float(), rtol=1e-4, atol=1e-4)
        assert layer.last_path == 'position_major'
        assert layer.last_mixture_product == 'c_loop'
    layer.impl = 'loop'
    assert not layer.uses_position_major(x)
    # Forced on a layer whose maps outweigh its kernel.
    layer.impl = 'position_major'
    big = x.detach()[:, :, :1].float().repeat(1, 1, 12, 12)
    with torch.no_grad():
        layer.impl = 'reference'
        want = layer(big)
        assert layer.last_path == 'reference'
        layer.impl = 'position_major'
        torch.testing.assert_close(layer(big), want, rtol=1e-4, atol=1e-4)
        assert layer.last_path == 'position_major'


@pytest.mark.parametrize('inplane,outplane', [(1, 1), (0.5, 0.5)])
@pytest.mark.parametrize('kernel_size,path', [(3, 'winograd'),
                                              (3, 'position_major'),
                                              (1, 'position_major')])
def test_float32_inference_paths_match_reference(request, c_loop_always,
                                                 inplane, outplane,
                                                 kernel_size, path):
    """Float32 CPU inference: Winograd F(2x2, 3x3) (3x3 stride 1) with the
    transformed kernels written by the C cell product (whole-position
    cells) or built from the mixtures (cells split over input and output
    channels), or the position-major conv from mixtures the C loop wrote
    into the reused buffer; against the float64 naive reference.
    Thresholds lowered so that small layers take these paths."""
    if path == 'winograd':
        request.getfixturevalue('small_winograd')
    net = _Net([('stage0_layer0_conv0', (16, 32, kernel_size),
                 dict(padding=kernel_size // 2, bias=True))],
               cell_num_ratio=1,
               cell_inplane_ratio=inplane,
               cell_outplane_ratio=outplane).eval()
    layer = net.layers[0]
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        layer.bias.normal_()
        hw = {'winograd': (7, 6), 'position_major': (3, 5)}[path]
        x = torch.randn(3, 16, *(hw if kernel_size == 3 else (2, 3)))
        if path == 'position_major':
            assert layer.uses_position_major(x)
            # 'auto' takes the mixtures' GEMMs for a 3x3 kernel in inference
            # (test_position_major_path_matches_reference): forced here.
            layer.impl = 'position_major'
        out = layer(x)
        expected = _reference_conv(net.double().layers[0], x.double(), 0.0)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)
    fused = path == 'winograd' and inplane == outplane == 1
    # The fused path writes the transformed kernels in the C product; the
    # others take the mixtures from it.
    assert layer.last_path == ('winograd_fused' if fused else path)
    assert layer.last_mixture_product == 'c_loop' or fused


def test_reused_mixtures_buffer_only_in_inference():
    """``mix_cells(reuse_buffer=True)`` writes into one per-thread buffer in
    inference (the next call overwrites it) and allocates with autograd."""
    net = _Net([('stage0_layer0_conv0', (16, 32, 3), dict(padding=1))],
               cell_num_ratio=1).eval()
    layer = net.layers[0]
    att = torch.rand(2, layer.num_mixtures, layer.num_cells)
    with torch.no_grad():
        first = layer.mix_cells(att, reuse_buffer=True)
        second = layer.mix_cells(att * 2, reuse_buffer=True)
        assert first.data_ptr() == second.data_ptr()
        fresh = layer.mix_cells(att)
        assert fresh.data_ptr() != second.data_ptr()
        torch.testing.assert_close(second, 2 * fresh)
    with_grad = layer.mix_cells(att, reuse_buffer=True)
    assert with_grad.requires_grad
    assert with_grad.data_ptr() != second.data_ptr()


def test_packed_cells_cache_follows_the_cells(monkeypatch, c_loop_always):
    """Float32 CPU inference cuts each warehouse into strips once for all its
    layers; an in-place update of the cells (an optimiser step),
    load_state_dict or a write through .data re-cuts it, train() and dtype
    moves drop it, MMDYN_KW_PACKED_CELLS=0 turns it off (the manager counts its
    builds).

    Outputs against the float64 naive reference each time.
    """
    specs = [('stage0_layer0_conv0', (16, 32, 1), {}),
             ('stage0_layer1_conv0', (32, 16, 1), {})]
    net = _Net(specs, cell_num_ratio=1, cell_inplane_ratio=0.5).eval()
    manager = net.warehouse_manager
    x = torch.randn(2, 16, 3, 3)

    def check():
        with torch.no_grad():
            hidden = net.layers[0](x)
            out = net.layers[1](hidden)
            ref_net = copy.deepcopy(net).double()
            ref = _reference_conv(
                ref_net.layers[1],
                _reference_conv(ref_net.layers[0], x.double(), 0.0), 0.0)
        torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)

    check()
    check()
    assert manager.packed.builds == 1  # one warehouse, both layers, twice
    assert net.layers[0].last_mixture_product == 'c_loop'
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    assert len(manager.packed) == 0
    net.layers[1](net.layers[0](x)).square().sum().backward()
    optimizer.step()
    net.eval()
    check()
    assert manager.packed.builds == 2
    other = _Net(specs, cell_num_ratio=1, cell_inplane_ratio=0.5)
    net.load_state_dict(other.state_dict())
    check()
    assert manager.packed.builds == 3
    # A write through .data (mmengine's EMA swap) leaves the version counter
    # alone: the sampled values catch it.
    manager.weights[0].data.mul_(-1.5)
    check()
    assert manager.packed.builds == 4
    net.double()  # moves drop the copy
    assert len(manager.packed) == 0
    net.float()
    check()
    assert manager.packed.builds == 5
    monkeypatch.setenv('MMDYN_KW_PACKED_CELLS', '0')
    with torch.no_grad():
        assert manager.packed_cells(0) is None
    check()
    assert manager.packed.builds == 5


@pytest.mark.parametrize('c_path', [False, True])
@pytest.mark.parametrize('kernel_size,inplane,outplane', [(3, 0.5, 0.5),
                                                          (3, 1, 1),
                                                          (1, 0.25, 0.5)])
def test_mixture_layouts(monkeypatch, c_path, kernel_size, inplane, outplane):
    """mix_cells' 'position_major' and 'output_major' layouts, written directly
    by the C loop (Scatter) or rearranged from torch.matmul, against the naive
    kernel permuted by torch."""
    from mmdyn.ops.accel.paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        1 if c_path else 1 << 30)
    net = _Net([('stage0_layer0_conv0', (16, 32, kernel_size), {})],
               cell_num_ratio=1,
               cell_inplane_ratio=inplane,
               cell_outplane_ratio=outplane).eval()
    layer = net.layers[0]
    att = torch.rand(3, layer.num_mixtures, layer.num_cells)
    # [B, C_out, C_in, kh, kw] by the naive loop, float64
    reference = copy.deepcopy(net).double().layers[0]
    kernel = torch.stack([
        _reference_kernel(reference, a) for a in att.double()
    ]).flatten(3).float()
    expected = {
        'position_major': kernel.permute(0, 3, 1, 2),
        'output_major': kernel.permute(0, 1, 3, 2)
    }
    with torch.no_grad():
        for layout, want in expected.items():
            got = layer.mix_cells(att, reuse_buffer=True, layout=layout)
            assert layer.last_mixture_product == ('c_loop'
                                                  if c_path else 'matmul')
            assert tuple(got.shape) == tuple(want.shape)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='layout'):
        layer.mix_cells(att, layout='kernel')
