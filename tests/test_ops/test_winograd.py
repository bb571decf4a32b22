# Copyright (c) mmdyn contributors. All rights reserved.
"""Winograd F(2x2, 3x3) per-sample convolution against independent
references: a loop of F.conv2d over per-sample kernels built by an explicit
sum, and the transformed kernel written out entry by entry from the
F(2x2, 3x3) matrix G."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmdyn.ops.accel import winograd
from mmdyn.ops.accel.paths import THRESHOLDS, uses_winograd
from mmdyn.ops.accel.winograd import (winograd_kernels,
                                      winograd_kernels_reference,
                                      winograd_per_sample_conv2d)


@pytest.fixture(params=[1, 2], ids=['1thread', '2threads'])
def c_threads(request):
    """Run a C-loop test on one and on two OpenMP threads (the loops split work
    of more than 4096 elements per thread, so the larger cases really use
    both)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


G = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]


def sample_kernels(bank, mix, spatial, batch):
    """W_b = spatial[b] * sum_k mix[b, k] * bank[k], by a Python loop."""
    out = []
    for b in range(batch):
        w = torch.zeros_like(bank[0])
        for k in range(bank.shape[0]):
            w += (1.0 if mix is None else float(mix[b, k])) * bank[k]
        if spatial is not None:
            w = w * spatial[b].view(3, 3)
        out.append(w)
    return out


def loop_conv(x, kernels, padding):
    return torch.cat([
        F.conv2d(x[b:b + 1], kernels[b], padding=padding)
        for b in range(x.shape[0])
    ])


def inputs(batch, num, c_in, c_out, with_mix=True, with_spatial=True):
    bank = torch.randn(num, c_out, c_in, 3, 3)
    mix = torch.softmax(torch.randn(batch, num), 1) if with_mix else None
    spatial = torch.rand(batch, 9) if with_spatial else None
    return bank, mix, spatial


@pytest.mark.parametrize('num,with_mix,with_spatial', [(4, True, True),
                                                       (3, True, False),
                                                       (1, False, True),
                                                       (1, True, False)])
def test_transformed_kernels_entry_by_entry(num, with_mix, with_spatial,
                                            c_threads):
    """U[b, 4u+v, o, i] = sum_{r,c} G[u][r] G[v][c] W_b[o, i, r, c], for the C
    loop and the PyTorch reference."""
    batch = 3
    bank, mix, spatial = inputs(batch, num, 5, 7, with_mix, with_spatial)
    weights = sample_kernels(bank, mix, spatial, batch)
    expected = torch.zeros(batch, 16, 7, 5)
    for b in range(batch):
        for u in range(4):
            for v in range(4):
                for r in range(3):
                    for c in range(3):
                        expected[b, 4 * u + v] += (
                            G[u][r] * G[v][c] * weights[b][:, :, r, c])
    torch.testing.assert_close(
        winograd_kernels_reference(bank, mix, spatial),
        expected,
        rtol=1e-5,
        atol=1e-5)
    torch.testing.assert_close(
        winograd_kernels(bank, mix, spatial), expected, rtol=1e-5, atol=1e-5)


def test_transformed_kernels_many_chunks_of_the_c_loop(c_threads):
    """More kernels than one block of the C loop (512), not a multiple."""
    bank, mix, spatial = inputs(2, 2, 33, 40)
    torch.testing.assert_close(
        winograd_kernels(bank, mix, spatial),
        winograd_kernels_reference(bank, mix, spatial),
        rtol=1e-5,
        atol=1e-5)


@pytest.mark.parametrize('size,padding', [((14, 14), (1, 1)), ((9, 6), (1, 1)),
                                          ((5, 7), (0, 0)), ((6, 5), (2, 1)),
                                          ((3, 3), (0, 2))])
def test_per_sample_conv_matches_conv_loop(size, padding, c_threads):
    """Even and odd output sizes (cropped tiles), zero and asymmetric
    padding."""
    batch = 3
    bank, mix, spatial = inputs(batch, 4, 6, 10)
    x = torch.randn(batch, 6, *size)
    expected = loop_conv(x, sample_kernels(bank, mix, spatial, batch), padding)
    out = winograd_per_sample_conv2d(x, bank, mix, spatial, padding)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_per_sample_conv_non_contiguous_input():
    bank, mix, spatial = inputs(2, 1, 6, 8, with_mix=False)
    x = torch.randn(2, 9, 8, 6).permute(0, 3, 2, 1)[:, :, ::1, 1:]
    assert not x.is_contiguous()
    expected = loop_conv(x, sample_kernels(bank, None, spatial, 2), (1, 1))
    torch.testing.assert_close(
        winograd_per_sample_conv2d(x, bank, None, spatial, (1, 1)),
        expected,
        rtol=1e-4,
        atol=1e-4)


