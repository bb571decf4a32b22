"""Convolution of each sample with its own kernel.

Every dynamic convolution (DyConv, ODConv, KernelWarehouse) ends with the
same operation: sample ``b`` of ``x`` is convolved with kernel ``weight[b]``.
This module holds the interchangeable implementations of that operation:

* ``'loop'``: one ``F.conv2d`` per sample (obviously correct: the reference).
* ``'grouped'``: the official codes' trick, the batch folded into the
  channels and one grouped conv with ``groups = B * groups``.
* ``'unfold'``: im2col + batched matmul; its graph does not depend on the
  batch size, so it is the path used for ONNX export.
* ``'auto'``: picks one of the above for the device and shape.

:func:`streamed_per_sample_conv2d` is the CPU inference path of deep
layers, whose per-sample kernels are much larger than their feature maps: it
builds one sample's kernel and convolves at once, so that the ``[B,
numel(W)]`` tensor of all kernels (tens of MB, page-faulted on every call and
cache-cold by the time the conv reads it) never exists.

torch only.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

PER_SAMPLE_CONV_IMPLS = ('auto', 'loop', 'grouped', 'unfold')


def _is_exporting() -> bool:
    return torch.onnx.is_in_onnx_export() if hasattr(
        torch.onnx, 'is_in_onnx_export') else False


def per_sample_conv2d(x: torch.Tensor,
                      weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None,
                      stride: Tuple[int, int] = (1, 1),
                      padding: Tuple[int, int] = (0, 0),
                      dilation: Tuple[int, int] = (1, 1),
                      groups: int = 1,
                      impl: str = 'auto') -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` with ``weight[b]``.

    Args:
        x (Tensor): [B, C_in, H, W].
        weight (Tensor): [B, C_out, C_in // groups, kh, kw].
        bias (Tensor, optional): [B, C_out] or [C_out].
        stride, padding, dilation (tuple[int, int]): as ``F.conv2d``.
        groups (int): as ``F.conv2d``.
        impl (str): one of :data:`PER_SAMPLE_CONV_IMPLS`.

    Returns:
        Tensor: [B, C_out, H_out, W_out].
    """
    if impl not in PER_SAMPLE_CONV_IMPLS:
        raise ValueError(f'impl must be one of {PER_SAMPLE_CONV_IMPLS}, got '
                         f'{impl!r}')
    if impl == 'auto':
        impl = choose_impl(x, weight, groups)
    if impl == 'loop':
        return _conv_loop(x, weight, bias, stride, padding, dilation, groups)
    if impl == 'grouped':
        return _conv_grouped(x, weight, bias, stride, padding, dilation,
                             groups)
    return _conv_unfold(x, weight, bias, stride, padding, dilation, groups)


def choose_impl(x: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """The implementation ``'auto'`` uses for these shapes and this device."""
    if _is_exporting() or torch.jit.is_tracing():
        return 'unfold'
    if x.shape[0] == 1:
        return 'loop'  # a single plain conv
    # Measured (benchmarks/README.md): on CPU (oneDNN) the grouped conv is
    # within ~1.1-1.2x of a static conv of the same shape in the forward pass
    # while the loop of batch-1 convs is 2-7x; on CUDA the grouped conv is
    # the official choice. But oneDNN's backward of a batch-as-groups conv
    # with a per-sample weight is pathological on CPU (a KW ResNet-18 step at
    # batch 32, 64 px: 36 of 47 s in 17 such backward calls), so a CPU
    # graph that needs gradients takes the loop.
    if not x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or
                                                      weight.requires_grad):
        return 'loop'
    return 'grouped'


def streams_per_sample(x: torch.Tensor, kernel_numel: int, out_channels: int,
                       out_hw: Tuple[int, int], impl: str = 'auto') -> bool:
    """Whether ``'auto'`` builds and applies the kernels one sample at a time.

    True for CPU inference (no autograd graph) of a batch when one sample's
    kernel has more than twice the elements of that sample's input and
    output maps (ResNet stage 3 and 4 shapes). Measured on this project's
    2-core CPU at batch 8, 1 thread (benchmarks/README.md): ODConv 4x at
    256 -> 256, 14x14: 2.25x -> 1.61x of ``nn.Conv2d`` (DyConv 2.14x ->
    1.47x), then 1-12 % less once the samples share one kernel buffer
    (four A/B runs); 512 -> 512, 7x7: 5.6x -> 2.6x; at 128 -> 128, 28x28
    the batched grouped conv stays faster (1.12x vs 1.40x).
    """
    if impl != 'auto' or x.device.type != 'cpu' or x.shape[0] == 1:
        return False
    if torch.is_grad_enabled() or _is_exporting() or torch.jit.is_tracing():
        return False
    c_in, h, w = x.shape[1:]
    features = c_in * h * w + out_channels * out_hw[0] * out_hw[1]
    return kernel_numel > 2 * features


