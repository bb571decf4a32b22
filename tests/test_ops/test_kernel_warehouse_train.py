# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse's CPU training path ``'mixture_gemm'``
(:mod:`mmdyn.ops.accel.kw_train`): the conv from the mixtures with a GEMM
backward, the mixtures rebuilt in it or kept.

* forced with ``impl='mixture_gemm'`` against ``forward_reference`` (plain
  autograd through the assembled kernels and one conv per sample): output
  and the gradients of the input, the shared warehouse and every attention
  parameter, for 1x1 and 3x3 kernels, stride 2, dilation 2, padding,
  channels that are not multiples of 8, cells spanning part of the
  channels, batch 1 and 3, mixtures rebuilt and kept;
* two layers sharing one warehouse: the warehouse's gradient is the sum;
* what a training step keeps (:class:`~mmdyn.analysis.memory.
  SavedTensorBytes`): the input and the attentions, not the mixtures;
* the per-layer rule, dispatch and refusals;
* KW-1x ResNet-50 at 224x224 with the CPU defaults keeps within 1.15x the
  activations of ResNet-50 (2.27x before this path).
"""
import math

import pytest
import torch
from torch import nn

from mmdyn.analysis.memory import SavedTensorBytes, saved_bytes_of_step
from mmdyn.ops import KWConv2d, WarehouseManager
from mmdyn.ops.accel import kw_paths, kw_train
from mmdyn.ops.accel.thresholds import THRESHOLDS

# (C_in, C_out, kernel, stride, padding, dilation, H, W, cell ratios)
GEOMETRIES = {
    '1x1': (8, 12, 1, 1, 0, 1, 5, 6, {}),
    '1x1_odd_channels': (7, 13, 1, 1, 0, 1, 5, 6, {}),
    '1x1_stride2_padded': (8, 12, 1, 2, 1, 1, 7, 6, {}),
    '1x1_split_cells': (8, 12, 1, 1, 0, 1, 5, 6,
                        dict(cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)),
    '3x3': (6, 10, 3, 1, 1, 1, 7, 6, {}),
    '3x3_stride2': (6, 10, 3, 2, 1, 1, 9, 8, {}),
    '3x3_dilation2': (7, 5, 3, 1, 2, 2, 8, 7, {}),
    '3x3_split_cells': (8, 12, 3, 1, 1, 1, 6, 5,
                        dict(cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)),
    '3x1_stride2_split':
    (8, 12, (3, 1), 2, (1, 0), 1, 7, 5, dict(cell_inplane_ratio=0.5)),
    '1x1_output_blocks':
    (8, 12, 1, 1, 0, 1, 5, 6, dict(cell_outplane_ratio=0.5)),
    '3x3_output_blocks':
    (8, 12, 3, 1, 1, 1, 6, 5, dict(cell_outplane_ratio=0.5)),
}


def _layer(c_in, c_out, k, s, p, d, options, bias=True):
    layer = KWConv2d(
        c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias,
        **options).double()
    layer.temperature.fill_(0.3)  # attentions not one-hot
    with torch.no_grad():
        for param in layer.attention.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer.train()


def _gradients(layer, x, forward, params):
    x = x.clone().requires_grad_()
    out = forward(x)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out, torch.autograd.grad(out, [x, *params], grad)


@pytest.mark.parametrize('recompute', [True, False], ids=['rebuilt', 'kept'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('name', sorted(GEOMETRIES))
def test_matches_reference(name, batch, recompute, monkeypatch):
    monkeypatch.setitem(THRESHOLDS['recompute'], 'kernel_warehouse',
                        math.inf if recompute else 0.0)
    torch.manual_seed(0)
    c_in, c_out, k, s, p, d, h, w, options = GEOMETRIES[name]
    layer = _layer(c_in, c_out, k, s, p, d, options)
    x = torch.randn(batch, c_in, h, w, dtype=torch.float64)
    assert kw_train.rebuilds_mixtures(layer, x) == recompute
    params = [q for q in layer.parameters() if q.requires_grad]
    params.append(layer.warehouse_manager.weights[layer.warehouse_id])
    expected, want = _gradients(layer, x, layer.forward_reference, params)
    layer.impl = 'mixture_gemm'
    out, got = _gradients(layer, x, layer, params)
    assert layer.last_path == 'mixture_gemm'
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for index, (a, b) in enumerate(zip(got, want)):
        assert b.abs().sum() > 0, index
        torch.testing.assert_close(
            a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f'{index}: {m}')


def test_float32_and_channels_last():
    torch.manual_seed(0)
    layer = _layer(16, 24, 3, 1, 1, 1, {}).float()
    x = torch.randn(3, 16, 6, 6).to(memory_format=torch.channels_last)
    params = [q for q in layer.parameters() if q.requires_grad]
    params.append(layer.warehouse_manager.weights[layer.warehouse_id])
    expected, want = _gradients(layer, x, layer.forward_reference, params)
    layer.impl = 'mixture_gemm'
    out, got = _gradients(layer, x, layer, params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _TwoLayers(nn.Module):
    """Two layers reserved from one manager: one shared warehouse."""

    def __init__(self):
        super().__init__()
        manager = WarehouseManager(cell_num_ratio=1)
        self.conv1 = manager.reserve(
            'stage0_layer0_conv0', 8, 8, 1, bias=False)
        self.conv2 = manager.reserve(
            'stage0_layer1_conv0', 8, 8, 3, padding=1, bias=False)
        self.warehouse_manager = manager
        manager.finalize(self)

    def forward(self, x):
        return self.conv2(self.conv1(x).relu())

    def forward_reference(self, x):
        return self.conv2.forward_reference(
            self.conv1.forward_reference(x).relu())


def test_shared_warehouse_gradient_sums_both_layers():
    torch.manual_seed(0)
    net = _TwoLayers().double().train()
    assert net.conv1.warehouse_id == net.conv2.warehouse_id
    for layer in (net.conv1, net.conv2):
        layer.temperature.fill_(0.3)
        layer.impl = 'mixture_gemm'
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    params = list(net.parameters())
    expected, want = _gradients(net, x, net.forward_reference, params)
    out, got = _gradients(net, x, net, params)
    assert net.conv1.last_path == net.conv2.last_path == 'mixture_gemm'
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_rebuilt_mixtures_are_not_kept(monkeypatch):
    """A 1x1 layer whose kernel outweighs its maps: the step keeps the
    input and the attentions, not the B x C_out x C_in mixtures (which
    the path before kept)."""
    torch.manual_seed(0)
    layer = KWConv2d(64, 64, 1, bias=False).train()
    x = torch.randn(4, 64, 4, 4, requires_grad=True)
    kernels = 4 * 64 * 64 * 4
    exclude = list(layer.parameters()) + list(layer.buffers())
    for recompute in (True, False):
        monkeypatch.setitem(THRESHOLDS['recompute'], 'kernel_warehouse',
                            math.inf if recompute else 0.0)
        with SavedTensorBytes(exclude=exclude) as saved:
            out = layer(x)
        assert layer.last_path == 'mixture_gemm'
        assert (saved.total < kernels) == recompute, saved.total
        out.sum().backward()


def test_auto_takes_it_in_training_on_cpu():
    torch.manual_seed(0)
    layer = KWConv2d(32, 32, 1).train()
    x = torch.randn(2, 32, 4, 4)
    layer(x)
    assert layer.last_path == 'mixture_gemm'
    with torch.no_grad():
        layer(x)
    assert layer.last_path != 'mixture_gemm'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x)
    assert layer.last_path != 'mixture_gemm'
    grouped = KWConv2d(32, 32, 1, groups=2).train()
    grouped(x)
    assert grouped.last_path != 'mixture_gemm'
    grouped.impl = 'mixture_gemm'
    with pytest.raises(ValueError, match='groups=1'):
        grouped(x)


def test_rule_rebuilds_where_the_maps_are_large(monkeypatch):
    """One more assembly costs n products per kernel element, the conv H' W':

    rebuilt when n <= limit * H' W'.
    """
    monkeypatch.setitem(THRESHOLDS['recompute'], 'kernel_warehouse', 1.0)
    layer = KWConv2d(16, 16, 1, cell_num_ratio=1)
    n = layer.num_cells
    side = math.ceil(math.sqrt(n))
    assert kw_train.rebuilds_mixtures(layer, torch.empty(1, 16, side, side))
    assert not kw_train.rebuilds_mixtures(
        layer, torch.empty(1, 16, side - 1, side - 1)) or \
        (side - 1)**2 >= n
    monkeypatch.setitem(THRESHOLDS['recompute'], 'kernel_warehouse', 0.0)
    assert not kw_train.rebuilds_mixtures(layer, torch.empty(1, 16, 64, 64))


def test_double_backward_is_refused():
    layer = KWConv2d(4, 4, 1, impl='mixture_gemm').train()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match='double backward'):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_resnet50_at_224_keeps_like_static_with_cpu_defaults():
    """The CPU defaults (no threshold changed): KW-1x ResNet-50's training step
    at 224x224 keeps within 1.15x of ResNet-50's saved activations (2.27x with
    the paths before ``'mixture_gemm'``); batch 2 (the per-sample kernels and
    the maps both scale with the batch)."""
    from mmpretrain.models.backbones import ResNet

    from mmdyn.models.backbones import KWResNet
    from mmdyn.models.backbones.kw_resnet import KW_1X_CFG
    x = torch.rand(2, 3, 224, 224)
    torch.manual_seed(0)
    static = ResNet(50)
    static.train()
    base = saved_bytes_of_step(static, x)
    del static
    model = KWResNet(50, kw_cfg=KW_1X_CFG)
    model.train()
    ratio = saved_bytes_of_step(model, x) / base
    assert ratio <= 1.15, f'{ratio:.2f}x ResNet-50'


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('name', sorted(GEOMETRIES))
def test_inference_from_the_cells_layout(name, batch, monkeypatch):
    """Inference of the position-major path when ``torch.matmul`` makes the
    mixtures (float64 here; float32 on AVX-512): 1x1 layers whose cells span
    part of the input channels convolve from the cells' own layout, one ``bmm``
    per cell position; the others from the mixtures in the kernel's layout."""
    torch.manual_seed(0)
    c_in, c_out, k, s, p, d, h, w, options = GEOMETRIES[name]
    layer = _layer(c_in, c_out, k, s, p, d, options).eval()
    x = torch.randn(batch, c_in, h, w, dtype=torch.float64)
    calls = []
    real = kw_paths.cells_layout_conv
    monkeypatch.setattr(kw_paths, 'cells_layout_conv',
                        lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer.impl = 'position_major'
        out = layer(x)
    assert layer.last_path == 'position_major'
    g_s, _, g_i = layer._kw_layout[:3]
    assert bool(calls) == (g_s == 1 and g_i > 1)
    assert layer.last_mixture_product == 'matmul'
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
