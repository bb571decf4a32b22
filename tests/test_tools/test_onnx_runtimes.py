# Copyright (c) mmdyn contributors. All rights reserved.
"""Deployment: the exported files in OpenVINO (skipped where it is not
installed) and ONNX Runtime, the graph simplification, the runtime
benchmark tool, ``pytorch2onnx.py --verify``'s timings and its checkpoint
loader, and the node counts of the exported ResNet-50s."""
import collections
import os.path as osp

import pytest
import torch
from torch import nn

pytest.importorskip('onnx', reason='pip install onnx onnxruntime')
pytest.importorskip('onnxruntime', reason='pip install onnx onnxruntime')

from script_loading import load_script as load_tool  # noqa: E402

from mmdyn.analysis.models import build_model  # noqa: E402
from mmdyn.analysis.onnx_export import exportable  # noqa: E402
from mmdyn.analysis.onnx_export import export_onnx, fold_norms_into_matmuls
from mmdyn.analysis.runtime_benchmark import open_session  # noqa: E402
from mmdyn.analysis.runtime_benchmark import runtime_available
from mmdyn.ops import DDFConv2d, DDFUpsample, KWConv2d, ODConv2d  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class DynamicStack(nn.Module):
    """[B, 3, H, W] -> every export form in a row (ODConv with one and with
    four kernels, KernelWarehouse, DDF, DDF-Up)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 13, 3, padding=1)
        self.od1 = ODConv2d(13, 14, 3, stride=2, padding=1, kernel_num=1)
        self.od4 = ODConv2d(
            14, 14, 3, padding=2, dilation=2, groups=2, kernel_num=4)
        self.kw = KWConv2d(14, 12, 3, padding=1)
        self.ddf = DDFConv2d(12, 12, 3, stride=2)
        self.up = DDFUpsample(12)

    def forward(self, x):
        x = self.stem(x)
        for layer in (self.od1, self.od4, self.kw, self.ddf, self.up):
            x = torch.relu(layer(x))
        return x

    def forward_reference(self, x):
        x = self.stem(x)
        for layer in (self.od1, self.od4, self.kw, self.ddf, self.up):
            x = torch.relu(layer.forward_reference(x))
        return x


def _perturb_norms(model):
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
            module.weight.data.uniform_(0.5, 1.5, generator=gen)


@pytest.fixture(scope='module')
def exported_stack(tmp_path_factory):
    torch.manual_seed(0)
    model = DynamicStack().eval()
    _perturb_norms(model)
    path = str(tmp_path_factory.mktemp('stack') / 'stack.onnx')
    export_onnx(model, path, (21, 19), dynamic_batch=True)
    return model, path


@pytest.mark.parametrize('runtime', ['onnxruntime', 'openvino'])
def test_runtime_equals_reference(exported_stack, runtime):
    """The same file in both runtimes equals PyTorch's reference forward at
    batch 1 and 3 (exported at batch 2)."""
    if not runtime_available(runtime):
        pytest.skip(f'{runtime} is not installed (pip install {runtime}, '
                    'or the "deploy" extra)')
    model, path = exported_stack
    run = open_session(path, runtime, threads=1)
    for batch in (1, 3):
        x = torch.randn(
            batch, 3, 21, 19, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model.forward_reference(x)
        got = torch.from_numpy(run(x.numpy())[0])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fold_norms_into_matmuls(tmp_path):
    """A norm after a bias-free linear layer becomes one Gemm; the values stay
    (onnxruntime against PyTorch)."""
    import onnx
    import onnxruntime as ort
    model = nn.Sequential(
        nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU()).eval()
    _perturb_norms(model)
    model[1].bias.data.uniform_(-1, 1)
    path = str(tmp_path / 'mlp.onnx')
    torch.onnx.export(
        model, (torch.randn(2, 7), ),
        path,
        input_names=['input'],
        output_names=['output'],
        dynamic_axes={
            'input': {
                0: 'b'
            },
            'output': {
                0: 'b'
            }
        },
        dynamo=False)
    graph = onnx.load(path)
    assert fold_norms_into_matmuls(graph) == 1
    ops = [n.op_type for n in graph.graph.node]
    assert 'BatchNormalization' not in ops and ops.count('Gemm') == 1
    x = torch.randn(4, 7)
    got = ort.InferenceSession(graph.SerializeToString()).run(
        None, {'input': x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-5)


def test_fold_constant_nodes():
    """Nodes computed from initializers only (a Tile and a Concat of weights)
    become initializers of the same values; a node of the input stays."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mmdyn.analysis.onnx_export import fold_constant_nodes
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph([
        helper.make_node('Tile', ['w', 'reps'], ['tiled']),
        helper.make_node('Concat', ['tiled', 'w'], ['both'], axis=0),
        helper.make_node('MatMul', ['x', 'both_t'], ['y']),
        helper.make_node('Transpose', ['both'], ['both_t']),
    ], 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3])], [
        helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 6])
    ], [
        numpy_helper.from_array(w, 'w'),
        numpy_helper.from_array(np.array([2, 1], np.int64), 'reps')
    ])
    # Topological order for the folder (Transpose before MatMul).
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([nodes[0], nodes[1], nodes[3], nodes[2]])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    x = np.ones((1, 3), np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(
        None, {'x': x})[0]
    assert fold_constant_nodes(model) == 3
    assert [n.op_type for n in model.graph.node] == ['MatMul']
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString()).run(
        None, {'x': x})[0]
    expected = x @ np.concatenate([w, w, w]).T
    np.testing.assert_allclose(before, expected)
    np.testing.assert_allclose(after, expected)


