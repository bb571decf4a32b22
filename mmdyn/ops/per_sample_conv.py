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

:func:`chunked_per_sample_conv2d` is the CPU inference path of deep
layers, whose per-sample kernels are much larger than their feature maps: it
builds the kernels into one workspace kept between calls, so that the ``[B,
numel(W)]`` tensor of all kernels (tens of MB) is not a fresh allocation,
page-faulted, on every call.

torch only.
"""
import math
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .fast_paths import graph_capture, uses_chunked_kernels  # noqa: F401

PER_SAMPLE_CONV_IMPLS = ('auto', 'loop', 'grouped', 'unfold')


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
    if graph_capture():
        return 'unfold'
    if x.shape[0] == 1:
        return 'loop'  # a single plain conv
    # Measured (benchmarks/README.md): on CPU (oneDNN) the grouped conv is
    # close to a static conv of the same shape in the forward pass while the
    # loop of batch-1 convs is several times slower; on CUDA the grouped
    # conv is the official choice. But oneDNN's backward of a
    # batch-as-groups conv with a per-sample weight is pathological on CPU
    # (most of a KW ResNet-18 training step), so a CPU graph that needs
    # gradients takes the loop.
    if not x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or
                                                      weight.requires_grad):
        return 'loop'
    return 'grouped'


#: Size of the per-thread block that :func:`chunked_per_sample_conv2d`
#: builds kernels into; a batch whose kernels do not fit is done in chunks.
KERNEL_WORKSPACE_BYTES = 64 * 2**20

_workspaces = threading.local()


def kernel_workspace(numel: int, dtype: torch.dtype,
                     device: torch.device,
                     slot: str = 'kernels') -> torch.Tensor:
    """A reused 1-D tensor of at least ``numel`` elements, one per thread,
    dtype, device and ``slot``, grown on demand and kept between calls (see
    :func:`release_kernel_workspaces`). Two buffers that must be alive at
    the same time (KernelWarehouse's mixtures and the Winograd kernels
    made from them) use different slots.

    Why: a fresh tensor of a batch of deep-layer kernels (tens of MB) is,
    with glibc's default thresholds, a new mmap paid in page faults on
    every call. Kept, its pages stay mapped. Building the whole batch's
    kernels at once, then convolving, also beats building one sample's
    kernel per conv (benchmarks/README.md).
    """
    cache = getattr(_workspaces, 'blocks', None)
    if cache is None:
        cache = _workspaces.blocks = {}
    key = (dtype, device, slot)
    block = cache.get(key)
    if block is None or block.numel() < numel:
        block = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return block[:numel]


def release_kernel_workspaces() -> None:
    """Free this thread's kernel workspaces."""
    _workspaces.blocks = {}


def chunked_per_sample_conv2d(
        x: torch.Tensor,
        kernels_fn: Callable[[int, int, torch.Tensor], torch.Tensor],
        kernel_shape: Tuple[int, ...],
        dtype: Optional[torch.dtype],
        stride: Tuple[int, int] = (1, 1),
        padding: Tuple[int, int] = (0, 0),
        dilation: Tuple[int, int] = (1, 1),
        groups: int = 1) -> torch.Tensor:
    """``conv(x[b], kernel_b)`` for each sample, the kernels built a chunk
    of samples at a time into one reused workspace.

    ``kernels_fn(start, stop, out)`` returns the kernels of samples
    ``start:stop`` as a [stop - start, numel] tensor; ``out`` is a
    workspace slice of that shape and ``dtype`` that it may write them into
    (``out=``) and return, or None when ``dtype`` is None (a ``kernels_fn``
    that allocates its own). The chunk is the whole batch when its kernels
    fit in :data:`KERNEL_WORKSPACE_BYTES`. Each sample is then one batch-1
    ``F.conv2d`` (on CPU faster than the batch-as-groups conv of the same
    kernels, benchmarks/README.md). No bias: callers add theirs. Inference
    only (the workspace is overwritten by the next call): callers use it
    under :func:`~mmdyn.ops.fast_paths.uses_chunked_kernels`.
    """
    batch = x.shape[0]
    numel = math.prod(int(size) for size in kernel_shape)
    item = (dtype or x.dtype).itemsize
    chunk = max(1, min(batch, KERNEL_WORKSPACE_BYTES // (numel * item)))
    workspace = None if dtype is None else kernel_workspace(
        chunk * numel, dtype, x.device).view(chunk, numel)
    outs = []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        out = None if workspace is None else workspace[:stop - start]
        kernels = kernels_fn(start, stop, out)
        for xb, kernel in zip(x[start:stop].split(1, dim=0),
                              kernels.unbind(0)):
            outs.append(
                F.conv2d(xb, kernel.view(kernel_shape), None, stride,
                         padding, dilation, groups))
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
    if c_out == groups:
        # Depthwise: a weighted sum of the columns (the same work as the
        # matrix-vector products). AOTAutograd traces matmul's backward
        # with views of the output gradient that a channels-last gradient
        # (ConvNeXt's LayerNorm2d after a depthwise conv) cannot take.
        out = (kernel.transpose(2, 3) * cols).sum(2, keepdim=True)
    else:
        out = torch.matmul(kernel, cols)  # [B, g, C_out/g, L]
    out = out.reshape(-1, c_out, h_out, w_out)
    if bias is not None:
        b = bias if bias.dim() == 2 else bias.unsqueeze(0)
        out = out + b.reshape(-1, c_out, 1, 1).to(out.dtype)
    return out