@pytest.mark.parametrize('samples_per_chunk', [1, 2, 5])
def test_per_sample_conv_in_workspace_chunks(monkeypatch, samples_per_chunk):
    """Kernels that do not fit the workspace are built a chunk at a time
    (chunks of 1, of 2 with a short last chunk, and the whole batch)."""
    batch, c_in, c_out = 5, 4, 6
    monkeypatch.setitem(THRESHOLDS['workspace'], 'kernel_bytes',
                        samples_per_chunk * 16 * c_in * c_out * 4)
    calls = []
    real = winograd.winograd_kernels

    def counting(bank, mix, spatial, out=None):
        calls.append(mix.shape[0])
        return real(bank, mix, spatial, out)

    monkeypatch.setattr(winograd, 'winograd_kernels', counting)
    bank, mix, spatial = inputs(batch, 3, c_in, c_out)
    x = torch.randn(batch, c_in, 7, 8)
    out = winograd_per_sample_conv2d(x, bank, mix, spatial, (1, 1))
    expected = loop_conv(x, sample_kernels(bank, mix, spatial, batch), (1, 1))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    full, rest = divmod(batch, samples_per_chunk)
    assert calls == [samples_per_chunk] * full + ([rest] if rest else [])


def test_bad_arguments_are_value_errors():
    bank, mix, spatial = inputs(2, 3, 4, 4)
    with pytest.raises(ValueError, match='bank'):
        winograd_kernels(bank[..., :2], mix, spatial)
    with pytest.raises(ValueError, match='mix'):
        winograd_kernels(bank, mix[:, :2], spatial)
    with pytest.raises(ValueError, match='mix'):
        winograd_kernels(bank, None, spatial)
    with pytest.raises(ValueError, match='spatial'):
        winograd_kernels(bank, mix, spatial[:, :4])
    with pytest.raises(ValueError, match='float32'):
        winograd_kernels(bank.double(), mix.double(), spatial.double())
    with pytest.raises(ValueError, match='out'):
        winograd_kernels(bank, mix, spatial, out=torch.empty(3))


def test_uses_winograd_only_where_it_pays(monkeypatch):
    """CPU float32 inference of a batch through a deep 3x3 stride-1 layer;
    never with autograd, autocast, one sample, other kernels/strides, groups,
    few channels or tiles, an explicit impl, or without the C loop."""
    conv = SimpleNamespace(
        out_channels=256,
        kernel_size=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        impl='auto')
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        assert uses_winograd(x, conv)
        assert not uses_winograd(x[:1], conv)
        assert not uses_winograd(x.double(), conv)
        for key, value in (('kernel_size', (1, 1)), ('stride', (2, 2)),
                           ('dilation', (2, 2)), ('groups', 2),
                           ('impl', 'loop'), ('out_channels', 64)):
            other = SimpleNamespace(**dict(vars(conv), **{key: value}))
            assert not uses_winograd(x, other)
        assert not uses_winograd(x[:, :64].contiguous(), conv)
        # 7x7 output: 16 tiles.
        assert not uses_winograd(x[..., :7, :7], conv)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not uses_winograd(x, conv)
        monkeypatch.setattr(winograd, 'load', lambda: None)
        assert not uses_winograd(x, conv)
    assert not uses_winograd(x, conv)  # autograd on


BT = [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0],
      [0.0, 1.0, 0.0, -1.0]]
AT = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]]


@pytest.mark.parametrize('size,padding', [((7, 6), (1, 1)), ((5, 9), (0, 1)),
                                          ((4, 4), (1, 0)), ((3, 3), (0, 0)),
                                          ((14, 14), (1, 1))])
def test_feature_transforms_against_the_matrices(size, padding, c_threads):
    """The C input and output transforms against B^T d B and A^T m A written
    with F(2x2, 3x3)'s matrices over unfolded tiles; odd sizes, asymmetric
    padding, cropped outputs."""
    batch, channels = 2, 3
    (h, w), (ph, pw) = size, padding
    x = torch.randn(batch, channels, h, w)
    v, (th, tw) = winograd._input_transform(x, padding)
    tiles = F.pad(x,
                  (pw, pw + 2, ph, ph + 2)).unfold(2, 4,
                                                   2).unfold(3, 4,
                                                             2)[:, :, :th, :tw]
    bt = torch.tensor(BT)
    want = torch.einsum('ir,bcyxrs,js->bijcyx', bt, tiles, bt)
    torch.testing.assert_close(
        v, want.reshape(batch, 16, channels, th * tw), rtol=1e-5, atol=1e-5)
    m = torch.randn(batch, 16, channels, th * tw)
    out_hw = (h + 2 * ph - 2, w + 2 * pw - 2)
    got = winograd._output_transform(m, (th, tw), out_hw)
    at = torch.tensor(AT)
    y = torch.einsum('ai,bijct,ej->bctae', at,
                     m.view(batch, 4, 4, channels, th * tw), at)
    y = y.reshape(batch, channels, th, tw, 2, 2).permute(0, 1, 2, 4, 3, 5)
    y = y.reshape(batch, channels, 2 * th, 2 * tw)[..., :out_hw[0], :out_hw[1]]
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_feature_transforms_take_float32_cpu_only():
    with pytest.raises(ValueError, match='float32 CPU'):
        winograd._input_transform(torch.randn(1, 2, 4, 4).double(), (1, 1))
    with pytest.raises(ValueError, match='float32 CPU'):
        winograd._output_transform(
            torch.randn(1, 16, 2, 4).double(), (2, 2), (4, 4))
