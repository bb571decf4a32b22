# Copyright (c) mmdyn contributors. All rights reserved.
"""Every layer of mmdyn.ops on the inputs and arguments a new user tries:

empty batches, channels_last models and inputs, non-finite ratios,
``padding_mode``, sizes above the allocation budget, and ``ddf()``'s filter
layouts. The static counterparts (``nn.Conv2d``, ``nn.Linear``,
``nn.Upsample``) are the reference of the expected behaviour.
"""
import copy

import pytest
import torch
from torch import nn

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       KWLinear, ODConv2d, WarehouseManager, ddf)
from mmdyn.ops.base import ALLOCATION_BUDGET_ENV

# name -> (layer factory, input shape, static counterpart factory). The
# counterpart gives the expected output shape.
LAYERS = {
    'odconv_k4': (lambda: ODConv2d(16, 24, 3, padding=1), (2, 16, 8, 8),
                  lambda: nn.Conv2d(16, 24, 3, padding=1)),
    'odconv_k1_pointwise': (lambda: ODConv2d(16, 24, 1, kernel_num=1),
                            (2, 16, 8, 8), lambda: nn.Conv2d(16, 24, 1)),
    'odconv_k1_deep': (lambda: ODConv2d(32, 32, 3, padding=1, kernel_num=1),
                       (2, 32, 4, 4), lambda: nn.Conv2d(32, 32, 3, padding=1)),
    'odconv_depthwise':
    (lambda: ODConv2d(16, 16, 3, padding=1, groups=16), (2, 16, 8, 8),
     lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16)),
    'odconv_stride2': (lambda: ODConv2d(16, 24, 3, 2, 1), (2, 16, 9, 9),
                       lambda: nn.Conv2d(16, 24, 3, 2, 1)),
    'dyconv': (lambda: DyConv2d(16, 24, 3, padding=1), (2, 16, 8, 8),
               lambda: nn.Conv2d(16, 24, 3, padding=1)),
    'dyconv_large_map':
    (lambda: DyConv2d(16, 16, 3, padding=1), (2, 16, 16, 16),
     lambda: nn.Conv2d(16, 16, 3, padding=1)),
    'condconv': (lambda: CondConv2d(16, 24, 3, padding=1), (2, 16, 8, 8),
                 lambda: nn.Conv2d(16, 24, 3, padding=1)),
    'kwconv': (lambda: KWConv2d(16, 24, 3, padding=1), (2, 16, 8, 8),
               lambda: nn.Conv2d(16, 24, 3, padding=1)),
    'kwconv_half_cells':
    (lambda: KWConv2d(16, 16, 3, padding=1, cell_inplane_ratio=0.5),
     (2, 16, 16, 16), lambda: nn.Conv2d(16, 16, 3, padding=1)),
    'kwconv_1x1':
    (lambda: KWConv2d(16, 24, 1), (2, 16, 8, 8), lambda: nn.Conv2d(16, 24, 1)),
    'kwlinear': (lambda: KWLinear(16, 8), (2, 16), lambda: nn.Linear(16, 8)),
    'kwlinear_tokens': (lambda: KWLinear(16, 8), (2, 5, 16),
                        lambda: nn.Linear(16, 8)),
    'ddfconv': (lambda: DDFConv2d(16, 16, 3), (2, 16, 8, 8),
                lambda: nn.Conv2d(16, 16, 3, padding=1)),
    'ddfconv_stride2': (lambda: DDFConv2d(16, 16, 3, stride=2), (2, 16, 9, 9),
                        lambda: nn.Conv2d(16, 16, 3, 2, padding=1)),
    'ddfup': (lambda: DDFUpsample(16, 2), (2, 16, 7, 7),
              lambda: nn.Upsample(scale_factor=2)),
    'ddfup_add_head2': (lambda: DDFUpsample(16, 2, combine='add', head=2),
                        (2, 16, 7, 7), lambda: nn.Upsample(scale_factor=2)),
}


