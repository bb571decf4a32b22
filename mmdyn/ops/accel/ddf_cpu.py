# Copyright (c) mmdyn contributors. All rights reserved.
"""Fused CPU kernels for the DDF operator, built on first use.

PyTorch has no single CPU op for ``sum_t a_t * b_t * shift_t(x)``: written
with eager ops the DDF operator costs two full passes over the output per
filter tap, several times a depthwise 3x3 conv (see
``benchmarks/ddf.md``). The three C loops (forward; backward for the
input and channel filter; backward for the spatial filter) do it in one pass
each, without any k*k-times larger buffer.

The C source (``csrc/ddf.c``, the loops in ``csrc/ddf_body.h`` once per
dtype) is built and loaded by :class:`~mmdyn.ops.accel.c_library.CLibrary`
(cached under ``$MMDYN_CACHE_DIR``). Everything degrades gracefully: with no
compiler, or with ``MMDYN_DDF_CPU_KERNEL=0``, :func:`load` returns None and
:func:`mmdyn.ops.ddf.ddf` uses its pure-PyTorch tap loop.
"""
import ctypes
from typing import Optional

import torch

from .. import switches
from .c_library import CLibrary, CSourceFile, num_threads, ptr

_SUFFIX = {torch.float32: '_f32', torch.float64: '_f64'}


def _declare(lib: ctypes.CDLL) -> None:
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for suffix in _SUFFIX.values():
        getattr(lib, 'ddf_forward' +
                suffix).argtypes = ([ptr] * 4 + [long_] * 9 + [int_] * 2)
        getattr(lib, 'ddf_backward_x_cf' +
                suffix).argtypes = ([ptr] * 6 + [long_] * 9 + [int_] * 4)
        getattr(lib, 'ddf_backward_sf' +
                suffix).argtypes = ([ptr] * 4 + [long_] * 9 + [int_] * 2)
        getattr(lib, 'ddf_forward_s1' +
                suffix).argtypes = ([ptr] * 4 + [long_] * 7 + [int_] * 2)
        getattr(lib, 'ddf_backward_x_cf_s1' +
                suffix).argtypes = ([ptr] * 6 + [long_] * 6 + [int_] * 4)
        getattr(lib, 'ddf_backward_sf_s1' +
                suffix).argtypes = ([ptr] * 4 + [long_] * 6 +
                                    [int_, long_, int_])
        for name in ('ddf_forward', 'ddf_backward_x_cf', 'ddf_backward_sf',
                     'ddf_backward_sf_s1'):
            getattr(lib, name + suffix).restype = None
        # 0, or -1 when a plane buffer could not be allocated.
        for name in ('ddf_forward_s1', 'ddf_backward_x_cf_s1'):
            getattr(lib, name + suffix).restype = int_


_LIBRARY = CLibrary('ddf_cpu', CSourceFile('ddf.c'), _declare,
                    switches.DDF_CPU_KERNEL,
                    'using the slower PyTorch tap loop')


def load() -> Optional[ctypes.CDLL]:
    """Return the compiled kernel library, building it once; None if not
    available (no compiler, build failure, or ``MMDYN_DDF_CPU_KERNEL=0``)."""
    return _LIBRARY.load()


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the C loops are built (building them on first use); a constant
    to ``torch.compile``, which calls it once while tracing."""
    return load() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel can run on these tensors (CPU, same float32 or
    float64 dtype)."""
    dtype = tensors[0].dtype
    return (dtype in _SUFFIX
            and all(t.device.type == 'cpu' and t.dtype == dtype
                    for t in tensors))


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    """Zero columns on the right: the kernels' padded-row layout."""
    return torch.nn.functional.pad(t, (0, cols)).contiguous()


