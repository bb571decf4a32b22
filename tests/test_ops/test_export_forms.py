# Copyright (c) mmdyn contributors. All rights reserved.
"""The export forms (mmdyn/ops/accel/export_forms.py) against each layer's
``forward_reference``: in PyTorch (the form forced with ``impl='export'``) and
through ONNX Runtime (exported at batch 2 with a dynamic batch, run at batch 1
and 3), on shapes with channels that are not multiples of 8, stride 2, dilation
2, groups and odd sizes."""
import collections
import io
import os.path as osp

import pytest
import torch
from torch import nn

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       ODConv2d)
from mmdyn.ops.accel import ddf_export_forms, export_forms
from mmdyn.ops.ddf import FilterNorm, ddf_reference

ATOL = 2e-5


def _odconv(**kw):
    return lambda: ODConv2d(**kw)


# (name, builder, input [C, H, W]); each layer in eval mode.
LAYERS = [
    ('odconv_k1_s2',
     _odconv(
         in_channels=13,
         out_channels=22,
         kernel_size=3,
         stride=2,
         padding=1,
         kernel_num=1), (13, 11, 9)),
    ('odconv_k1_d2_g',
     _odconv(
         in_channels=12,
         out_channels=18,
         kernel_size=3,
         padding=2,
         dilation=2,
         groups=3,
         kernel_num=1), (12, 9, 11)),
    ('odconv_k1_5x5',
     _odconv(
         in_channels=7,
         out_channels=10,
         kernel_size=5,
         padding=2,
         kernel_num=1), (7, 8, 7)),
    ('odconv_k4_s2_g',
     _odconv(
         in_channels=14,
         out_channels=10,
         kernel_size=3,
         stride=2,
         padding=1,
         groups=2,
         kernel_num=4), (14, 9, 10)),
    ('odconv_k3_1x1',
     _odconv(
         in_channels=11,
         out_channels=17,
         kernel_size=1,
         stride=2,
         kernel_num=3), (11, 7, 9)),
    ('odconv_k4_deep',
     _odconv(
         in_channels=24,
         out_channels=20,
         kernel_size=3,
         padding=1,
         kernel_num=4), (24, 4, 5)),
    ('odconv_k1_1x1_deep',
     _odconv(in_channels=40, out_channels=36, kernel_size=1,
             kernel_num=1), (40, 3, 3)),
    ('odconv_k1_s2_d2_g_odd',
     _odconv(
         in_channels=15,
         out_channels=9,
         kernel_size=3,
         stride=2,
         padding=2,
         dilation=2,
         groups=3,
         kernel_num=1), (15, 13, 11)),
    ('odconv_k1_1x1_s2_bias',
     _odconv(
         in_channels=11,
         out_channels=7,
         kernel_size=1,
         stride=2,
         bias=True,
         kernel_num=1), (11, 9, 7)),
    ('odconv_depthwise',
     _odconv(
         in_channels=10,
         out_channels=10,
         kernel_size=3,
         padding=1,
         groups=10,
         kernel_num=1), (10, 9, 9)),
    ('dyconv_large_map', lambda: DyConv2d(
        13, 19, 3, stride=2, padding=2, dilation=2, kernel_num=4), (13, 21,
                                                                    19)),
    ('condconv_small_map_g',
     lambda: CondConv2d(12, 15, 3, padding=1, groups=3, kernel_num=3), (12, 5,
                                                                        7)),
    ('condconv_1x1', lambda: CondConv2d(9, 11, 1, kernel_num=2), (9, 7, 5)),
    ('kw_3x3_s2', lambda: KWConv2d(13, 22, 3, stride=2, padding=1), (13, 11,
                                                                     9)),
    ('kw_3x3_d2', lambda: KWConv2d(12, 20, 3, padding=2, dilation=2), (12, 9,
                                                                       7)),
    ('kw_3x3_deep_s2',
     lambda: KWConv2d(24, 28, 3, stride=2, padding=1, bias=True), (24, 5, 6)),
    ('kw_1x1', lambda: KWConv2d(17, 11, 1, bias=True), (17, 7, 9)),
    ('kw_1x1_blocks_s2', lambda: KWConv2d(
        12, 20, 1, stride=2, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
     (12, 9, 7)),
    ('kw_3x3_in_blocks',
     lambda: KWConv2d(12, 20, 3, padding=1, cell_inplane_ratio=0.5), (12, 7,
                                                                      9)),
    ('kw_3x3_out_blocks_g', lambda: KWConv2d(
        12, 20, 3, stride=2, padding=1, groups=2, cell_outplane_ratio=0.5),
     (12, 9, 9)),
]

LAYERS_BY_NAME = {name: builder for name, builder, _ in LAYERS}


def _build(builder):
    torch.manual_seed(0)
    layer = builder().eval()
    # Non-trivial attention statistics (a fresh BN is the identity).
    for module in layer.modules():
        if isinstance(module, nn.BatchNorm2d) or \
                isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize(
    'name,builder,chw', LAYERS, ids=[n for n, _, _ in LAYERS])
@pytest.mark.parametrize('batch', [1, 3])
def test_form_equals_reference_in_pytorch(name, builder, chw, batch):
    layer = _build(builder)
    x = torch.randn(batch, *chw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer.impl = 'export'
        got = layer(x)
    assert layer.last_path == 'export'
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_odconv_takes_every_form():
    """With several kernels, both the folded attentions and the scaled maps are
    exercised above (one kernel: scaled columns, or one static conv for
    1x1)."""
    shapes = {name: chw for name, _, chw in LAYERS}
    folds = {
        name: export_forms.odconv_folds(builder(),
                                        torch.zeros(1, *shapes[name]))
        for name, builder, _ in LAYERS if name.startswith('odconv_k')
    }
    assert folds['odconv_k4_s2_g'] and folds['odconv_k3_1x1']
    assert not folds['odconv_k4_deep']


def test_kernel_warehouse_layouts_covered():
    """Whole-position cells, 1x1 blocks and the general assembly are all
    exercised above."""
    layouts = {
        name: builder()._kw_layout
        for name, builder, _ in LAYERS if name.startswith('kw')
    }
    assert layouts['kw_3x3_s2'][1:3] == (1, 1)
    assert layouts['kw_3x3_deep_s2'][1:3] == (1, 1)
    assert not export_forms.kw_position_major(LAYERS_BY_NAME['kw_3x3_s2'](),
                                              torch.zeros(1, 13, 11, 9))
    assert export_forms.kw_position_major(LAYERS_BY_NAME['kw_3x3_deep_s2'](),
                                          torch.zeros(1, 24, 5, 6))
    assert layouts['kw_1x1_blocks_s2'][:3] == (1, 2, 2)
    assert layouts['kw_3x3_in_blocks'][:3] == (9, 1, 2)
    assert layouts['kw_3x3_out_blocks_g'][:3] == (9, 2, 1)


def test_mixture_takes_both_forms():
    """The two CondConv/DyConv forms are both exercised above."""
    small = CondConv2d(12, 15, 3, padding=1, groups=3, kernel_num=3)
    large = DyConv2d(13, 19, 3, stride=2, padding=2, dilation=2, kernel_num=4)
    assert export_forms.mixture_stacks_kernels(small, torch.zeros(1, 12, 5, 7))
    assert not export_forms.mixture_stacks_kernels(large,
                                                   torch.zeros(1, 13, 21, 19))


@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize(
    'k,dilation,stride,hw,out_hw',
    [
        (3, 1, 1, (9, 11), (9, 11)),
        (3, 2, 2, (11, 9), (6, 5)),  # ceil(H / s)
        (5, 1, 2, (11, 9), (5, 4)),  # H // s, the official size
    ])
@pytest.mark.parametrize('batch', [1, 3])
def test_ddf_form_equals_reference(combine, k, dilation, stride, hw, out_hw,
                                   batch):
    gen = torch.Generator().manual_seed(2)
    C = 13
    x = torch.randn(batch, C, *hw, generator=gen)
    cf = torch.randn(batch, C, k, k, generator=gen)
    sf = torch.randn(batch, k * k, *out_hw, generator=gen)
    expected = ddf_reference(x, cf, sf, k, dilation, stride, combine)
    got = ddf_export_forms.ddf(x, cf.view(batch, C, k * k), sf, k, dilation,
                               stride, combine == 'add', out_hw)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_im2col_matches_unfold():
    x = torch.randn(2, 7, 10, 9)
    cols = export_forms.im2col(x, (3, 2), (2, 1), (1, 2), (2, 1))
    expected = torch.nn.functional.unfold(x, (3, 2), (2, 1), (1, 2), (2, 1))
    assert torch.equal(cols.flatten(2), expected)


# --------------------------------------------------------------------------
# Through ONNX Runtime, dynamic batch
# --------------------------------------------------------------------------
DDF_LAYERS = [
    ('ddf_mul_s2_d2', lambda: DDFConv2d(13, 13, 3, stride=2, dilation=2),
     (13, 11, 9)),
    ('ddf_add_head2', lambda: DDFConv2d(12, 12, 3, head=2, combine='add'),
     (12, 9, 7)),
    ('ddf_up', lambda: DDFUpsample(11), (11, 5, 7)),
    ('ddf_mul_s2_even', lambda: DDFConv2d(13, 13, 3, stride=2), (13, 10, 8)),
    ('ddf_add_s2_d2_odd',
     lambda: DDFConv2d(15, 15, 3, stride=2, dilation=2, combine='add'),
     (15, 11, 9)),
    ('ddf_mul_head3_5x5_bias', lambda: DDFConv2d(12, 12, 5, head=3, bias=True),
     (12, 7, 9)),
    ('ddf_mul_gen3', lambda: DDFConv2d(10, 10, 3, gen_kernel_size=3), (10, 7,
                                                                       8)),
    ('ddf_up_add_head2_s3',
     lambda: DDFUpsample(12, scale_factor=3, head=2, combine='add'), (12, 4,
                                                                      5)),
    ('ddf_up_d2', lambda: DDFUpsample(9, dilation=2), (9, 6, 5)),
]


def data_ops(graph) -> collections.Counter:
    """The op types of ``graph``'s nodes that compute on tensor data, not on
    shapes (nodes whose inputs all derive from ``Shape`` nodes and constants
    are left out)."""
    constant = {init.name for init in graph.initializer}
    shape = set()
    ops = collections.Counter()
    for node in graph.node:  # topologically sorted
        inputs = [name for name in node.input if name]
        if node.op_type == 'Constant' or all(n in constant for n in inputs):
            constant.update(node.output)
        elif node.op_type == 'Shape' or all(n in constant or n in shape
                                            for n in inputs):
            shape.update(node.output)
        else:
            ops[node.op_type] += 1
    return ops


def export_and_run(layer, chw, batches=(1, 3), runtime='onnxruntime'):
    """Export ``layer`` at batch 2 with a dynamic batch (the TorchScript
    exporter, as tools/deployment/pytorch2onnx.py); per batch, the output of
    ``runtime`` (onnxruntime, or OpenVINO in float32) and the layer's
    ``forward_reference``.

    Also the op types of the graph.
    """
    ort = pytest.importorskip('onnxruntime', reason='pip install onnxruntime')
    onnx = pytest.importorskip('onnx', reason='pip install onnx')
    if runtime == 'openvino':
        ov = pytest.importorskip(
            'openvino', reason='pip install openvino (the "deploy" extra)')
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            layer, (torch.randn(2, *chw), ),
            buffer,
            input_names=['input'],
            output_names=['output'],
            dynamic_axes={
                'input': {
                    0: 'batch'
                },
                'output': {
                    0: 'batch'
                }
            },
            opset_version=17,
            dynamo=False)
    ops = data_ops(onnx.load_from_string(buffer.getvalue()).graph)
    if runtime == 'openvino':
        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(buffer.getvalue(), b''), 'CPU',
            {'INFERENCE_PRECISION_HINT': 'f32'})

        def run(x):
            return compiled(x)[compiled.outputs[0]]
    else:
        session = ort.InferenceSession(
            buffer.getvalue(), providers=['CPUExecutionProvider'])

        def run(x):
            return session.run(None, {'input': x})[0]

    results = []
    for batch in batches:
        x = torch.randn(
            batch, *chw, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = layer.forward_reference(x)
        got = torch.from_numpy(run(x.numpy()))
        results.append((got, expected))
    return results, ops


@pytest.mark.parametrize(
    'name,builder,chw',
    LAYERS + DDF_LAYERS,
    ids=[n for n, _, _ in LAYERS + DDF_LAYERS])
def test_onnxruntime_dynamic_batch(name, builder, chw):
    layer = _build(builder)
    results, ops = export_and_run(layer, chw)
    for got, expected in results:
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # No unfold subgraph (Gather/Slice chains on the feature maps): im2col
    # is a Conv, the per-sample products MatMuls.
    # Slices: none for a 1x1 stride (an AveragePool) or DDF-Up's phases (one
    # set of filter nodes); the KW attention's last two columns dropped for
    # the general kernel assembly.
    assert ops['Gather'] == 0 and ops['ScatterND'] == 0, ops
    assert ops['Slice'] <= (1 if name.startswith('kw') else 0), ops


@pytest.mark.parametrize(
    'name,builder,chw',
    LAYERS + DDF_LAYERS,
    ids=[n for n, _, _ in LAYERS + DDF_LAYERS])
def test_openvino_dynamic_batch(name, builder, chw):
    """The same exports in OpenVINO (float32), batch 1 and 3."""
    layer = _build(builder)
    results, _ = export_and_run(layer, chw, runtime='openvino')
    for got, expected in results:
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------
# The folded attention branches, the one-kernel ODConv forms, the filter norm
# --------------------------------------------------------------------------
ONE_KERNEL = [name for name, _, _ in LAYERS if name.startswith('odconv_k1')]


@pytest.mark.parametrize('form', ['columns', 'taps', 'kernels'])
@pytest.mark.parametrize('name', ONE_KERNEL + ['odconv_depthwise'])
@pytest.mark.parametrize('batch', [1, 3])
def test_odconv_one_kernel_forms(name, form, batch, monkeypatch):
    """The one-kernel forms (scaled im2col columns; the tap maps summed by a
    grouped one-hot Conv, stride-1 layers; per-sample kernels, groups=1) with
    the folded attention branch equal the reference, also with a temperature
    other than 1."""
    monkeypatch.setattr(export_forms, 'ODCONV_ONE_KERNEL_FORM', form)
    layer = _build(LAYERS_BY_NAME[name])
    layer.update_temperature(2.5)
    chw = {n: c for n, _, c in LAYERS}[name]
    x = torch.randn(batch, *chw, generator=torch.Generator().manual_seed(3))
    assert export_forms.odconv_attentions(layer, x) is not None
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer.impl = 'export'
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize('form,name', [('taps', 'odconv_k1_d2_g'),
                                       ('taps', 'odconv_k1_5x5'),
                                       ('kernels', 'odconv_k1_s2'),
                                       ('kernels', 'odconv_k1_5x5')])
def test_onnxruntime_odconv_other_forms(form, name, monkeypatch):
    """The tap-maps and per-sample-kernel forms through ONNX Runtime, dynamic
    batch (1 and 3)."""
    monkeypatch.setattr(export_forms, 'ODCONV_ONE_KERNEL_FORM', form)
    layer = _build(LAYERS_BY_NAME[name])
    results, ops = export_and_run(layer, {n: c for n, _, c in LAYERS}[name])
    for got, expected in results:
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert ops['Gather'] == 0 and ops['Slice'] == 0, ops


@pytest.mark.parametrize('kernel_size', [1, 3])
def test_odconv_branch_that_does_not_fold(kernel_size):
    """A layer norm in the attention branch does not fold: the form uses
    the layer's own attentions, still equal to the reference."""
    layer = _build(lambda: ODConv2d(
        13,
        10,
        kernel_size,
        stride=2,
        padding=kernel_size // 2,
        kernel_num=1,
        attention_norm='ln'))
    x = torch.randn(3, 13, 9, 11, generator=torch.Generator().manual_seed(6))
    assert export_forms.odconv_attentions(layer, x) is None
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer.impl = 'export'
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_odconv_tap_maps_only_at_stride_1(monkeypatch):
    monkeypatch.setattr(export_forms, 'ODCONV_ONE_KERNEL_FORM', 'taps')
    assert export_forms.odconv_uses_tap_maps(
        LAYERS_BY_NAME['odconv_k1_d2_g']())
    assert not export_forms.odconv_uses_tap_maps(
        LAYERS_BY_NAME['odconv_k1_s2']())


def test_odconv_sample_kernels_where_they_apply(monkeypatch):
    """The per-sample kernels where a kernel is no larger than its columns
    (C_out <= H'W') and groups=1: both cases are among the shapes above."""
    monkeypatch.setattr(export_forms, 'ODCONV_ONE_KERNEL_FORM', 'kernels')
    shapes = {n: c for n, _, c in LAYERS}

    def uses(name):
        return export_forms.odconv_uses_sample_kernels(
            LAYERS_BY_NAME[name](), torch.zeros(1, *shapes[name]))

    assert uses('odconv_k1_s2') and uses('odconv_k1_5x5')
    assert not uses('odconv_k1_d2_g')  # groups
    big = ODConv2d(8, 40, 3, padding=1, kernel_num=1)
    assert not export_forms.odconv_uses_sample_kernels(big,
                                                       torch.zeros(1, 8, 5, 6))


def test_fold_norm_matches_linear_then_norm():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5)
    norm = nn.BatchNorm1d(5).eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-1, 1)
    weight, bias = export_forms.fold_norm(linear.weight, linear.bias, norm)
    v = torch.randn(4, 7)
    with torch.no_grad():
        torch.testing.assert_close(v @ weight.t() + bias, norm(linear(v)))
    assert export_forms.fold_norm(linear.weight, None, nn.LayerNorm(5)) \
        is None
    assert export_forms.fold_norm(linear.weight, None,
                                  nn.BatchNorm1d(5).train()) is None


