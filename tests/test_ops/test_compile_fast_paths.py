# Copyright (c) mmdyn contributors. All rights reserved.
"""Compiled graphs keep the CPU inference fast paths.

Under ``torch.compile`` (float32 CPU inference) each ODConv, CondConv,
DyConv, KernelWarehouse and DDF conv is one ``mmdyn::layer_forward``
operator (its eager forward inside); with that off (``WHOLE_LAYER_TYPES``
empty) the Winograd, chunked and KernelWarehouse C-product paths run as
the ``mmdyn::`` custom operators of :mod:`mmdyn.ops.accel.custom_ops`.
The graph Dynamo hands to the backend (recorded by a backend that returns
it unchanged) calls them, and the compiled output equals the layer's eager
``forward_reference``. Under export and in compiled training none of them
appears.

Each layer is given its path (``impl=``), as the size thresholds that
choose among the paths differ between CPUs; the compiled graph takes the
path the layer takes in eager mode (``last_path``).
"""
import pytest
import torch
from torch import nn

from mmdyn.ops import CondConv2d, DyConv2d, KWConv2d, ODConv2d
from mmdyn.ops.accel import custom_ops, kw_cells, winograd
from mmdyn.ops.accel.paths import THRESHOLDS

pytestmark = pytest.mark.skipif(
    winograd.load() is None or kw_cells.load() is None,
    reason='the C loops need a C compiler')

#: The operators that stand for whole inference paths or the KW product.
PATH_OPS = ('mmdyn.winograd_conv', 'mmdyn.mixture_chunked_conv',
            'mmdyn.kw_mix_cells', 'mmdyn.kw_winograd_conv',
            'mmdyn.layer_forward')
#: The layer classes compiled as one operator by default.
WHOLE_LAYERS = custom_ops.WHOLE_LAYER_TYPES


