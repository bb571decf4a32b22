# Copyright (c) mmdyn contributors. All rights reserved.
"""Per-sample convolutions whose kernels autograd does not keep: the
training path ``'recompute'`` of ODConv, CondConv/DyConv and KernelWarehouse.

A dynamic layer convolves sample ``b`` with its own kernel ``W_b``, built
from a parameter bank and small per-sample attentions. Plain autograd keeps
the ``[B, C_out, C_in/g, kh, kw]`` tensor of all kernels for the backward
pass: for a KernelWarehouse ResNet-50 at batch 64 about 23.5 M kernel
elements times 64, more than the network's own activations.
:func:`conv2d_recomputed_kernel` keeps only the input and the kernel's
inputs (bank and attentions) and builds the kernels again in the backward:

* forward: ``W = make_kernel(*kernel_inputs)`` without autograd, the
  per-sample conv, ``W`` freed;
* backward: ``W`` rebuilt with autograd, ``grad_x`` and ``grad_W`` by one
  convolution backward (the batch folded into the groups on CUDA, one
  batch-1 conv per sample elsewhere), then ``torch.autograd.grad(W,
  kernel_inputs, grad_W)``.

Rebuilding costs one more kernel assembly per step (``[B, K] x [K,
numel(W)]`` for ODConv/DyConv, ``[B, m, n] x [n, cell]`` for
KernelWarehouse), small beside the convolutions on large maps. On
accelerators ``impl='auto'`` takes this path for every training forward
(memory is what limits training there); on CPU only where the rebuild is
cheap next to the conv (:func:`rebuild_is_cheap`, thresholds
``THRESHOLDS['recompute']``, one per family), so that the CPU training
step keeps its speed. KernelWarehouse's ``groups=1`` layers on CPU take
``'mixture_gemm'`` (:mod:`~mmdyn.ops.accel.kw_train`) before this path:
the conv from the mixtures with a GEMM backward that rebuilds them by
the same threshold.

The adapters (:func:`odconv_recompute`, :func:`mixture_recompute`,
:func:`kernel_warehouse_recompute`) take the layer object and the
attentions its forward computed, and return the layer's output. ODConv's
channel and filter attentions are folded into the rebuilt kernel, so no
tensor of feature-map size besides the input is kept.

Autocast: the kernels are built under the autocast state of the forward
(in the backward too) and the conv runs in the dtype autocast gives
``F.conv2d``. Double backward is not supported (``RuntimeError``). Graph
capture does not take this path (the backward calls
``torch.autograd.grad``); the layers' dispatch runs their other paths
there.

torch only; the layers are received, never imported.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..capture import graph_capture
from .thresholds import THRESHOLDS

Pair = Tuple[int, int]
_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)
_NO_DOUBLE_BACKWARD = (
    "the 'recompute' path of the dynamic convs (per-sample kernels rebuilt "
    'in the backward) has no double backward (create_graph=True); build '
    "the layer with impl='reference' for higher-order gradients")


def conv2d_recomputed_kernel(x: torch.Tensor,
                             make_kernel: Callable[..., torch.Tensor],
                             kernel_inputs: Sequence[Optional[torch.Tensor]],
                             bias: Optional[torch.Tensor] = None,
                             stride: Pair = (1, 1),
                             padding: Pair = (0, 0),
                             dilation: Pair = (1, 1),
                             groups: int = 1) -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` with ``make_kernel(*kernel_inputs) [b]``,
    keeping only ``x`` and ``kernel_inputs`` for the backward.

    Args:
        x (Tensor): [B, C_in, H, W], B >= 1.
        make_kernel (callable): ``make_kernel(*kernel_inputs)`` -> the
            per-sample kernels [B, C_out, C_in // groups, kh, kw]. Called
            once in the forward (no autograd) and once in the backward (with
            autograd, on detached copies of ``kernel_inputs``): it must be
            a pure function of its arguments.
        kernel_inputs (sequence[Tensor | None]): Its arguments (parameters
            and attentions); None entries are passed through.
        bias (Tensor, optional): [C_out] or [B, C_out], added outside (its
            gradient needs nothing saved).
        stride, padding, dilation (tuple[int, int]): as ``F.conv2d``.
        groups (int): as ``F.conv2d``.

    Returns:
        Tensor: [B, C_out, H_out, W_out].
    """
    geometry = (tuple(int(v) for v in stride), tuple(int(v) for v in padding),
                tuple(int(v) for v in dilation), int(groups))
    out = _RecomputedKernelConv2d.apply(x, make_kernel, geometry,
                                        *kernel_inputs)
    if bias is not None:
        b = bias if bias.dim() == 2 else bias.unsqueeze(0)
        out = out + b.reshape(-1, out.shape[1], 1, 1).to(out.dtype)
    return out


