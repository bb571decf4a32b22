"""bfloat16 autocast on CPU for ``--amp``.

mmengine 0.10's ``AmpOptimWrapper`` asserts a CUDA/NPU/MLU/MUSA device, so
``--amp`` could not run on a CPU machine at all. :class:`CPUAmpOptimWrapper`
is the CPU counterpart: the forward pass (data preprocessor included, as in
``AmpOptimWrapper``) runs under ``torch.autocast('cpu', dtype=bfloat16)``.
bfloat16 has float32's exponent range, so no loss scaling is needed and the
optimizer update stays in float32 on float32 parameters.

mmcv's CPU kernels of ``nms`` and ``roi_align`` accept float32 only
("expected scalar type Float but found BFloat16" under autocast); they are
run in float32 (inputs cast up, floating outputs cast back to the input
dtype so that mmdet's bookkeeping tensors keep matching) the first time this
wrapper is built.
"""
import functools
import importlib
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ['CPUAmpOptimWrapper']

_FLOAT32_ONLY_OPS = (('mmcv.ops.nms', 'NMSop'),
                     ('mmcv.ops.roi_align', 'RoIAlignFunction'))


def _as_float32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    return value


def _float32_forward(forward):
    """Run ``forward`` in float32; give floating outputs the input dtype."""

    @functools.wraps(forward)
    def wrapped(ctx, *args, **kwargs):
        dtypes = [a.dtype for a in args
                  if torch.is_tensor(a) and a.is_floating_point()]
        if all(d == torch.float32 for d in dtypes):
            return forward(ctx, *args, **kwargs)
        with torch.autocast(device_type='cpu', enabled=False):
            out = forward(ctx, *[_as_float32(a) for a in args],
                          **{k: _as_float32(v) for k, v in kwargs.items()})
        if torch.is_tensor(out) and out.is_floating_point():
            out = out.to(dtypes[0])
        return out

    return wrapped


def _float32_backward(backward):
    """Run ``backward`` on float32 gradients (autograd casts the results
    back to the inputs' dtypes)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with torch.autocast(device_type='cpu', enabled=False):
            return backward(ctx, *[_as_float32(g) for g in grads])

    return wrapped


def _run_mmcv_ops_in_float32():
    """Wrap mmcv autograd functions whose CPU kernels need float32."""
    for module_name, name in _FLOAT32_ONLY_OPS:
        try:
            func = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
        if getattr(func, '_mmdyn_cpu_autocast', False):
            continue
        func.forward = staticmethod(_float32_forward(func.forward))
        if 'backward' in func.__dict__:
            func.backward = staticmethod(_float32_backward(func.backward))
        func._mmdyn_cpu_autocast = True


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
        _run_mmcv_ops_in_float32()

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield
