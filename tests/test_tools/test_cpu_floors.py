# Copyright (c) mmdyn contributors. All rights reserved.
"""``benchmarks/cpu_floors.py``: every form's pieces, run in order, compute the
layer (against a per-sample ``F.conv2d`` loop of the paper's formula), the per-
sample convs of the KW floor compute per-sample convs, the KW layers are
recorded with their inputs and kernel assemblies, and the floors are the sums
and minima they claim to be."""
import pytest
import torch
import torch.nn.functional as F
from script_loading import load_script

from mmdyn.ops import DyConv2d, ODConv2d
from mmdyn.ops.accel import tap_sum_cpu

floors = load_script('benchmarks/cpu_floors.py')

needs_c = pytest.mark.skipif(
    tap_sum_cpu.load() is None, reason='the C tap sum is not available')


def _odconv_loop(layer, x):
    """``alpha_f * conv(alpha_c * x_b, alpha_s * W)`` one sample at a time."""
    channel, filt, spatial, _ = layer.attentions(x)
    k = layer.kernel_size[0]
    outs = []
    for b in range(x.shape[0]):
        weight = layer.weight[0] * spatial[b].view(1, 1, k, k)
        y = F.conv2d(x[b:b + 1] * channel[b].view(1, -1, 1, 1), weight, None,
                     layer.stride, layer.padding)
        outs.append(y * filt[b].view(1, -1, 1, 1))
    return torch.cat(outs)


def _dyconv_loop(layer, x):
    """``conv(x_b, sum_k pi_bk W_k)`` one sample at a time."""
    pi = layer.routing_weights(x)
    outs = []
    for b in range(x.shape[0]):
        weight = sum(pi[b, i] * layer.weight[i]
                     for i in range(layer.kernel_num))
        outs.append(
            F.conv2d(x[b:b + 1], weight, None, layer.stride, layer.padding))
    return torch.cat(outs)


@needs_c
@pytest.mark.parametrize('batch,channels,size', [(3, 12, 6), (1, 8, 5),
                                                 (2, 16, 7)])
def test_every_form_computes_the_layer(batch, channels, size):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=torch.float64)
    odconv = ODConv2d(
        channels, channels, 3, padding=1, bias=False,
        kernel_num=1).double().eval()
    dyconv = DyConv2d(
        channels, channels, 3, padding=1, bias=False,
        kernel_num=4).double().eval()
    with torch.no_grad():
        for layer, forms, loop, names in ((odconv, floors.odconv_forms,
                                           _odconv_loop,
                                           {'taps', 'columns', 'kernels'}),
                                          (dyconv, floors.dyconv_forms,
                                           _dyconv_loop, {
                                               'taps', 'kernels', 'samples',
                                               'static'
                                           })):
            expected = loop(layer, x)
            # the loop is the layer's formula: it gives the layer's output
            torch.testing.assert_close(layer(x), expected)
            built = forms(layer, x)
            assert set(built) == names
            for form, pieces in built.items():
                out = floors.run_form(pieces)
                torch.testing.assert_close(
                    out, expected, rtol=1e-10, atol=1e-10, msg=form)


def test_forms_refuse_other_geometries():
    strided = ODConv2d(8, 8, 3, stride=2, padding=1, bias=False, kernel_num=1)
    with pytest.raises(ValueError, match='stride-1'):
        floors.odconv_forms(strided.eval(), torch.randn(1, 8, 6, 6))
    biased = DyConv2d(8, 8, 3, padding=1)
    with pytest.raises(ValueError, match='no bias'):
        floors.dyconv_forms(biased.eval(), torch.randn(1, 8, 6, 6))


