# Copyright (c) mmdyn contributors. All rights reserved.
"""Mmcv's CPU ``nms`` and ``roi_align`` under bfloat16 autocast.

``--amp`` on CPU (:class:`mmdyn.engine.amp.CPUAmpOptimWrapper`) runs the
forward pass under ``torch.autocast('cpu', dtype=bfloat16)``. mmcv 2.x's
CPU kernels of ``nms`` and ``roi_align`` accept float32 only: a detector's
RPN and RoI heads fail with ``expected scalar type Float but found
BFloat16``. :func:`apply` makes the two autograd functions (``NMSop``,
``RoIAlignFunction``) run in float32: inputs cast up, floating outputs cast
back to the input dtype (so that mmdet's bookkeeping tensors keep
matching), gradients computed in float32. :func:`revert` restores mmcv's
own functions.
"""
import functools
import importlib

import torch

PACKAGE = 'mmcv'
VERSIONS = '>=2.0.0,<2.3'
SUMMARY = ('mmcv\'s CPU nms/roi_align refuse bfloat16: detectors fail '
           'under CPU autocast (--amp on CPU)')
UPSTREAM = 'none'

OPS = (('mmcv.ops.nms', 'NMSop'), ('mmcv.ops.roi_align', 'RoIAlignFunction'))

# {(module, name): (forward, backward or None)} of mmcv, while applied.
_ORIGINAL = {}


def _as_float32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    return value


def _float32_forward(forward):
    """Run ``forward`` in float32; give floating outputs the input dtype."""

    @functools.wraps(forward)
    def wrapped(ctx, *args, **kwargs):
        dtypes = [
            a.dtype for a in args
            if torch.is_tensor(a) and a.is_floating_point()
        ]
        if all(d == torch.float32 for d in dtypes):
            return forward(ctx, *args, **kwargs)
        with torch.autocast(device_type='cpu', enabled=False):
            out = forward(ctx, *[_as_float32(a) for a in args], **{
                k: _as_float32(v)
                for k, v in kwargs.items()
            })
        if torch.is_tensor(out) and out.is_floating_point():
            out = out.to(dtypes[0])
        return out

    return wrapped


def _float32_backward(backward):
    """Run ``backward`` on float32 gradients (autograd casts the results back
    to the inputs' dtypes)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with torch.autocast(device_type='cpu', enabled=False):
            return backward(ctx, *[_as_float32(g) for g in grads])

    return wrapped


def _functions():
    for module_name, name in OPS:
        try:
            yield (module_name,
                   name), getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue


def is_needed():
    """Whether mmcv's CPU nms refuses bfloat16 boxes here (and the fix is not
    applied)."""
    if _ORIGINAL:
        return False
    try:
        from mmcv.ops import nms
    except ImportError:
        return False
    boxes = torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 2.1]],
                         dtype=torch.bfloat16)
    try:
        nms(boxes, torch.tensor([0.9, 0.8], dtype=torch.bfloat16), 0.5)
    except RuntimeError:
        return True
    return False


def apply():
    """Run ``NMSop`` and ``RoIAlignFunction`` in float32 (idempotent)."""
    for key, func in _functions():
        if key in _ORIGINAL:
            continue
        backward = func.__dict__.get('backward')
        _ORIGINAL[key] = (func.__dict__['forward'], backward)
        func.forward = staticmethod(_float32_forward(func.forward))
        if backward is not None:
            func.backward = staticmethod(_float32_backward(func.backward))


def revert():
    """Give mmcv its own ``forward``/``backward`` back."""
    for key, func in _functions():
        if key not in _ORIGINAL:
            continue
        forward, backward = _ORIGINAL.pop(key)
        func.forward = forward
        if backward is not None:
            func.backward = backward
