# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of :class:`~mmdyn.ops.CondConv2d` and
:class:`~mmdyn.ops.DyConv2d` (mixtures of ``K`` kernels): each computes the
layer's ``forward_reference`` result another way (chosen by
:mod:`mmdyn.ops.accel.paths`). Each function receives the layer and the routing
weights ``pi`` [B, K] of its input.

* ``conv_then_mix``: ``K`` static convs, outputs mixed (training on small
  maps).
* ``batch_grouped``: the mixed kernels and one batch-as-groups conv, all
  oneDNN (inference; rule measured on AVX-512, 2026-12-06, where it beats
  the Winograd C loop).
* ``pointwise_gemm``: a 1x1 layer as the mixed [C_out, C_in] matrices
  and one batched matmul with the pixels (inference).
* ``taps``: a stride-1 layer larger than 1x1: the kernels mixed tap-major
  from a kept tap-major copy of the bank, one batched GEMM to every tap's
  output channels and the C tap sum (inference; measured on AVX-512,
  2026-12-07).
* ``winograd`` and ``chunked``: the per-sample conv by Winograd
  F(2x2, 3x3), or with the kernels built into a reused workspace (the
  deepest layers).

torch only.
"""
import torch
import torch.nn.functional as F

from ..capture import compiling
from ..per_sample_conv import per_sample_conv2d, pointwise_per_sample_conv
from . import tap_sum_cpu
from .chunked import chunked_per_sample_conv2d, kernel_workspace
from .custom_ops import mixture_chunked_conv_op, winograd_conv_op
from .kept_copies import layer_copies
from .winograd import winograd_per_sample_conv2d


def _mixed_bias(layer, pi):
    return pi @ layer.bias if layer.bias is not None else None


def conv_then_mix(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """``sum_k pi_k conv(x, W_k)``, which equals ``conv(x, sum_k pi_k W_k)``:
    ``K`` static convs of the batch, no per-sample kernel.

    On CPU with autograd the per-sample kernels (and their gradients) of layers
    on small maps cost far more than their convolutions.
    """
    bias = _mixed_bias(layer, pi)
    groups, num = layer.groups, layer.kernel_num
    c_out_g = layer.out_channels // groups
    # Group-major output channels (group, kernel, channel) so that each
    # group of the stacked conv sees its own input channels.
    bank = layer.weight.reshape(num, groups, c_out_g,
                                *layer.weight.shape[2:]).transpose(0, 1)
    out = F.conv2d(x, bank.reshape(-1, *layer.weight.shape[2:]), None,
                   layer.stride, layer.padding, layer.dilation, groups)
    h_out, w_out = out.shape[-2:]
    out = out.view(-1, groups, num, c_out_g, h_out * w_out)
    out = torch.einsum('bgkcp,bk->bgcp', out, pi.to(out.dtype))
    out = out.reshape(-1, layer.out_channels, h_out, w_out)
    if bias is not None:
        out = out + bias[:, :, None, None].to(out.dtype)
    return out


def batch_grouped(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The mixed kernels ``pi @ W`` of the batch, then ONE conv with the batch
    folded into the groups (oneDNN's grouped conv; a plain conv for a batch of
    one), with or without autograd.

    The reference does the same in inference; as a path it is taken before the
    C loops where it beats them (AVX-512, 2026-12-06).
    """
    bias = _mixed_bias(layer, pi)
    weight = (pi @ layer.weight.flatten(1)).view(-1, *layer.weight.shape[1:])
    return per_sample_conv2d(x, weight, bias, layer.stride, layer.padding,
                             layer.dilation, layer.groups, 'grouped')


def pointwise_gemm(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """A 1x1, stride-1, unpadded, ``groups=1`` layer: the mixed matrices ``pi @
    W`` [B, C_out, C_in] times the pixels [B, C_in, H*W] as one batched matmul
    (+ the mixed bias)."""
    matrices = (pi @ layer.weight.flatten(1)).view(x.shape[0],
                                                   layer.out_channels, -1)
    return pointwise_per_sample_conv(x, matrices.to(x.dtype),
                                     _mixed_bias(layer, pi))


def tap_major_bank(layer) -> torch.Tensor:
    """The kernel bank [K, C_out, C_in, kh, kw] rearranged tap-major, [K,
    kh*kw*C_out*C_in], kept on the layer until the bank changes (see
    :mod:`~mmdyn.ops.accel.kept_copies`: writes through ``.data``, like an EMA
    parameter swap, included), or ``layer.train()``: one more copy of the bank
    in memory while the layer runs :func:`taps` in inference."""
    return layer_copies(layer, '_tap_major_bank').get(
        'bank', layer.weight, lambda bank: bank.detach().permute(
            0, 3, 4, 1, 2).reshape(bank.shape[0], -1).contiguous())


def taps(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Stride 1, ``groups=1``, a kernel larger than 1x1, CPU inference: the
    kernels mixed tap-major, ``pi @`` :func:`tap_major_bank` into this thread's
    reused ``'kernels'`` workspace, then
    :func:`~mmdyn.ops.accel.tap_sum_cpu.stride1_tap_conv` (one batched GEMM to
    every tap's output channels, the C tap sum), the mixed bias added.

    No kernel is written in the conv's layout, and oneDNN reorders no per-
    sample kernel.
    """
    bank = tap_major_bank(layer)
    kh, kw = layer.kernel_size
    mixtures = kernel_workspace(pi.shape[0] * bank.shape[1], bank.dtype,
                                bank.device)
    torch.matmul(pi, bank, out=mixtures.view(pi.shape[0], -1))
    out = tap_sum_cpu.stride1_tap_conv(
        tap_sum_cpu.load(), x,
        mixtures.view(pi.shape[0], kh * kw, layer.out_channels,
                      layer.in_channels), layer.kernel_size, layer.dilation,
        layer.padding, None)
    bias = _mixed_bias(layer, pi)
    if bias is not None:
        out += bias[:, :, None, None].to(out.dtype)
    return out


def winograd(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The per-sample conv by Winograd F(2x2, 3x3) (inference)."""
    bias = _mixed_bias(layer, pi)
    if compiling():  # the C loops as one opaque operator of the graph
        out = winograd_conv_op(x, layer.weight, pi, None, list(layer.padding))
    else:
        out = winograd_per_sample_conv2d(x, layer.weight, pi, None,
                                         layer.padding)
    if bias is not None:
        out += bias[:, :, None, None].to(out.dtype)
    return out


def chunked(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Kernels built a chunk of samples at a time into the reused workspace,
    then batch-1 convs (inference)."""
    bias = _mixed_bias(layer, pi)
    if compiling():  # one opaque operator of the graph
        out = mixture_chunked_conv_op(x, layer.weight, pi, None,
                                      list(layer.stride), list(layer.padding),
                                      list(layer.dilation), layer.groups)
        return out if bias is None else out + bias[:, :, None,
                                                   None].to(out.dtype)
    bank = layer.weight.flatten(1)

    def kernels(start, stop, out):
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(pi[start:stop], bank, out=out)

    out = chunked_per_sample_conv2d(x, kernels, layer.weight.shape[1:],
                                    bank.dtype, layer.stride, layer.padding,
                                    layer.dilation, layer.groups)
    if bias is not None:
        out += bias[:, :, None, None].to(out.dtype)
    return out


def reference(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The reference forward from the routing weights."""
    return layer.reference_from_routing(x, pi)