def test_simplify_keeps_values(tmp_path):
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    import onnx
    torch.manual_seed(0)
    model = DynamicStack().eval()
    _perturb_norms(model)
    raw, simple = str(tmp_path / 'raw.onnx'), str(tmp_path / 'simple.onnx')
    export_onnx(model, raw, (21, 19), simplify=False)
    export_onnx(model, simple, (21, 19), simplify=True)
    assert len(onnx.load(simple).graph.node) < \
        len(onnx.load(raw).graph.node)
    x = torch.randn(2, 3, 21, 19).numpy()
    a = open_session(raw)(x)[0]
    b = open_session(simple)(x)[0]
    assert abs(a - b).max() < 1e-5


def _batch_names(model) -> dict:
    """Value name -> the name (or size) shape inference gives its dim 0."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {
        v.name: (v.type.tensor_type.shape.dim[0].dim_param
                 or v.type.tensor_type.shape.dim[0].dim_value)
        for v in list(inferred.value_info) + list(inferred.output)
        if v.type.tensor_type.shape.dim
    }


def test_keep_batch_in_reshapes():
    """A reshape to a feature map that keeps the batch gets a 0 for it, so
    shape inference names the batch of its output (a residual Add then has
    inputs of one proven shape); a reshape that moves the batch, or to a
    matrix, stays; ONNX Runtime computes the same before and after, at two
    batch sizes."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mmdyn.analysis.onnx_export import keep_batch_in_reshapes

    def shape(name, dims):
        return numpy_helper.from_array(np.array(dims, np.int64), name)

    graph = helper.make_graph([
        helper.make_node('Reshape', ['x', 'to_map'], ['map']),
        helper.make_node('Add', ['map', 'y'], ['sum']),
        helper.make_node('Reshape', ['x', 'moves_batch'], ['moved']),
        helper.make_node('Reshape', ['x', 'to_matrix'], ['matrix']),
    ], 'g', [
        helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                      ['batch', 8, 4, 4]),
        helper.make_tensor_value_info('y', TensorProto.FLOAT,
                                      ['batch', 2, 4, 16])
    ], [
        helper.make_tensor_value_info('sum', TensorProto.FLOAT, None),
        helper.make_tensor_value_info('moved', TensorProto.FLOAT, None),
        helper.make_tensor_value_info('matrix', TensorProto.FLOAT, None)
    ], [
        shape('to_map', [-1, 2, 4, 16]),
        shape('moves_batch', [-1, 4, 4, 4]),
        shape('to_matrix', [-1, 128]),
        shape('unused', [1])
    ])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    assert _batch_names(model)['map'] != 'batch'
    before = model.SerializeToString()
    assert keep_batch_in_reshapes(model) == 1
    names = _batch_names(model)
    assert names['map'] == 'batch' and names['sum'] == 'batch'
    assert names['moved'] != 'batch' and names['matrix'] != 'batch'
    inits = {
        i.name: numpy_helper.to_array(i).tolist()
        for i in model.graph.initializer
    }
    assert inits == {
        'to_map_keep_batch': [0, 2, 4, 16],
        'moves_batch': [-1, 4, 4, 4],
        'to_matrix': [-1, 128]
    }
    for batch in (1, 3):
        x = np.random.RandomState(batch).randn(batch, 8, 4,
                                               4).astype(np.float32)
        y = np.ones((batch, 2, 4, 16), np.float32)
        feeds = {'x': x, 'y': y}
        old = ort.InferenceSession(before).run(None, feeds)
        new = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
        expected = [
            x.reshape(batch, 2, 4, 16) + y,
            x.reshape(-1, 4, 4, 4),
            x.reshape(batch, 128)
        ]
        for a, b, c in zip(old, new, expected):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, c)


