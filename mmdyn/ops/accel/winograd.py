# Copyright (c) mmdyn contributors. All rights reserved.
"""Winograd F(2x2, 3x3) convolution of each sample with its own 3x3 kernel.

The CPU inference path of the mixture-of-kernels layers (DyConv, CondConv,
ODConv) on deep 3x3 stride-1 layers. There, every sample has its own kernel
and oneDNN's batch-1 convolutions cost more than one batch conv of the same
shape (benchmarks/README.md); no batched oneDNN primitive takes per-sample
kernels. In the Winograd domain the per-sample kernels are no obstacle: a
2x2 output tile of a 3x3 conv is ::

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (4x4 input tile d)

and summed over input channels the elementwise product becomes, for each
of the 16 tile positions ``p``, a matrix product ::

    M_b[p] = U_b[p] @ V_b[p]   [C_out, C_in] @ [C_in, tiles]

with ``U_b = G W_b G^T`` (the transformed kernel of sample ``b``) and
``V_b = B^T d B`` (its transformed input tiles): one batched matmul over
``B * 16`` products with 2.25x fewer multiply-adds than the direct conv.

The per-sample kernel of these layers is ``W_b = s_b * sum_k a_bk W_k``
(``a`` the kernel attention or routing weights, ``s`` ODConv's spatial
attention over the 9 kernel positions). Building ``U_b`` from it is a pass
over ``16/9`` times the kernel's size; as PyTorch ops (einsum + matmul with
an inner dimension of 9) it costs a large part of the whole static conv, so
it is one fused C loop (``csrc/winograd.c``, built by
:class:`~mmdyn.ops.accel.c_library.CLibrary`) that reads the kernel bank in its
own ``[K, C_out, C_in, 3, 3]`` layout and writes ``U`` once.

The speed of this path against batch-1 convs and ``nn.Conv2d`` is measured
in benchmarks/README.md (AVX2, 2026-12-01). On AVX-512 (2026-12-06,
``benchmarks/vendor_paths.py``) oneDNN's own convolutions are about 3x
faster and this loop loses: ODConv with one kernel takes the tap GEMM or
the scaled columns, CondConv/DyConv the batch-as-groups conv
(:mod:`~mmdyn.ops.accel.paths`), where they pay; the rules of ODConv
with several kernels and of KernelWarehouse still send deep 3x3 layers
here. KernelWarehouse's cell product writes its transformed kernels
directly, or they are built from its mixtures
(:func:`winograd_block_conv2d`). Which layers take the path:
:func:`~mmdyn.ops.accel.paths.uses_winograd`.

Results differ from the direct conv by float32 rounding of the transforms
(relative error ~1e-6). ``MMDYN_WINOGRAD=0`` turns the path off;
:func:`winograd_kernels_reference` and the per-sample ``F.conv2d`` loop are
the references the tests compare it with.

torch only (plus the C loop through ``ctypes``).
"""
import ctypes
import math
from typing import Optional, Tuple

import torch

from .. import switches
from .c_library import (CLibrary, CSourceFile, check_float32_cpu, num_threads,
                        ptr)
from .chunked import kernel_workspace, workspace_bytes

#: Environment variable; ``0`` disables the Winograd path.
WINOGRAD_SWITCH = switches.WINOGRAD

# F(2x2, 3x3) (Lavin & Gray, 2016).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _declare(lib: ctypes.CDLL) -> None:
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.winograd_kernels_f32.argtypes = [p, p, p, p, n, n, n, ctypes.c_int]
    lib.winograd_kernels_f32.restype = None
    lib.winograd_blocks_f32.argtypes = [p, p, n, n, n, n, n, ctypes.c_int]
    lib.winograd_blocks_f32.restype = None
    lib.winograd_input_f32.argtypes = [
        p, p, n, n, n, n, n, n, n, n, ctypes.c_int
    ]
    lib.winograd_input_f32.restype = ctypes.c_int
    lib.winograd_output_f32.argtypes = [p, p, n, n, n, n, n, n, ctypes.c_int]
    lib.winograd_output_f32.restype = ctypes.c_int


