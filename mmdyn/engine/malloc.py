# Copyright (c) mmdyn contributors. All rights reserved.
"""Glibc ``malloc`` settings that let a CPU process reuse freed memory.

By default glibc serves every allocation above its mmap threshold (128 KiB,
raised adaptively) with a fresh ``mmap`` and gives it back on ``free``, and
trims the heap top once 128 KiB of it are free. A training or inference
step allocates and frees the same multi-MB tensors (feature maps, their
gradients, per-sample kernels) over and over, so each of them is paid in
page faults again; on this project's CPU a page fault costs about 3 us (a
fresh 67 MB tensor took 53 ms to fill, 5 ms when its memory was reused,
measured in an earlier session; 8 batch-1 convs with a fresh 2.4 MB kernel
each: 35.5 ms, with one reused buffer 21.1 ms).
Dynamic convolutions allocate more such temporaries than a static network
and suffer most: ODConv-1x ResNet-50 training step at batch 8, 1.52x the
static ResNet-50 with the default settings and 1.24x with these at 1
thread, 1.64x and 1.32x at 2 threads (benchmarks/models.md).

:func:`tune_malloc` keeps blocks up to 32 MiB (glibc's largest accepted
mmap threshold) in the heap and stops trimming it, the same effect as the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
environment variables. The cost is that the resident set stays at its peak
instead of shrinking between iterations, as with PyTorch's CUDA caching
allocator. ``tools/train.py``, ``tools/test.py`` and the benchmarks call it;
``MMDYN_MALLOC_TUNING=0`` turns it off.
"""
import ctypes
import sys

from mmdyn.ops import switches

__all__ = ['tune_malloc', 'MALLOC_TUNING_ENV']

MALLOC_TUNING_ENV = switches.MALLOC_TUNING

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 * 1024**2),  # HEAP_MAX_SIZE / 2 on 64-bit glibc
    (_M_TRIM_THRESHOLD, 4 * 1024**3),
    (_M_TOP_PAD, 256 * 1024**2),
)


def tune_malloc(enable=None) -> bool:
    """Apply the settings above to this process.

    Args:
        enable (bool, optional): None reads ``MMDYN_MALLOC_TUNING`` (on
            unless it is ``0``, ``false`` or ``off``).

    Returns:
        bool: whether the settings are in effect (False when disabled, off
        Linux, or with a C library without glibc's ``mallopt``).
    """
    enable = switches.malloc_tuning(enable)
    if not enable or not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