class DDFBlock(nn.Module):
    """A residual block around a DDF layer, as in DDF-ResNet: the residual
    ``Add`` follows a static conv of the DDF layer's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.ddf = DDFConv2d(12, 12, 3)
        self.conv = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.conv(torch.relu(self.ddf(x))) + x)


def test_exported_ddf_keeps_the_batch_name(tmp_path):
    """In an exported DDF block every 4-D reshape (the DDF export form's) and
    the residual ``Add`` keep the input's batch name (before
    :func:`keep_batch_in_reshapes` they got new unknown dims, and ONNX Runtime
    fused neither the ``Add`` nor the ``Relu`` into the static conv); the
    values equal PyTorch at batch 1 and 3."""
    pytest.importorskip('onnxscript', reason='pip install onnxscript')
    import onnx
    torch.manual_seed(0)
    model = DDFBlock().eval()
    path = str(tmp_path / 'ddf_block.onnx')
    export_onnx(model, path, (13, 11), dynamic_batch=True)
    graph = onnx.load(path)
    names = _batch_names(graph)
    maps = [
        node.output[0] for node in graph.graph.node
        if node.op_type == 'Reshape' and len(_shape_of(graph, node)) == 4
    ]
    adds = [
        node.output[0] for node in graph.graph.node if node.op_type == 'Add'
    ]
    assert maps and adds
    assert {names[m]
            for m in maps + adds} == {'batch'}, {
                m: names[m]
                for m in maps + adds
            }
    run = open_session(path, threads=1)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 13, 11)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(
            torch.from_numpy(run(x.numpy())[0]),
            expected,
            atol=1e-4,
            rtol=1e-4)


def _shape_of(model, reshape) -> list:
    """A ``Reshape``'s target shape when it is an initializer, else []."""
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    target = inits.get(reshape.input[1])
    return [] if target is None else numpy_helper.to_array(target).tolist()


def test_benchmark_onnx_tool(exported_stack, capsys):
    _, path = exported_stack
    load_tool('tools/analysis_tools/benchmark_onnx.py').main([
        path, '--compare', path, '--shape', '21', '19', '--batch-size', '2',
        '--repeat', '1', '--warmup', '0', '--threads', '1'
    ])
    out = capsys.readouterr().out
    assert out.count('| onnxruntime | 2 |') == 2


def _capture_session_options(monkeypatch):
    """Record the ``SessionOptions`` every ONNX Runtime session is opened with
    (the sessions still open)."""
    import onnxruntime as ort
    seen = []
    real = ort.InferenceSession

    def recording(path, sess_options=None, *args, **kwargs):
        seen.append(sess_options)
        return real(path, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, 'InferenceSession', recording)
    return seen


def _stops_spinning(options) -> bool:
    return (options is not None
            and options.get_session_config_entry('session.force_spinning_stop')
            == '1')


def test_timed_sessions_stop_spinning(exported_stack, monkeypatch):
    """Sessions timed beside others (the benchmark's alternating sessions,
    --verify's run before PyTorch's) stop their workers' spinning when a
    run returns: spinning, the workers of one session took the cores of the
    next."""
    from mmdyn.analysis.onnx_export import compare_with_onnxruntime
    from mmdyn.analysis.runtime_benchmark import benchmark_onnx_files
    module, path = exported_stack
    seen = _capture_session_options(monkeypatch)
    benchmark_onnx_files([path, path], ['a', 'b'],
                         batch_size=1,
                         shape=(21, 19),
                         threads=1,
                         repeat=1,
                         warmup=0,
                         log=None)
    compare_with_onnxruntime(module, path, (21, 19), batch_sizes=(1, ))
    assert len(seen) == 3 and all(map(_stops_spinning, seen)), seen
    run = open_session(path, threads=1)
    assert len(seen) == 4 and _stops_spinning(seen[-1])
    assert seen[-1].intra_op_num_threads == 1
    assert run(torch.randn(1, 3, 21, 19).numpy())[0].shape[0] == 1


def test_nodes_by_scope(exported_stack, capsys):
    """The node counts per module scope add up to the file's node count; every
    dynamic layer of the stack has its own scope."""
    from mmdyn.analysis.runtime_benchmark import (count_nodes,
                                                  count_nodes_by_scope)
    _, path = exported_stack
    scopes = count_nodes_by_scope(path, depth=1)
    assert sum(scopes.values()) == count_nodes(path)
    assert {'od1', 'od4', 'kw', 'ddf', 'up'} <= set(scopes), scopes
    load_tool('tools/analysis_tools/benchmark_onnx.py').main(
        [path, '--shape', '21', '19', '--nodes-by-scope', '1', '--nodes-only'])
    out = capsys.readouterr().out
    assert f'{count_nodes(path)} nodes in' in out and '  od4  (' in out