def _compute_dtype(x: torch.Tensor
                   ) -> Tuple[bool, Optional[torch.dtype], torch.dtype]:
    """(autocast on, autocast dtype, dtype of the conv) for ``x`` now."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return True, dtype, dtype if x.dtype in _LOW_PRECISION else x.dtype
    return False, None, x.dtype


def _grouped(x: torch.Tensor) -> bool:
    """The batch folded into the groups (one conv) on accelerators; on CPU
    oneDNN's backward of that form is far slower than one conv per sample."""
    return x.device.type != 'cpu' and x.shape[0] > 1


def per_sample_conv_forward(x, kernel, stride, padding, dilation, groups):
    """``conv(x[b], kernel[b])`` for every sample (no bias)."""
    batch = x.shape[0]
    if _grouped(x):
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            kernel.reshape(-1, *kernel.shape[2:]), None, stride, padding,
            dilation, groups * batch)
        return out.view(batch, -1, *out.shape[2:])
    return torch.cat([
        F.conv2d(xb, kb, None, stride, padding, dilation, groups)
        for xb, kb in zip(x.split(1), kernel.unbind(0))
    ])


def per_sample_conv_backward(grad_out, x, kernel, stride, padding, dilation,
                             groups, need_x: bool, need_kernel: bool):
    """(grad of ``x`` or None, grad of ``kernel`` or None) of
    :func:`per_sample_conv_forward`."""
    backward = torch.ops.aten.convolution_backward
    mask = [need_x, need_kernel, False]
    geometry = (list(stride), list(padding), list(dilation), False, [0, 0])
    if _grouped(x):
        batch = x.shape[0]
        grad_x, grad_kernel, _ = backward(
            grad_out.reshape(1, -1, *grad_out.shape[2:]),
            x.reshape(1, -1, *x.shape[2:]),
            kernel.reshape(-1, *kernel.shape[2:]), None, *geometry,
            groups * batch, mask)
        return (grad_x.view_as(x) if need_x else None,
                grad_kernel.view_as(kernel) if need_kernel else None)
    # Written sample by sample into the results: no list of B gradients
    # alive beside them.
    grad_x = torch.empty_like(x) if need_x else None
    grad_kernel = torch.empty_like(kernel) if need_kernel else None
    for b, (gb, xb, kb) in enumerate(
            zip(grad_out.split(1), x.split(1), kernel.unbind(0))):
        gx, gk, _ = backward(gb, xb, kb, None, *geometry, groups, mask)
        if need_x:
            grad_x[b:b + 1].copy_(gx)
        if need_kernel:
            grad_kernel[b].copy_(gk)
    return grad_x, grad_kernel


