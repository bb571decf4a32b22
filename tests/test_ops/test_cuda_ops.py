# Copyright (c) mmdyn contributors. All rights reserved.
"""CUDA checks of the conv layers: the same results as on CPU (fp32,
forward and gradients) and finite, close results under fp16/bf16 autocast;
the Triton DDF kernels compiled into ``torch.compile`` graphs, at sizes past
a grid dimension's limit, on a device that is not the current one, and
float64 kept off them.

These are the only tests that depend on the machine: they run where
``torch.cuda.is_available()`` (``tools/gpu_check.sh`` runs them).
"""
import copy

import pytest
import torch

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       ODConv2d, ddf, per_sample_conv2d)
from mmdyn.ops.accel import ddf_triton

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device')

LAYERS = {
    'ODConv2d-4x':
    lambda: ODConv2d(16, 24, 3, padding=1, kernel_num=4),
    'ODConv2d-1x-pointwise':
    lambda: ODConv2d(16, 24, 1, kernel_num=1),
    'ODConv2d-depthwise':
    lambda: ODConv2d(16, 16, 3, stride=2, padding=1, groups=16),
    'DyConv2d':
    lambda: DyConv2d(16, 24, 3, padding=1, groups=2),
    'CondConv2d':
    lambda: CondConv2d(16, 24, 3, stride=2, padding=1),
    'KWConv2d':
    lambda: KWConv2d(16, 24, 3, padding=1, bias=False),
    'DDFConv2d':
    lambda: DDFConv2d(16, 16, 3, padding=1),
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
    ref = per_sample_conv2d(
        x.cpu(), weight.cpu(), bias.cpu(), impl='loop', **kw)
    for impl in ('loop', 'grouped', 'unfold', 'auto'):
        out = per_sample_conv2d(x, weight, bias, impl=impl, **kw)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


needs_triton = pytest.mark.skipif(
    not ddf_triton.TRITON_IMPORTED, reason='triton is not installed')

DDF_LAYERS = {
    'DDFConv2d':
    lambda: DDFConv2d(16, 16, 3, stride=2, head=2, impl='triton'),
    'DDFConv2d-add-k5':
    lambda: DDFConv2d(16, 16, 5, dilation=2, combine='add', impl='triton'),
    'DDFUpsample-guided':
    lambda: DDFUpsample(16, 2, guided=True, head=2, impl='triton'),
}


def _step(layer, inputs):
    """Output and the gradients of every input and parameter."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = layer(*leaves)
    out.square().sum().backward()
    grads = [t.grad for t in leaves] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@needs_triton
@pytest.mark.parametrize('name', list(DDF_LAYERS))
def test_compiled_triton_ddf_matches_eager(name):
    """``torch.compile(fullgraph=True)`` decomposes the Triton operators into
    their kernel launches (on CPU the interpreter keeps them whole):

    forward and every gradient equal eager's.
    """
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = _randomise(DDF_LAYERS[name]()).cuda().train()
    x = torch.randn(2, 16, 20, 18, device='cuda')
    inputs = [x]
    if 'guided' in name:
        inputs.append(torch.randn(2, 16, 40, 36, device='cuda'))
    eager_out, eager_grads = _step(layer, inputs)
    compiled = torch.compile(layer, fullgraph=True)
    (out, grads), code = run_and_get_code(_step, compiled, inputs)
    code = '\n'.join(code)
    # The graphs run the kernels themselves, not the operators whole.
    assert 'forward_kernel' in code and 'grad_input_kernel' in code
    assert 'grad_spatial_filter_kernel' in code
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(eager_grads)
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        assert g is not None and e is not None, i
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=str(i))


@needs_triton
def test_triton_ddf_past_a_grid_dimension_limit():
    """2048x1024 at k=7: 65536 blocks of 32 pixels per plane, one more than
    grid dimension 1 holds."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 2048, 1024, device='cuda')
    cf = torch.randn(1, 2, 7, 7, device='cuda')
    sf = torch.randn(1, 49, 2048, 1024, device='cuda')
    leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
    out = ddf(*leaves, 7, impl='triton')
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, leaves, grad)]
    leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
    out = ddf(*leaves, 7, impl='taps')
    expected = [out, *torch.autograd.grad(out, leaves, grad)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=2e-3)


@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_triton_ddf_runs_on_the_tensor_device():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7, device='cuda:1')
    cf = torch.randn(2, 4, 3, 3, device='cuda:1')
    sf = torch.randn(2, 9, 9, 7, device='cuda:1')
    with torch.cuda.device(0):
        got = ddf(x, cf, sf, 3, impl='triton')
    torch.testing.assert_close(got, ddf(x, cf, sf, 3, impl='taps'))


def test_float64_on_cuda_is_exact():
    """Impl='auto' keeps float64 off the float32 Triton kernels."""
    torch.manual_seed(0)
    args = [
        torch.randn(
            1, 2, 6, 5, dtype=torch.float64, device='cuda',
            requires_grad=True),
        torch.randn(
            1, 2, 3, 3, dtype=torch.float64, device='cuda',
            requires_grad=True),
        torch.randn(
            1, 9, 6, 5, dtype=torch.float64, device='cuda', requires_grad=True)
    ]
    assert torch.autograd.gradcheck(lambda *a: ddf(*a, 3, impl='auto'), args)
