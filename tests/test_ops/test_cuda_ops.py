"""CUDA checks of the conv layers: the same results as on CPU (fp32,
forward and gradients) and finite, close results under fp16/bf16 autocast.

These are the only tests that depend on the machine: they run where
``torch.cuda.is_available()``.
"""
import copy

import pytest
import torch

from mmdyn.ops import (CondConv2d, DDFConv2d, DyConv2d, KWConv2d, ODConv2d,
                       per_sample_conv2d)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device')

LAYERS = {
    'ODConv2d-4x': lambda: ODConv2d(16, 24, 3, padding=1, kernel_num=4),
    'ODConv2d-1x-pointwise': lambda: ODConv2d(16, 24, 1, kernel_num=1),
    'ODConv2d-depthwise': lambda: ODConv2d(
        16, 16, 3, stride=2, padding=1, groups=16),
    'DyConv2d': lambda: DyConv2d(16, 24, 3, padding=1, groups=2),
    'CondConv2d': lambda: CondConv2d(16, 24, 3, stride=2, padding=1),
    'KWConv2d': lambda: KWConv2d(16, 24, 3, padding=1, bias=False),
    'DDFConv2d': lambda: DDFConv2d(16, 16, 3, padding=1),
}


def _randomise(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() <= 1:
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize('name', list(LAYERS))
def test_cuda_matches_cpu_fp32(name):
    cpu = _randomise(LAYERS[name]()).train()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 16, 13, 11)
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    out_c, out_g = cpu(xc), gpu(xg)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(out_c)
    out_c.backward(grad)
    out_g.backward(grad.cuda())
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-3, atol=1e-3)
    for (n, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        assert pg.grad is not None, n
        torch.testing.assert_close(
            pg.grad.cpu(), pc.grad, rtol=1e-3, atol=1e-3, msg=n)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', list(LAYERS))
def test_cuda_autocast_finite_and_close(name, dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    layer = _randomise(LAYERS[name]()).cuda()
    x = torch.randn(2, 16, 15, 16, device='cuda')
    layer.train()
    with torch.autocast('cuda', dtype=dtype):
        out = layer(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    for n, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    layer.eval()
    with torch.no_grad():
        high = layer(x)
        with torch.autocast('cuda', dtype=dtype):
            low = layer(x).float()
    assert (low - high).abs().max() <= 0.05 * high.abs().max()


@pytest.mark.parametrize('name', ['ODConv2d-4x', 'DyConv2d', 'KWConv2d'])
def test_cuda_batch_one_training(name):
    layer = LAYERS[name]().cuda().train()
    x = torch.randn(1, 16, 9, 9, device='cuda', requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cuda_per_sample_impls_agree():
    x = torch.randn(3, 8, 10, 9, device='cuda')
    weight = torch.randn(3, 12, 4, 3, 3, device='cuda')
    bias = torch.randn(3, 12, device='cuda')
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    ref = per_sample_conv2d(x.cpu(), weight.cpu(), bias.cpu(), impl='loop',
                            **kw)
    for impl in ('loop', 'grouped', 'unfold', 'auto'):
        out = per_sample_conv2d(x, weight, bias, impl=impl, **kw)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