@pytest.mark.parametrize('name', ['kw_3x3_s2', 'kw_1x1', 'kw_3x3_in_blocks'])
def test_kw_attention_with_temperature(name):
    """The folded contrasting attention blends ``beta`` in while the
    temperature is not 0 (training's warm-up), as the reference does."""
    layer = _build(LAYERS_BY_NAME[name])
    layer.update_temperature(0.3)
    chw = {n: c for n, _, c in LAYERS}[name]
    x = torch.randn(3, *chw, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer.impl = 'export'
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize('channels,kk,hw,learnable', [
    (1, 9, (7, 5), False),
    (3, 9, (7, 5), False),
    (13, 9, (1, 1), True),
    (2, 25, (3, 4), False),
])
def test_normalize_filters_form(channels, kk, hw, learnable):
    """Centred, over the unbiased std + 1e-10, times the scale: against a hand-
    written loop over the filters (and 0, not NaN, for a zero filter)."""
    k = int(kk**0.5)
    norm = FilterNorm(
        channels,
        k,
        'channel' if learnable else 'spatial',
        learnable_std=learnable)
    x = torch.randn(
        3, channels * kk, *hw, generator=torch.Generator().manual_seed(5))
    x[0] = 0.0
    scale = norm.std.detach() if learnable else norm.gain
    got = ddf_export_forms.normalize_filters(x, channels, kk, scale)
    expected = torch.empty_like(x)
    for b in range(3):
        for g in range(channels):
            block = x[b, g * kk:(g + 1) * kk].double()
            centred = block - block.mean(0)
            std = centred.pow(2).sum(0).div(kk - 1).sqrt()
            value = centred / (std + 1e-10)
            if learnable:
                value = value * scale[g * kk:(g + 1) * kk].double().view(
                    -1, *[1] * len(hw))
            else:
                value = value * scale
            expected[b, g * kk:(g + 1) * kk] = value.float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            got, norm(x) if not learnable else norm(x), atol=ATOL, rtol=1e-4)


