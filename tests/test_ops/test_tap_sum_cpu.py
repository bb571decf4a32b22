# Copyright (c) mmdyn contributors. All rights reserved.
"""ODConv's C tap sum and its backward, used by ``tap_gemm`` on CPU.

The loops against a per-element Python sum (and autograd of it); the layer
with them against its ``forward_reference`` in inference and training, one
sample per chunk, with the switch off, and under autocast, where they must
not run.
"""
import copy

import pytest
import torch
from test_dyconv import randomise

from mmdyn.ops import ODConv2d, switches
from mmdyn.ops.accel import tap_sum_cpu
from mmdyn.ops.accel.thresholds import THRESHOLDS

pytestmark = pytest.mark.skipif(
    tap_sum_cpu.load() is None, reason='no C compiler for the tap sum')


def _naive_tap_sum(z, taps, scale, bias, out_shape):
    """``out[b, o, i, j]`` summed element by element in float64."""
    batch, channels, h_out, w_out = out_shape
    z, scale = z.double().flatten(), scale.double()
    out = torch.zeros(out_shape, dtype=torch.float64)
    for b in range(batch):
        for i in range(h_out):
            for j in range(w_out):
                for base, pix, h, w, q_y, q_x, s in taps.tolist():
                    y, x = i + q_y, j + q_x
                    if 0 <= y < h and 0 <= x < w:
                        start = base + ((b * h + y) * w + x) * pix
                        out[b, :, i, j] += scale[b, s] * \
                            z[start:start + channels]
    if bias is not None:
        out += bias.double()[:, None, None]
    return out


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('with_bias', [False, True])
def test_the_loop_matches_a_per_element_sum(dtype, with_bias):
    """Two sub-images of different sizes in one buffer, taps reading past every
    border and one reading nothing, a shared scale row."""
    torch.manual_seed(0)
    batch, channels, h_out, w_out = 2, 5, 4, 3
    # Sub-image 0: 4x3 pixels, 2 taps; sub-image 1: 3x5 pixels, 1 tap.
    size0 = batch * 4 * 3 * 2 * channels
    z = torch.randn(size0 + batch * 3 * 5 * channels, dtype=dtype)
    taps = torch.tensor([[0, 2 * channels, 4, 3, -1, 1, 0],
                         [channels, 2 * channels, 4, 3, 1, -1, 2],
                         [size0, channels, 3, 5, 0, 2, 1],
                         [size0, channels, 3, 5, 9, 0, 1]],
                        dtype=torch.int64)
    scale = torch.randn(batch, 3, channels, dtype=dtype)
    bias = torch.randn(channels, dtype=dtype) if with_bias else None
    out = torch.full((batch, channels, h_out, w_out),
                     float('nan'),
                     dtype=dtype)
    tap_sum_cpu.tap_sum(tap_sum_cpu.load(), z, taps, scale, bias, out)
    want = _naive_tap_sum(z, taps, scale, bias, out.shape)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_the_loop_rejects_bad_arguments():
    lib = tap_sum_cpu.load()
    out = torch.empty(1, 2, 3, 3)
    taps = torch.zeros(1, tap_sum_cpu.TAP_FIELDS, dtype=torch.int64)
    scale = torch.ones(1, 1, 2)
    with pytest.raises(ValueError, match='one dtype'):
        tap_sum_cpu.tap_sum(lib, torch.zeros(18, dtype=torch.float64), taps,
                            scale, None, out)
    with pytest.raises(ValueError, match='int64'):
        tap_sum_cpu.tap_sum(lib, torch.zeros(18), taps.int(), scale, None, out)
    with pytest.raises(ValueError, match='does not match'):
        tap_sum_cpu.tap_sum(lib, torch.zeros(18), taps, torch.ones(1, 1, 3),
                            None, out)


def _layer(stride, dilation, bias, seed=0):
    torch.manual_seed(seed)
    return randomise(
        ODConv2d(
            7,
            6,
            3,
            stride,
            dilation,
            dilation,
            bias=bias,
            kernel_num=1,
            impl='tap_gemm')).eval()