@pytest.mark.parametrize('kernel,stride,groups,forms', [
    (1, 1, 1, {'grouped conv', 'batched matmul'}),
    (1, 2, 1, {'grouped conv', 'batched matmul'}),
    (3, 1, 1, {'grouped conv', 'taps'}),
    (3, 2, 2, {'grouped conv'}),
])
def test_per_sample_conv_forms(kernel, stride, groups, forms):
    if 'taps' in forms and tap_sum_cpu.load() is None:
        pytest.skip('the C tap sum is not available')
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, kernel, stride, kernel // 2, groups=groups)
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64)
    kernels = torch.randn(
        3, 8, 6 // groups, kernel, kernel, dtype=torch.float64)
    expected = torch.cat([
        F.conv2d(x[b:b + 1], kernels[b], None, stride, kernel // 2, 1, groups)
        for b in range(3)
    ])
    built = floors.per_sample_conv_forms(conv, x, kernels)
    assert set(built) == forms
    for name, pieces in built.items():
        torch.testing.assert_close(floors.run_form(pieces), expected, msg=name)


def test_kw_layers_records_inputs_and_assemblies():
    """The products :func:`kw_layers` derives from the layers equal the ones
    the layers multiply (recorded at ``mix_cells``, which every layer of this
    small model calls)."""
    from mmdyn.models.backbones import KWResNet
    from mmdyn.models.backbones.kw_resnet import KW_1X_CFG
    from mmdyn.ops import KWConv2d
    from mmdyn.ops import kernel_warehouse as kw
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=KW_1X_CFG)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    recorded = {}
    real = kw._KWLayerMixin.mix_cells

    def recording(self, attention, *args, **kwargs):
        cells = self._cell_rows()
        recorded[id(self)] = (attention.shape[0] * attention.shape[1],
                              attention.shape[2], cells.shape[1])
        assert attention.shape[2] == cells.shape[0]
        return real(self, attention, *args, **kwargs)

    kw._KWLayerMixin.mix_cells = recording
    try:
        layers = floors.kw_layers(model, x)
    finally:
        kw._KWLayerMixin.mix_cells = real
    names = [n for n, m in model.named_modules() if isinstance(m, KWConv2d)]
    assert [n for n, _, _, _ in layers] == names and names
    for name, layer, shape, product in layers:
        assert shape[0] == 2 and shape[1] == layer.in_channels
        assert product == recorded[id(layer)], name
        rows, _, cols = product
        kh, kw_ = layer.kernel_size
        # The assembly writes every sample's whole kernel once.
        assert rows * cols == 2 * layer.out_channels * (
            layer.in_channels // layer.groups) * kh * kw_


def test_in_model_times():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1)))
    times = floors.in_model_times(
        model, ['0', '2.0'], torch.randn(1, 3, 8, 8), rounds=3)
    assert set(times) == {'0', '2.0'}
    assert all(t > 0 for t in times.values())
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_floor_arithmetic():
    medians = {'a': {'x': 1.0, 'y': 2.0}, 'b': {'z': 2.5}}
    assert floors.floors(medians) == {'a': 3.0, 'b': 2.5, 'floor': 2.5}
    layer_times = [
        floors.KWLayerTimes(1.0, 0.5, {
            'grouped conv': 2.0,
            'batched matmul': 1.5
        }),
        floors.KWLayerTimes(2.0, 1.0, {'grouped conv': 3.0}),
    ]
    # 10 - 1 + 0.5 + 1.5 - 2 + 1 + 3
    assert floors.kw_floor(layer_times, 10.0) == pytest.approx(13.0)


@needs_c
def test_layer_table_runs():
    lines = floors.layer_table(batch=2, channels=8, size=5, rounds=1)
    assert lines[0].startswith('| layer |')
    assert sum('least floor' in line for line in lines) == 2


def test_cold_timing_order():
    """Before every timed call: the sweep is read, then that candidate's warm
    operands are written; nothing in between is timed."""
    log = []

    class Recorder:

        def __init__(self, name):
            self.name = name

        def sum(self):
            log.append(('sweep', self.name))

        def mul_(self, value):
            log.append(('write', self.name))

    floors._time_cold(
        {
            'a': lambda: log.append(('call', 'a')),
            'b': lambda: log.append(('call', 'b'))
        }, 2, Recorder('sweep'),
        {'a': [Recorder('x'), Recorder('kernels')]})
    one_round = [('sweep', 'sweep'), ('write', 'x'), ('write', 'kernels'),
                 ('call', 'a'), ('sweep', 'sweep'), ('call', 'b')]
    assert log == [('call', 'a'), ('call', 'b')] + one_round * 2


@needs_c
def test_cold_table_times_whole_forms(monkeypatch):
    """Every form of both layers as one candidate, each call after the sweep (a
    1 MiB buffer here) and the input written."""
    calls = []
    real = floors._time_cold

    def recording(candidates, rounds, sweep, warm):
        calls.append((len(candidates), rounds, sweep.numel(), {
            name: [t.shape for t in tensors]
            for name, tensors in warm.items()
        }))
        return real(candidates, rounds, sweep, warm)

    monkeypatch.setattr(floors, '_time_cold', recording)
    lines = floors.cold_table(
        batch=2, channels=8, size=5, rounds=2, sweep_mib=1)
    assert sum('least form' in line for line in lines) == 2
    assert sum(' form |' in line for line in lines) == 3 + 4
    # conv, layer and 3 ODConv forms; conv, layer and 4 DyConv forms, each
    # with the input written after the sweep
    x = (2, 8, 5, 5)
    assert [c[:3] for c in calls] == [(5, 2, 1 << 18), (6, 2, 1 << 18)]
    for count, _, _, warm in calls:
        assert len(warm) == count
        assert all(shapes == [x] for shapes in warm.values())


@needs_c
@pytest.mark.parametrize('cold', [False, True], ids=['warm', 'cold'])
def test_kw_layer_times(cold, monkeypatch):
    """A stride-1 3x3 conv: the assembly and the grouped and tap forms timed,
    warm piece by piece or cold whole, each cold form after its input and
    the kernels it reads are written."""
    layer = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    sweep = torch.zeros(1 << 10) if cold else None
    warmed = {}
    real = floors._time_cold

    def recording(candidates, rounds, sweep, warm):
        warmed.update({k: [t.shape for t in v] for k, v in warm.items()})
        return real(candidates, rounds, sweep, warm)

    monkeypatch.setattr(floors, '_time_cold', recording)
    with torch.no_grad():
        times = floors.kw_layer_times(layer, (2, 8, 5, 5), (18, 6, 64), 0.5, 1,
                                      sweep)
    assert times.static_conv == 0.5 and times.assembly > 0
    assert set(times.per_sample) == {'grouped conv', 'taps'}
    assert times.fastest_per_sample == min(times.per_sample.values()) > 0
    if cold:
        assert warmed == {
            'grouped conv': [(2, 8, 5, 5), (2, 8, 8, 3, 3)],
            'taps': [(2, 8, 5, 5), (2, 8, 72)]
        }
    else:
        assert not warmed
