# Copyright (c) mmdyn contributors. All rights reserved.
"""Every ``MMDYN_*`` environment switch of mmdyn, parsed in one place.

============================ ==============================================
variable                     effect
============================ ==============================================
``MMDYN_DISABLE_ACCEL``      ``1``: no C loop, ``mmdyn::`` custom operator
                             or Triton kernel runs; every layer takes its
                             pure-PyTorch paths (the accelerated paths of
                             :mod:`mmdyn.ops.accel` report themselves
                             unavailable)
``MMDYN_WINOGRAD``           ``0``: the Winograd C loops off
``MMDYN_KW_CPU_KERNEL``      ``0``: KernelWarehouse's C cell product off
``MMDYN_DDF_CPU_KERNEL``     ``0``: DDF's fused C loops off
``MMDYN_TAP_SUM_CPU_KERNEL`` ``0``: the C tap sum (ODConv's
                             ``tap_gemm``, the ``taps`` paths of
                             KernelWarehouse and CondConv/DyConv) off
``MMDYN_KW_PACKED_CELLS``    ``0``: no packed copy of the warehouses
``MMDYN_TRITON_AUTOTUNE``    ``0``: DDF's Triton kernels use one fixed
                             configuration instead of autotuning
``MMDYN_CACHE_DIR``          where the C loops are built (default
                             ``~/.cache/mmdyn``)
``MMDYN_MAX_ALLOC_BYTES``    the largest parameter tensor a layer may
                             allocate, in bytes (default 4 GiB)
``MMDYN_MALLOC_TUNING``      ``0``: leave glibc's malloc settings alone
                             (:mod:`mmdyn.engine.malloc`)
``MMDYN_AUTOTUNE``           ``1``: ``impl='auto'`` layers time their
                             candidate paths on first use of a shape and keep
                             the fastest (:mod:`mmdyn.ops.accel.autotune`);
                             ``0``: the size thresholds decide. Unset:
                             :data:`AUTOTUNE_DEFAULT`
============================ ==============================================

An on/off switch is off when its value is ``0``, ``false``, ``off`` or
``no`` (any case), on otherwise and when unset. Values are read at every
call: setting a variable in a running process takes effect at the next
check (a C library already loaded stays loaded).

No torch, no OpenMMLab import: engine code reads its switches here too.
"""
import os
import os.path as osp
import re
from typing import Optional

#: The switch that turns every accelerator off.
DISABLE_ACCEL = 'MMDYN_DISABLE_ACCEL'
#: On/off switches of the accelerators, each naming what it turns off.
WINOGRAD = 'MMDYN_WINOGRAD'
KW_CPU_KERNEL = 'MMDYN_KW_CPU_KERNEL'
DDF_CPU_KERNEL = 'MMDYN_DDF_CPU_KERNEL'
TAP_SUM_CPU_KERNEL = 'MMDYN_TAP_SUM_CPU_KERNEL'
KW_PACKED_CELLS = 'MMDYN_KW_PACKED_CELLS'
TRITON_AUTOTUNE = 'MMDYN_TRITON_AUTOTUNE'
ACCEL_SWITCHES = {
    WINOGRAD: 'the Winograd C loops',
    KW_CPU_KERNEL: "KernelWarehouse's C cell product",
    DDF_CPU_KERNEL: "DDF's fused C loops",
    TAP_SUM_CPU_KERNEL: 'the C tap sum',
    KW_PACKED_CELLS: 'the packed copies of the warehouses',
    TRITON_AUTOTUNE: "the autotuning of DDF's Triton kernels",
}
CACHE_DIR = 'MMDYN_CACHE_DIR'
MAX_ALLOC_BYTES = 'MMDYN_MAX_ALLOC_BYTES'
MALLOC_TUNING = 'MMDYN_MALLOC_TUNING'
AUTOTUNE = 'MMDYN_AUTOTUNE'
#: The ``-march`` the C loops are built for on x86 (default ``native``;
#: e.g. ``haswell`` for AVX2 code on an AVX-512 machine: see
#: :mod:`mmdyn.analysis.machine`'s ISA caps).
C_MARCH = 'MMDYN_C_MARCH'
#: Whether the layers time their paths (:mod:`mmdyn.ops.accel.autotune`)
#: when ``MMDYN_AUTOTUNE`` is unset; set by ``benchmarks/autotune.py``
#: (tuning cost against time saved on the demo trainings).
AUTOTUNE_DEFAULT = False
#: Every switch (for documentation and tests).
SWITCHES = (DISABLE_ACCEL, *ACCEL_SWITCHES, CACHE_DIR, MAX_ALLOC_BYTES,
            MALLOC_TUNING, AUTOTUNE, C_MARCH)

_OFF = ('0', 'false', 'off', 'no')


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == '':
        return default
    return value.strip().lower() not in _OFF


def switch_on(name: str) -> bool:
    """Whether the on/off switch ``name`` is on (unset: on)."""
    return _flag(name, True)


def accel_disabled() -> bool:
    """Whether ``MMDYN_DISABLE_ACCEL`` turns every accelerator off."""
    return _flag(DISABLE_ACCEL, False)


def accel_enabled(name: str) -> bool:
    """Whether the accelerator switch ``name`` (a key of
    :data:`ACCEL_SWITCHES`) is on: not set off, and not every accelerator
    turned off by ``MMDYN_DISABLE_ACCEL``."""
    if name not in ACCEL_SWITCHES:
        raise ValueError(f'unknown accelerator switch {name!r}; one of '
                         f'{tuple(ACCEL_SWITCHES)}')
    return not accel_disabled() and switch_on(name)


def c_march() -> str:
    """The ``-march`` value of the C loops' x86 builds: ``$MMDYN_C_MARCH`` or
    ``native``.

    Raises ValueError for a value that is not a CPU name
    (letters, digits, ``-``, ``_``, ``.``).
    """
    value = os.environ.get(C_MARCH, '').strip() or 'native'
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', value):
        raise ValueError(f'{C_MARCH}={value!r} is not a -march CPU name '
                         '(e.g. native, haswell, skylake-avx512)')
    return value


def cache_dir() -> str:
    """Where the C loops are built: ``$MMDYN_CACHE_DIR`` or
    ``~/.cache/mmdyn``."""
    return os.environ.get(CACHE_DIR) or osp.join(
        osp.expanduser('~'), '.cache', 'mmdyn')


def max_alloc_bytes(default: int) -> int:
    """``$MMDYN_MAX_ALLOC_BYTES`` as a positive int, ``default`` when unset;
    ``ValueError`` naming the variable for anything else."""
    value = os.environ.get(MAX_ALLOC_BYTES)
    if value is None or value == '':
        return default
    try:
        budget = int(value)
    except ValueError:
        budget = -1
    if budget <= 0:
        raise ValueError(f'{MAX_ALLOC_BYTES} must be a positive number '
                         f'of bytes, got {value!r}')
    return budget


def malloc_tuning(enable: Optional[bool] = None) -> bool:
    """Whether to tune glibc's malloc: ``enable`` when given, else
    ``MMDYN_MALLOC_TUNING`` (on unless switched off)."""
    if enable is not None:
        return bool(enable)
    return switch_on(MALLOC_TUNING)


def autotune_enabled() -> bool:
    """Whether ``MMDYN_AUTOTUNE`` turns the measured path choice on (unset:

    :data:`AUTOTUNE_DEFAULT`).
    """
    return _flag(AUTOTUNE, AUTOTUNE_DEFAULT)
