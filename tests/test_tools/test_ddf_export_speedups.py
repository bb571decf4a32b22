# Copyright (c) mmdyn contributors. All rights reserved.
"""The DDF export's cache blocking and folds, each against an independent
reference: DDF in channel chunks and with the channel filters' scale in the
im2col weights (against ``forward_reference``), the filter norms as one
``LpNormalization`` (against numpy), the BatchNorm after a DDF layer folded
into it (against the block before the fold), and all of them through ONNX
Runtime and OpenVINO."""
import copy
import os.path as osp

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('onnx', reason='pip install onnx onnxruntime')
pytest.importorskip('onnxruntime', reason='pip install onnx onnxruntime')

from mmdyn.analysis.onnx_export import (export_onnx, fold_norms_into_ddf,
                                        lp_normalize_divisions)
from mmdyn.analysis.runtime_benchmark import open_session, runtime_available
from mmdyn.models.utils import dynamic_like
from mmdyn.ops import DDFConv2d
from mmdyn.ops.accel import ddf_export_forms
from mmdyn.ops.accel.thresholds import THRESHOLDS

ATOL = 2e-5


def _randomise(module, seed=0):
    """Random weights everywhere (the DDF branches' zero inits too) and random
    running statistics in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module.eval()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 600 bytes of columns per sample, up to 4."""
    monkeypatch.setitem(THRESHOLDS, 'ddf_export',
                        dict(chunk_bytes=600, max_chunks=4))


@pytest.mark.parametrize(
    'channels,hw,k,stride,dilation,chunks',
    [
        (12, (9, 7), 3, 1, 1, 4),
        (12, (11, 9), 3, 2, 1, 4),  # odd sizes, stride 2
        (10, (8, 9), 3, 1, 2, 2),  # 10 channels: at most 2 chunks
        (8, (7, 7), 5, 1, 1, 4),
        (13, (7, 9), 3, 1, 1, 1),  # 13 channels: no chunks
    ])
