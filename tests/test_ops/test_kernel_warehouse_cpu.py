# Copyright (c) mmdyn contributors. All rights reserved.
"""The C loop of KernelWarehouse's kernel assembly against torch.matmul."""
import pytest
import torch

from mmdyn.ops.accel import kw_cells
from mmdyn.ops.accel.kw_cells import (STRIP, Scatter, pack_columns,
                                      small_rows_matmul)
from mmdyn.ops.accel.paths import uses_c_cell_product
from mmdyn.ops.accel.thresholds import THRESHOLDS


@pytest.fixture(params=[1, 2], ids=['1thread', '2threads'])
def c_threads(request):
    """Run a C-loop test on one and on two OpenMP threads (the loops split work
    of more than 4096 elements per thread, so the larger cases really use
    both)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize(
    'rows,inner,cols',
    [
        (72, 138, 4096),  # ResNet-50 shapes: multiples of the 4x24 tile
        (32, 47, 5000),  # a partial last strip of columns
        (7, 13, 100),  # a partial panel of rows
        (3, 1, 17),  # fewer columns than one strip, inner size 1
        (1, 300, 24),
    ])
def test_matches_torch_matmul(rows, inner, cols, c_threads):
    a = torch.randn(rows, inner)
    b = torch.randn(inner, cols)
    torch.testing.assert_close(
        small_rows_matmul(a, b), a @ b, rtol=1e-5, atol=1e-4)


def test_batched_rows_and_out():
    """[B, m, K] rows; written into a given ``out``; non-contiguous inputs."""
    a = torch.randn(20, 3, 4).transpose(0, 2)  # [4, 3, 20], strided
    b = torch.randn(40, 20).t()  # [20, 40], strided
    out = torch.empty(4, 3, 40)
    got = small_rows_matmul(a, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.matmul(a, b), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match='out'):
        small_rows_matmul(a, b, out=torch.empty(4, 3, 41))


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match='float32'):
        small_rows_matmul(
            torch.randn(2, 3).double(),
            torch.randn(3, 4).double())
    with pytest.raises(ValueError, match='multiply'):
        small_rows_matmul(torch.randn(2, 3), torch.randn(4, 5))


def test_used_only_for_float32_inference_of_wide_products(monkeypatch):
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        4096)
    a, b = torch.randn(8, 10), torch.randn(10, 8192)
    with torch.no_grad():
        assert uses_c_cell_product(a, b)
        assert not uses_c_cell_product(a.double(), b.double())
        assert not uses_c_cell_product(a, b[:, :100])  # too narrow
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not uses_c_cell_product(a, b)
        monkeypatch.setattr(kw_cells, 'load', lambda: None)
        assert not uses_c_cell_product(a, b)
    assert not uses_c_cell_product(a, b)  # autograd on


@pytest.mark.parametrize('capability,wide,narrow', [('AVX2', True, False),
                                                    ('DEFAULT', True, False),
                                                    ('AVX512', False, False)])
def test_default_columns_threshold_follows_the_cpu(monkeypatch, capability,
                                                   wide, narrow):
    """With ``c_loop_min_columns`` None the CPU decides: the C product from
    4096 columns on AVX2 (and CPUs not listed), never on AVX-512 (MKL is faster
    there); a number set in the table overrides it."""
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        None)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability',
                        lambda: capability)
    a = torch.randn(8, 10)
    with torch.no_grad():
        assert uses_c_cell_product(a, torch.randn(10, 4096)) == wide
        assert uses_c_cell_product(a, torch.randn(10, 4095)) == narrow
        monkeypatch.setitem(THRESHOLDS['kernel_warehouse'],
                            'c_loop_min_columns', 1)
        assert uses_c_cell_product(a, torch.randn(10, 4095))


@pytest.mark.parametrize('rows,inner,cols', [(72, 47, 4096), (9, 5, 100),
                                             (4, 3, 17)])
def test_packed_columns(rows, inner, cols, c_threads):
    """Columns cut into strips once (pack_columns) give the same product; the
    strips hold b's columns, zero-padded."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    packed = pack_columns(b)
    strips = -(-cols // STRIP)
    assert packed.shape == (strips, inner, STRIP)
    padded = torch.zeros(inner, strips * STRIP)
    padded[:, :cols] = b
    assert torch.equal(packed,
                       padded.view(inner, strips, STRIP).transpose(0, 1))
    # b itself is not read when its strips are given
    got = small_rows_matmul(
        a, torch.full((inner, cols), float('nan')), packed_b=packed)
    torch.testing.assert_close(got, a @ b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match='packed_b'):
        small_rows_matmul(a, b, packed_b=packed[:, :-1])


@pytest.mark.parametrize('packed', [False, True])
@pytest.mark.parametrize('g_o,g_i,c_o,c_i', [(2, 3, 5, 8), (1, 4, 2, 30),
                                             (3, 2, 4, 24)])
def test_scatter_writes_cells_into_kernel_blocks(packed, g_o, g_i, c_o, c_i,
                                                 c_threads):
    """Row (b, o, i) of the product is a [c_o, c_i] cell; scattered, it lands
    in block (o, i) of sample b's [g_o c_o, g_i c_i] kernel: against the same
    product permuted by torch."""
    batch, inner = 3, 7
    a = torch.randn(batch, g_o * g_i, inner)
    b = torch.randn(inner, c_o * c_i)
    c_out, c_in = g_o * c_o, g_i * c_i
    bi, o, i = torch.meshgrid(
        torch.arange(batch),
        torch.arange(g_o),
        torch.arange(g_i),
        indexing='ij')
    starts = ((bi * c_out + o * c_o) * c_in + i * c_i).flatten()
    out = torch.full((batch, c_out, c_in), float('nan'))
    small_rows_matmul(
        a,
        b,
        out,
        packed_b=pack_columns(b) if packed else None,
        scatter=Scatter(starts, c_i, c_in))
    expected = (a @ b).view(batch, g_o, g_i, c_o, c_i).transpose(2, 3)
    torch.testing.assert_close(
        out, expected.reshape(batch, c_out, c_in), rtol=1e-5, atol=1e-4)


def test_scatter_bounds_are_checked():
    a, b = torch.randn(2, 3), torch.randn(3, 10)
    out = torch.empty(20)
    small_rows_matmul(
        a, b, out, scatter=Scatter(torch.tensor([0, 10]), 10, 10))
    torch.testing.assert_close(out.view(2, 10), a @ b)
    for starts, segment, stride in (([0, 11], 10, 10), ([-1, 5], 10, 10),
                                    ([0, 9], 5, 7), ([0, 1], 0, 1)):
        with pytest.raises(ValueError, match='scatter'):
            small_rows_matmul(
                a,
                b,
                out,
                scatter=Scatter(torch.tensor(starts), segment, stride))
    with pytest.raises(ValueError, match='scatter'):
        small_rows_matmul(
            a, b, None, scatter=Scatter(torch.tensor([0, 1]), 10, 10))
    with pytest.raises(ValueError, match='overlap'):
        small_rows_matmul(
            a, b, out, scatter=Scatter(torch.tensor([0, 10]), 5, 4))
    with pytest.raises(ValueError, match='float32'):
        small_rows_matmul(
            a, b, out.double(), scatter=Scatter(torch.tensor([0, 10]), 10, 10))


@pytest.mark.parametrize('packed', [False, True])
@pytest.mark.parametrize('batch,inner,cols', [(8, 47, 4096), (3, 5, 100),
                                              (1, 7, 24)])
def test_winograd_transform_of_the_product(packed, batch, inner, cols,
                                           c_threads):
    """Winograd=True: the nine rows of each sample are a 3x3 kernel per column;
    out holds G w G^T of each, against the product transformed with F(2x2,
    3x3)'s G by torch (partial panels of rows, partial strips)."""
    a, b = torch.randn(batch, 9, inner), torch.randn(inner, cols)
    got = small_rows_matmul(
        a, b, packed_b=pack_columns(b) if packed else None, winograd=True)
    g = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5],
                      [0.0, 0.0, 1.0]])
    kernels = (a @ b).transpose(1, 2).reshape(batch, cols, 3, 3)
    want = (g @ kernels @ g.t()).reshape(batch, cols, 16).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match='9 rows'):
        small_rows_matmul(a[:, :8], b, winograd=True)
    with pytest.raises(ValueError, match='out'):
        small_rows_matmul(
            a, b, torch.empty(batch, 16, cols + 1), winograd=True)