def streamed_per_sample_conv2d(
        x: torch.Tensor,
        kernel_fn: Callable[[int, Optional[torch.Tensor]], torch.Tensor],
        stride: Tuple[int, int] = (1, 1),
        padding: Tuple[int, int] = (0, 0),
        dilation: Tuple[int, int] = (1, 1),
        groups: int = 1) -> torch.Tensor:
    """``conv(x[b], kernel_fn(b, buffer))`` for each sample ``b``, one at a
    time.

    ``kernel_fn(b, buffer)`` returns sample ``b``'s kernel [C_out, C_in/g,
    kh, kw] (or [1, C_out, ...]). ``buffer`` is None for the first sample
    and then the kernel returned for the previous one: a ``kernel_fn`` that
    writes into it (``out=``) reuses one kernel-sized block of memory for
    the whole batch. That matters on CPU: a fresh multi-MB tensor per
    sample is paid in page faults (8 samples of a 256 -> 256 3x3 kernel,
    14x14, 1 thread: 35.5 ms with a fresh kernel per sample, 21.1 ms
    written into one buffer, 17.5 ms for a fixed kernel). No bias: callers
    add theirs. Same result as :func:`per_sample_conv2d` with the stacked
    kernels.
    """
    outs = []
    kernel = None
    for b, xb in enumerate(x.split(1, dim=0)):
        kernel = kernel_fn(b, kernel)
        outs.append(
            F.conv2d(xb, kernel[0] if kernel.dim() == 5 else kernel, None,
                     stride, padding, dilation, groups))
    return torch.cat(outs, dim=0)


def _conv_loop(x, weight, bias, stride, padding, dilation, groups):
    # unbind/split rather than weight[b]: the backward of B separate
    # selections would write B full-size zero gradients (O(B^2) traffic).
    biases = (bias.unbind(0) if bias is not None and bias.dim() == 2 else
              [bias] * x.shape[0])
    outs = [
        F.conv2d(xb, wb, bb, stride, padding, dilation, groups)
        for xb, wb, bb in zip(x.split(1, dim=0), weight.unbind(0), biases)
    ]
    return torch.cat(outs, dim=0)


def _conv_grouped(x, weight, bias, stride, padding, dilation, groups):
    batch, c_in, h, w = x.shape
    c_out = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, batch * c_in, h, w),
        weight.reshape(batch * c_out, *weight.shape[2:]),
        None, stride, padding, dilation, groups * batch)
    out = out.reshape(batch, c_out, out.shape[-2], out.shape[-1])
    if bias is not None:
        out = out + (bias if bias.dim() == 2 else bias.expand(
            batch, c_out)).reshape(batch, c_out, 1, 1).to(out.dtype)
    return out


def _conv_unfold(x, weight, bias, stride, padding, dilation, groups):
    # Python ints: only the batch may vary in a traced/exported graph; the
    # kernel and feature sizes are constants of the layer and the input.
    h, w = int(x.shape[2]), int(x.shape[3])
    c_out, c_in_g, kh, kw = (int(v) for v in weight.shape[1:])
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding,
                    stride=stride)  # [B, C_in*kh*kw, L]
    # -1 for the batch so that a traced graph does not bake it in.
    cols = cols.reshape(-1, groups, c_in_g * kh * kw, h_out * w_out)
    kernel = weight.reshape(-1, groups, c_out // groups, c_in_g * kh * kw)
    out = torch.matmul(kernel, cols)  # [B, g, C_out/g, L]
    out = out.reshape(-1, c_out, h_out, w_out)
    if bias is not None:
        b = bias if bias.dim() == 2 else bias.unsqueeze(0)
        out = out + b.reshape(-1, c_out, 1, 1).to(out.dtype)
    return out