def _empty(shape):
    return torch.randn(0, *shape[1:])


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_empty_batch_as_static_counterpart(name, train):
    make, shape, make_static = LAYERS[name]
    layer, static = make().train(train), make_static().train(train)
    x = _empty(shape).requires_grad_()
    x_static = x.detach().clone().requires_grad_()
    out, expected = layer(x), static(x_static)
    assert out.shape == expected.shape
    assert out.dtype == expected.dtype
    out.sum().backward()
    expected.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # As nn.Conv2d: every parameter gets a (zero) gradient, so that
    # distributed training finds no unused parameter.
    for pname, param in layer.named_parameters():
        assert param.grad is not None, pname
        assert not param.grad.any(), pname
    # Nothing ran: running statistics and temperatures are untouched.
    for bname, buf in make().named_buffers():
        torch.testing.assert_close(
            dict(layer.named_buffers())[bname], buf, msg=bname)
    with torch.no_grad():
        assert layer(_empty(shape)).shape == expected.shape


def test_empty_batch_shared_warehouse_gets_a_zero_gradient():
    net = nn.Module()
    manager = WarehouseManager()
    net.conv1 = manager.reserve('stage0_layer0_conv0', 16, 16, 3, padding=1)
    net.conv2 = manager.reserve('stage0_layer1_conv0', 16, 16, 3, padding=1)
    net.warehouse_manager = manager
    manager.finalize(net)
    x = torch.randn(0, 16, 6, 6, requires_grad=True)
    net.conv2(net.conv1(x)).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


