# Copyright (c) mmdyn contributors. All rights reserved.
"""Small models of each backbone family and the DDF-Up FPN neck under
``torch.compile(fullgraph=True, backend='aot_eager')`` (train: forward and
gradients; eval: forward), and the ResNet-50 backbones through
``torch.export``: equal to the eager reference forward."""
import pytest
import torch

from mmdyn.models.backbones import (DDFResNet, DynamicMobileNetV2,
                                    DynamicResNet, KWConvNeXt, KWMobileNetV2,
                                    KWResNet)
from mmdyn.models.necks import DDFUpFPN

OD1 = dict(type='ODConv2d', kernel_num=1, reduction=0.0625)


def first_blocks(mobilenet, stages=2):
    """A MobileNetV2 cut after its first ``stages`` stages (compile time grows
    with the number of layers, not with their width)."""
    mobilenet.layers = mobilenet.layers[:stages]
    mobilenet.out_indices = (stages - 1, )
    return mobilenet


#: name -> (constructor, input shapes)
MODELS = {
    'dynamic_resnet18': (lambda: DynamicResNet(
        18,
        stem_channels=8,
        base_channels=8,
        dyconv_cfg=OD1,
        num_stages=2,
        strides=(1, 2),
        dilations=(1, 1),
        out_indices=(1, )), [(2, 3, 32, 32)]),
    'dynamic_mobilenet_v2': (lambda: first_blocks(
        DynamicMobileNetV2(
            widen_factor=0.25, dyconv_cfg=dict(type='DyConv2d'))), [(2, 3, 32,
                                                                     32)]),
    'ddf_resnet50': (lambda: DDFResNet(
        50,
        stem_channels=8,
        base_channels=4,
        num_stages=1,
        strides=(1, ),
        dilations=(1, ),
        out_indices=(0, )), [(2, 3, 32, 32)]),
    'kw_resnet18': (lambda: KWResNet(
        18,
        base_channels=8,
        num_stages=2,
        strides=(1, 2),
        dilations=(1, 1),
        out_indices=(1, )), [(2, 3, 32, 32)]),
    'kw_mobilenet_v2':
    (lambda: first_blocks(KWMobileNetV2(widen_factor=0.25)), [(2, 3, 32, 32)]),
    'kw_convnext':
    (lambda: KWConvNeXt(arch=dict(depths=[1, 1], channels=[16, 32])),
     [(2, 3, 32, 32)]),
    'ddf_up_fpn':
    (lambda: DDFUpFPN(in_channels=[8, 16], out_channels=8, num_outs=2),
     [(2, 8, 8, 8), (2, 16, 4, 4)]),
}


def reference(model, inputs):
    saved = {}
    for m in model.modules():
        if hasattr(m, 'impl'):
            saved[m] = m.impl
            m.impl = 'reference'
    try:
        return model(*inputs)
    finally:
        for m, impl in saved.items():
            m.impl = impl


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def build(name):
    """The model and its inputs in float64: batch-statistics BN of a batch
    of 2 amplifies float32 reordering, which would hide a real error."""
    torch.manual_seed(0)
    ctor, shapes = MODELS[name]
    model = ctor().double()
    inputs = tuple(torch.randn(s, dtype=torch.float64) for s in shapes)
    return model, (inputs, ) if name == 'ddf_up_fpn' else inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(MODELS))
def test_compile_fullgraph_model(name):
    model, inputs = build(name)
    model.train()
    expected = flat(reference(model, inputs))
    sum(t.square().sum() for t in expected).backward()
    grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad()
    # BN running statistics: the compiled run starts from the same ones.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    out = flat(compiled(*inputs))
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    sum(t.square().sum() for t in out).backward()
    params = dict(model.named_parameters())
    for n, grad in grads.items():
        torch.testing.assert_close(
            params[n].grad,
            grad,
            rtol=1e-5,
            atol=1e-7,
            msg=lambda m: f'{n}: {m}')
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        expected = flat(reference(model, inputs))
        for a, b in zip(flat(compiled(*inputs)), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


#: The ResNet-50 backbones of the issue, through torch.export.
RESNET50 = {
    'odconv1x_resnet50': lambda: DynamicResNet(50, dyconv_cfg=OD1),
    'kw1x_resnet50': lambda: KWResNet(50),
    'ddf_resnet50': lambda: DDFResNet(50),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(RESNET50))
def test_export_resnet50(name):
    """The exported program of the eval-mode backbone runs and matches the
    eager reference forward."""
    torch.manual_seed(0)
    model = RESNET50[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = flat(reference(model, (x, )))
    program = torch.export.export(model, (x, ))
    with torch.no_grad():
        out = flat(program.module()(x))
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