def test_normalize_filters_zero_filter_through_onnxruntime(tmp_path):
    """A zero filter normalises to zeros, not NaN, in the simplified export
    (the simplifier drops an Add of 1e-10; the form clamps instead)."""
    ort = pytest.importorskip('onnxruntime', reason='pip install onnxruntime')
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    from mmdyn.analysis.onnx_export import simplify_onnx
    norm = FilterNorm(1, 3, 'spatial').eval()
    path = str(tmp_path / 'norm.onnx')
    torch.onnx.export(
        norm, (torch.randn(2, 9, 4, 5), ),
        path,
        input_names=['input'],
        dynamic_axes={'input': {
            0: 'batch'
        }},
        opset_version=17,
        dynamo=False)
    simplify_onnx(path)
    x = torch.randn(3, 9, 4, 5, generator=torch.Generator().manual_seed(7))
    x[:, :, 1, 2] = 0.0
    got = torch.from_numpy(
        ort.InferenceSession(path).run(None, {'input': x.numpy()})[0])
    expected = norm(x)  # eager: the reference's normalisation
    assert torch.equal(got[:, :, 1, 2], torch.zeros(3, 9))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------
# Node counts of the exported layers, and the folded DDF filter norms
# --------------------------------------------------------------------------
def _data_ops(layer, chw):
    """The data op types of ``layer``'s ONNX export (no-op ``Cast`` nodes,
    which the simplifier drops, left out); the export is checked against the
    reference on the way."""
    results, ops = export_and_run(layer, chw)
    for got, expected in results:
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    ops.pop('Cast', None)
    return ops


