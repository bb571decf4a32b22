# Copyright (c) mmdyn contributors. All rights reserved.
"""The conv-layer contract of issue 3, for every mmdyn conv layer: built by
mmcv's ``build_conv_layer`` from a registered name, usable as
``ConvModule(conv_cfg=...)`` and as ``dcn=`` of stock mmdet ``ResNet``,
``nn.Conv2d``-compatible attributes and output shapes, trainable at batch size
1, non-contiguous inputs."""
import pytest
import torch
from mmcv.cnn import ConvModule, build_conv_layer
from torch import nn

import mmdyn.models  # noqa: F401  (registers the layers)
from mmdyn.ops import CondConv2d, DDFConv2d, DyConv2d, KWConv2d, ODConv2d

# Every conv layer class of mmdyn.ops that is constructible on its own.
# DDFConv2d is channel-preserving with padding implied by the dilation, so
# the shared cases use C_in == C_out and padding == dilation * (k - 1) / 2.
LAYERS = [ODConv2d, DyConv2d, CondConv2d, KWConv2d, DDFConv2d]
IDS = [cls.__name__ for cls in LAYERS]

# (stride, dilation, input H, W)
GEOMETRIES = [(1, 1, 9, 9), (2, 1, 13, 11), (1, 2, 10, 7), (2, 2, 15, 16),
              (3, 1, 8, 17)]


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_build_conv_layer_matches_nn_conv2d(cls, geometry):
    stride, dilation, h, w = geometry
    layer = build_conv_layer(
        dict(type=cls.__name__),
        16,
        16,
        3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False)
    assert type(layer) is cls
    ref = nn.Conv2d(16, 16, 3, stride, dilation, dilation, bias=False)
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride',
                 'padding', 'dilation', 'groups', 'transposed',
                 'output_padding'):
        assert getattr(layer, attr) == getattr(ref, attr), attr
    assert hasattr(layer, 'init_weights')
    assert hasattr(layer, 'madds_per_sample')
    x = torch.randn(2, 16, h, w)
    assert layer(x).shape == ref(x).shape
    madds = layer.madds_per_sample((h, w))
    assert set(madds) == {'conv', 'att', 'agg', 'scal'}
    assert all(isinstance(v, int) and v >= 0 for v in madds.values())


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
def test_conv_module_batch_one_training(cls):
    module = ConvModule(
        16,
        16,
        3,
        padding=1,
        conv_cfg=dict(type=cls.__name__),
        norm_cfg=dict(type='BN'),
        act_cfg=dict(type='ReLU'))
    assert isinstance(module.conv, cls)
    # bias='auto' gives no bias when a norm follows.
    assert module.conv.bias is None or not module.conv.with_bias
    module.init_weights()
    module.train()
    x = torch.randn(1, 16, 9, 9, requires_grad=True)
    out = module(x)
    assert out.shape == (1, 16, 9, 9)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in module.conv.parameters() if p.requires_grad]
    assert grads and all(
        g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
def test_non_contiguous_input(cls):
    layer = cls(16, 16, 3, stride=2, padding=1, bias=False).eval()
    x = torch.randn(3, 16, 11, 12)
    sliced = torch.randn(3, 32, 11, 12)[:, ::2]
    with torch.no_grad():
        ref = layer(x)
        for xv in (x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert not xv.is_contiguous()
            torch.testing.assert_close(layer(xv), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            layer(sliced), layer(sliced.contiguous()), rtol=1e-5, atol=1e-5)


DCN_KWARGS = {
    'ODConv2d': dict(kernel_num=1),
    'DyConv2d': dict(kernel_num=2),
    'CondConv2d': dict(kernel_num=2),
    'KWConv2d': dict(),
    'DDFConv2d': dict(),
}


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
def test_mmdet_resnet_dcn_slot(cls):
    from mmdet.models.backbones import ResNet
    dcn = dict(type=cls.__name__, **DCN_KWARGS[cls.__name__])
    model = ResNet(
        depth=50,
        base_channels=8,
        num_stages=3,
        strides=(1, 2, 2),
        dilations=(1, 1, 2),  # dilation as in the mmdet DC5 variants
        out_indices=(0, 1, 2),
        dcn=dcn,
        stage_with_dcn=(False, True, True),
        norm_cfg=dict(type='BN', requires_grad=True))
    model.init_weights()
    assert not isinstance(model.layer1[0].conv2, cls)
    for stage in (model.layer2, model.layer3):
        for block in stage:
            assert isinstance(block.conv2, cls)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer3[1].conv2.dilation == (2, 2)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    outs = model(x)
    assert [o.shape[1] for o in outs] == [32, 64, 128]
    assert [o.shape[-1] for o in outs] == [16, 8, 4]
    sum(o.mean() for o in outs).backward()
    grads = [p.grad for p in model.layer3[0].conv2.parameters()]
    assert grads and all(
        g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 33, 47))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
def test_invalid_channels_name_the_argument(cls):
    with pytest.raises(ValueError, match='in_channels|groups'):
        cls(10, 10, 3, padding=1, groups=4)
    with pytest.raises(ValueError, match='in_channels'):
        cls(16, 16, 3, padding=1)(torch.randn(1, 8, 9, 9))


@pytest.mark.parametrize('cls', LAYERS, ids=IDS)
@pytest.mark.parametrize('hw', [(3, 4), (12, 13)], ids=['deep', 'shallow'])
@pytest.mark.parametrize('grad', [False, True], ids=['infer', 'train'])
def test_cpu_bf16_autocast_every_path(cls, hw, grad):
    """Finite and close to fp32 under CPU bf16 autocast on every CPU path
    (small maps: chunked / position-major inference, conv-then-mix and
    position-major training; larger maps: the batched paths)."""
    torch.manual_seed(0)
    layer = cls(16, 16, 3, padding=1, bias=True).eval()
    x = torch.randn(4, 16, *hw)
    with torch.no_grad():
        ref = layer(x)
    with torch.set_grad_enabled(grad), torch.autocast(
            'cpu', dtype=torch.bfloat16):
        x_in = x.clone().requires_grad_(grad)
        out = layer(x_in)
        assert torch.isfinite(out).all()
        if grad:
            out.float().square().mean().backward()
            assert torch.isfinite(x_in.grad).all()
    scale = ref.abs().max().clamp(min=1e-3)
    assert (out.float() - ref).abs().max() / scale < 0.05