def test_pytorch2onnx_verify_times_and_loads_checkpoints(tmp_path, capsys):
    """--verify prints the runtime's time beside PyTorch's; the checkpoint
    goes through the project's loader, which refuses one that leaves the
    dynamic layers unloaded."""
    config = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    model = build_model(config)
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': model.state_dict()}, good)
    tool = load_tool('tools/deployment/pytorch2onnx.py')
    tool.main([
        config,
        str(good), '--output-file',
        str(tmp_path / 'od.onnx'), '--shape', '32', '--dynamic-batch',
        '--verify'
    ])
    out = capsys.readouterr().out
    assert 'batch 4: max abs difference' in out
    assert 'ms, PyTorch' in out and 'onnxruntime ' in out
    partial = tmp_path / 'partial.pth'
    torch.save(
        {
            'state_dict': {
                k: v
                for k, v in model.state_dict().items() if 'attention' not in k
            }
        }, partial)
    with pytest.raises(Exception, match='attention'):
        tool.main([
            config,
            str(partial), '--output-file',
            str(tmp_path / 'od2.onnx'), '--shape', '32'
        ])


#: Nodes of each exported ResNet-50 (64x64 input, dynamic batch,
#: simplified), at most this many times the static ResNet-50's (126). The
#: remaining nodes are the dynamic layers' attention branches, folded (one
#: hidden Conv/Gemm with its norm, one Conv and Sigmoid for every ODConv
#: head) and the mixing: 9 more per 1x1 ODConv layer than a static conv
#: and 11-14 per 3x3 one, 12-16 per KernelWarehouse layer (the attention
#: normalisation, the mixture GEMMs and their reshapes), 14 per DDF layer
#: (the filter norms' centring folded into the branches' convs, each norm
#: one LpNormalization, the BN after it folded in) and 7-15 more in
#: channel chunks on large maps. At 224x224: 611, 828 and 497 nodes (430
#: before the chunks and folds); ODConv-1x and KW-1x cannot reach 4x with
#: standard ONNX operators (the least per layer: export_forms.py), DDF-mul
#: is within it. The exports of the im2col/tap-loop forms had 3,191
#: (ODConv-1x), 5,042 (KW-1x) and 6,760 (DDF-mul) nodes against 176 (not
#: simplified); the first export forms 906, 1,304 and 1,335 against 126,
#: then 632, 888 and 529.
NODE_RATIOS = {
    'configs/odconv/resnet50-odconv1x_8xb32_in1k.py': 4.9,
    'configs/kernelwarehouse/resnet50-kw1x_8xb128-300e_in1k.py': 6.7,
    'configs/ddf/resnet50-ddf-mul_8xb128-130e_in1k.py': 4.0,
}


def test_resnet50_node_counts(tmp_path):
    import onnx

    def nodes(config):
        """Op type counts; 'Gather of data': Gathers not of a shape."""
        path = str(tmp_path / (osp.basename(config) + '.onnx'))
        export_onnx(exportable(build_model(config)), path, (64, 64))
        graph = onnx.load(path).graph
        producer = {out: n.op_type for n in graph.node for out in n.output}
        ops = collections.Counter(n.op_type for n in graph.node)
        ops['Gather of data'] = sum(
            n.op_type == 'Gather' and producer.get(n.input[0]) != 'Shape'
            for n in graph.node)
        return ops

    static = sum(nodes('mmpretrain::resnet/resnet50_8xb32_in1k.py').values())
    for config, bound in NODE_RATIOS.items():
        ops = nodes(osp.join(ROOT, config))
        total = sum(ops.values()) - ops['Gather of data']
        assert total <= bound * static, (config, total, static, ops)
        # No unfold subgraphs (Gathers of feature maps), no tap loops (a
        # Slice per tap: 9 per DDF layer).
        assert ops['Gather of data'] == 0, (config, ops)
        assert ops['Slice'] <= 60, (config, ops)


def test_detector_backbone_and_neck(tmp_path, capsys):
    """The detector fallback: an ODConv backbone with the DDF-Up FPN
    (guided), backbone + neck exported with a dynamic batch, equal to
    PyTorch in onnxruntime at batch 1 and 4."""
    config = osp.join(ROOT,
                      'configs/demo/mask-rcnn_r18-odconv1x_fpn-ddfup_demo.py')
    onnx_file = tmp_path / 'neck.onnx'
    load_tool('tools/deployment/pytorch2onnx.py').main([
        config, '--output-file',
        str(onnx_file), '--shape', '64', '96', '--dynamic-batch',
        '--backbone-only', '--with-neck', '--verify', '--cfg-options',
        'model.backbone.init_cfg=None'
    ])
    out = capsys.readouterr().out
    assert 'batch 4: max abs difference' in out
    import onnx
    graph = onnx.load(str(onnx_file)).graph
    assert len(graph.output) == 5  # the FPN levels
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops['ScatterND'] == 0, ops  # DDF-Up's phases by one Transpose


def test_with_neck_needs_a_neck():
    model = nn.Module()
    model.backbone = nn.Identity()
    with pytest.raises(ValueError, match='with_neck'):
        exportable(model, backbone_only=True, with_neck=True)
