# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse's ``taps`` path (one batched GEMM from the position-major
mixtures to every tap's output channels, then the C tap sum) against the
layer's paper forward, on the geometries it takes, and the rule that sends deep
stride-1 layers there in CPU inference only."""
import pytest
import torch

from mmdyn.ops import KWConv2d, switches
from mmdyn.ops.accel import tap_sum_cpu
from mmdyn.ops.accel.paths import THRESHOLDS

pytestmark = pytest.mark.skipif(
    tap_sum_cpu.load() is None, reason='the C tap sum is not available')


def _layer(*args, impl='taps', dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    layer = KWConv2d(*args, impl=impl, **kwargs).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if 'attention' in name:
                p.add_(torch.randn_like(p) * 0.2)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize(
    'args,kwargs,shape',
    [
        ((12, 20, 3), dict(padding=1), (3, 12, 7, 5)),
        ((12, 20, 3), dict(padding=2, dilation=2), (2, 12, 9, 8)),
        ((12, 12, 3), dict(padding=0), (2, 12, 6, 7)),  # no padding
        ((8, 16, 5), dict(padding=2), (1, 8, 5, 6)),  # one sample
        ((8, 16, (3, 1)), dict(padding=(1, 0)), (2, 8, 6, 4)),
        ((16, 24, 3),
         dict(padding=1, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
         (2, 16, 5, 5)),  # split cells
        ((12, 20, 3), dict(padding=1, bias=False), (2, 12, 4, 4)),
    ])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_taps_match_the_reference(args, kwargs, shape, dtype):
    layer = _layer(*args, dtype=dtype, **kwargs)
    x = torch.randn(shape, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    with torch.no_grad():
        want = layer.forward_reference(x)
        torch.testing.assert_close(layer(x), want, **tol)
        assert layer.last_path == 'taps'
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(layer(channels_last), want, **tol)


def test_taps_refuse_what_they_do_not_compute():
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match='stride 1'):
            _layer(8, 8, 3, 2, 1)(x)
        with pytest.raises(ValueError, match='larger than 1x1'):
            _layer(8, 8, 1)(x)
        with pytest.raises(ValueError, match='groups=1'):
            _layer(8, 8, 3, padding=1, groups=2)(x)
    with pytest.raises(ValueError, match='inference'):
        _layer(8, 8, 3, padding=1)(x)  # autograd on


def test_auto_takes_taps_for_deep_stride1_inference(monkeypatch):
    deep = _layer(256, 256, 3, padding=1, impl='auto')
    x = torch.randn(2, 256, 5, 5)
    with torch.no_grad():
        want = deep.forward_reference(x)
        torch.testing.assert_close(deep(x), want, rtol=1e-4, atol=1e-4)
        assert deep.last_path == 'taps'
        deep(x[:1])  # one sample too
        assert deep.last_path == 'taps'
        monkeypatch.setenv(switches.TAP_SUM_CPU_KERNEL, '0')
        deep(x)
        assert deep.last_path != 'taps'
        monkeypatch.delenv(switches.TAP_SUM_CPU_KERNEL)
        monkeypatch.setitem(THRESHOLDS['kernel_warehouse'],
                            'taps_min_in_channels', 512)
        deep(x)
        assert deep.last_path != 'taps'
        shallow = _layer(128, 128, 3, padding=1, impl='auto')
        monkeypatch.setitem(THRESHOLDS['kernel_warehouse'],
                            'taps_min_in_channels', 256)
        shallow(torch.randn(2, 128, 5, 5))
        assert shallow.last_path != 'taps'
    deep(x)  # training: not taken
    assert deep.last_path != 'taps'


def test_stride1_taps_table():
    table = tap_sum_cpu.stride1_taps((3, 2), (2, 1), (1, 0), 5, 7, 6)
    assert table.tolist() == [[t * 5, 30, 7, 6, (t // 2) * 2 - 1, t % 2, t]
                              for t in range(6)]