def forward(lib,
            x,
            cf,
            sf,
            out_hw,
            kernel_size,
            dilation,
            stride,
            add,
            scale=1):
    """Out = ddf(x, cf, sf) for contiguous CPU tensors of one dtype.

    ``scale`` > 1 (stride 1 only) is DDF-Up: ``cf`` [s*s, B, C, k*k] and
    ``sf`` [s*s, B, k*k, H, W] hold one filter pair per sub-pixel phase, and
    the result is the interleaved [B, C, s*H, s*W].
    """
    B, C, H, W = x.shape
    Ho, Wo = out_hw
    suffix = _SUFFIX[x.dtype]
    threads = num_threads(B * C * Ho * Wo * scale * scale)
    if stride == 1:
        out = x.new_empty((B, C, H * scale, W * scale))
        pad = (kernel_size - 1) // 2 * dilation
        # Named, so that it stays alive during the call (ctypes only sees a
        # raw pointer).
        sfe = _pad_cols(sf, 2 * pad)
        if getattr(lib,
                   'ddf_forward_s1' + suffix)(ptr(x), ptr(cf), ptr(sfe),
                                              ptr(out), B, C, H, W,
                                              kernel_size, dilation, scale,
                                              int(add), threads):
            raise MemoryError('DDF forward: out of memory for its plane '
                              'buffers')
        return out
    if scale != 1:
        raise ValueError('scale > 1 needs stride 1')
    out = x.new_empty((B, C, Ho, Wo))
    getattr(lib, 'ddf_forward' + suffix)(ptr(x), ptr(cf), ptr(sf), ptr(out), B,
                                         C, H, W, Ho, Wo, kernel_size,
                                         dilation, stride, int(add), threads)
    return out


def backward(lib, grad_out, x, cf, sf, kernel_size, dilation, stride, add,
             needs):
    """Gradients (x, cf, sf) of ddf; ``needs`` is a triple of bools, and an
    entry not needed is returned as None."""
    B, C, H, W = x.shape
    Ho, Wo = grad_out.shape[-2:]
    suffix = _SUFFIX[x.dtype]
    gx = torch.empty_like(x) if needs[0] else None
    gcf = torch.empty_like(cf) if needs[1] else None
    gsf = None
    threads = num_threads(B * C * Ho * Wo)
    if stride == 1:
        pad = (kernel_size - 1) // 2 * dilation
        if needs[0] or needs[1]:
            sfe = _pad_cols(sf, 2 * pad)
            if getattr(lib,
                       'ddf_backward_x_cf_s1' + suffix)(ptr(grad_out), ptr(x),
                                                        ptr(cf), ptr(sfe),
                                                        ptr(gx), ptr(gcf), B,
                                                        C, H, W, kernel_size,
                                                        dilation, int(add),
                                                        int(needs[0]),
                                                        int(needs[1]),
                                                        threads):
                raise MemoryError('DDF backward: out of memory for its '
                                  'plane buffers')
            del sfe
        if needs[2]:
            # One spare zero row below, as the kernel's padded planes.
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad + 1))
            gsfe = sf.new_empty((B, sf.shape[1], H, W + 2 * pad))
            blocks = -(-threads // max(B, 1))
            goe = _pad_cols(grad_out, 2 * pad)
            getattr(lib,
                    'ddf_backward_sf_s1' + suffix)(ptr(goe), ptr(xp), ptr(cf),
                                                   ptr(gsfe), B, C, H, W,
                                                   kernel_size, dilation,
                                                   int(add), blocks, threads)
            gsf = gsfe[..., :W].contiguous()
        return gx, gcf, gsf
    gsf = torch.empty_like(sf) if needs[2] else None
    if needs[0] or needs[1]:
        getattr(lib,
                'ddf_backward_x_cf' + suffix)(ptr(grad_out), ptr(x), ptr(cf),
                                              ptr(sf), ptr(gx), ptr(gcf), B, C,
                                              H, W, Ho, Wo,
                                              kernel_size, dilation, stride,
                                              int(add), int(needs[0]),
                                              int(needs[1]), threads)
    if needs[2]:
        getattr(lib,
                'ddf_backward_sf' + suffix)(ptr(grad_out), ptr(x), ptr(cf),
                                            ptr(gsf), B, C, H, W, Ho, Wo,
                                            kernel_size, dilation, stride,
                                            int(add), threads)
    return gx, gcf, gsf
