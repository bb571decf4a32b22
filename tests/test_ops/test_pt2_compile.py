# Copyright (c) mmdyn contributors. All rights reserved.
"""The layers under ``torch.compile`` and ``torch.export``: results equal to
eager (the independent reference being each layer's ``forward_reference`` run
eagerly, or the eager gradients).

Tiny layers and inputs: a compile costs about a second per layer here.
"""
import pytest
import torch
from torch import nn

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       KWLinear, ODConv2d, WarehouseManager)
from mmdyn.ops.capture import graph_capture


class SharedKW(nn.Module):
    """Two KW layers sharing one warehouse (a shared manager)."""

    def __init__(self):
        super().__init__()
        manager = WarehouseManager()
        self.conv1 = manager.reserve('stage0_layer0_conv0', 8, 8, 3, padding=1)
        self.conv2 = manager.reserve('stage0_layer1_conv0', 8, 8, 3, padding=1)
        self.warehouse_manager = manager
        manager.finalize(self)

    def forward(self, x):
        return self.conv2(self.conv1(x).relu())


class SharedKWLinear(nn.Module):
    """Two KWLinear layers of one manager."""

    def __init__(self):
        super().__init__()
        manager = WarehouseManager()
        self.fc1 = manager.reserve(
            'stage0_layer0_fc0', 8, 8, layer_type='linear')
        self.fc2 = manager.reserve(
            'stage0_layer1_fc0', 8, 8, layer_type='linear')
        self.warehouse_manager = manager
        manager.finalize(self)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


#: name -> (constructor, input shape): the layers issue-listed variants.
LAYERS = {
    'odconv_k1':
    (lambda: ODConv2d(8, 8, 3, padding=1, kernel_num=1), (2, 8, 6, 6)),
    'odconv_k4':
    (lambda: ODConv2d(8, 8, 3, padding=1, kernel_num=4), (2, 8, 6, 6)),
    'odconv_depthwise':
    (lambda: ODConv2d(8, 8, 3, padding=1, groups=8), (2, 8, 6, 6)),
    'odconv_pointwise': (lambda: ODConv2d(8, 16, 1), (2, 8, 6, 6)),
    'dyconv': (lambda: DyConv2d(8, 8, 3, padding=1), (2, 8, 6, 6)),
    'condconv': (lambda: CondConv2d(8, 8, 3, padding=1), (2, 8, 6, 6)),
    'kwconv_private': (lambda: KWConv2d(8, 8, 3, padding=1), (2, 8, 6, 6)),
    'kwconv_shared': (SharedKW, (2, 8, 6, 6)),
    'kwlinear_private': (lambda: KWLinear(8, 8), (2, 8)),
    'kwlinear_shared': (SharedKWLinear, (2, 8)),
    'ddf_mul': (lambda: DDFConv2d(8, 8, 3), (2, 8, 6, 6)),
    'ddf_add_stride2':
    (lambda: DDFConv2d(8, 8, 3, stride=2, combine='add'), (2, 8, 7, 7)),
    'ddf_up': (lambda: DDFUpsample(8), (2, 8, 5, 5)),
    'ddf_up_guided': (lambda: DDFUpsample(8, guided=True, guide_channels=4),
                      (2, 8, 5, 5)),
}


def build(name):
    torch.manual_seed(0)
    ctor, shape = LAYERS[name]
    layer = ctor()
    inputs = (torch.randn(shape), )
    if name == 'ddf_up_guided':
        inputs += (torch.randn(2, 4, 10, 10), )
    return layer, inputs


def reference(module, inputs):
    """Eager forward with every layer on its reference path."""
    saved = {}
    for m in module.modules():
        if hasattr(m, 'impl'):
            saved[m] = m.impl
            m.impl = 'reference'
    try:
        return module(*inputs)
    finally:
        for m, impl in saved.items():
            m.impl = impl


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_kw_eval_compiled_matches_eager():
    """KWConv2d in eval under torch.compile (graph breaks allowed): the C cell
    product used to receive data pointers of tensors TorchDynamo had already
    freed (NaN or errors of 1e34, not an exception)."""
    torch.manual_seed(0)
    layer = KWConv2d(128, 128, 3, padding=1).eval()
    x = torch.randn(2, 128, 16, 16)
    compiled = torch.compile(layer, backend='eager')
    with torch.no_grad():
        expected = reference(layer, (x, ))
        for _ in range(3):
            torch.testing.assert_close(
                compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_kwlinear_eval_compiled_matches_eager():
    torch.manual_seed(0)
    layer = KWLinear(256, 256).eval()
    x = torch.randn(2, 256)
    compiled = torch.compile(layer, backend='eager')
    with torch.no_grad():
        expected = reference(layer, (x, ))
        for _ in range(3):
            torch.testing.assert_close(
                compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_graph_capture_predicate():
    """One predicate: true inside torch.compile, torch.export and fx
    tracing, false in eager."""
    seen = []

    def probe(x):
        seen.append(graph_capture())
        return x + 1

    class Probe(nn.Module):

        def forward(self, x):
            return probe(x)

    x = torch.randn(2)
    probe(x)
    torch.compile(probe, backend='eager', fullgraph=True)(x)
    torch.export.export(Probe(), (x, ))
    torch.fx.symbolic_trace(Probe())
    assert seen[0] is False
    assert all(seen[1:]) and len(seen) >= 4


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_compile_fullgraph_train_and_eval(name):
    """fullgraph aot_eager: forward and all gradients in train mode, the
    forward in eval, equal to eager."""
    layer, inputs = build(name)
    layer.train()
    expected = reference(layer, inputs)
    expected.square().sum().backward()
    grads = {
        n: p.grad.clone()
        for n, p in layer.named_parameters() if p.grad is not None
    }
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    out = compiled(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert grads
    for n, grad in grads.items():
        torch.testing.assert_close(
            dict(layer.named_parameters())[n].grad,
            grad,
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f'{n}: {m}')
    layer.eval()
    with torch.no_grad():
        expected = reference(layer, inputs)
        torch.testing.assert_close(
            compiled(*inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_export_eval(name):
    """torch.export in eval: the exported program runs and matches, also at
    another batch size when the batch is marked dynamic."""
    layer, inputs = build(name)
    layer.eval()
    with torch.no_grad():
        expected = reference(layer, inputs)
    program = torch.export.export(layer, inputs)
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(*inputs), expected, rtol=1e-4, atol=1e-5)


class OneOfEach(nn.Module):
    """One layer of each method in a chain (one Inductor compile)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            ODConv2d(8, 8, 3, padding=1), DyConv2d(8, 8, 3, padding=1),
            KWConv2d(8, 8, 3, padding=1), DDFConv2d(8, 8, 3), DDFUpsample(8))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.slow
def test_inductor_eval():
    """The default backend (Inductor) on a layer of each method."""
    torch.manual_seed(0)
    model = OneOfEach().eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = reference(model, (x, ))
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['ddf_mul', 'ddf_up'])
def test_compiled_ddf_keeps_the_c_loops(name):
    """Under torch.compile DDF and DDF-Up run the fused C loops as the
    mmdyn::ddf custom operator (in the graph, with its backward)."""
    from mmdyn.ops.accel import ddf_cpu
    if ddf_cpu.load() is None:
        pytest.skip('the C loops need a C compiler')
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm

    layer, inputs = build(name)
    expected = reference(layer, inputs)
    out = torch.compile(layer, fullgraph=True, backend=recording)(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert 'torch.ops.mmdyn.ddf' in graphs[0].code