@pytest.mark.parametrize(
    'name,builder,chw,most',
    [
        # pooled branch 4, spatial conv, 2 norms of 3, 2 filter Reshapes,
        # im2col (the channel filter's scale in its weights), columns
        # Reshape, Mul, MatMul, Reshape
        ('ddf_mul_s2_even', lambda: DDFConv2d(13, 13, 3, stride=2),
         (13, 10, 8), 18),
        # mul's 18, the channel and spatial scales' Muls, ReduceSum and Add
        ('ddf_add', lambda: DDFConv2d(13, 13, 3, combine='add'),
         (13, 9, 7), 22),
        # the 4 phases as one: the 19 of one DDF, Transpose and Reshape
        ('ddf_up', lambda: DDFUpsample(11), (11, 5, 7), 21),
    ])
def test_ddf_export_folds_the_filter_centring(name, builder, chw, most):
    """The filter norms' centring is folded into the branches' convs: no
    ``ReduceMean``/``Sub`` (the pooled branch is a ``GlobalAveragePool``), no
    ``Pad`` where the conv padding gives the output size, one im2col ``Conv``
    and one ``MatMul`` for DDF-Up's phases together."""
    ops = _data_ops(_build(builder), chw)
    assert ops['ReduceMean'] == 0 and ops['Sub'] == 0, ops
    assert ops['Pad'] == 0 and ops['Slice'] == 0, ops
    assert ops['ReduceL2'] == 2 and ops['MatMul'] == 1, ops
    assert sum(ops.values()) <= most, ops


