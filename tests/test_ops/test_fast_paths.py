# Copyright (c) mmdyn contributors. All rights reserved.
"""Every execution path of every layer, selected publicly by ``impl``, against
the layer's paper forward (``forward_reference``), with the path taken read
back from ``last_path``; the dispatcher's choices follow the public threshold
table."""
import copy

import pytest
import torch

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       ODConv2d)
from mmdyn.ops.accel.paths import (KERNEL_WAREHOUSE_PATHS, MIXTURE_PATHS,
                                   ODCONV_PATHS, PER_SAMPLE_IMPLS, THRESHOLDS)

# (layer factory, input shape, paths that run with autograd, paths that
# run only in float32 CPU inference)
LAYERS = {
    'odconv_k4':
    (lambda impl: ODConv2d(16, 24, 3, padding=1, impl=impl), (3, 16, 6, 5),
     ('reference', 'folded'), ('winograd', 'chunked')),
    'odconv_k1':
    (lambda impl: ODConv2d(16, 24, 3, padding=1, kernel_num=1, impl=impl),
     (3, 16, 6, 5), ('reference', 'folded', 'scaled_columns'), ('winograd',
                                                                'chunked')),
    'dyconv':
    (lambda impl: DyConv2d(16, 24, 3, padding=1, impl=impl), (3, 16, 6, 5),
     ('reference', 'conv_then_mix'), ('winograd', 'chunked', 'taps')),
    'condconv_stride2':
    (lambda impl: CondConv2d(16, 24, 3, 2, 1, impl=impl), (3, 16, 7, 6),
     ('reference', 'conv_then_mix'), ('chunked', )),
    'kwconv': (lambda impl: KWConv2d(16, 24, 3, padding=1, impl=impl),
               (3, 16, 6, 5), ('reference', 'position_major'),
               ('winograd', 'winograd_fused', 'chunked', 'taps')),
    'kwconv_split_cells': (lambda impl: KWConv2d(
        16,
        24,
        3,
        padding=1,
        impl=impl,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5), (3, 16, 6, 5), ('reference',
                                                  'position_major'),
                           ('winograd', 'chunked', 'taps')),
    'kwconv_1x1': (lambda impl: KWConv2d(16, 24, 1, impl=impl), (3, 16, 6, 5),
                   ('reference', 'position_major',
                    'pointwise'), ('chunked', )),
}


@pytest.fixture
def c_loop_always(monkeypatch):
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        1)


def _randomised(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if 'attention' in name:
                p.add_(torch.randn_like(p) * 0.2)
        if getattr(layer, 'bias', None) is not None:
            layer.bias.normal_()
    return layer


def _pair(name, impl):
    make, shape = LAYERS[name][:2]
    torch.manual_seed(0)
    reference = _randomised(make('reference'))
    layer = make(impl)
    layer.load_state_dict(reference.state_dict())
    if isinstance(layer, KWConv2d):
        layer.warehouse.load_state_dict(reference.warehouse.state_dict())
    return reference, layer, shape


@pytest.mark.parametrize('name,impl', [(n, p) for n, v in LAYERS.items()
                                       for p in v[2] + PER_SAMPLE_IMPLS])
def test_training_paths_match_the_reference(name, impl):
    reference, layer, shape = _pair(name, impl)
    reference.train()
    layer.train()
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, want = layer(x), reference.forward_reference(x_ref)
    assert layer.last_path == (
        impl if impl not in PER_SAMPLE_IMPLS else 'reference')
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (pname, p), p_ref in zip(layer.named_parameters(),
                                 reference.parameters()):
        torch.testing.assert_close(
            p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=pname)


@pytest.mark.parametrize('name,impl', [(n, p) for n, v in LAYERS.items()
                                       for p in v[2] + v[3]])
def test_inference_paths_match_the_reference(name, impl, c_loop_always):
    reference, layer, shape = _pair(name, impl)
    reference.eval()
    layer.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), reference.forward_reference(x), rtol=1e-4, atol=1e-4)
    assert layer.last_path == impl


@pytest.mark.parametrize('name,impl',
                         [(n, p) for n, v in LAYERS.items() for p in v[3]])
def test_inference_only_paths_refuse_autograd(name, impl):
    layer = LAYERS[name][0](impl)
    with pytest.raises(ValueError, match=f'impl={impl!r} cannot run here'):
        layer(torch.randn(LAYERS[name][1]))


def test_paths_that_do_not_fit_the_layer_are_refused():
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match='3x3 stride-1'):
            ODConv2d(16, 16, 5, padding=2, impl='winograd')(x)
        with pytest.raises(ValueError, match='kernel_num=1'):
            ODConv2d(16, 16, 3, padding=1, impl='scaled_columns')(x)
        with pytest.raises(ValueError, match='1x1 kernel'):
            KWConv2d(16, 16, 3, padding=1, impl='pointwise')(x)
        with pytest.raises(ValueError, match='whole-position cells'):
            KWConv2d(
                16,
                16,
                3,
                padding=1,
                impl='winograd_fused',
                cell_inplane_ratio=0.5)(
                    x)
        with pytest.raises(ValueError, match='groups=1'):
            KWConv2d(16, 16, 3, padding=1, groups=2, impl='position_major')(x)
    for cls, paths in ((ODConv2d, ODCONV_PATHS), (DyConv2d, MIXTURE_PATHS),
                       (KWConv2d, KERNEL_WAREHOUSE_PATHS)):
        with pytest.raises(ValueError, match="impl must be one of"):
            cls(16, 16, 3, impl='fastest')
        for path in paths:
            assert cls(16, 16, 3, impl=path).impl == path


def test_auto_follows_the_threshold_table(monkeypatch):
    """The same layer and input change path when the public table does."""
    layer = DyConv2d(128, 128, 3, padding=1).eval()
    x = torch.randn(2, 128, 12, 12)
    with torch.no_grad():
        layer(x)
        assert layer.last_path == 'batch_grouped'
        monkeypatch.setitem(THRESHOLDS['mixture'],
                            'grouped_max_kernel_to_maps', 0)
        layer(x)
        assert layer.last_path == 'winograd'
        monkeypatch.setitem(THRESHOLDS['winograd'], 'min_channels', 256)
        layer(x)
        assert layer.last_path == 'chunked'
        monkeypatch.setitem(THRESHOLDS['chunked'], 'kernel_to_maps', 100)
        layer(x)
        assert layer.last_path == 'reference'
    layer.train()
    layer(x[:, :, :4, :4])
    assert layer.last_path == 'conv_then_mix'
    monkeypatch.setitem(THRESHOLDS['mixture'], 'conv_then_mix_max_work', 0)
    layer(x[:, :, :4, :4])
    assert layer.last_path == 'recompute'
    monkeypatch.setitem(THRESHOLDS['recompute'], 'mixture', 0)
    layer(x[:, :, :4, :4])
    assert layer.last_path == 'reference'


@pytest.mark.parametrize('impl', ['fused', 'taps', 'reference'])
def test_ddf_layers_record_their_path(impl):
    torch.manual_seed(0)
    conv = DDFConv2d(8, 8, 3, impl='reference')
    forced = copy.deepcopy(conv)
    forced.impl = impl
    up = DDFUpsample(8, 2, impl='reference')
    up_forced = copy.deepcopy(up)
    up_forced.impl = impl
    x = torch.randn(2, 8, 6, 7)
    torch.testing.assert_close(forced(x), conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up_forced(x), up(x), rtol=1e-5, atol=1e-5)
    assert forced.last_path == up_forced.last_path == impl
    assert conv.last_path == up.last_path == 'reference'
