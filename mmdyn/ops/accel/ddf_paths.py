# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of the DDF operator (:func:`~mmdyn.ops.ddf.ddf`)
and of DDF-Up: each computes :func:`~mmdyn.ops.ddf.ddf_reference`'s result
another way. Which one runs is decided once per call by
:func:`~mmdyn.ops.accel.paths.ddf_path`.

* ``'taps'``: a pure-PyTorch loop over the k*k filter taps (plain ops
  under graph capture; otherwise :class:`_DDFTaps`, with a tap-by-tap
  backward that keeps only the inputs).
* ``'fused'``: the fused C loops (:mod:`~mmdyn.ops.accel.ddf_cpu`) with an
  explicit backward; under ``torch.compile`` the ``mmdyn::ddf`` custom
  operator (:mod:`~mmdyn.ops.accel.custom_ops`).
* ``'triton'``: the Triton kernels (:mod:`~mmdyn.ops.accel.ddf_triton`).

torch only.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..capture import compiling, graph_capture
from . import ddf_cpu, ddf_export_forms, ddf_triton, export_forms
from .custom_ops import ddf_op


def taps_view(xp: torch.Tensor, i: int, j: int, out_hw: Tuple[int, int],
              dilation: int, stride: int) -> torch.Tensor:
    """The input values tap (i, j) sees, as a strided view of padded ``xp``."""
    Ho, Wo = out_hw
    y0, x0 = i * dilation, j * dilation
    return xp[:, :, y0:y0 + (Ho - 1) * stride + 1:stride,
              x0:x0 + (Wo - 1) * stride + 1:stride]


def pad_for_taps(x: torch.Tensor, kernel_size: int, dilation: int, stride: int,
                 out_hw: Tuple[int, int]) -> torch.Tensor:
    r = (kernel_size - 1) // 2 * dilation
    H, W = x.shape[-2:]
    # Enough zeros on the far side for the last output row/column.
    bottom = max(0, (out_hw[0] - 1) * stride + r - (H - 1))
    right = max(0, (out_hw[1] - 1) * stride + r - (W - 1))
    return F.pad(x, (r, right, r, bottom))


def ddf_taps(x, cf, sf, kernel_size, dilation, stride, add, out_hw):
    """Pure-PyTorch DDF: one strided view and two multiply-adds per tap.

    Differentiable by autograd and exportable to ONNX (slices, muls, adds).
    ``cf`` is [B, C, k*k], ``sf`` [B, k*k, Ho, Wo] (one head).
    """
    xp = pad_for_taps(x, kernel_size, dilation, stride, out_hw)
    out = None
    for i in range(kernel_size):
        for j in range(kernel_size):
            t = i * kernel_size + j
            shifted = taps_view(xp, i, j, out_hw, dilation, stride)
            c_t = cf[:, :, t, None, None]
            s_t = sf[:, t:t + 1]
            term = shifted * (c_t + s_t) if add else (shifted * s_t) * c_t
            out = term if out is None else out + term
    return out


