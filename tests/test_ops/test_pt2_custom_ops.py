# Copyright (c) mmdyn contributors. All rights reserved.
"""The ``mmdyn::`` custom operators of the C loops: each against its
pure-PyTorch reference, and ``torch.library.opcheck`` (schema, fake
tensor, autograd registration, AOT dispatch)."""
import pytest
import torch

from mmdyn.ops.accel import ddf_cpu
from mmdyn.ops.accel.custom_ops import (ddf_backward_op, ddf_op,
                                        pack_columns_op, small_rows_matmul_op,
                                        winograd_blocks_op, winograd_input_op,
                                        winograd_kernels_op,
                                        winograd_output_op)
from mmdyn.ops.accel.winograd import winograd_kernels_reference
from mmdyn.ops.ddf import ddf_reference

pytestmark = pytest.mark.skipif(
    ddf_cpu.load() is None, reason='the C loops need a C compiler')


def ddf_inputs(stride=1, scale=1, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=dtype)
    hw = (5, 6) if stride == 1 else (3, 3)
    if scale > 1:
        return (x, torch.randn(scale * scale, 2, 3, 9, dtype=dtype),
                torch.randn(scale * scale, 2, 9, 5, 6, dtype=dtype))
    return (x, torch.randn(2, 3, 9,
                           dtype=dtype), torch.randn(2, 9, *hw, dtype=dtype))


@pytest.mark.parametrize('stride,add', [(1, False), (2, True)])
def test_ddf_op_matches_reference_and_gradcheck(stride, add):
    x, cf, sf = (t.requires_grad_() for t in ddf_inputs(stride))
    out = ddf_op(x, cf, sf, 3, 1, stride, add, 1)
    expected = ddf_reference(x, cf.view(2, 3, 3, 3), sf, 3, 1, stride,
                             'add' if add else 'mul')
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(
        lambda *t: ddf_op(*t, 3, 1, stride, add, 1), (x, cf, sf))


def test_ddf_up_op_matches_phases():
    x, cf, sf = ddf_inputs(scale=2)
    out = ddf_op(x, cf, sf, 3, 1, 1, False, 2)
    for p in range(4):
        torch.testing.assert_close(
            out[:, :, p // 2::2, p % 2::2],
            ddf_reference(x, cf[p].view(2, 3, 3, 3), sf[p], 3))
    x, cf, sf = (t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(lambda *t: ddf_op(*t, 3, 1, 1, False, 2),
                                    (x, cf, sf))


@pytest.mark.parametrize('stride,scale', [(1, 1), (2, 1), (1, 2)])
def test_opcheck_ddf(stride, scale):
    args = ddf_inputs(stride, scale, torch.float32)
    torch.library.opcheck(ddf_op,
                          (*(t.requires_grad_()
                             for t in args), 3, 1, stride, False, scale))
    out_hw = (5 * scale, 6 * scale) if scale > 1 else args[2].shape[-2:]
    grad = torch.randn(2, 3, *out_hw)
    torch.library.opcheck(ddf_backward_op,
                          (grad, *(t.detach()
                                   for t in args), 3, 1, stride, False, scale))


def test_kernel_warehouse_ops():
    a, b = torch.randn(2, 9, 7), torch.randn(7, 50)
    torch.testing.assert_close(small_rows_matmul_op(a, b), a @ b)
    torch.library.opcheck(small_rows_matmul_op, (a, b))
    packed = pack_columns_op(b)
    assert packed.shape == (3, 7, 24)
    torch.testing.assert_close(packed[1, :, :24], b[:, 24:48])
    assert not packed[2, :, 2:].any()
    torch.library.opcheck(pack_columns_op, (b, ))


def test_winograd_ops():
    bank = torch.randn(2, 4, 3, 3, 3)
    mix, spatial = torch.rand(5, 2), torch.rand(5, 9)
    torch.testing.assert_close(
        winograd_kernels_op(bank, mix, spatial),
        winograd_kernels_reference(bank, mix, spatial),
        rtol=1e-5,
        atol=1e-5)
    torch.library.opcheck(winograd_kernels_op, (bank, mix, spatial))
    torch.library.opcheck(winograd_kernels_op, (bank[:1], None, spatial))
    mixtures = torch.randn(2, 9, 1, 1, 4, 3)
    kernels = mixtures.permute(0, 4, 5, 1, 2, 3).reshape(2, 4, 3, 3, 3)
    expected = torch.stack([
        winograd_kernels_reference(k[None], None, torch.ones(1, 9))[0]
        for k in kernels
    ])
    torch.testing.assert_close(
        winograd_blocks_op(mixtures), expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(winograd_blocks_op, (mixtures, ))
    # The input and output transforms around a per-sample product are the
    # 3x3 conv.
    x = torch.randn(5, 3, 7, 6)
    v = winograd_input_op(x, [1, 1])
    torch.library.opcheck(winograd_input_op, (x, [1, 1]))
    m = torch.matmul(winograd_kernels_op(bank, mix, spatial), v)
    grid = [(7 + 2 - 1) // 2, (6 + 2 - 1) // 2]
    out = winograd_output_op(m, grid, [7, 6])
    torch.library.opcheck(winograd_output_op, (m, grid, [7, 6]))
    weights = torch.einsum('bk,koixy->boixy', mix, bank) * spatial.view(
        5, 1, 1, 3, 3)
    expected = torch.cat([
        torch.nn.functional.conv2d(x[i:i + 1], weights[i], padding=1)
        for i in range(5)
    ])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