class _RecomputedKernelConv2d(torch.autograd.Function):
    """See :func:`conv2d_recomputed_kernel`.

    Inputs: ``x, make_kernel,
    geometry, *kernel_inputs``.
    """

    @staticmethod
    def forward(ctx, x, make_kernel, geometry, *kernel_inputs):
        autocast, autocast_dtype, dtype = _compute_dtype(x)
        kernel = make_kernel(*kernel_inputs)
        with torch.autocast(x.device.type, enabled=False):
            out = per_sample_conv_forward(
                x.to(dtype), kernel.to(dtype), *geometry)
        del kernel
        ctx.save_for_backward(x, *kernel_inputs)
        ctx.make_kernel = make_kernel
        ctx.geometry = geometry
        ctx.autocast = (autocast, autocast_dtype)
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        x, *inputs = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        needs = ctx.needs_input_grad[3:]
        need_kernel = any(need and t is not None
                          for need, t in zip(needs, inputs))
        leaves = [
            t.detach().requires_grad_() if need and t is not None else t
            for need, t in zip(needs, inputs)
        ]
        autocast, autocast_dtype = ctx.autocast
        device = x.device.type
        with torch.set_grad_enabled(need_kernel), torch.autocast(
                device, dtype=autocast_dtype, enabled=autocast):
            kernel = ctx.make_kernel(*leaves)
        dtype = ctx.dtype
        with torch.autocast(device, enabled=False):
            grad_x, grad_kernel = per_sample_conv_backward(
                grad_out.to(dtype), x.to(dtype),
                kernel.detach().to(dtype), *ctx.geometry, need_x, need_kernel)
        grads = [None] * len(inputs)
        if need_kernel:
            wanted = [
                i for i, t in enumerate(leaves) if needs[i] and t is not None
            ]
            found = torch.autograd.grad(
                kernel, [leaves[i] for i in wanted],
                grad_kernel.to(kernel.dtype),
                allow_unused=True)
            for i, grad in zip(wanted, found):
                grads[i] = grad
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return (grad_x, None, None, *grads)


# Per-family adapters: the layer object and the attentions of its forward
# in, the layer's output out.


