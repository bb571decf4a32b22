# Copyright (c) mmdyn contributors. All rights reserved.
"""The errors a user gets for inputs and arguments a layer cannot take: one
``ValueError`` that names the layer, what it got and what it expects,
instead of an error from deep inside torch. Where a static counterpart
exists (``nn.Conv2d``, ``nn.Upsample``) it decides what is refused."""
import pytest
import torch
from torch import nn

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       KWLinear, ODConv2d, ddf)

# name -> (layer factory, input shape)
LAYERS = {
    'ODConv2d': (lambda: ODConv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    'ODConv2d_1x':
    (lambda: ODConv2d(8, 12, 3, padding=1, kernel_num=1), (2, 8, 6, 6)),
    'DyConv2d': (lambda: DyConv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    'CondConv2d': (lambda: CondConv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    'KWConv2d': (lambda: KWConv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    'KWLinear': (lambda: KWLinear(8, 4), (2, 5, 8)),
    'DDFConv2d': (lambda: DDFConv2d(8, 8, 3), (2, 8, 6, 6)),
    'DDFUpsample': (lambda: DDFUpsample(8, 2), (2, 8, 5, 5)),
}
WRONG_DTYPES = (torch.float64, torch.float16, torch.bfloat16, torch.int64,
                torch.int32, torch.bool)


def _input(shape, dtype):
    return (torch.randn(shape) * 4).to(dtype)


@pytest.mark.parametrize('dtype', WRONG_DTYPES, ids=str)
@pytest.mark.parametrize('name', list(LAYERS))
def test_wrong_input_dtype_names_layer_and_both_dtypes(name, dtype):
    make, shape = LAYERS[name]
    layer = make().eval()
    with pytest.raises(ValueError) as info:
        layer(_input(shape, dtype))
    message = str(info.value)
    cls = name.split('_')[0]
    assert message.startswith(f'{cls} got an input x of dtype {dtype}')
    assert 'expected torch.float32' in message
    if dtype in (torch.float16, torch.bfloat16):
        assert 'torch.autocast' in message


@pytest.mark.parametrize('name', list(LAYERS))
def test_float64_layer_takes_float64_input(name):
    make, shape = LAYERS[name]
    layer = make().eval()
    x = torch.randn(shape)
    expected = layer(x)
    out = layer.double()(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    'dtype', (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize('name', list(LAYERS))
def test_autocast_half_input_to_a_float32_layer_is_accepted(name, dtype):
    """Under autocast a float32 layer takes half inputs (autocast casts the
    operands), as ``nn.Conv2d`` does."""
    make, shape = LAYERS[name]
    layer = make().eval()
    x = torch.randn(shape)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x.to(dtype))
    torch.testing.assert_close(out.float(), layer(x), rtol=0.1, atol=0.1)


def test_autocast_still_refuses_a_float64_input():
    layer = ODConv2d(8, 12, 3, padding=1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with pytest.raises(ValueError, match='dtype torch.float64'):
            layer(torch.randn(2, 8, 6, 6, dtype=torch.float64))


def test_ddf_upsample_int_input_is_named():
    with pytest.raises(
            ValueError, match='DDFUpsample got an input x of '
            'dtype torch.int64'):
        DDFUpsample(8, 2)(torch.ones(1, 8, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize('shape', [(2, 8, 0, 5), (2, 8, 5, 0), (0, 8, 0, 5)])
def test_ddf_upsample_zero_size_as_nn_upsample(shape):
    """nn.Upsample refuses an input with no rows or columns; so does DDF-Up,
    naming itself and the shape."""
    with pytest.raises(RuntimeError):
        nn.Upsample(scale_factor=2)(torch.randn(shape))
    with pytest.raises(ValueError) as info:
        DDFUpsample(8, 2)(torch.randn(shape))
    assert 'DDFUpsample' in str(info.value)
    assert str(shape) in str(info.value)
    assert 'Calculated padded input size' not in str(info.value)


def test_ddf_zero_height_input_names_x():
    x = torch.randn(2, 8, 0, 5)
    with pytest.raises(
            ValueError,
            match=r'x must have a height and a width '
            r'>= 1.*\(2, 8, 0, 5\)'):
        ddf(x, torch.randn(2, 8, 3, 3), torch.randn(2, 9, 0, 5), 3)


def test_ddf_spatial_filter_message_expects_what_it_accepts():
    """H = 1 with stride 2: the official size H // 2 is 0, which is no size;
    the message must show the size it accepts (1), not the one got."""
    x = torch.randn(2, 8, 1, 6)
    cf = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError) as info:
        ddf(x, cf, torch.randn(2, 9, 0, 3), 3, stride=2)
    message = str(info.value)
    assert '[2, 9, 1, 3]' in message and '(2, 9, 0, 3)' in message
    # and the size it names is one it takes
    out = ddf(x, cf, torch.randn(2, 9, 1, 3), 3, stride=2)
    assert out.shape == (2, 8, 1, 3)


@pytest.mark.parametrize('args,name', [(('16', 16), 'in_channels'),
                                       ((16, '16'), 'out_channels'),
                                       ((16.0, 16), 'in_channels')])
def test_ddfconv_channel_types_checked_before_equality(args, name):
    with pytest.raises(ValueError) as info:
        DDFConv2d(*args)
    message = str(info.value)
    assert message.startswith(f'{name} must be a positive int')
    assert 'in_channels == out_channels' not in message


def test_ddfconv_in_a_stem_says_depthwise_and_which_layer():
    """A stem conv (3 -> 64, 7x7, stride 2) swapped for DDF by conv_cfg."""
    from mmcv.cnn import build_conv_layer

    import mmdyn.models  # noqa: F401 - registers the layers
    with pytest.raises(ValueError) as info:
        build_conv_layer(dict(type='DDFConv2d'), 3, 64, 7, stride=2, padding=3)
    message = str(info.value)
    assert 'depthwise' in message
    assert 'in_channels == out_channels' in message
    assert ('DDFConv2d(in_channels=3, out_channels=64, kernel_size=7, '
            'stride=2)') in message


def test_kwconv_half_warehouse_with_an_odd_mixture_count_builds():
    """7x7 depthwise, 5 channels: 49 mixtures of 5x1 cells, a warehouse of
    int(49 / 2) = 24 cells.

    The official start-up rule (mixture i takes a cell when i % 2 == (i // 2) %
    2) would give cells to 25 mixtures; the 25th takes the zero cell.
    """
    layer = KWConv2d(5, 5, 7, padding=3, groups=5, cell_num_ratio=0.5)
    cells = layer.warehouse_manager.weights[layer.warehouse_id]
    assert tuple(cells.shape[:3]) == (24, 5, 1)
    beta = layer.beta
    assert beta.shape == (49, 25)
    assert torch.equal(beta.sum(1), torch.ones(49))
    rule = [i for i in range(49) if i % 2 == (i // 2) % 2]
    assert len(rule) == 25
    for cell, i in enumerate(rule[:24]):
        assert beta[i, cell] == 1
    assert beta[rule[24], 24] == 1  # the zero cell
    assert layer.cell_range == (0, 24)
    x = torch.randn(2, 5, 9, 9)
    static = nn.Conv2d(5, 5, 7, padding=3, groups=5)
    assert layer(x).shape == static(x).shape