def _spy(monkeypatch, name='tap_sum'):
    """The output shapes (the gradient's, for the backward) of every call of
    ``tap_sum_cpu.<name>``."""
    calls = []
    real = getattr(tap_sum_cpu, name)

    def counting(*args):
        calls.append(args[-1 if name == 'tap_sum' else 4].shape)
        return real(*args)

    monkeypatch.setattr(tap_sum_cpu, name, counting)
    return calls


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('stride,dilation', [(1, 1), (1, 2), (2, 1)])
def test_layer_one_sample_per_chunk(monkeypatch, stride, dilation, dtype):
    """A buffer too small for one sample: one chunk (one C call) per sample,
    the same result as the reference."""
    layer = _layer(stride, dilation, bias=True).to(dtype)
    x = torch.randn(3, 7, 9, 8, dtype=dtype)
    calls = _spy(monkeypatch)
    monkeypatch.setitem(THRESHOLDS['odconv'], 'tap_gemm_chunk_bytes', 1)
    with torch.no_grad():
        out = layer(x)
        want = layer.forward_reference(x)
    assert layer.last_path == 'tap_gemm' and len(calls) == 3
    assert all(shape[0] == 1 for shape in calls)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_layer_without_the_loop(monkeypatch):
    """``MMDYN_TAP_SUM_CPU_KERNEL=0``: the PyTorch-ops sum, same result, the
    loop not called."""
    layer = _layer(1, 1, bias=True)
    x = torch.randn(2, 7, 6, 6)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        with_loop = layer(x)
        monkeypatch.setenv(switches.TAP_SUM_CPU_KERNEL, '0')
        without = layer(x)
        want = layer.forward_reference(x)
    assert len(calls) == 1
    torch.testing.assert_close(with_loop, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without, want, rtol=1e-5, atol=1e-5)


def test_layer_under_autocast_leaves_the_loops(monkeypatch):
    layer = _layer(1, 1, bias=False)
    x = torch.randn(2, 7, 6, 6)
    calls = _spy(monkeypatch)
    backward_calls = _spy(monkeypatch, 'tap_sum_backward')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            layer(x)
        copy.deepcopy(layer).train()(x).float().sum().backward()
    assert calls == [] and backward_calls == []


