# Copyright (c) mmdyn contributors. All rights reserved.
"""``torch.fx.symbolic_trace`` of each layer built with its default arguments,
alone and inside a model: the traced module runs and matches the eager
reference forward."""
import pytest
import torch
from torch import nn

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       KWLinear, ODConv2d)

#: Layers with default arguments (besides the required sizes).
DEFAULT_LAYERS = {
    'odconv': (lambda: ODConv2d(8, 8, 3), (2, 8, 6, 6)),
    'dyconv': (lambda: DyConv2d(8, 8, 3), (2, 8, 6, 6)),
    'condconv': (lambda: CondConv2d(8, 8, 3), (2, 8, 6, 6)),
    'kwconv': (lambda: KWConv2d(8, 8, 3), (2, 8, 6, 6)),
    'kwlinear': (lambda: KWLinear(8, 8), (2, 8)),
    'ddf': (lambda: DDFConv2d(8, 8), (2, 8, 6, 6)),
    'ddf_up': (lambda: DDFUpsample(8), (2, 8, 5, 5)),
}


def reference(layer, x):
    layer.impl, impl = 'reference', getattr(layer, 'impl', None)
    try:
        return layer(x)
    finally:
        if impl is None:
            del layer.impl
        else:
            layer.impl = impl


@pytest.mark.parametrize('name', sorted(DEFAULT_LAYERS))
def test_symbolic_trace_layer(name):
    torch.manual_seed(0)
    ctor, shape = DEFAULT_LAYERS[name]
    layer = ctor().eval()
    x = torch.randn(shape)
    traced = torch.fx.symbolic_trace(layer)
    with torch.no_grad():
        torch.testing.assert_close(
            traced(x), reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(DEFAULT_LAYERS))
def test_symbolic_trace_in_model(name):
    """Inside a model the layer is a ``call_module`` leaf of the graph (as
    ``nn.Conv2d``), followed by traced ops."""
    torch.manual_seed(0)
    ctor, shape = DEFAULT_LAYERS[name]
    model = nn.Sequential(nn.ReLU(), ctor(), nn.Tanh()).eval()
    x = torch.randn(shape)
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == 'call_module']
    assert targets == ['0', '1', '2']
    with torch.no_grad():
        expected = torch.tanh(reference(model[1], torch.relu(x)))
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