def odconv_kernel(groups: int, bank: torch.Tensor, channel: torch.Tensor,
                  filt: Optional[torch.Tensor],
                  spatial: Optional[torch.Tensor],
                  kernel: Optional[torch.Tensor]) -> torch.Tensor:
    """ODConv's per-sample kernel with all four attentions folded in:
    ``alpha_f[b, o] * alpha_c[b, i] * alpha_s[b, p] * sum_k alpha_w[b, k]
    W_k[o, i, p]`` ([B, C_out, C_in/g, kh, kw]), built in the bank's dtype (as
    the reference mixes its kernels).

    Two broadcast products over the full kernel, each along contiguous
    rows: by the [B, g, 1, C_in/g * kh*kw] product of the input-channel and
    spatial attentions, then by the filter attention, one factor per row.
    """
    num, c_out, c_in_g, kh, kw = bank.shape
    positions = kh * kw
    dtype = bank.dtype
    with torch.autocast(bank.device.type, enabled=False):
        flat = bank.reshape(num, -1)
        mixed = flat if kernel is None else kernel.to(dtype) @ flat
        mixed = mixed.view(-1, groups, c_out // groups, c_in_g * positions)
        inputs = channel.to(dtype).view(-1, groups, c_in_g, 1)
        if spatial is not None:
            inputs = inputs * spatial.to(dtype).view(-1, 1, 1, positions)
        else:
            inputs = inputs.expand(-1, groups, c_in_g, positions)
        mixed = mixed * inputs.reshape(-1, groups, 1, c_in_g * positions)
        if filt is not None:
            mixed = mixed * filt.to(dtype).view(-1, groups, c_out // groups, 1)
        return mixed.view(-1, c_out, c_in_g, kh, kw)


class _ScaledMapsConv2d(torch.autograd.Function):
    """``alpha_f * conv(alpha_c * x, W)`` with a static ``W`` (ODConv with
    one kernel and no spatial attention: its 1x1 layers), keeping ``x``,
    the attentions, ``W`` and the output (which the next layer keeps
    anyway: the same storage), not ``alpha_c * x`` nor the unscaled conv
    output. The backward rebuilds ``alpha_c * x`` (one product of the
    input) and reads the unscaled output as ``out / alpha_f`` (``alpha_f``
    is a sigmoid, never 0). Inputs: ``x, channel, filt, weight,
    geometry``."""

    @staticmethod
    def forward(ctx, x, channel, filt, weight, geometry):
        autocast, autocast_dtype, dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            scaled = (x * channel[:, :, None, None].to(x.dtype)).to(dtype)
            out = F.conv2d(scaled, weight.to(dtype), None, *geometry)
            del scaled
            if filt is not None:
                out.mul_(filt[:, :, None, None].to(out.dtype))
        ctx.save_for_backward(x, channel, filt, weight, out)
        ctx.geometry = geometry
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        x, channel, filt, weight, out = ctx.saved_tensors
        need_x, need_c, need_f, need_w = ctx.needs_input_grad[:4]
        dtype = ctx.dtype
        grad_filt = None
        grad = grad_out.to(dtype)
        if filt is not None:
            f = filt[:, :, None, None].to(dtype)
            if need_f:
                grad_filt = ((grad * out).sum(
                    (2, 3), dtype=torch.float32) / filt.float()).to(filt.dtype)
            grad = grad * f
        c = channel[:, :, None, None].to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            grad_scaled, grad_weight, _ = \
                torch.ops.aten.convolution_backward(
                    grad, (x * c).to(dtype), weight.to(dtype), None,
                    list(ctx.geometry[0]), list(ctx.geometry[1]),
                    list(ctx.geometry[2]), False, [0, 0], ctx.geometry[3],
                    [need_x or need_c, need_w, False])
        grad_x = grad_channel = None
        if need_x or need_c:
            grad_scaled = grad_scaled.to(x.dtype)
            if need_x:
                grad_x = grad_scaled * c
            if need_c:
                grad_channel = (grad_scaled * x).sum(
                    (2, 3), dtype=torch.float32).to(channel.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_channel, grad_filt, grad_weight, None


def odconv_recompute(layer, x: torch.Tensor, channel: torch.Tensor,
                     filt: Optional[torch.Tensor],
                     spatial: Optional[torch.Tensor],
                     kernel: Optional[torch.Tensor]) -> torch.Tensor:
    """:class:`~mmdyn.ops.ODConv2d`'s output from its attentions (see
    ``ODAttention.forward``): ``alpha_f * conv(alpha_c * x, W) + bias`` as one
    conv of ``x`` with the folded kernel of :func:`odconv_kernel`; for a layer
    whose kernel does not depend on the sample (one kernel, 1x1) the static
    conv of the scaled input, nothing of map size kept but ``x`` and the output
    (:class:`_ScaledMapsConv2d`)."""
    if spatial is None and kernel is None:
        out = _ScaledMapsConv2d.apply(x, channel, filt, layer.weight[0],
                                      (tuple(layer.stride), tuple(
                                          layer.padding), tuple(
                                              layer.dilation), layer.groups))
        if layer.bias is not None:
            out = out + layer.bias.view(1, -1, 1, 1).to(out.dtype)
        return out
    return conv2d_recomputed_kernel(
        x, functools.partial(odconv_kernel, layer.groups),
        (layer.weight, channel, filt, spatial, kernel), layer.bias,
        layer.stride, layer.padding, layer.dilation, layer.groups)


def mixture_kernel(bank: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """CondConv/DyConv's per-sample kernel ``sum_k pi[b, k] W_k``."""
    return (pi @ bank.flatten(1)).view(-1, *bank.shape[1:])


def mixture_recompute(layer, x: torch.Tensor,
                      pi: torch.Tensor) -> torch.Tensor:
    """:class:`~mmdyn.ops.CondConv2d`/:class:`~mmdyn.ops.DyConv2d`'s output
    from its routing weights ``pi`` [B, K] (in the bank's dtype)."""
    bias = pi @ layer.bias if layer.bias is not None else None
    return conv2d_recomputed_kernel(x, mixture_kernel, (layer.weight, pi),
                                    bias, layer.stride, layer.padding,
                                    layer.dilation, layer.groups)


def kernel_warehouse_kernel(kw_layout: Tuple[int, ...],
                            weight_shape: Tuple[int, ...], cells: torch.Tensor,
                            attention: torch.Tensor) -> torch.Tensor:
    """KernelWarehouse's per-sample kernel: the mixtures ``attention`` [B, m,
    n] @ ``cells`` [n, c_o * c_i], mixture ``(s * g_o + o) * g_i + c`` filling
    output block o, input block c, kernel position s."""
    g_s, g_o, g_i, c_o, c_i = kw_layout
    if not torch.is_autocast_enabled(attention.device.type):
        attention = attention.to(cells.dtype)
    mixtures = torch.matmul(attention, cells)
    kernel = mixtures.view(-1, g_s, g_o, g_i, c_o,
                           c_i).permute(0, 2, 4, 3, 5, 1)
    return kernel.reshape(-1, *weight_shape)


def kernel_warehouse_recompute(layer, x: torch.Tensor,
                               attention: torch.Tensor) -> torch.Tensor:
    """:class:`~mmdyn.ops.KWConv2d`'s output from its attentions [B, m, n]."""
    make_kernel = functools.partial(kernel_warehouse_kernel,
                                    tuple(layer._kw_layout),
                                    tuple(layer.weight_shape))
    return conv2d_recomputed_kernel(x, make_kernel,
                                    (layer._cell_rows(), attention),
                                    layer.bias, layer.stride, layer.padding,
                                    layer.dilation, layer.groups)


# When impl='auto' takes the path (the registry's cost rules).


def can_run(layer, x: torch.Tensor, context: tuple) -> bool:
    """Anywhere but under graph capture (the backward's ``torch.autograd.grad``
    cannot be captured)."""
    return not graph_capture()


def rebuild_is_cheap(layer, x: torch.Tensor, family: str,
                     mix_terms: int) -> bool:
    """Whether rebuilding the kernels in the backward costs little next to
    the conv: always on accelerators; on CPU when ``mix_terms`` (products
    per kernel element of one assembly: ``K`` for a mixture of ``K``
    kernels, the cell count for KernelWarehouse) is at most
    ``THRESHOLDS['recompute'][family]`` times the output pixels ``H_out *
    W_out`` (the conv's products per kernel element); a threshold of 0
    keeps the path off on CPU."""
    if x.device.type != 'cpu':
        return True
    limit = THRESHOLDS['recompute'][family]
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    return limit > 0 and mix_terms <= limit * h_out * w_out


def _training() -> bool:
    return torch.is_grad_enabled() and not graph_capture()


def odconv_pays(layer, x: torch.Tensor, context: tuple) -> bool:
    """ODConv in training: the mixture of ``K`` kernels and the two
    attention products; none for a kernel that depends on the sample only
    through ``alpha_c``/``alpha_f`` (``context``, the attentions: spatial
    and kernel ones None), which is never built
    (:class:`_ScaledMapsConv2d`)."""
    scales_only = context[2] is None and context[3] is None
    return _training() and rebuild_is_cheap(
        layer, x, 'odconv', 0 if scales_only else layer.kernel_num + 2)


def mixture_pays(layer, x: torch.Tensor, context: tuple) -> bool:
    """CondConv/DyConv in training: a mixture of ``K`` kernels."""
    return _training() and rebuild_is_cheap(layer, x, 'mixture',
                                            layer.kernel_num)


def kernel_warehouse_pays(layer, x: torch.Tensor, context: tuple) -> bool:
    """KernelWarehouse in training: a mixture of the warehouse's cells."""
    return _training() and rebuild_is_cheap(layer, x, 'kernel_warehouse',
                                            layer.num_cells)