@pytest.mark.parametrize('stride,dilation', [(1, 1), (1, 2), (2, 1)])
def test_training_with_the_loops(monkeypatch, stride, dilation):
    """Training in float64, one sample per chunk: the forward and backward
    loops run, the output and every gradient (input, kernel, bias, attentions)
    equal the reference's."""
    layer = _layer(stride, dilation, bias=True).double().train()
    reference = copy.deepcopy(layer)
    calls = _spy(monkeypatch)
    backward_calls = _spy(monkeypatch, 'tap_sum_backward')
    monkeypatch.setitem(THRESHOLDS['odconv'], 'tap_gemm_chunk_bytes', 1)
    x = torch.randn(3, 7, 9, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, want = layer(x), reference.forward_reference(x_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    assert layer.last_path == 'tap_gemm'
    assert len(calls) == 3 and len(backward_calls) >= 3
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    params = dict(reference.named_parameters())
    for name, param in layer.named_parameters():
        torch.testing.assert_close(
            param.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_the_backward_loop_matches_autograd_of_a_per_element_sum():
    """One sub-image, taps reading past every border: the maps' and the scale's
    gradients against autograd of :func:`_naive_tap_sum`."""
    torch.manual_seed(1)
    batch, channels, h, w, h_out, w_out = 2, 5, 4, 3, 3, 4
    taps = [(0, -1, 1, 0), (channels, 1, -1, 2), (2 * channels, 0, 0, 2)]
    pixel = len(taps) * channels
    z = torch.randn(
        batch, h, w, pixel, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(
        batch, 3, channels, dtype=torch.float64, requires_grad=True)
    table = torch.tensor([(base, pixel, h, w, q_y, q_x, s)
                          for base, q_y, q_x, s in taps])
    out = _naive_tap_sum(z, table, scale, None,
                         (batch, channels, h_out, w_out))
    grad = torch.randn_like(out)
    want_z, want_scale = torch.autograd.grad(out, (z, scale), grad)
    grad_z = torch.full_like(z, float('nan'))
    grad_scale = torch.zeros_like(scale)
    tap_sum_cpu.tap_sum_backward(tap_sum_cpu.load(), z.detach(),
                                 torch.tensor(taps), scale.detach(),
                                 grad.permute(0, 2, 3, 1).contiguous(), grad_z,
                                 grad_scale)
    torch.testing.assert_close(grad_z, want_z)
    torch.testing.assert_close(grad_scale, want_scale)
    # Without the maps: the maps' gradient only.
    grad_z.fill_(float('nan'))
    tap_sum_cpu.tap_sum_backward(tap_sum_cpu.load(), None, torch.tensor(taps),
                                 scale.detach(),
                                 grad.permute(0, 2, 3, 1).contiguous(), grad_z,
                                 None)
    torch.testing.assert_close(grad_z, want_z)


def test_switch_turned_off_between_forward_and_backward(monkeypatch):
    """The backward uses the library its forward used."""
    layer = _layer(1, 1, bias=True).train()
    x = torch.randn(2, 7, 6, 6, requires_grad=True)
    out = layer(x)
    monkeypatch.setenv(switches.TAP_SUM_CPU_KERNEL, '0')
    out.sum().backward()
    want, = torch.autograd.grad(layer.forward_reference(x).sum(), x)
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_layer_when_every_tap_reads_padding_only(train):
    """Stride 2, dilation 2, padding 1, a 1x1 map: every residue class is
    empty, the output is the bias (and the gradients those of the
    reference)."""
    torch.manual_seed(0)
    layer = randomise(
        ODConv2d(5, 4, 2, 2, 1, 2, bias=True, kernel_num=1,
                 impl='tap_gemm')).double().train(train)
    x = torch.randn(2, 5, 1, 1, dtype=torch.float64, requires_grad=train)
    with torch.set_grad_enabled(train):
        out = layer(x)
        want = copy.deepcopy(layer).forward_reference(x)
    torch.testing.assert_close(out, want)
    if train:
        grad, = torch.autograd.grad(out.sum(), x)
        want_grad, = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize('threads', [2, 3])
def test_loops_on_several_threads(monkeypatch, threads):
    """One OpenMP thread per element of work, so that every call splits its
    rows between threads: the results equal the reference's, and the
    scale's gradient (summed per thread, then added up) is the same, bit for
    bit, on a second run."""
    monkeypatch.setitem(THRESHOLDS['c_loops'], 'work_per_thread', 1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = _layer(1, 1, bias=True).double().train()
        reference = copy.deepcopy(layer)
        x = torch.randn(3, 7, 9, 8, dtype=torch.float64)
        grads = []
        for _ in range(2):
            layer.zero_grad()
            layer(x).square().sum().backward()
            grads.append(
                [p.grad.clone() for p in layer.attention.parameters()])
        reference.forward_reference(x).square().sum().backward()
        for got, again, want in zip(grads[0], grads[1],
                                    reference.attention.parameters()):
            assert torch.equal(got, again)
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        layer.eval()  # its attention's running statistics, not the copy's
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x),
                copy.deepcopy(layer).forward_reference(x),
                rtol=1e-12,
                atol=1e-12)
    finally:
        torch.set_num_threads(saved)


def test_tables_that_read_outside_are_refused():
    lib = tap_sum_cpu.load()
    out = torch.empty(1, 2, 3, 3)
    scale = torch.ones(1, 2, 2)
    z = torch.zeros(3 * 3 * 2)
    for row in [(1, 2, 3, 3, 0, 0, 0), (0, 2, 3, 3, 0, 0, 2),
                (0, 1, 3, 3, 0, 0, 0), (0, 2, 4, 3, 0, 0, 0)]:
        with pytest.raises(ValueError, match='reads outside'):
            tap_sum_cpu.tap_sum(lib, z, torch.tensor([row]), scale, None, out)
    grad = torch.zeros(1, 3, 3, 2)
    grad_z = torch.zeros(1, 3, 3, 2)
    for row in [(1, 0, 0, 0), (0, 0, 0, 2), (-1, 0, 0, 0)]:
        with pytest.raises(ValueError, match='reads outside'):
            tap_sum_cpu.tap_sum_backward(lib, None, torch.tensor([row]), scale,
                                         grad, grad_z, None)
