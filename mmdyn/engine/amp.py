# Copyright (c) mmdyn contributors. All rights reserved.
"""Bfloat16 autocast on CPU for ``--amp``.

mmengine 0.10's ``AmpOptimWrapper`` asserts a CUDA/NPU/MLU/MUSA device, so
``--amp`` could not run on a CPU machine at all. :class:`CPUAmpOptimWrapper`
is the CPU counterpart: the forward pass (data preprocessor included, as in
``AmpOptimWrapper``) runs under ``torch.autocast('cpu', dtype=bfloat16)``.
bfloat16 has float32's exponent range, so no loss scaling is needed and the
optimizer update stays in float32 on float32 parameters.

mmcv's CPU kernels of ``nms`` and ``roi_align`` accept float32 only
("expected scalar type Float but found BFloat16" under autocast): detectors
need the compat fix :mod:`mmdyn.compat.cpu_amp_ops`, applied by
:func:`mmdyn.compat.apply` (the tools call it). Building this wrapper
changes nothing in mmcv; it logs a warning when that fix is needed and not
applied.
"""
import sys
from contextlib import contextmanager

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from mmdyn.compat import cpu_amp_ops

__all__ = ['CPUAmpOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` that runs the forward pass in CPU autocast.

    Args:
        dtype (str | torch.dtype): autocast dtype, ``'bfloat16'`` (default)
            or ``'float16'``.
        **kwargs: as for :class:`mmengine.optim.OptimWrapper`.
    """

    valid_dtypes = ('bfloat16', 'float16')

    def __init__(self, dtype='bfloat16', **kwargs):
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace('torch.', '')
        if dtype not in self.valid_dtypes:
            raise ValueError(
                f'dtype must be one of {self.valid_dtypes}, got {dtype!r}')
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)
        # mmcv's ops are loaded by models that use them (detectors).
        if 'mmcv.ops' in sys.modules and cpu_amp_ops.is_needed():
            print_log(
                'CPUAmpOptimWrapper: mmcv\'s CPU nms/roi_align refuse '
                f'{dtype} here; detectors need mmdyn.compat.apply() (the '
                'tools call it) before training',
                logger='current',
                level=30)

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield
