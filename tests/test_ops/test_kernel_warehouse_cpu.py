"""The C loop of KernelWarehouse's kernel assembly against torch.matmul."""
import pytest
import torch

from mmdyn.ops import kernel_warehouse_cpu
from mmdyn.ops.kernel_warehouse_cpu import (small_rows_matmul,
                                            uses_small_rows_matmul)


@pytest.mark.parametrize('rows,inner,cols', [
    (72, 138, 4096),  # ResNet-50 shapes: multiples of the 4x24 tile
    (32, 47, 5000),   # a partial last strip of columns
    (7, 13, 100),     # a partial panel of rows
    (3, 1, 17),       # fewer columns than one strip, inner size 1
    (1, 300, 24),
])
def test_matches_torch_matmul(rows, inner, cols):
    a = torch.randn(rows, inner)
    b = torch.randn(inner, cols)
    torch.testing.assert_close(small_rows_matmul(a, b), a @ b, rtol=1e-5,
                               atol=1e-4)


def test_batched_rows_and_out():
    """[B, m, K] rows; written into a given ``out``; non-contiguous
    inputs."""
    a = torch.randn(20, 3, 4).transpose(0, 2)  # [4, 3, 20], strided
    b = torch.randn(40, 20).t()                 # [20, 40], strided
    out = torch.empty(4, 3, 40)
    got = small_rows_matmul(a, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.matmul(a, b), rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(ValueError, match='out'):
        small_rows_matmul(a, b, out=torch.empty(4, 3, 41))


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match='float32'):
        small_rows_matmul(torch.randn(2, 3).double(),
                          torch.randn(3, 4).double())
    with pytest.raises(ValueError, match='multiply'):
        small_rows_matmul(torch.randn(2, 3), torch.randn(4, 5))


def test_used_only_for_float32_inference_of_wide_products(monkeypatch):
    a, b = torch.randn(8, 10), torch.randn(10, 8192)
    with torch.no_grad():
        assert uses_small_rows_matmul(a, b)
        assert not uses_small_rows_matmul(a.double(), b.double())
        assert not uses_small_rows_matmul(a, b[:, :100])  # too narrow
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not uses_small_rows_matmul(a, b)
        monkeypatch.setattr(kernel_warehouse_cpu, 'load', lambda: None)
        assert not uses_small_rows_matmul(a, b)
    assert not uses_small_rows_matmul(a, b)  # autograd on