def test_ddf_export_keeps_a_norm_that_does_not_fold():
    """A spatial branch whose conv does not take centred weights (a non-zero
    padding mode) keeps its norm's centring nodes; still exact."""
    layer = _build(lambda: DDFConv2d(12, 12, 3))
    layer.spatial_branch[0].padding_mode = 'reflect'  # 1x1: same values
    ops = _data_ops(layer, (12, 7, 9))
    assert ops['ReduceMean'] == 1 and ops['Sub'] == 1, ops


DDF_FORMS = [
    ('mul_s2_d2_odd', lambda: DDFConv2d(13, 13, 3, stride=2, dilation=2),
     (13, 11, 9)),
    ('add_head2', lambda: DDFConv2d(12, 12, 3, head=2, combine='add'), (12, 9,
                                                                        7)),
    ('mul_head3_5x5_s2_bias',
     lambda: DDFConv2d(12, 12, 5, head=3, stride=2, bias=True), (12, 9, 8)),
    ('mul_gen3', lambda: DDFConv2d(10, 10, 3, gen_kernel_size=3), (10, 7, 7)),
    ('up', lambda: DDFUpsample(11), (11, 5, 7)),
    ('up_add_head2_s3',
     lambda: DDFUpsample(12, head=2, combine='add', scale_factor=3), (12, 4,
                                                                      5)),
]