_LIBRARY = CLibrary('winograd_cpu', CSourceFile('winograd.c'), _declare,
                    WINOGRAD_SWITCH, 'per-sample convs run as batch-1 convs')


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel-transform loop; None when unavailable (no compiler,
    a failed build, or ``MMDYN_WINOGRAD=0``)."""
    return _LIBRARY.load()


def num_tiles(out_hw: Tuple[int, int]) -> int:
    """2x2 output tiles of an ``out_hw`` map."""
    return ((out_hw[0] + 1) // 2) * ((out_hw[1] + 1) // 2)


def _output_hw(x: torch.Tensor, padding: Tuple[int, int]) -> Tuple[int, int]:
    """Output size of a 3x3, stride-1 conv of ``x``."""
    return x.shape[2] + 2 * padding[0] - 2, x.shape[3] + 2 * padding[1] - 2


def _kernels_out(out: Optional[torch.Tensor], shape: Tuple[int, ...],
                 like: torch.Tensor) -> torch.Tensor:
    """A new [B, 16, C_out, C_in] tensor, or ``out`` checked to be one the C
    loops can write into (contiguous float32, same size)."""
    if out is None:
        return like.new_empty(shape)
    if out.numel() != math.prod(shape) or not out.is_contiguous() or \
            out.dtype != torch.float32:
        raise ValueError(f'out must be a contiguous float32 tensor of '
                         f'{math.prod(shape)} elements')
    return out.view(shape)


def _check_bank(bank, mix, spatial):
    if bank.dim() != 5 or tuple(bank.shape[3:]) != (3, 3):
        raise ValueError('bank must be [K, C_out, C_in, 3, 3], got '
                         f'{tuple(bank.shape)}')
    if mix is None and spatial is None:
        raise ValueError('one of mix and spatial must be given (the batch)')
    batch = (mix if mix is not None else spatial).shape[0]
    if mix is not None and tuple(mix.shape) != (batch, bank.shape[0]):
        raise ValueError(f'mix must be [B, K={bank.shape[0]}], got '
                         f'{tuple(mix.shape)}')
    if mix is None and bank.shape[0] != 1:
        raise ValueError(f'mix is needed for a bank of {bank.shape[0]} '
                         'kernels')
    if spatial is not None and tuple(spatial.shape) != (batch, 9):
        raise ValueError(f'spatial must be [B={batch}, 9], got '
                         f'{tuple(spatial.shape)}')
    return batch


def winograd_kernels_reference(bank: torch.Tensor, mix: Optional[torch.Tensor],
                               spatial: Optional[torch.Tensor]
                               ) -> torch.Tensor:
    """``U_b = G W_b G^T`` with ``W_b = spatial[b] * sum_k mix[b, k] *
    bank[k]``, by plain tensor ops (the reference of :func:`winograd_kernels`).

    Args:
        bank (Tensor): [K, C_out, C_in, 3, 3].
        mix (Tensor, optional): [B, K]; None for one kernel of weight 1.
        spatial (Tensor, optional): [B, 9] factors of the kernel positions.

    Returns:
        Tensor: [B, 16, C_out, C_in].
    """
    batch = _check_bank(bank, mix, spatial)
    num, c_out, c_in = bank.shape[:3]
    flat = bank.reshape(num, c_out * c_in, 9)
    weight = (
        flat[0].expand(batch, -1, -1) if mix is None else torch.einsum(
            'bk,knj->bnj', mix.to(bank.dtype), flat))
    if spatial is not None:
        weight = weight * spatial.to(bank.dtype)[:, None, :]
    g = torch.tensor(_G, dtype=bank.dtype, device=bank.device)
    transform = torch.kron(g, g)  # [16, 9]
    return torch.matmul(transform,
                        weight.transpose(1, 2)).view(batch, 16, c_out, c_in)


def winograd_kernels(bank: torch.Tensor,
                     mix: Optional[torch.Tensor],
                     spatial: Optional[torch.Tensor],
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The transformed per-sample kernels of
    :func:`winograd_kernels_reference`, by the fused C loop (float32 CPU
    tensors; the library must be available, see :func:`load`).

    ``out``, when given, is a contiguous float32 tensor of B * 16 * C_out *
    C_in elements that the kernels are written into.
    """
    batch = _check_bank(bank, mix, spatial)
    check_float32_cpu('winograd_kernels', bank, mix, spatial)
    lib = _LIBRARY.require()
    num, c_out, c_in = bank.shape[:3]
    n = c_out * c_in
    out = _kernels_out(out, (batch, 16, c_out, c_in), bank)
    bank = bank.contiguous()
    mix = None if mix is None else mix.contiguous()
    spatial = None if spatial is None else spatial.contiguous()
    lib.winograd_kernels_f32(
        ptr(bank), ptr(mix), ptr(spatial), ptr(out), batch, num, n,
        num_threads(out.numel()))
    return out


