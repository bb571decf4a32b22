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


def test_whole_path_ops_match_references_and_opcheck():
    """The inference paths as operators: each against per-sample
    ``F.conv2d`` of the kernels built by plain tensor ops, and opcheck."""
    import torch.nn.functional as F

    from mmdyn.ops.accel.custom_ops import (kw_mix_cells_op,
                                            kw_winograd_conv_op,
                                            mixture_chunked_conv_op,
                                            winograd_conv_op)
    torch.manual_seed(0)

    def per_sample(x, weights, **conv):
        return torch.cat([
            F.conv2d(x[i:i + 1], weights[i], **conv) for i in range(x.shape[0])
        ])

    x = torch.randn(3, 4, 7, 6)
    bank = torch.randn(2, 5, 4, 3, 3)
    mix, spatial = torch.rand(3, 2), torch.rand(3, 9)
    weights = torch.einsum('bk,koixy->boixy', mix, bank) * spatial.view(
        3, 1, 1, 3, 3)
    expected = per_sample(x, weights, padding=1)
    for args in ((x, bank, mix, spatial, [1, 1]),
                 (x, bank[:1], None, spatial, [1, 1]), (x, bank, mix, None,
                                                        [1, 1])):
        got = winograd_conv_op(*args)
        if args[2] is not None and args[3] is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.library.opcheck(winograd_conv_op, args)
    conv = dict(stride=2, padding=1, dilation=1)
    torch.testing.assert_close(
        mixture_chunked_conv_op(x, bank, mix, spatial, [2, 2], [1, 1], [1, 1],
                                1),
        per_sample(x, weights, **conv),
        rtol=1e-4,
        atol=1e-4)
    grouped = torch.randn(2, 4, 2, 3, 3)
    pi = torch.rand(3, 2)
    torch.testing.assert_close(
        mixture_chunked_conv_op(x, grouped, pi, None, [1, 1], [1, 1], [1, 1],
                                2),
        per_sample(
            x,
            torch.einsum('bk,koixy->boixy', pi, grouped),
            padding=1,
            groups=2),
        rtol=1e-4,
        atol=1e-4)
    torch.library.opcheck(mixture_chunked_conv_op,
                          (x, bank, mix, spatial, [2, 2], [1, 1], [1, 1], 1))
    torch.library.opcheck(mixture_chunked_conv_op,
                          (x, grouped, pi, None, [1, 1], [1, 1], [1, 1], 2))
    # KernelWarehouse: 9 positions of whole [C_out, C_in] cells, or 2 x 2
    # blocks of 2-channel cells per position.
    for layout in ((9, 1, 1, 6, 4), (9, 2, 2, 3, 2)):
        g_s, g_o, g_i, c_o, c_i = layout
        attention = torch.rand(3, g_s * g_o * g_i, 7)
        cells = torch.randn(7, c_o * c_i)
        mixtures = (attention @ cells).view(3, *layout)
        kernels = mixtures.permute(0, 2, 4, 3, 5, 1).reshape(3, 6, 4, 3, 3)
        for name in kw_cells_layouts():
            got = kw_mix_cells_op(attention, cells, list(layout), name)
            order = {
                'cells': (0, 1, 2, 3, 4, 5),
                'position_major': (0, 1, 2, 4, 3, 5),
                'output_major': (0, 2, 4, 1, 3, 5)
            }[name]
            torch.testing.assert_close(
                got.reshape(-1),
                mixtures.permute(order).reshape(-1),
                rtol=1e-5,
                atol=1e-5)
            torch.library.opcheck(kw_mix_cells_op,
                                  (attention, cells, list(layout), name))
        fused = layout[1:3] == (1, 1)
        args = (x, attention, cells, list(layout), [1, 1], fused)
        torch.testing.assert_close(
            kw_winograd_conv_op(*args),
            per_sample(x, kernels, padding=1),
            rtol=1e-4,
            atol=1e-4)
        torch.library.opcheck(kw_winograd_conv_op, args)


def kw_cells_layouts():
    from mmdyn.ops.accel.kw_cells import MIXTURE_LAYOUTS
    return MIXTURE_LAYOUTS


def test_layer_forward_op_and_opcheck():
    """``mmdyn::layer_forward`` runs the registered layer's eager forward."""
    from mmdyn.ops import ODConv2d
    from mmdyn.ops.accel.custom_ops import _layer_key, layer_forward_op
    torch.manual_seed(0)
    layer = ODConv2d(4, 6, 3, padding=1, stride=2).eval()
    x = torch.randn(2, 4, 7, 7)
    args = (x, _layer_key(layer), [2, 6, 4, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            layer_forward_op(*args), layer.forward_reference(x))
    torch.library.opcheck(layer_forward_op, args)
