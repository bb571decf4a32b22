# Copyright (c) mmdyn contributors. All rights reserved.
"""The accelerated paths of :class:`~mmdyn.ops.CondConv2d` and
:class:`~mmdyn.ops.DyConv2d` (mixtures of ``K`` kernels): each computes the
layer's ``forward_reference`` result another way (chosen by
:mod:`mmdyn.ops.accel.paths`). Each function receives the layer and the routing
weights ``pi`` [B, K] of its input.

torch only.
"""
import torch
import torch.nn.functional as F

from .chunked import chunked_per_sample_conv2d
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


def winograd(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The per-sample conv by Winograd F(2x2, 3x3) (inference)."""
    bias = _mixed_bias(layer, pi)
    out = winograd_per_sample_conv2d(x, layer.weight, pi, None, layer.padding)
    if bias is not None:
        out += bias[:, :, None, None].to(out.dtype)
    return out


def chunked(layer, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Kernels built a chunk of samples at a time into the reused workspace,
    then batch-1 convs (inference)."""
    bias = _mixed_bias(layer, pi)
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