def _input_transform(x: torch.Tensor, padding: Tuple[int, int]):
    """``V = B^T d B`` of every 4x4 input tile (stride 2) by the C loop: one
    pass over ``x``, writing V once (as PyTorch ops: eight passes).

    Returns:
        tuple: V [B, 16, C, tiles] and the tile grid (tiles_h, tiles_w).
    """
    check_float32_cpu('the Winograd input transform', x)
    batch, channels, h, w = x.shape
    ph, pw = padding
    tiles_h, tiles_w = (h + 2 * ph - 1) // 2, (w + 2 * pw - 1) // 2
    x = x.contiguous()
    v = x.new_empty(batch, 16, channels, tiles_h * tiles_w)
    lib = _LIBRARY.require()
    if lib.winograd_input_f32(
            ptr(x), ptr(v), batch, channels, h, w, ph, pw, tiles_h, tiles_w,
            num_threads(v.numel())):
        raise MemoryError('Winograd input transform: out of memory')
    return v, (tiles_h, tiles_w)


def _output_transform(m: torch.Tensor, grid: Tuple[int, int],
                      out_hw: Tuple[int, int]) -> torch.Tensor:
    """[B, C, out_h, out_w] = ``A^T m A`` of every tile of ``m`` [B, 16, C,
    tiles] by the C loop, cropped to ``out_hw``."""
    check_float32_cpu('the Winograd output transform', m)
    batch, _, channels, _ = m.shape
    m = m.contiguous()
    out = m.new_empty(batch, channels, *out_hw)
    lib = _LIBRARY.require()
    if lib.winograd_output_f32(
            ptr(m), ptr(out), batch, channels, out_hw[0], out_hw[1], grid[0],
            grid[1], num_threads(m.numel())):
        raise MemoryError('Winograd output transform: out of memory')
    return out


