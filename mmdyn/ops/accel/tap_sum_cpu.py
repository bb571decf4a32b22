# Copyright (c) mmdyn contributors. All rights reserved.
"""The C loop of ODConv's ``tap_gemm`` inference: the weighted sum of the
shifted tap maps in one pass.

With one kernel an ODConv layer is ``alpha_f * sum_t alpha_s[t] *
shift_t(Z_t)``, ``Z`` one 1x1 GEMM of ``alpha_c * x`` to every tap's output
channels (:func:`mmdyn.ops.accel.odconv_paths.tap_gemm`). Written with
eager ops the sum is one read-modify-write pass over the output per tap;
the C loop (``csrc/tap_sum.c``) reads each tap map once, from the GEMM's
pixel-major output, and writes the output once, in NCHW with the bias.

Built and loaded by :class:`~mmdyn.ops.accel.c_library.CLibrary` (cached
under ``$MMDYN_CACHE_DIR``); with no compiler, or with
``MMDYN_TAP_SUM_CPU_KERNEL=0``, :func:`load` returns None and the layer
sums the taps with PyTorch ops.
"""
import ctypes
from typing import Optional

import torch

from .. import switches
from .c_library import CLibrary, CSourceFile, num_threads, ptr

_SUFFIX = {torch.float32: '_f32', torch.float64: '_f64'}

#: The fields of one row of the tap table (see :func:`tap_sum`).
TAP_FIELDS = 7


def _declare(lib: ctypes.CDLL) -> None:
    ptr_, long_ = ctypes.c_void_p, ctypes.c_long
    for suffix in _SUFFIX.values():
        fn = getattr(lib, 'tap_sum' + suffix)
        fn.argtypes = [ptr_, ptr_, long_, ptr_, long_, ptr_, ptr_] + \
            [long_] * 4 + [ctypes.c_int]
        fn.restype = ctypes.c_int


_LIBRARY = CLibrary('tap_sum_cpu', CSourceFile('tap_sum.c'), _declare,
                    switches.TAP_SUM_CPU_KERNEL,
                    'summing the ODConv taps with PyTorch ops')


def load() -> Optional[ctypes.CDLL]:
    """The compiled library, built once; None if unavailable (no compiler, a
    failed build, ``MMDYN_TAP_SUM_CPU_KERNEL=0`` or
    ``MMDYN_DISABLE_ACCEL=1``)."""
    return _LIBRARY.load()


def supports(x: torch.Tensor) -> bool:
    """Whether the loop can sum maps of ``x``'s dtype and device (float32 or
    float64 on CPU)."""
    return x.dtype in _SUFFIX and x.device.type == 'cpu'


def tap_sum(lib: ctypes.CDLL, z: torch.Tensor, taps: torch.Tensor,
            scale: torch.Tensor, bias: Optional[torch.Tensor],
            out: torch.Tensor) -> torch.Tensor:
    """Write ``out[b, o, i, j] = bias[o] + sum_t scale[b, s_t, o] * z[base_t +
    ((b * h_t + i + qy_t) * w_t + j + qx_t) * pix_t + o]`` over the taps whose
    pixel lies in their ``h_t x w_t`` sub-image.

    Args:
        lib: :func:`load`'s library.
        z (Tensor): The tap maps, contiguous, any shape.
        taps (Tensor): int64 [T, 7], one row ``(base, pix, h, w, qy, qx,
            s)`` per tap.
        scale (Tensor): [B, S, C] contiguous.
        bias (Tensor | None): [C].
        out (Tensor): [B, C, H_out, W_out] contiguous, written.

    Returns:
        Tensor: ``out``.
    """
    batch, channels, h_out, w_out = out.shape
    for t in (z, scale, out) + (() if bias is None else (bias, )):
        if t.dtype != out.dtype or not t.is_contiguous() or \
                t.device.type != 'cpu':
            raise ValueError('tap_sum takes contiguous CPU tensors of one '
                             f'dtype, got {t.dtype} on {t.device}')
    if taps.dtype != torch.int64 or taps.shape[-1] != TAP_FIELDS or \
            not taps.is_contiguous():
        raise ValueError(f'taps must be contiguous int64 [T, {TAP_FIELDS}]')
    if scale.shape[0] != batch or scale.shape[2] != channels:
        raise ValueError(f'scale {tuple(scale.shape)} does not match the '
                         f'output {tuple(out.shape)}')
    threads = num_threads(out.numel())
    status = getattr(lib,
                     'tap_sum' + _SUFFIX[out.dtype])(ptr(z), ptr(taps),
                                                     taps.shape[0], ptr(scale),
                                                     scale.shape[1], ptr(bias),
                                                     ptr(out), batch, channels,
                                                     h_out, w_out, threads)
    if status:
        raise MemoryError('ODConv tap sum: out of memory for its row buffers')
    return out
