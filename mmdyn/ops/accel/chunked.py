# Copyright (c) mmdyn contributors. All rights reserved.
"""Per-sample kernels built a chunk of samples at a time into a reused
workspace, then batch-1 convs: the CPU inference path of deep layers.

There, per-sample kernels are much larger than their feature maps: building
them into one workspace kept between calls means that the ``[B, numel(W)]``
tensor of all kernels (tens of MB) is not a fresh allocation, page-faulted,
on every call. Inference only: the workspace is overwritten by the next
call (the path registry, :mod:`mmdyn.ops.accel.paths`, sends only
inference here).

Measured on AVX2 (2026-12-01) and on AVX-512 (2026-12-06,
``benchmarks/vendor_paths.py``): on both it is the fastest per-sample path
of the deepest layers (ResNet-50 stage 4, kernels tens of times larger than
the maps), where building all kernels of the batch at once costs more than
the convs.

torch only.
"""
import math
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .thresholds import THRESHOLDS

_workspaces = threading.local()


def workspace_bytes() -> int:
    """Size of the per-thread block kernels are built into
    (:data:`~mmdyn.ops.accel.thresholds.THRESHOLDS` ``['workspace']``)."""
    return THRESHOLDS['workspace']['kernel_bytes']


def kernel_workspace(numel: int,
                     dtype: torch.dtype,
                     device: torch.device,
                     slot: str = 'kernels') -> torch.Tensor:
    """A reused 1-D tensor of at least ``numel`` elements, one per thread,
    dtype, device and ``slot``, grown on demand and kept between calls (see
    :func:`release_kernel_workspaces`). Two buffers that must be alive at the
    same time (KernelWarehouse's mixtures and the Winograd kernels made from
    them) use different slots.

    Why: a fresh tensor of a batch of deep-layer kernels (tens of MB) is,
    with glibc's default thresholds, a new mmap paid in page faults on
    every call. Kept, its pages stay mapped. Building the whole batch's
    kernels at once, then convolving, also beats building one sample's
    kernel per conv (benchmarks/README.md).
    """
    cache = getattr(_workspaces, 'blocks', None)
    if cache is None:
        cache = _workspaces.blocks = {}
    key = (dtype, device, slot)
    block = cache.get(key)
    if block is None or block.numel() < numel:
        # A normal tensor even inside torch.inference_mode: an inference
        # tensor could not be written outside it by later calls.
        with torch.inference_mode(False):
            block = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return block[:numel]


def release_kernel_workspaces() -> None:
    """Free this thread's kernel workspaces."""
    _workspaces.blocks = {}


def chunked_per_sample_conv2d(x: torch.Tensor,
                              kernels_fn: Callable[[int, int, torch.Tensor],
                                                   torch.Tensor],
                              kernel_shape: Tuple[int, ...],
                              dtype: Optional[torch.dtype],
                              stride: Tuple[int, int] = (1, 1),
                              padding: Tuple[int, int] = (0, 0),
                              dilation: Tuple[int, int] = (1, 1),
                              groups: int = 1) -> torch.Tensor:
    """``conv(x[b], kernel_b)`` for each sample, the kernels built a chunk of
    samples at a time into one reused workspace.

    ``kernels_fn(start, stop, out)`` returns the kernels of samples
    ``start:stop`` as a [stop - start, numel] tensor; ``out`` is a
    workspace slice of that shape and ``dtype`` that it may write them into
    (``out=``) and return, or None when ``dtype`` is None (a ``kernels_fn``
    that allocates its own). The chunk is the whole batch when its kernels
    fit in :func:`workspace_bytes`. Each sample is then one batch-1
    ``F.conv2d`` (on CPU faster than the batch-as-groups conv of the same
    kernels, benchmarks/README.md). No bias: callers add theirs. Inference
    only (the workspace is overwritten by the next call).
    """
    batch = x.shape[0]
    numel = math.prod(int(size) for size in kernel_shape)
    item = (dtype or x.dtype).itemsize
    chunk = max(1, min(batch, workspace_bytes() // (numel * item)))
    workspace = None if dtype is None else kernel_workspace(
        chunk * numel, dtype, x.device).view(chunk, numel)
    outs = []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        out = None if workspace is None else workspace[:stop - start]
        kernels = kernels_fn(start, stop, out)
        for xb, kernel in zip(x[start:stop].split(1, dim=0),
                              kernels.unbind(0)):
            outs.append(
                F.conv2d(xb, kernel.view(kernel_shape), None, stride, padding,
                         dilation, groups))
    return torch.cat(outs, dim=0)


def repeat_positions(rows: int) -> Tuple[int, int]:
    """Layout for scaling a [B, rows*P] kernel by a [B, P] attention.

    Broadcasting a [B, 1, P] factor over a [B, rows, P] view runs an inner
    loop of only P (9) elements; repeating the factor R times gives rows of
    9R contiguous elements, faster on CPU. Returns (R, rows / R), R the gcd
    of ``rows`` and ``THRESHOLDS['odconv']['scale_repeat']``.
    """
    repeat = math.gcd(rows, THRESHOLDS['odconv']['scale_repeat'])
    return repeat, rows // repeat


def mix_kernels_into(kernel: Optional[torch.Tensor],
                     bank: torch.Tensor,
                     spatial: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P],
    written into ``out`` when given; ``kernel`` None means one kernel with
    attention 1.

    No autograd: the forward of :class:`_MixKernels` and the
    chunked per-sample kernels.
    """
    batch, positions = spatial.shape
    repeat, rows = repeat_positions(bank.shape[1] // positions)
    scale = spatial.repeat(1, repeat).unsqueeze(1)
    if out is None:
        out = bank.new_empty(batch, bank.shape[1])
    mixed = out.view(batch, rows, positions * repeat)
    if kernel is None or kernel.shape[1] == 1:
        # One kernel: a broadcast product, one pass over the output
        # (a [B, 1] x [1, N] matmul is an outer product MKL runs slowly).
        if kernel is not None:
            scale = scale * kernel.view(-1, 1, 1)
        torch.mul(bank.view(1, rows, positions * repeat), scale, out=mixed)
    else:
        torch.matmul(kernel, bank, out=out)
        mixed.mul_(scale)
    return out