@pytest.mark.parametrize(
    'name,builder,chw', DDF_FORMS, ids=[n for n, _, _ in DDF_FORMS])
@pytest.mark.parametrize('batch', [1, 3])
def test_ddf_layer_forms_equal_reference(name, builder, chw, batch):
    """The export forms of DDFConv2d and DDF-Up (norms folded) in PyTorch
    against ``forward_reference``."""
    layer = _build(builder)
    x = torch.randn(batch, *chw, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = layer.forward_reference(x)
        if isinstance(layer, DDFUpsample):
            got = ddf_export_forms.ddf_upsample(layer, x)
        else:
            got = ddf_export_forms.ddf_conv(layer, x)
            if layer.bias is not None:
                got = got + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize('guide_hw', [(5, 7), (10, 14), (10, 13), (9, 13)])
def test_guided_ddf_up_form_equals_reference(guide_hw):
    """Guided DDF-Up (a depthwise conv before each spatial branch's 1x1 conv; a
    guidance at the input's size, twice it, or about twice it: edge-padded, the
    phases stacked along the channels)."""
    layer = _build(lambda: DDFUpsample(11, guided=True, guide_channels=6))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 11, 5, 7, generator=gen)
    guidance = torch.randn(3, 6, *guide_hw, generator=gen)
    with torch.no_grad():
        expected = layer.forward_reference(x, guidance)
        got = ddf_export_forms.ddf_upsample(layer, x, guidance)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_centred_taps_centre_the_conv_output():
    """A conv with :func:`centred_taps` weights and bias outputs the conv's
    filters minus their mean over the taps (a loop over the filters)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 2 * 9, 1)
    x = torch.randn(2, 5, 4, 3)
    with torch.no_grad():
        raw = conv(x)
        got = torch.nn.functional.conv2d(
            x, ddf_export_forms.centred_taps(conv.weight, 9),
            ddf_export_forms.centred_taps(conv.bias, 9))
    expected = raw.clone()
    for g in range(2):
        block = raw[:, g * 9:(g + 1) * 9]
        expected[:, g * 9:(g + 1) * 9] = block - block.mean(1, keepdim=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    'name,builder,chw,most,absent',
    [
        # one mixture: pooled, 2 Gemm, ReLU, Abs, ReduceSum, Div; MatMul with
        # the warehouse, kernel and input Reshapes, MatMul, output Reshape
        ('kw_1x1', lambda: KWConv2d(17, 11, 1, bias=False), (17, 7, 9), 12,
         ('Add', 'Transpose')),
        # attentions cell-major (no Transpose), kernels in the conv layout
        ('kw_3x3_s2',
         lambda: KWConv2d(13, 22, 3, stride=2, padding=1, bias=False),
         (13, 11, 9), 15, ('Add', 'Transpose')),
        # a strided 1x1 as one AveragePool, not a Slice per axis
        ('kw_1x1_blocks_s2', lambda: KWConv2d(
            12,
            20,
            1,
            stride=2,
            bias=False,
            cell_inplane_ratio=0.5,
            cell_outplane_ratio=0.5), (12, 9, 7), 16, ('Add', 'Slice')),
        # attention branch 6; alpha_c * alpha_s, Reshape, * W, im2col,
        # Reshape, MatMul, Reshape, * alpha_f
        ('odconv_k1_s2', lambda: ODConv2d(
            13, 22, 3, stride=2, padding=1, bias=False, kernel_num=1),
         (13, 11, 9), 14, ('Add', )),
    ])
def test_dynamic_conv_export_nodes(name, builder, chw, most, absent):
    """KernelWarehouse: the ``+ eps`` of the contrasting attention as an
    ``fc2`` output (no ``Add``), no ``Transpose`` of the attentions, no
    ``Slice`` for a 1x1 stride; ODConv's per-sample kernels from one
    [B, C_in*k*k] attention product (3 Reshapes, not 6)."""
    layer = _build(builder)
    assert layer.bias is None
    ops = _data_ops(layer, chw)
    for op in absent:
        assert ops[op] == 0, ops
    assert sum(ops.values()) <= most, ops


def test_resnet50_ddf_export_within_4x_of_resnet50(tmp_path):
    """The exported (simplified) DDF-mul ResNet-50 has at most 4 times the
    nodes of the exported static ResNet-50."""
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    from mmdyn.analysis.runtime_benchmark import (count_nodes,
                                                  export_config_file)
    static = count_nodes(
        export_config_file('mmpretrain::resnet/resnet50_8xb32_in1k.py',
                           str(tmp_path)))
    config = osp.join(
        osp.dirname(__file__), '..', '..', 'configs', 'ddf',
        'resnet50-ddf-mul_8xb128-130e_in1k.py')
    ddf = count_nodes(export_config_file(config, str(tmp_path)))
    assert ddf <= 4 * static, (ddf, static)


class _GuidedUpsample(nn.Module):
    """A guided DDF-Up fed by one input: the guidance, and its 2x2 average
    pool (ceil mode: odd sizes) as the map upsampled."""

    def __init__(self):
        super().__init__()
        self.up = DDFUpsample(7, guided=True, guide_channels=7)

    def forward(self, guidance):
        x = nn.functional.avg_pool2d(guidance, 2, ceil_mode=True)
        return self.up(x, guidance)

    def forward_reference(self, guidance):
        x = nn.functional.avg_pool2d(guidance, 2, ceil_mode=True)
        return self.up.forward_reference(x, guidance)


@pytest.mark.parametrize('hw', [(10, 12), (9, 13)])
def test_guided_ddf_up_through_onnxruntime(hw):
    """A high-resolution guidance (even, and odd: edge-padded): the phases
    stacked along the channels (no ``Slice`` per phase, no ``Concat``), the
    spatial branches one depthwise and one grouped ``Conv``; equal to the
    reference at batch 1 and 3."""
    ops = _data_ops(_build(_GuidedUpsample), (7, *hw))
    assert ops['Slice'] == 0 and ops['Concat'] == 0, ops
    assert ops['Conv'] == 5, ops  # 2 pooled, 2 spatial, im2col


def test_interleave_phases_places_each_phase():
    """DDF-Up's phases computed apart (a path other than the export form),
    interleaved: phase ``py*s + px`` at the pixels (y*s + py, x*s + px)."""
    phases = [torch.randn(2, 3, 4, 5) for _ in range(9)]
    out = ddf_export_forms.interleave_phases(phases, 3)
    assert out.shape == (2, 3, 12, 15)
    for py in range(3):
        for px in range(3):
            assert torch.equal(out[:, :, py::3, px::3], phases[py * 3 + px])