@pytest.fixture(autouse=True)
def _small_thresholds(monkeypatch):
    """The C cell product for small warehouses, the attentions in the graph
    (the path operators); a fresh Dynamo each test."""
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', ())
    monkeypatch.setitem(
        THRESHOLDS, 'kernel_warehouse',
        dict(THRESHOLDS['kernel_warehouse'], c_loop_min_columns=1))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend():
    """A backend that runs Dynamo's FX graphs as they are and keeps the
    ``call_function`` targets of their nodes."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(
            str(node.target) for node in gm.graph.nodes
            if node.op == 'call_function')
        return gm

    return backend, targets


def mmdyn_ops(targets):
    """The ``mmdyn::`` path operators among ``targets`` (overload suffix
    dropped)."""
    return {t.rsplit('.default', 1)[0] for t in targets} & set(PATH_OPS)


#: name -> (constructor, input shape, eager path, operator in the graph).
CASES = {
    'odconv_k1': (lambda: ODConv2d(16, 24, 3, padding=1, kernel_num=1),
                  (2, 16, 8, 8), 'winograd', 'mmdyn.winograd_conv'),
    'odconv_k4': (lambda: ODConv2d(16, 16, 3, padding=1), (3, 16, 7, 9),
                  'winograd', 'mmdyn.winograd_conv'),
    'dyconv': (lambda: DyConv2d(16, 16, 3, padding=1), (2, 16, 8, 8),
               'winograd', 'mmdyn.winograd_conv'),
    'condconv': (lambda: CondConv2d(16, 8, 3, padding=1), (2, 16, 8, 8),
                 'winograd', 'mmdyn.winograd_conv'),
    'kwconv_fused': (lambda: KWConv2d(16, 16, 3, padding=1), (2, 16, 8, 8),
                     'winograd_fused', 'mmdyn.kw_winograd_conv'),
    'kwconv_blocks': (lambda: KWConv2d(
        16, 16, 3, padding=1, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
                      (2, 16, 8, 8), 'winograd', 'mmdyn.kw_winograd_conv'),
    'kwconv_1x1': (lambda: KWConv2d(16, 32, 1), (2, 16, 8, 8),
                   'position_major', 'mmdyn.kw_mix_cells'),
}


def build(name):
    torch.manual_seed(0)
    ctor, shape, path, _ = CASES[name]
    layer = ctor().eval()
    layer.impl = path
    with torch.no_grad():  # non-trivial attentions and bias
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer, torch.randn(shape)


@pytest.mark.parametrize('name', sorted(CASES))
def test_compiled_inference_calls_the_mmdyn_operator(name):
    """Fails where a captured graph holds only PyTorch-op paths (no
    ``mmdyn::`` operator)."""
    layer, x = build(name)
    _, _, eager_path, op = CASES[name]
    with torch.no_grad():
        expected = layer.forward_reference(x)
        layer(x)
        assert layer.last_path == eager_path
        backend, targets = recording_backend()
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        out = compiled(x)
        again = compiled(x)
    assert op in mmdyn_ops(targets), targets
    assert layer.last_path == eager_path
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize('path', ['chunked', 'reference'])
def test_compiled_chunked_and_kw_reference(path):
    """The chunked path of ODConv/DyConv (one operator) and KW's reference
    (kernels from ``mmdyn::kw_mix_cells``) under torch.compile."""
    layers = {
        'chunked': [
            ODConv2d(8, 8, 3, padding=1, stride=2),
            DyConv2d(8, 8, 3, padding=1, stride=2)
        ],
        'reference': [KWConv2d(8, 8, 3, padding=1, stride=2)]
    }[path]
    for layer in layers:
        layer.impl = path
    op = {
        'chunked': 'mmdyn.mixture_chunked_conv',
        'reference': 'mmdyn.kw_mix_cells'
    }[path]
    x = torch.randn(3, 8, 9, 9)
    for layer in layers:
        torch.manual_seed(0)
        layer.eval()
        torch._dynamo.reset()
        with torch.no_grad():
            expected = layer.forward_reference(x)
            layer(x)
            eager_path = layer.last_path
            backend, targets = recording_backend()
            out = torch.compile(layer, backend=backend, fullgraph=True)(x)
        assert eager_path in ('chunked', 'reference')
        assert op in mmdyn_ops(targets), (type(layer).__name__, targets)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_packed_cells_are_cut_once():
    """The KW operators reuse the packed warehouse between calls and repack it
    after the cells change."""
    layer, x = build('kwconv_1x1')
    custom_ops.release_packed_cells()
    builds = custom_ops._PACKED.builds
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        assert custom_ops._PACKED.builds == builds + 1
        layer.warehouse_manager.weights[0].mul_(2)
        torch.testing.assert_close(
            compiled(x), layer.forward_reference(x), rtol=1e-4, atol=1e-4)
    assert custom_ops._PACKED.builds == builds + 2


@pytest.mark.parametrize('name', ['odconv_k4', 'kwconv_fused'])
def test_export_and_training_keep_pytorch_ops(name, monkeypatch):
    """torch.export and compiled training: no C loop operator in the graph,
    results equal the reference."""
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', WHOLE_LAYERS)
    layer, x = build(name)
    with torch.no_grad():
        expected = layer.forward_reference(x)
        program = torch.export.export(layer, (x, ))
        torch.testing.assert_close(
            program.module()(x), expected, rtol=1e-4, atol=1e-4)
    exported = {str(n.target) for n in program.graph.nodes}
    assert not any('mmdyn' in t for t in exported), exported
    layer.train()
    backend, targets = recording_backend()
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert not mmdyn_ops(targets), targets
    torch.testing.assert_close(
        out, layer.forward_reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', sorted(CASES))
def test_compiled_inference_runs_the_whole_layer_as_one_operator(
        name, monkeypatch):
    """With ``WHOLE_LAYER_TYPES`` (the default) the graph is the one
    operator: no attention branch to compile; the eager path runs inside
    it."""
    assert {'ODConv2d', 'CondConv2d', 'DyConv2d', 'KWConv2d'} <= \
        set(WHOLE_LAYERS)
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', WHOLE_LAYERS)
    layer, x = build(name)
    with torch.no_grad():
        expected = layer.forward_reference(x)
        backend, targets = recording_backend()
        layer.last_path = None
        out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert [t for t in targets if 'mmdyn' in t] == \
        ['mmdyn.layer_forward.default'], targets
    assert len(targets) == 1, targets
    assert layer.last_path == CASES[name][2]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_compiled_ddf_inference_is_one_operator(monkeypatch):
    from mmdyn.ops import DDFConv2d
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', WHOLE_LAYERS)
    torch.manual_seed(0)
    layer = DDFConv2d(16, 16, 3, stride=2).eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        expected = layer.forward_reference(x)
        backend, targets = recording_backend()
        out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert targets == ['mmdyn.layer_forward.default'], targets
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['odconv_k1', 'dyconv', 'kwconv_1x1'])
def test_compiled_whole_layer_runs_its_hooks_once(name, monkeypatch):
    """A forward pre-hook and hook of the layer run once per compiled call (the
    traced graph calls them; the operator must not call them again), and a pre-
    hook that changes the input changes the operator's input."""
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', WHOLE_LAYERS)
    layer, x = build(name)
    calls = []
    layer.register_forward_pre_hook(lambda mod, args: (calls.append('pre'),
                                                       (args[0] * 2, ))[1])
    layer.register_forward_hook(lambda mod, args, out: calls.append('post'))
    compiled = torch.compile(layer)
    with torch.no_grad():
        compiled(x)
        calls.clear()
        out = compiled(x)
        expected = layer.forward_reference(x * 2)
    assert calls == ['pre', 'post']
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_disable_accel_keeps_the_operators_out(monkeypatch):
    """``MMDYN_DISABLE_ACCEL=1``: no ``mmdyn::`` operator in a compiled
    graph, whole layer or path."""
    from mmdyn.ops import switches
    monkeypatch.setenv(switches.DISABLE_ACCEL, '1')
    for whole in (WHOLE_LAYERS, ()):
        monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', whole)
        torch._dynamo.reset()
        layer, x = build('odconv_k4')
        layer.impl = 'auto'
        with torch.no_grad():
            backend, targets = recording_backend()
            out = torch.compile(layer, backend=backend, fullgraph=True)(x)
            expected = layer.forward_reference(x)
        assert not [t for t in targets if 'mmdyn' in t], targets
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class OneOfEach(nn.Module):
    """An ODConv (one operator for the whole layer), a DyConv and two KW layers
    (their path operators)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            ODConv2d(16, 16, 3, padding=1, kernel_num=1, impl='winograd'),
            DyConv2d(16, 16, 3, padding=1, impl='winograd'),
            KWConv2d(16, 16, 3, padding=1, impl='winograd_fused'),
            KWConv2d(16, 16, 1, impl='position_major'))

    def forward(self, x):
        return self.layers(x)


def test_inductor_runs_the_operators(monkeypatch):
    """One Inductor compile (the default backend): the operators in its
    generated code, the output equal to the reference forwards."""
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setattr(custom_ops, 'WHOLE_LAYER_TYPES', ('ODConv2d', ))
    torch.manual_seed(0)
    model = OneOfEach().eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected = x
        for layer in model.layers:
            expected = layer.forward_reference(expected)
        out, code = run_and_get_code(torch.compile(model), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    source = '\n'.join(code)
    for op in ('layer_forward', 'winograd_conv', 'kw_winograd_conv',
               'kw_mix_cells'):
        assert f'torch.ops.mmdyn.{op}' in source, op