class _DDFTaps(torch.autograd.Function):
    """The tap loop with an explicit, tap-by-tap backward.

    Autograd through :func:`ddf_taps` saves every per-tap product (about
    12x the output in a forward+backward); this keeps only the inputs and
    makes a few output-sized temporaries per tap. Used off CPU (e.g. CUDA)
    or when the fused kernel is unavailable.
    """

    @staticmethod
    def forward(ctx, x, cf, sf, kernel_size, dilation, stride, add, out_hw):
        ctx.conf = (kernel_size, dilation, stride, add, out_hw)
        ctx.save_for_backward(x, cf, sf)
        return ddf_taps(x, cf, sf, kernel_size, dilation, stride, add, out_hw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kernel_size, dilation, stride, add, out_hw = ctx.conf
        x, cf, sf = ctx.saved_tensors
        need_x, need_cf, need_sf = ctx.needs_input_grad[:3]
        xp = pad_for_taps(x, kernel_size, dilation, stride, out_hw)
        gxp = torch.zeros_like(xp) if need_x else None
        gcf = torch.empty_like(cf) if need_cf else None
        gsf = torch.empty_like(sf) if need_sf else None
        for i in range(kernel_size):
            for j in range(kernel_size):
                t = i * kernel_size + j
                shifted = taps_view(xp, i, j, out_hw, dilation, stride)
                c_t = cf[:, :, t, None, None]
                s_t = sf[:, t:t + 1]
                if need_x:
                    g_view = taps_view(gxp, i, j, out_hw, dilation, stride)
                    if add:
                        g_view.addcmul_(grad_out, c_t + s_t)
                    else:
                        g_view.addcmul_(grad_out * s_t, c_t)
                if not (need_cf or need_sf):
                    continue
                prod = grad_out * shifted
                if need_cf:
                    gcf[:, :, t] = (
                        prod.sum((2, 3)) if add else torch.einsum(
                            'bchw,bhw->bc', prod, s_t[:, 0]))
                if need_sf:
                    gsf[:, t] = (
                        prod.sum(1) if add else torch.einsum(
                            'bchw,bc->bhw', prod, c_t[:, :, 0, 0]))
        gx = None
        if need_x:
            r = (kernel_size - 1) // 2 * dilation
            gx = gxp[:, :, r:r + x.shape[2], r:r + x.shape[3]]
        return gx, gcf, gsf, None, None, None, None, None


class _DDFFusedCPU(torch.autograd.Function):
    """DDF on CPU through the fused C loops, with an explicit backward.

    Only ``x``, the channel filter and the spatial filter are saved (no
    per-tap products), and the backward is one pass for (x, channel filter)
    and one for the spatial filter.
    """

    @staticmethod
    def forward(ctx, x, cf, sf, kernel_size, dilation, stride, add, lib):
        ctx.conf = (kernel_size, dilation, stride, add, lib)
        ctx.save_for_backward(x, cf, sf)
        return ddf_cpu.forward(lib, x, cf, sf, sf.shape[-2:], kernel_size,
                               dilation, stride, add)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kernel_size, dilation, stride, add, lib = ctx.conf
        x, cf, sf = ctx.saved_tensors
        grads = ddf_cpu.backward(lib, grad_out.contiguous(), x, cf, sf,
                                 kernel_size, dilation, stride, add,
                                 ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


class _DDFUpFusedCPU(torch.autograd.Function):
    """DDF-Up's s*s stride-1 DDFs on CPU, each written straight into its sub-
    pixel phase of the [B, C, s*H, s*W] output (no stack and pixel shuffle
    copies).

    ``cf`` is [s*s, B, C, k*k], ``sf`` [s*s, B, k*k, H, W].
    """

    @staticmethod
    def forward(ctx, x, cf, sf, kernel_size, dilation, add, scale, lib):
        ctx.conf = (kernel_size, dilation, add, scale, lib)
        ctx.save_for_backward(x, cf, sf)
        return ddf_cpu.forward(lib, x, cf, sf, x.shape[-2:], kernel_size,
                               dilation, 1, add, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kernel_size, dilation, add, scale, lib = ctx.conf
        x, cf, sf = ctx.saved_tensors
        B, C, H, W = x.shape
        needs = ctx.needs_input_grad[:3]
        grad6 = grad_out.reshape(B, C, H, scale, W, scale)
        gx = torch.zeros_like(x) if needs[0] else None
        gcf = torch.empty_like(cf) if needs[1] else None
        gsf = torch.empty_like(sf) if needs[2] else None
        for p in range(scale * scale):
            go = grad6[:, :, :, p // scale, :, p % scale].contiguous()
            gx_p, gcf_p, gsf_p = ddf_cpu.backward(lib, go, x, cf[p], sf[p],
                                                  kernel_size, dilation, 1,
                                                  add, needs)
            if needs[0]:
                gx += gx_p
            if needs[1]:
                gcf[p] = gcf_p
            if needs[2]:
                gsf[p] = gsf_p
        return gx, gcf, gsf, None, None, None, None, None


def _fused(x, cf, sf, kernel_size, dilation, stride, add):
    """The C loops (float32/float64; half types run in float32, as the
    official CUDA op does); under ``torch.compile`` as ``mmdyn::ddf``."""
    if compiling():
        return ddf_op(x, cf, sf, kernel_size, dilation, stride, add, 1)
    return _DDFFusedCPU.apply(x, cf, sf, kernel_size, dilation, stride, add,
                              ddf_cpu.load())


def run(path: str, x: torch.Tensor, cf: torch.Tensor, sf: torch.Tensor,
        out_hw: Tuple[int, int], kernel_size: int, dilation: int, stride: int,
        add: bool, head: int) -> torch.Tensor:
    """DDF by ``path`` (``'fused'``, ``'taps'`` or ``'triton'``) on checked
    arguments: ``cf`` [B, C, k*k], ``sf`` [B, head*k*k, Ho, Wo]. Returns
    [B, C, Ho, Wo] in the promoted dtype of the inputs."""
    if path == 'triton':
        return ddf_triton.ddf(x, cf, sf, kernel_size, dilation, stride, add,
                              head)
    B, C, H, W = x.shape
    kk = kernel_size * kernel_size
    if head > 1:
        # Each head is an independent DDF over its channel group.
        x = x.reshape(B * head, C // head, H, W)
        cf = cf.reshape(B * head, C // head, kk)
        sf = sf.reshape(B * head, kk, *out_hw)
    out_dtype = torch.promote_types(
        torch.promote_types(x.dtype, cf.dtype), sf.dtype)
    if path == 'fused':
        work = torch.float64 if out_dtype == torch.float64 else torch.float32
        x, cf, sf = (t.to(work).contiguous() for t in (x, cf, sf))
        out = _fused(x, cf, sf, kernel_size, dilation, stride,
                     add).to(out_dtype)
    elif path == 'taps':
        args = (x.to(out_dtype), cf.to(out_dtype), sf.to(out_dtype),
                kernel_size, dilation, stride, add, out_hw)
        if export_forms.exporting():  # a graph for ONNX runtimes
            out = ddf_export_forms.ddf(*args)
        elif graph_capture():
            out = ddf_taps(*args)  # plain ops, for the tracer to record
        else:
            out = _DDFTaps.apply(*args)
    else:
        raise ValueError(f'no DDF path {path!r} here')
    return out.reshape(B, C, *out_hw) if head > 1 else out


def ddf_up_fused(x: torch.Tensor, cfs: List[torch.Tensor],
                 sfs: List[torch.Tensor], kernel_size: int, dilation: int,
                 add: bool, scale: int) -> torch.Tensor:
    """DDF-Up (one head) by the C loops: the s*s phase filters ``cfs`` ([B, C,
    k, k] each) and ``sfs`` ([B, k*k, H, W] each) straight into the [B, C, s*H,
    s*W] output, in the dtype of ``x``."""
    B, C = x.shape[:2]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cf = torch.stack(cfs).to(work).reshape(scale * scale, B, C,
                                           kernel_size * kernel_size)
    sf = torch.stack(sfs).to(work)
    if compiling():  # the C loops as the mmdyn::ddf operator
        out = ddf_op(
            x.to(work).contiguous(), cf, sf.contiguous(), kernel_size,
            dilation, 1, add, scale)
    else:
        out = _DDFUpFusedCPU.apply(
            x.to(work).contiguous(), cf, sf, kernel_size, dilation, add, scale,
            ddf_cpu.load())
    return out.to(x.dtype)


def ddf_up_triton(x: torch.Tensor, cfs: List[torch.Tensor],
                  sfs: List[torch.Tensor], kernel_size: int, dilation: int,
                  add: bool, head: int, scale: int) -> torch.Tensor:
    """DDF-Up by the sub-pixel Triton kernels, in the dtype of ``x``."""
    B, C = x.shape[:2]
    out = ddf_triton.ddf_up(
        x,
        torch.stack(cfs).reshape(scale * scale,
                                 B, C, kernel_size * kernel_size),
        torch.stack(sfs), kernel_size, dilation, add, head, scale)
    return out.to(x.dtype)
