# Copyright (c) mmdyn contributors. All rights reserved.
"""The C loops of ODConv's ``tap_gemm`` and of the ``taps`` paths of
KernelWarehouse and CondConv/DyConv on CPU: the weighted sum of the shifted tap
maps in one pass, and its backward.

With one kernel an ODConv layer is ``alpha_f * sum_t alpha_s[t] *
shift_t(Z_t)``, ``Z`` one 1x1 GEMM of ``alpha_c * x`` to every tap's output
channels (:func:`mmdyn.ops.accel.odconv_paths.tap_gemm`). Written with
eager ops the sum is one read-modify-write pass over the output per tap;
the C loop (``csrc/tap_sum.c``) reads each tap map once, from the GEMM's
pixel-major output, and writes the output once, in NCHW with the bias.
The backward loop writes every slot of the maps' gradient once (no zeroed
buffer) and sums the scale's gradient in the same pass.

:func:`stride1_tap_conv` is a stride-1 conv with per-sample kernels given
tap-major (``[B, kh*kw, C_out, C_in]``): one batched GEMM to every tap's
maps, summed the same way with unit scales (:func:`stride1_taps` gives its
table). KernelWarehouse's ``taps`` (:func:`mmdyn.ops.accel.kw_paths.taps`)
runs it on its position-major mixtures, CondConv/DyConv's ``taps``
(:func:`mmdyn.ops.accel.mixture_paths.taps`) on the mixtures of a
tap-major copy of the kernel bank.

Built and loaded by :class:`~mmdyn.ops.accel.c_library.CLibrary` (cached
under ``$MMDYN_CACHE_DIR``); with no compiler, or with
``MMDYN_TAP_SUM_CPU_KERNEL=0``, :func:`load` returns None: ODConv sums the
taps with PyTorch ops, KernelWarehouse and CondConv/DyConv take their other
paths.
"""
import ctypes
from typing import Optional

import torch

from .. import switches
from ..capture import graph_capture
from .c_library import CLibrary, CSourceFile, num_threads, ptr
from .chunked import kernel_workspace

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
        fn = getattr(lib, 'tap_sum_backward' + suffix)
        fn.argtypes = [ptr_, ptr_, long_, ptr_, long_, ptr_, ptr_, ptr_] + \
            [long_] * 7 + [ctypes.c_int]
        fn.restype = ctypes.c_int


_LIBRARY = CLibrary(
    'tap_sum_cpu', CSourceFile('tap_sum.c'), _declare,
    switches.TAP_SUM_CPU_KERNEL,
    'ODConv sums its taps with PyTorch ops, KernelWarehouse and '
    'CondConv/DyConv take their other paths')


def load() -> Optional[ctypes.CDLL]:
    """The compiled library, built once; None if unavailable (no compiler, a
    failed build, ``MMDYN_TAP_SUM_CPU_KERNEL=0`` or
    ``MMDYN_DISABLE_ACCEL=1``)."""
    return _LIBRARY.load()


def supports(x: torch.Tensor) -> bool:
    """Whether the loop can sum maps of ``x``'s dtype and device (float32 or
    float64 on CPU)."""
    return x.dtype in _SUFFIX and x.device.type == 'cpu'


def library_for(x: torch.Tensor) -> Optional[ctypes.CDLL]:
    """The library where a path may use it on ``x`` (ODConv's ``tap_gemm``, the
    ``taps`` paths of KernelWarehouse and CondConv/DyConv): outside graph
    capture and CPU autocast, a float32/float64 CPU input; else None (also when
    :func:`load` is)."""
    if graph_capture() or not supports(x) or \
            torch.is_autocast_enabled('cpu'):
        return None
    return load()


