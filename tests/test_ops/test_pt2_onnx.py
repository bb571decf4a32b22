# Copyright (c) mmdyn contributors. All rights reserved.
"""Each layer through both ONNX exporters (the TorchScript-based one and
``dynamo=True``), with a dynamic batch: onnxruntime equals PyTorch's eager
reference forward at batch 1 and 3."""
import pytest
import torch
from torch import nn

pytest.importorskip('onnxruntime', reason='pip install onnx onnxruntime')

from mmdyn.analysis.onnx_export import compare_with_onnxruntime  # noqa
from mmdyn.analysis.onnx_export import export_onnx
from mmdyn.ops import DyConv2d  # noqa
from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, KWConv2d, KWLinear,
                       ODConv2d)


class Probe(nn.Module):
    """A 3-channel input into the layer (the exporter's input contract):

    ``[B, 3, H, W]`` -> a 1x1 conv to 8 channels -> the layer.
    """

    def __init__(self, layer, tokens=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.layer = layer
        self.tokens = tokens

    def forward(self, x):
        x = self.stem(x)
        if self.tokens:  # KWLinear: [B, H*W, C] tokens
            return self.layer(x.flatten(2).transpose(1, 2))
        return self.layer(x)


LAYERS = {
    'odconv': lambda: ODConv2d(8, 8, 3, padding=1),
    'dyconv': lambda: DyConv2d(8, 8, 3, padding=1),
    'condconv': lambda: CondConv2d(8, 8, 3, padding=1),
    'kwconv': lambda: KWConv2d(8, 8, 3, padding=1),
    'kwlinear': lambda: KWLinear(8, 8),
    'ddf': lambda: DDFConv2d(8, 8, 3),
    'ddf_up': lambda: DDFUpsample(8),
}


def reference_outputs(model):
    """A forward with every layer on its reference path (the independent
    expected value, as ``compare_with_onnxruntime`` calls it)."""

    class Reference(nn.Module):

        def forward(self, x):
            saved = model.layer.impl if hasattr(model.layer, 'impl') \
                else None
            if saved is not None:
                model.layer.impl = 'reference'
            try:
                return model(x)
            finally:
                if saved is not None:
                    model.layer.impl = saved

    return Reference()


@pytest.mark.parametrize(
    'dynamo', [False, True], ids=['torchscript', 'dynamo'])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_onnx_dynamic_batch(name, dynamo, tmp_path):
    if dynamo:
        pytest.importorskip('onnxscript', reason='pip install onnxscript')
    torch.manual_seed(0)
    model = Probe(LAYERS[name](), tokens=name == 'kwlinear').eval()
    path = str(tmp_path / f'{name}.onnx')
    export_onnx(model, path, (6, 6), dynamic_batch=True, dynamo=dynamo)
    results = compare_with_onnxruntime(
        reference_outputs(model), path, (6, 6), batch_sizes=(1, 3))
    assert [b for b, _ in results] == [1, 3]
    for batch, diff in results:
        assert diff < 1e-4, f'batch {batch}: max difference {diff}'