@pytest.mark.parametrize('batch', [1, 3])
def test_chunked_ddf_equals_reference(small_chunks, channels, hw, k, stride,
                                      dilation, chunks, batch):
    """The export form in channel chunks (and the channel filters' scale in the
    im2col weights) against the layer's ``forward_reference``."""
    layer = _randomise(
        DDFConv2d(channels, channels, k, stride=stride, dilation=dilation))
    x = torch.randn(
        batch, channels, *hw, generator=torch.Generator().manual_seed(batch))
    out_hw = tuple((n - 1) // stride + 1 for n in hw)
    assert ddf_export_forms.column_chunks(x, k, out_hw, False, 1, 1) == chunks
    with torch.no_grad():
        got = ddf_export_forms.ddf_conv(layer, x)
        expected = layer.forward_reference(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize('head', [2, 4])
def test_spatial_scale_alone_with_heads(small_chunks, head):
    """A channel branch whose norm does not fold (its output, normalised, is
    used as it is) with several heads: the spatial filters' gains (one per
    head) alone go into the im2col weights."""
    layer = _randomise(DDFConv2d(8, 8, 3, head=head))
    layer.channel_branch[-1] = nn.Sequential(layer.channel_branch[-1])
    x = torch.randn(3, 8, 7, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ddf_export_forms.ddf_conv(layer, x)
        expected = layer.forward_reference(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_column_chunks_rule():
    """The fewest power-of-two chunks whose columns fit ``chunk_bytes`` per
    sample, at most ``max_chunks``, dividing the channels; one-head, one-phase
    ``mul`` only."""
    limits = THRESHOLDS['ddf_export']
    assert limits == dict(chunk_bytes=2**20, max_chunks=4)

    def chunks(channels, hw, add=False, head=1, phases=1, dtype=torch.float32):
        x = torch.empty(1, channels, 1, 1, dtype=dtype)
        return ddf_export_forms.column_chunks(x, 3, (hw, hw), add, head,
                                              phases)

    # DDF-mul ResNet-50 at 224x224: stages 1-4 (9 * 4 bytes per value).
    assert [chunks(64, 56),
            chunks(128, 28),
            chunks(256, 14),
            chunks(512, 7)] == [4, 4, 2, 1]
    assert chunks(64, 56, dtype=torch.float64) == 4
    assert chunks(64, 20) == 1  # 0.92 MB
    assert chunks(64, 22) == 2  # 1.1 MB
    assert chunks(6, 400) == 2  # 6 channels: 2, not 4
    assert chunks(64, 56, add=True) == 1
    assert chunks(64, 56, head=2) == 1
    assert chunks(64, 56, phases=4) == 1


def _lp_graph(eps,
              extra_use=False,
              keepdims=1,
              opset=17,
              clip_max=False,
              numerator='input'):
    """Div(numerator, Clip(ReduceL2(x, axes=[-2]), eps[, max])) [+ a second use
    of the norm]; opset 18: the axes as an input."""
    from onnx import TensorProto, helper
    if opset >= 18:
        reduce = helper.make_node(
            'ReduceL2', ['input', 'axes'], ['n'], keepdims=keepdims)
    else:
        reduce = helper.make_node(
            'ReduceL2', ['input'], ['n'], axes=[-2], keepdims=keepdims)
    nodes = [
        reduce,
        helper.make_node('Clip', ['n', 'eps'] + (['eps'] if clip_max else []),
                         ['c']),
        helper.make_node('Abs', ['input'], ['other']),
        helper.make_node('Div', [numerator, 'c'], ['y']),
    ]
    outputs = [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)]
    if extra_use:
        nodes.append(helper.make_node('Relu', ['n'], ['n2']))
        outputs.append(
            helper.make_tensor_value_info('n2', TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, 'g', [
        helper.make_tensor_value_info('input', TensorProto.FLOAT, [2, 3, 9, 5])
    ], outputs, [
        helper.make_tensor('eps', TensorProto.FLOAT, [], [eps]),
        helper.make_tensor('axes', TensorProto.INT64, [1], [-2])
    ])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', opset)])


@pytest.mark.parametrize('opset', [17, 18])
def test_lp_normalize_divisions_values(tmp_path, opset):
    """The rewritten graph in ONNX Runtime (and OpenVINO where installed)
    against numpy's ``x / max(||x||, eps)``, a zero vector included; the axes
    as an attribute (opset 17) and as an input (18)."""
    model = _lp_graph(1e-10, opset=opset)
    assert lp_normalize_divisions(model) == 1
    assert [n.op_type
            for n in model.graph.node] == ['Abs',
                                           'LpNormalization'], model.graph.node
    assert [a.i for a in model.graph.node[1].attribute] == [-2, 2]
    x = np.random.default_rng(0).standard_normal(
        (2, 3, 9, 5)).astype(np.float32)
    x[1, 2, :, 3] = 0.0
    expected = x / np.maximum(
        np.sqrt((x.astype(np.float64)**2).sum(-2, keepdims=True)), 1e-10)
    runtimes = ['onnxruntime'
                ] + (['openvino'] if runtime_available('openvino') else [])
    path = str(tmp_path / 'lp.onnx')
    with open(path, 'wb') as f:
        f.write(model.SerializeToString())
    for runtime in runtimes:
        got = open_session(path, runtime, threads=1)(x)[0]
        assert np.isfinite(got).all(), runtime
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)
        assert not got[1, 2, :, 3].any(), runtime


@pytest.mark.parametrize('case', [
    dict(eps=1e-3),
    dict(extra_use=True),
    dict(keepdims=0),
    dict(clip_max=True),
    dict(numerator='other'),
])
def test_lp_normalize_divisions_leaves_others(case):
    """Not rewritten: a clamp larger than ``LP_NORM_MAX_EPS`` (the values
    would differ), a norm read elsewhere, a reduction without kept dims, a
    clamp from above too, a division of another tensor."""
    model = _lp_graph(**{'eps': 1e-10, **case})
    assert lp_normalize_divisions(model) == 0
    assert 'LpNormalization' not in [n.op_type for n in model.graph.node]


def _ddf_bottleneck(combine='mul', channels=16):
    """Mmpretrain's Bottleneck with a DDF conv2 (as DDFResNet builds it),
    random weights and norm statistics."""
    from mmpretrain.models.backbones.resnet import Bottleneck
    block = Bottleneck(channels, channels)
    block.conv2 = dynamic_like(block.conv2,
                               dict(type='DDFConv2d', combine=combine))
    return _randomise(block)


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('learnable_std', [True, False])
def test_fold_norms_into_ddf_keeps_the_block(bias, learnable_std):
    """The block after the fold against a copy of it before (conv2's BatchNorm
    an Identity, its channel norm's scale and the bias set)."""
    block = _ddf_bottleneck()
    if bias:
        block.conv2.bias = nn.Parameter(torch.randn(4))
    if not learnable_std:
        block.conv2.channel_branch[-1].std = None
    before = copy.deepcopy(block)
    x = torch.randn(3, 16, 9, 7, generator=torch.Generator().manual_seed(2))
    assert fold_norms_into_ddf(block) == 1
    assert isinstance(block.norm2, nn.Identity)
    assert isinstance(block.norm1, nn.BatchNorm2d)
    with torch.no_grad():
        expected = before(x)
        torch.testing.assert_close(block(x), expected, atol=ATOL, rtol=1e-4)
        # The reference path of the folded layer too.
        mid = before.relu(before.norm1(before.conv1(x)))
        torch.testing.assert_close(
            block.conv2.forward_reference(mid),
            before.norm2(before.conv2.forward_reference(mid)),
            atol=ATOL,
            rtol=1e-4)


@pytest.mark.parametrize('style', ['pytorch', 'caffe'])
def test_fold_norms_into_mmdet_bottleneck(style):
    """Mmdet's Bottleneck (its own class; stride 2, both styles): folded, equal
    to the block before."""
    from mmdet.models.backbones.resnet import Bottleneck
    block = Bottleneck(16, 4, stride=2, style=style)
    block.conv2 = dynamic_like(block.conv2,
                               dict(type='DDFConv2d', combine='mul'))
    block.downsample = nn.Sequential(
        nn.Conv2d(16, 16, 1, stride=2), nn.BatchNorm2d(16))
    _randomise(block)
    before = copy.deepcopy(block)
    x = torch.randn(2, 16, 9, 8, generator=torch.Generator().manual_seed(5))
    assert fold_norms_into_ddf(block) == 1
    assert isinstance(block.norm2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(block(x), before(x), atol=ATOL, rtol=1e-4)


def test_fold_norms_into_ddf_leaves_others():
    """Not folded: an ``add`` DDF, a BatchNorm in training mode."""
    add = _ddf_bottleneck('add')
    assert fold_norms_into_ddf(add) == 0
    assert isinstance(add.norm2, nn.BatchNorm2d)
    training = _ddf_bottleneck()
    training.norm2.train()
    assert fold_norms_into_ddf(training) == 0


class _Blocks(nn.Module):
    """A stem conv and two DDF bottlenecks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(_ddf_bottleneck(), _ddf_bottleneck())

    def forward(self, x):
        return self.blocks(self.stem(x))


@pytest.mark.parametrize('runtime', ['onnxruntime', 'openvino'])
def test_export_with_chunks_and_folds(small_chunks, tmp_path, runtime):
    """``export_onnx`` of DDF bottlenecks: chunked DDF, the norms as
    ``LpNormalization``, conv2's BatchNorm folded (none left but the static
    convs', which the simplifier folds); the runtime at batch 1 and 3 against
    the module, which the export left unfolded."""
    if not runtime_available(runtime):
        pytest.skip(f'{runtime} is not installed (the "deploy" extra)')
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    import onnx
    model = _randomise(_Blocks())
    path = str(tmp_path / 'blocks.onnx')
    export_onnx(model, path, (10, 9))
    assert all(isinstance(b.norm2, nn.BatchNorm2d) for b in model.blocks)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count('LpNormalization') == 4, ops
    assert ops.count('ReduceL2') == 0 and ops.count('Clip') == 0, ops
    assert ops.count('BatchNormalization') == 0, ops
    assert ops.count('Split') == 4 and ops.count('Concat') == 2, ops
    run = open_session(path, runtime, threads=1)
    for batch in (1, 3):
        x = torch.randn(
            batch, 3, 10, 9, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(run(x.numpy())[0])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_resnet50_ddf_chunks_at_224(tmp_path):
    """DDF-mul ResNet-50 exported at 224x224: stages 1-3 in 4, 4 and 2
    chunks (a Split of the input and one of the channel filters each), no
    BatchNorm left after a DDF layer, within 4x ResNet-50's 126 nodes."""
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    import collections

    import onnx

    from mmdyn.analysis.runtime_benchmark import export_config_file
    config = osp.join(
        osp.dirname(__file__), '..', '..', 'configs', 'ddf',
        'resnet50-ddf-mul_8xb128-130e_in1k.py')
    graph = onnx.load(export_config_file(config, str(tmp_path))).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops['Split'] == 2 * (3 + 4 + 6), ops
    # + 1: the classifier's flatten builds its shape with a Concat.
    assert ops['Concat'] == 3 + 4 + 6 + 1, ops
    assert ops['MatMul'] == 3 * 4 + 4 * 4 + 6 * 2 + 3, ops
    assert ops['LpNormalization'] == 32 and ops['BatchNormalization'] == 0
    assert sum(ops.values()) <= 4 * 126, ops


def test_benchmark_sessions_run_in_turn(monkeypatch):
    """``benchmark_onnx_files(..., sessions=3)``: each file opened three times,
    each session warmed ``warmup`` times, then round ``r`` runs session ``r %
    3`` of every file."""
    from mmdyn.analysis import runtime_benchmark
    calls = []

    def fake_open(path, runtime, threads):
        index = sum(c[0] == path for c in calls if c[1] == 'open')
        calls.append((path, 'open', index))
        return lambda x: calls.append((path, 'run', index))

    monkeypatch.setattr(runtime_benchmark, 'open_session', fake_open)
    runtime_benchmark.benchmark_onnx_files(['a', 'b'], ['a', 'b'],
                                           batch_size=1,
                                           shape=(2, 2),
                                           repeat=4,
                                           warmup=1,
                                           log=None,
                                           sessions=3)
    runs = [(p, i) for p, kind, i in calls if kind == 'run']
    # 3 warm-ups per file, then 1 + 4 interleaved rounds (the order of the
    # files alternates between rounds).
    assert runs[:6] == [('a', 0), ('a', 1), ('a', 2), ('b', 0), ('b', 1),
                        ('b', 2)]
    rounds = runs[6:]
    assert sorted(rounds[:2]) == [('a', 0), ('b', 0)]
    assert [sorted(rounds[2 * r:2 * r + 2]) for r in range(1, 5)
            ] == [[('a', r % 3), ('b', r % 3)] for r in range(1, 5)]
    with pytest.raises(ValueError, match='sessions'):
        runtime_benchmark.benchmark_onnx_files(['a'], ['a'], sessions=0)