@pytest.mark.parametrize('impl', ['auto', 'fused', 'taps', 'reference'])
@pytest.mark.parametrize('stride', [1, 2])
def test_ddf_empty_batch(impl, stride):
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    cf = torch.randn(0, 4, 3, 3, requires_grad=True)
    sf = torch.randn(0, 9, 9 // stride, 9 // stride, requires_grad=True)
    out = ddf(x, cf, sf, 3, stride=stride, impl=impl)
    assert out.shape == (0, 4, 9 // stride, 9 // stride)
    out.sum().backward()
    assert x.grad.shape == x.shape and cf.grad.shape == cf.shape
    assert sf.grad.shape == sf.shape


def test_ddf_upsample_empty_batch_issue_repro():
    up = DDFUpsample(16, 2).train()
    x = torch.randn(0, 16, 14, 14, requires_grad=True)
    out = up(x)
    assert out.shape == (0, 16, 28, 28)
    out.sum().backward()
    guided = DDFUpsample(16, 2, guided=True, guide_channels=8).train()
    out = guided(x, torch.randn(0, 8, 28, 28, requires_grad=True))
    assert out.shape == (0, 16, 28, 28)
    out.sum().backward()


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_channels_last_model_and_input_equal_contiguous(name, train):
    make, shape, _ = LAYERS[name]
    layer = make().train(train)
    converted = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x = torch.randn(shape)
    x_cl = x.clone()
    if x.dim() == 4:
        x_cl = x_cl.to(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous()
    x.requires_grad_()
    x_cl.requires_grad_()
    out, out_cl = layer(x), converted(x_cl)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_cl.backward(grad)
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-4, atol=1e-4)
    for (pname, param), param_cl in zip(layer.named_parameters(),
                                        converted.parameters()):
        torch.testing.assert_close(
            param_cl.grad, param.grad, rtol=1e-4, atol=1e-4, msg=pname)
    with torch.no_grad():
        torch.testing.assert_close(
            converted.eval()(x_cl), layer.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['odconv_k4', 'dyconv', 'kwconv'])
def test_channels_last_on_the_fast_inference_paths(name, small_winograd,
                                                   monkeypatch):
    from mmdyn.ops.accel.paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        1)
    make, shape, _ = LAYERS[name]
    layer = make().eval()
    converted = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(
            converted(x.to(memory_format=torch.channels_last)),
            layer(x),
            rtol=1e-5,
            atol=1e-5)


def test_channels_last_keeps_state_dict_and_dtype_moves():
    layer = ODConv2d(8, 8, 3, padding=1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(memory_format=torch.channels_last)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)
    # dtype conversions still reach the 5-D bank.
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64
    layer.to(torch.float32, memory_format=torch.channels_last)
    assert layer.weight.dtype == torch.float32
    assert layer.weight.shape == (4, 8, 8, 3, 3)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
@pytest.mark.parametrize('build, argument', [
    (lambda v: ODConv2d(8, 8, 3, reduction=v), 'reduction'),
    (lambda v: DyConv2d(8, 8, 3, ratio=v), 'ratio'),
    (lambda v: KWConv2d(8, 8, 3, cell_num_ratio=v), 'cell_num_ratio'),
    (lambda v: KWConv2d(8, 8, 3, reduction=v), 'reduction'),
    (lambda v: WarehouseManager(cell_inplane_ratio=v), 'cell_inplane_ratio'),
    (lambda v: KWLinear(8, 8, cell_num_ratio=(1, v)), 'cell_num_ratio'),
    (lambda v: DDFConv2d(8, 8, 3, se_ratio=v), 'se_ratio'),
    (lambda v: DDFUpsample(8, se_ratio=v), 'se_ratio'),
])
def test_non_finite_ratios_are_refused_naming_the_argument(
        build, argument, value):
    with pytest.raises(
            ValueError, match=f'^{argument} must be a positive '
            'finite number'):
        build(value)


def test_kwconv_accepts_nn_conv2d_padding_mode():
    layer = KWConv2d(8, 8, 3, padding=1, padding_mode='zeros')
    assert layer.padding_mode == 'zeros'
    assert layer(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)
    manager = WarehouseManager()
    net = nn.Module()
    net.conv = manager.reserve(
        'stage0_layer0_conv0', 8, 8, 3, padding=1, padding_mode='zeros')
    net.warehouse_manager = manager
    manager.finalize(net)
    assert net.conv(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize('cls', [KWConv2d, ODConv2d, DyConv2d, CondConv2d])
@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
def test_other_padding_modes_are_refused_naming_padding_mode(cls, mode):
    with pytest.raises(ValueError, match="^padding_mode must be 'zeros'"):
        cls(8, 8, 3, padding=1, padding_mode=mode)


@pytest.mark.parametrize('build, arguments', [
    (lambda: KWConv2d(16, 16, 3, cell_num_ratio=256), 'cell_num_ratio'),
    (lambda: KWLinear(64, 64, cell_num_ratio=128), 'cell_num_ratio'),
    (lambda: ODConv2d(64, 64, 3, kernel_num=64), 'kernel_num'),
    (lambda: ODConv2d(64, 64, 3, reduction=1000.0), 'reduction'),
    (lambda: DyConv2d(64, 64, 3, kernel_num=64), 'kernel_num'),
    (lambda: CondConv2d(64, 64, 3, kernel_num=64), 'kernel_num'),
    (lambda: DDFConv2d(64, 64, 3, se_ratio=40.0), 'se_ratio'),
    (lambda: DDFUpsample(64, kernel_size=31), 'kernel_size'),
])
def test_sizes_above_the_budget_raise_before_allocating(
        build, arguments, monkeypatch):
    # A budget of 1 MiB: each of these layers asks for 4 MiB or more.
    monkeypatch.setenv(ALLOCATION_BUDGET_ENV, str(2**20))
    with pytest.raises(
            ValueError,
            match=f'above the .* budget.*{arguments}'
            f'.*{ALLOCATION_BUDGET_ENV}'):
        build()
    monkeypatch.delenv(ALLOCATION_BUDGET_ENV)
    build()  # fits the default budget


def test_default_budget_refuses_the_issue_example():
    # cell_num_ratio=1e6 asked for 8.6 GiB of cells.
    with pytest.raises(ValueError, match='cell_num_ratio'):
        KWConv2d(16, 16, 3, cell_num_ratio=1e6)


def test_invalid_budget_setting_is_named(monkeypatch):
    monkeypatch.setenv(ALLOCATION_BUDGET_ENV, 'lots')
    with pytest.raises(ValueError, match=ALLOCATION_BUDGET_ENV):
        ODConv2d(8, 8, 3)


def test_ddf_checks_the_channel_filter_layout():
    x = torch.randn(2, 4, 6, 6)
    sf = torch.randn(2, 9, 6, 6)
    cf = torch.randn(2, 4, 3, 3)
    expected = ddf(x, cf, sf, 3, impl='reference')
    # The two documented layouts.
    torch.testing.assert_close(
        ddf(x, cf.reshape(2, 36, 1, 1), sf, 3), expected)
    torch.testing.assert_close(ddf(x, cf, sf, 3), expected)
    # [B, k, k, C] has the right number of elements but the wrong layout.
    for bad in (cf.permute(0, 2, 3, 1), cf.reshape(2, 36), cf.reshape(2, 4, 9),
                cf.reshape(2, 1, 36, 1)):
        with pytest.raises(ValueError, match='channel_filter must be'):
            ddf(x, bad, sf, 3)
