# Copyright (c) mmdyn contributors. All rights reserved.
"""Compiled training keeps the per-sample conv a conv: no im2col columns.

Under ``torch.compile`` a layer's per-sample conv must not become im2col +
matmul, whose columns (``kh * kw`` times the input) are kept for the
backward. The forward and backward graphs AOTAutograd builds for a training
step are inspected through the fake tensors on their nodes
(:func:`~mmdyn.analysis.memory.largest_graph_tensors`): no node may compute
a tensor of im2col size. Results equal eager (output and every gradient).

Graphs that must hold for any batch (TorchScript tracing, ONNX export)
keep the batch-independent im2col form: test_per_sample_conv.py and
test_pt2_onnx.py.
"""
import pytest
import torch
import torch._dynamo

from mmdyn.analysis.memory import largest_graph_tensors
from mmdyn.ops import DyConv2d, KWConv2d, ODConv2d
from mmdyn.ops.per_sample_conv import per_sample_conv2d

BATCH, CHANNELS, SIZE = 4, 8, 12
#: Elements of the im2col columns of a 3x3 stride-1 conv of the input.
IM2COL = BATCH * CHANNELS * 9 * SIZE * SIZE


class PerSampleConv(torch.nn.Module):
    """``per_sample_conv2d`` (``impl='auto'``) with a learnt kernel bank mixed
    per sample."""

    def __init__(self):
        super().__init__()
        self.bank = torch.nn.Parameter(
            torch.randn(BATCH, CHANNELS, CHANNELS, 3, 3) * 0.1)

    def forward(self, x):
        return per_sample_conv2d(x, self.bank * 1.5, None, padding=(1, 1))


LAYERS = {
    'per_sample_conv2d':
    PerSampleConv,
    'odconv_k4':
    lambda: ODConv2d(CHANNELS, CHANNELS, 3, padding=1),
    'odconv_k1':
    lambda: ODConv2d(CHANNELS, CHANNELS, 3, padding=1, kernel_num=1),
    'odconv_depthwise':
    lambda: ODConv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS),
    'dyconv':
    lambda: DyConv2d(CHANNELS, CHANNELS, 3, padding=1),
    'kwconv':
    lambda: KWConv2d(CHANNELS, CHANNELS, 3, padding=1),
}


def _step(model, forward, x):
    out = forward(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad.clone(), {
        n: p.grad.clone()
        for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_compiled_training_step_has_no_im2col(name):
    torch.manual_seed(0)
    model = LAYERS[name]().train()
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)

    expected = _step(model, model, x.clone().requires_grad_())
    model.zero_grad()

    torch._dynamo.reset()
    backend, record = largest_graph_tensors()
    compiled = torch.compile(model, backend=backend)
    got = _step(model, compiled, x.clone().requires_grad_())

    assert record.forward and record.backward, record.describe()
    # The input, the output and the per-sample kernels are each at most
    # 1/9 of the columns; im2col would be exactly IM2COL elements.
    assert record.largest < IM2COL // 4, (
        f'a graph computes a tensor of {record.largest} elements (im2col: '
        f'{IM2COL}): {record.describe()}')

    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    assert got[2].keys() == expected[2].keys()
    for n in expected[2]:
        torch.testing.assert_close(
            got[2][n],
            expected[2][n],
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f'{n}: {m}')


def test_recording_backend_sees_im2col():
    """The counter can fail: the batch-independent im2col form, compiled,
    shows a tensor of exactly the columns' size."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, requires_grad=True)
    weight = torch.randn(BATCH, CHANNELS, CHANNELS, 3, 3, requires_grad=True)
    torch._dynamo.reset()
    backend, record = largest_graph_tensors()
    fn = torch.compile(
        lambda a, w: per_sample_conv2d(
            a, w, None, padding=(1, 1), impl='unfold'),
        backend=backend)
    fn(x, weight).sum().backward()
    assert record.largest >= IM2COL, record.describe()


def test_grouped_form_compiles_with_a_symbolic_batch():
    """The form ``'auto'`` takes under ``torch.compile`` on CUDA, the batch
    folded into the groups, compiles with a dynamic batch (``groups`` a
    symbolic multiple of it) and matches a loop of plain convs at two batch
    sizes, gradients included, without im2col columns."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    backend, record = largest_graph_tensors()
    fn = torch.compile(
        lambda a, w: per_sample_conv2d(
            a, w, None, padding=(1, 1), impl='grouped'),
        backend=backend,
        dynamic=True)
    for batch in (3, 5):
        x = torch.randn(batch, CHANNELS, SIZE, SIZE, requires_grad=True)
        weight = torch.randn(
            batch, CHANNELS, CHANNELS, 3, 3, requires_grad=True)
        out = fn(x, weight)
        grads = torch.autograd.grad(out.square().sum(), (x, weight))
        expected = torch.cat([
            torch.nn.functional.conv2d(x[b:b + 1], weight[b], padding=1)
            for b in range(batch)
        ])
        want = torch.autograd.grad(expected.square().sum(), (x, weight))
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    im2col = 5 * CHANNELS * 9 * SIZE * SIZE
    assert 0 < record.largest < im2col // 4, record.describe()