def stride1_taps(kernel_size, dilation, padding, channels: int, height: int,
                 width: int) -> torch.Tensor:
    """The tap table of :func:`tap_sum` for a stride-1 conv whose tap maps are
    pixel-major ``[B, height, width, kh*kw*channels]``.

    Tap ``t = ky*kw + kx`` is at channels ``t*channels ...`` of each
    pixel; for output pixel ``(i, j)`` it reads map pixel ``(i + ky*dy -
    py, j + kx*dx - px)``.
    """
    kh, kw = kernel_size
    pixel = kh * kw * channels
    rows = [(t * channels, pixel, height, width,
             (t // kw) * dilation[0] - padding[0],
             (t % kw) * dilation[1] - padding[1], t) for t in range(kh * kw)]
    return torch.tensor(rows, dtype=torch.int64)


def stride1_tap_conv(lib: ctypes.CDLL, x: torch.Tensor, mixtures: torch.Tensor,
                     kernel_size, dilation, padding,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(x[b], W_b)`` for every sample, stride 1, ``groups=1``, from
    the kernels given tap-major: ``mixtures`` [B, kh*kw, C_out, C_in]
    contiguous, ``mixtures[b, ky*kw + kx] = W_b[:, :, ky, kx]``.

    The mixtures, read transposed as ``[B, C_in, kh*kw*C_out]``, are the
    right operand of one batched GEMM from the input's pixels (``[B, H*W,
    C_in]``, a view of an NCHW or channels-last input) to the tap maps
    ``[B, H*W, kh*kw*C_out]``, pixel-major, in this thread's reused
    ``'tap_maps'`` workspace (:func:`~mmdyn.ops.accel.chunked.
    kernel_workspace`). :func:`tap_sum` then adds each output pixel's
    shifted taps, zero padding skipped, and writes the NCHW output with
    ``bias`` [C_out]. No kernel in the conv's layout and no im2col columns
    are written: the GEMM has the conv's multiply-adds, at the library's
    speed.
    """
    batch, c_in, height, width = x.shape
    kh, kw = kernel_size
    positions, c_out = kh * kw, mixtures.shape[-2]
    if tuple(mixtures.shape) != (batch, positions, c_out, c_in):
        raise ValueError(f'mixtures {tuple(mixtures.shape)} are not [B, '
                         f'kh*kw, C_out, C_in] for the input '
                         f'{tuple(x.shape)} and kernel {kh}x{kw}')
    pixels = height * width
    maps = kernel_workspace(batch * pixels * positions * c_out, x.dtype,
                            x.device, 'tap_maps')
    maps = maps.view(batch, pixels, positions * c_out)
    torch.bmm(
        x.permute(0, 2, 3, 1).reshape(batch, pixels, c_in),
        mixtures.view(batch, positions * c_out, c_in).transpose(1, 2),
        out=maps)
    h_out = height + 2 * padding[0] - dilation[0] * (kh - 1)
    w_out = width + 2 * padding[1] - dilation[1] * (kw - 1)
    out = x.new_empty(batch, c_out, h_out, w_out)
    table = stride1_taps(kernel_size, dilation, padding, c_out, height, width)
    scale = x.new_ones(batch, positions, c_out)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    return tap_sum(lib, maps, table, scale, bias, out)


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
    for t in (z, scale, out, bias):
        if t is not None and (t.dtype != out.dtype or not t.is_contiguous()
                              or t.device.type != 'cpu'):
            raise ValueError('tap_sum takes contiguous CPU tensors of one '
                             f'dtype, got {t.dtype} on {t.device}')
    if taps.dtype != torch.int64 or taps.dim() != 2 or \
            taps.shape[-1] != TAP_FIELDS or not taps.is_contiguous():
        raise ValueError(f'taps must be contiguous int64 [T, {TAP_FIELDS}]')
    if scale.shape[0] != batch or scale.shape[2] != channels:
        raise ValueError(f'scale {tuple(scale.shape)} does not match the '
                         f'output {tuple(out.shape)}')
    for base, pixel, h, w, _, _, s in taps.tolist():
        last = base + (batch * h * w - 1) * pixel + channels
        if base < 0 or h < 1 or w < 1 or pixel < channels or \
                last > z.numel() or not 0 <= s < scale.shape[1]:
            raise ValueError('tap_sum: a tap of the table reads outside the '
                             'maps or the scales')
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


def tap_sum_backward(lib: ctypes.CDLL, z: Optional[torch.Tensor],
                     taps: torch.Tensor, scale: torch.Tensor,
                     grad: torch.Tensor, grad_z: torch.Tensor,
                     grad_scale: Optional[torch.Tensor]) -> None:
    """The gradients of :func:`tap_sum` over ONE sub-image's maps.

    Args:
        lib: :func:`load`'s library.
        z (Tensor | None): The sub-image's maps [B, h, w, P] (P = its taps
            times C), needed for ``grad_scale`` only.
        taps (Tensor): int64 [T, 4], one row ``(offset of the tap's C
            channels in a pixel, qy, qx, s)`` per tap of the sub-image.
        scale (Tensor): [B, S, C].
        grad (Tensor): The output gradient, pixel-major [B, H_out, W_out,
            C].
        grad_z (Tensor): [B, h, w, P], every element written: ``scale[b,
            s_t, o] * grad[b, y - qy_t, x - qx_t, o]`` in the slot of tap
            ``t`` at pixel ``(y, x)``, 0 where that output pixel does not
            exist.
        grad_scale (Tensor | None): [B, S, C], with ``z`` only: the sum of
            ``z[slot] * grad[...]`` added.
    """
    batch, h_out, w_out, channels = grad.shape
    for t in (z, scale, grad, grad_z, grad_scale):
        if t is not None and (t.dtype != grad.dtype or not t.is_contiguous()
                              or t.device.type != 'cpu'):
            raise ValueError('tap_sum_backward takes contiguous CPU tensors '
                             f'of one dtype, got {t.dtype} on {t.device}')
    if taps.dtype != torch.int64 or taps.dim() != 2 or \
            taps.shape[-1] != 4 or not taps.is_contiguous():
        raise ValueError('taps must be contiguous int64 [T, 4]')
    if (z is None) != (grad_scale is None):
        raise ValueError('tap_sum_backward: z and grad_scale go together')
    if grad_z.dim() != 4 or grad_z.shape[0] != batch or \
            (z is not None and z.shape != grad_z.shape) or \
            scale.shape[0] != batch or scale.shape[2] != channels:
        raise ValueError('tap_sum_backward: shapes do not match (grad '
                         f'{tuple(grad.shape)}, grad_z {tuple(grad_z.shape)}'
                         f', scale {tuple(scale.shape)})')
    h, w, pixel = grad_z.shape[1:]
    for offset, _, _, s in taps.tolist():
        if offset < 0 or offset + channels > pixel or \
                not 0 <= s < scale.shape[1]:
            raise ValueError('tap_sum_backward: a tap of the table reads '
                             'outside a pixel or the scales')
    threads = num_threads(grad_z.numel())
    status = getattr(lib, 'tap_sum_backward' +
                     _SUFFIX[grad.dtype])(ptr(z), ptr(taps), taps.shape[0],
                                          ptr(scale), scale.shape[1],
                                          ptr(grad), ptr(grad_z),
                                          ptr(grad_scale), batch, channels,
                                          h_out, w_out, h, w, pixel, threads)
    if status:
        raise MemoryError('ODConv tap sum backward: out of memory for its '
                          'buffers')