def winograd_conv2d(x: torch.Tensor,
                    kernels: torch.Tensor,
                    padding: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """3x3, stride 1 conv of sample ``b`` of ``x`` with the transformed kernel
    ``kernels[b]`` (from :func:`winograd_kernels`; [B, 16, C_out, C_in]).

    No bias.
    """
    v, grid = _input_transform(x, padding)
    return _output_transform(
        torch.matmul(kernels, v), grid, _output_hw(x, padding))


def winograd_kernels_from_blocks(mixtures: torch.Tensor,
                                 out: Optional[torch.Tensor] = None
                                 ) -> torch.Tensor:
    """``G W_b G^T`` of per-sample 3x3 kernels given in KernelWarehouse's
    mixture layout (:meth:`~mmdyn.ops.KWConv2d.mix_cells`), by the C loop.

    Args:
        mixtures (Tensor): [B, 9, g_o, g_i, c_o, c_i], float32 on CPU,
            contiguous: kernel position ``3 * row + col``, output block,
            input block, then the ``c_o x c_i`` cell.
        out (Tensor, optional): Contiguous float32 tensor of ``B * 16 *
            C_out * C_in`` elements to write into.

    Returns:
        Tensor: [B, 16, g_o * c_o, g_i * c_i].
    """
    if mixtures.dim() != 6 or mixtures.shape[1] != 9:
        raise ValueError('mixtures must be [B, 9, g_o, g_i, c_o, c_i], got '
                         f'{tuple(mixtures.shape)}')
    check_float32_cpu('winograd_kernels_from_blocks', mixtures)
    lib = _LIBRARY.require()
    batch, _, g_o, g_i, c_o, c_i = mixtures.shape
    out = _kernels_out(out, (batch, 16, g_o * c_o, g_i * c_i), mixtures)
    mixtures = mixtures.contiguous()
    lib.winograd_blocks_f32(
        ptr(mixtures), ptr(out), batch, g_o, g_i, c_o, c_i,
        num_threads(out.numel()))
    return out


def chunked_winograd_conv2d(x: torch.Tensor, c_out: int, padding: Tuple[int,
                                                                        int],
                            kernels_fn) -> torch.Tensor:
    """``winograd_conv2d`` of chunks of samples whose transformed kernels,
    ``kernels_fn(start, stop, out)`` -> [stop - start, 16, C_out, C_in]
    written into ``out`` (a flat slice of the reused workspace), fit that
    workspace."""
    batch = x.shape[0]
    per_sample = 16 * c_out * x.shape[1]
    chunk = max(1, min(batch, workspace_bytes() // (per_sample * 4)))
    workspace = kernel_workspace(chunk * per_sample, torch.float32, x.device)
    outs = []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        kernels = kernels_fn(start, stop,
                             workspace[:(stop - start) * per_sample])
        outs.append(winograd_conv2d(x[start:stop], kernels, padding))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def winograd_per_sample_conv2d(
    x: torch.Tensor,
    bank: torch.Tensor,
    mix: Optional[torch.Tensor],
    spatial: Optional[torch.Tensor],
    padding: Tuple[int, int] = (1, 1)
) -> torch.Tensor:
    """``conv(x[b], spatial[b] * sum_k mix[b, k] * bank[k])`` (3x3, stride 1,
    zero ``padding``) for each sample, by Winograd F(2x2, 3x3).

    The transformed kernels are built a chunk of samples at a time into the
    per-thread workspace of
    :func:`~mmdyn.ops.accel.chunked.kernel_workspace` (the whole batch
    when they fit in its ``THRESHOLDS['workspace']``). Inference only:
    callers check :func:`~mmdyn.ops.accel.paths.uses_winograd`. No bias.

    Args:
        x (Tensor): [B, C_in, H, W], float32 on CPU.
        bank (Tensor): [K, C_out, C_in, 3, 3].
        mix (Tensor, optional): [B, K]; None for ``K == 1``.
        spatial (Tensor, optional): [B, 9]; None for no spatial factor.
        padding (tuple[int, int]): Zero padding.

    Returns:
        Tensor: [B, C_out, H_out, W_out].
    """
    if x.shape[1] != bank.shape[2]:
        raise ValueError(f'x has {x.shape[1]} channels, the bank '
                         f'{bank.shape[2]}')
    return chunked_winograd_conv2d(
        x, bank.shape[1], padding, lambda start, stop, out: winograd_kernels(
            bank,
            None if mix is None else mix[start:stop],
            None if spatial is None else spatial[start:stop],
            out=out))


def winograd_block_conv2d(x: torch.Tensor,
                          mixtures: torch.Tensor,
                          padding: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``conv(x[b], W_b)`` (3x3, stride 1) by Winograd F(2x2, 3x3) for per-
    sample kernels in KernelWarehouse's mixture layout (see
    :func:`winograd_kernels_from_blocks`).

    Inference only. No bias.
    """
    c_out = mixtures.shape[2] * mixtures.shape[4]
    if x.shape[1] != mixtures.shape[3] * mixtures.shape[5]:
        raise ValueError(f'x has {x.shape[1]} channels, the kernels '
                         f'{mixtures.shape[3] * mixtures.shape[5]}')
    return chunked_winograd_conv2d(
        x, c_out, padding,
        lambda start, stop, out: winograd_kernels_from_blocks(
            mixtures[start:stop], out=out))


__all__ = [
    'WINOGRAD_SWITCH', 'load', 'num_tiles', 'winograd_kernels',
    'winograd_kernels_reference', 'winograd_kernels_from_blocks',
    'winograd_conv2d', 'winograd_per_sample_conv2d', 'winograd_block_conv2d',
    'chunked_winograd_conv2d'
]
