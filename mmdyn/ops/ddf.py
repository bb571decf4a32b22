# Copyright (c) mmdyn contributors. All rights reserved.
"""Decoupled Dynamic Filter (DDF) operator, DDF module and DDF-Up upsampler.

Paper: Zhou et al., "Decoupled Dynamic Filter Networks", CVPR 2021,
https://arxiv.org/abs/2104.14107 (official code: theFoxofSky/ddfnet, whose
operator is CUDA only).

* :func:`ddf`: the operator. Every output pixel applies a k x k filter that
  is the product (``'mul'``) or sum (``'add'``) of a per-sample channel
  filter [B, C, k, k] and a per-pixel spatial filter [B, k*k, Ho, Wo] shared
  by all channels (of one head).
* :class:`DDFConv2d`: the DDF module (``DDFPack``): a spatial branch (1x1
  conv + filter norm) and an SE-like channel branch (+ filter norm) predict
  the two filters from the input. A drop-in for a 3x3 conv with
  ``in_channels == out_channels``.
* :class:`DDFUpsample`: DDF-Up, ``scale_factor**2`` DDF branches on the
  low-resolution input (one per sub-pixel phase) and a pixel shuffle,
  optionally guided by a second feature map.

This file holds the math: the reference operator :func:`ddf_reference`
(an explicit unfold and sum), the filter branches and the layers, each
with a ``forward_reference``. :func:`ddf` decides its path once per call
(:func:`~mmdyn.ops.accel.paths.ddf_path`) and runs the accelerated ones
from :mod:`mmdyn.ops.accel.ddf_paths`: on CPU fused C loops with an
explicit backward (no k*k-times larger buffer, about the cost of a
depthwise 3x3 conv), Triton kernels on CUDA, elsewhere (ONNX export, no C
compiler) a pure-PyTorch loop over the k*k taps.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .accel import ddf_export_forms, ddf_paths, export_forms
from .accel.paths import ddf_path
from .base import (DynamicConv2dBase, check_allocation, check_input_dtype,
                   check_positive, empty_batch_output, is_empty_batch,
                   linear_1x1)
from .capture import fx_leaf, graph_capture

COMBINES = ('mul', 'add')
IMPLS = ('auto', 'fused', 'taps', 'reference', 'triton')


# --------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------
def check_ddf_config(kernel_size: int,
                     dilation: int,
                     head: int,
                     combine: str,
                     stride: int = 1,
                     impl: Optional[str] = None,
                     se_ratio: Optional[float] = None,
                     channels: Optional[Tuple[str, int]] = None) -> None:
    """The argument checks shared by :func:`ddf`, :class:`DDFConv2d` and
    :class:`DDFUpsample`: ``ValueError`` naming the argument.

    ``channels``: (its argument name, the channel count) that ``head`` must
    divide; ``impl`` and ``se_ratio`` are checked when given.
    """
    check_positive(kernel_size, 'kernel_size')
    if kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd, got {kernel_size}')
    check_positive(dilation, 'dilation')
    check_positive(stride, 'stride')
    check_positive(head, 'head')
    _check_choice(combine, 'combine', COMBINES)
    if impl is not None:
        _check_choice(impl, 'impl', IMPLS)
    if se_ratio is not None:
        check_positive(se_ratio, 'se_ratio', allow_float=True)
    if channels is not None and channels[1] % head:
        raise ValueError(f'{channels[0]} ({channels[1]}) must be divisible '
                         f'by head ({head})')


def _check_ddf_args(x, channel_filter, spatial_filter, kernel_size, dilation,
                    stride, combine, head):
    """Validate the arguments of :func:`ddf`; return (cf [B, C, k*k], sf, (Ho,
    Wo))."""
    check_ddf_config(kernel_size, dilation, head, combine, stride)
    for name, t in (('x', x), ('channel_filter', channel_filter),
                    ('spatial_filter', spatial_filter)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f'{name} must be a floating point tensor, got '
                             f'{getattr(t, "dtype", type(t).__name__)}')
    if x.dim() != 4:
        raise ValueError(f'x must be [B, C, H, W], got {tuple(x.shape)}')
    B, C, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError('x must have a height and a width >= 1 (as the '
                         f'input of a conv), got {tuple(x.shape)}')
    kk = kernel_size * kernel_size
    if C % head:
        raise ValueError(f'the channels of x ({C}) must be divisible by '
                         f'head ({head})')
    layouts = ((B, C, kernel_size, kernel_size), (B, C * kk, 1, 1))
    if tuple(channel_filter.shape) not in layouts:
        raise ValueError(
            f'channel_filter must be [B, C, k, k] = {list(layouts[0])} or '
            f'[B, C*k*k, 1, 1] = {list(layouts[1])}, got '
            f'{tuple(channel_filter.shape)}')
    Ho, Wo = spatial_filter.shape[-2:] if spatial_filter.dim() == 4 else (0, 0)
    # Official size H // s; the conv size ceil(H / s) (where the official
    # operator refuses to run) is accepted too, so odd inputs work.
    ok_h = Ho in (H // stride, (H - 1) // stride + 1)
    ok_w = Wo in (W // stride, (W - 1) // stride + 1)
    if (spatial_filter.dim() != 4 or spatial_filter.shape[0] != B
            or spatial_filter.shape[1] != head * kk or not ok_h or not ok_w
            or Ho == 0 or Wo == 0):
        accepted = ({size // stride, (size - 1) // stride + 1} - {0}
                    for size in (H, W))
        sizes = [' or '.join(str(n) for n in sorted(a)) for a in accepted]
        raise ValueError(
            f'spatial_filter must be [B, head*k*k, Ho, Wo] = [{B}, '
            f'{head * kk}, {sizes[0]}, {sizes[1]}] (Ho = H//stride or '
            f'ceil(H/stride), at least 1), got '
            f'{tuple(spatial_filter.shape)}')
    return channel_filter.reshape(B, C, kk), spatial_filter, (Ho, Wo)


def ddf_reference(x,
                  channel_filter,
                  spatial_filter,
                  kernel_size,
                  dilation=1,
                  stride=1,
                  combine='mul',
                  head=1):
    """Obviously-correct DDF by an explicit unfold and sum (k*k memory).

    Same arguments and result as :func:`ddf`; meant for tests and checks.
    """
    cf, sf, (Ho, Wo) = _check_ddf_args(x, channel_filter, spatial_filter,
                                       kernel_size, dilation, stride, combine,
                                       head)
    B, C, H, W = x.shape
    kk = kernel_size * kernel_size
    r = (kernel_size - 1) // 2 * dilation
    # Enough zeros on the far side for the last output row/column.
    bottom = max(0, (Ho - 1) * stride + r - (H - 1))
    right = max(0, (Wo - 1) * stride + r - (W - 1))
    xp = F.pad(x, (r, right, r, bottom))
    cols = F.unfold(xp, kernel_size, dilation=dilation, stride=stride)
    rows = (xp.shape[2] - dilation * (kernel_size - 1) - 1) // stride + 1
    cols = cols.view(B, C, kk, rows, -1)[:, :, :, :Ho, :Wo]
    cf = cf.view(B, C, kk, 1, 1)
    sf = sf.reshape(B, head, 1, kk, Ho, Wo)
    sf = sf.expand(B, head, C // head, kk, Ho, Wo).reshape(B, C, kk, Ho, Wo)
    filters = cf + sf if combine == 'add' else cf * sf
    return (cols * filters).sum(2)


def ddf(x: torch.Tensor,
        channel_filter: torch.Tensor,
        spatial_filter: torch.Tensor,
        kernel_size: int,
        dilation: int = 1,
        stride: int = 1,
        combine: str = 'mul',
        head: int = 1,
        impl: str = 'auto') -> torch.Tensor:
    """Decoupled dynamic filtering.

    ``out[b, c, y, x] = sum_{i, j} in[b, c, y*s + (i - r)*d, x*s + (j - r)*d]
    * F[i, j]`` with r = (k - 1) / 2, zero padding, and
    ``F = cf[b, c, i, j] * sf[b, h(c)*k*k + i*k + j, y, x]`` (mul) or the
    sum (add), where ``h(c) = c // (C / head)`` is the head of channel c.

    Args:
        x (Tensor): Input [B, C, H, W].
        channel_filter (Tensor): [B, C, k, k] (or [B, C*k*k, 1, 1]).
        spatial_filter (Tensor): [B, head*k*k, Ho, Wo] with Ho = H // stride
            as the official operator (Ho = ceil(H / stride), the size of a
            conv with padding (k-1)/2*d, is accepted too). Its size sets the
            output size.
        kernel_size (int): k, odd.
        dilation (int): Dilation of the taps. Default: 1.
        stride (int): Stride. Default: 1.
        combine (str): ``'mul'`` or ``'add'``. Default: ``'mul'``.
        head (int): Groups of channels that each have their own spatial
            filter. Default: 1 (the official operator supports only 1).
        impl (str): ``'auto'`` (fused C kernel for CPU float tensors when it
            can be built, else the tap loop; the Triton kernels on CUDA),
            ``'fused'``, ``'taps'`` (pure PyTorch; also used while exporting
            to ONNX), ``'triton'`` (:mod:`mmdyn.ops.accel.ddf_triton`: CUDA, or
            CPU with ``TRITON_INTERPRET=1``) or ``'reference'`` (unfold,
            k*k memory). Default: ``'auto'``.

    Returns:
        Tensor: [B, C, Ho, Wo], in the promoted dtype of the inputs.
    """
    checked = _check_ddf_args(x, channel_filter, spatial_filter, kernel_size,
                              dilation, stride, combine, head)
    _check_choice(impl, 'impl', IMPLS)
    return _ddf_by_path(
        ddf_path(impl, x), x, channel_filter, spatial_filter, checked,
        kernel_size, dilation, stride, combine, head)


def _ddf_by_path(path: str, x, channel_filter, spatial_filter, checked,
                 kernel_size, dilation, stride, combine, head):
    """:func:`ddf` by ``path`` (:func:`~mmdyn.ops.accel.paths.ddf_path`), on
    arguments ``checked`` by :func:`_check_ddf_args`."""
    cf, sf, out_hw = checked
    if not graph_capture() and x.numel() == 0:  # an empty batch
        out_dtype = torch.promote_types(
            torch.promote_types(x.dtype, cf.dtype), sf.dtype)
        return empty_batch_output((*x.shape[:2], *out_hw), x.to(out_dtype),
                                  (channel_filter, spatial_filter))
    if path == 'reference':
        return ddf_reference(x, channel_filter, spatial_filter, kernel_size,
                             dilation, stride, combine, head)
    return ddf_paths.run(path, x, cf, sf, out_hw, kernel_size, dilation,
                         stride, combine == 'add', head)


# --------------------------------------------------------------------------
# Filter normalisation and the two filter-generating branches
# --------------------------------------------------------------------------
def normalize_filters(x: torch.Tensor, groups: int, kk: int) -> torch.Tensor:
    """Centre and divide by the unbiased std (+1e-10) each of the ``groups``
    filters of k*k values along dim 1 of ``x`` [B, groups*kk, ...].

    Computed in float32 (float64 for float64 inputs), after dividing each
    filter by its detached max-abs: the result is unchanged (the
    normalisation is scale invariant, and the 1e-10 is rescaled with it)
    but huge filters cannot overflow, and a constant filter gives zeros.
    """
    if export_forms.exporting():  # few nodes, no batch-size shape chains
        return ddf_export_forms.normalize_filters(x, groups, kk)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(dtype).reshape(x.shape[0], groups, kk, *x.shape[2:])
    # Subtracting one element first makes a constant filter exactly zero
    # (the mean of huge equal values is not exact); centring ignores it.
    v = v - v.narrow(2, 0, 1)
    v = v - v.mean(2, keepdim=True)
    scale = v.detach().abs().amax(
        2, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    v = v / scale
    # Unbiased std written out (torch.std over a strided dim is slow on
    # CPU); the clamp only touches constant filters (v == 0), whose sqrt
    # would otherwise have an infinite gradient.
    var = v.square().sum(2, keepdim=True) / (kk - 1)
    std = var.clamp_min(torch.finfo(dtype).tiny).sqrt()
    return (v / (std + 1e-10 / scale)).reshape(x.shape)


class FilterNorm(nn.Module):
    """Centre each filter and divide it by its unbiased std (+1e-10).

    ``'spatial'``: the k*k values at each pixel of a [B, k*k, H, W] map (one
    head at a time), then a constant gain/k. ``'channel'``: each channel's
    k*k values of a [B, C*k*k, 1, 1] map, then a learnable vector ``std`` of
    size C*k*k initialised to randn * gain / k.

    Numerically safe: the statistics are computed in float32 (or float64)
    after dividing each filter by its (detached) max-abs, which leaves the
    result unchanged (the normalisation is scale invariant and the 1e-10 is
    rescaled with it) but cannot overflow for huge inputs, and a constant
    filter gives zeros rather than NaN.

    Args:
        channels (int): Filters per sample: C for ``'channel'``, the number
            of heads for ``'spatial'``.
        kernel_size (int): k.
        filter_type (str): ``'spatial'`` or ``'channel'``.
        nonlinearity (str): Gain (``torch.nn.init.calculate_gain``) of the
            scale. Default: ``'relu'``.
        learnable_std (bool): Learnable per-value scale (the official
            channel branch). Default: False.
    """

    def __init__(self,
                 channels: int,
                 kernel_size: int,
                 filter_type: str,
                 nonlinearity: str = 'relu',
                 learnable_std: bool = False):
        super().__init__()
        if filter_type not in ('spatial', 'channel'):
            raise ValueError("filter_type must be 'spatial' or 'channel', "
                             f'got {filter_type!r}')
        if kernel_size < 2:
            # The std of a single value is undefined (NaN).
            raise ValueError('kernel_size must be >= 2 for a filter norm, '
                             f'got {kernel_size}')
        self.channels = channels
        self.kernel_size = kernel_size
        self.filter_type = filter_type
        self.gain = nn.init.calculate_gain(nonlinearity) / kernel_size
        if learnable_std:
            self.std = nn.Parameter(torch.empty(channels * kernel_size**2))
        else:
            self.std = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.std is not None:
            with torch.no_grad():
                self.std.normal_().mul_(self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if export_forms.exporting():  # the scale folded in
            return ddf_export_forms.normalize_filters(
                x, self.channels, self.kernel_size**2,
                self.gain if self.std is None else self.std)
        v = normalize_filters(x, self.channels, self.kernel_size**2)
        if self.std is None:
            return v * self.gain
        return v * self.std.to(v.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f'{self.channels}, kernel_size={self.kernel_size}, '
                f'filter_type={self.filter_type!r}')


def _hidden_channels(channels: int, se_ratio: float) -> int:
    # floor(se_ratio * C) as the official code; at least 1 for tiny C.
    return max(1, int(channels * se_ratio))


def build_spatial_branch(in_channels: int,
                         kernel_size: int,
                         head: int = 1,
                         stride: int = 1,
                         nonlinearity: str = 'relu',
                         gen_kernel_size: int = 1) -> nn.Sequential:
    """Spatial filter branch: [depthwise gen conv] -> 1x1 conv -> FilterNorm.

    Laid out as the official ``spatial_branch`` (same state-dict keys).
    """
    check_allocation(
        in_channels * max(gen_kernel_size**2, head * kernel_size**2),
        'the DDF spatial branch',
        f'kernel_size ({kernel_size}), head ({head}) or gen_kernel_size '
        f'({gen_kernel_size})')
    layers = []
    if gen_kernel_size > 1:
        layers.append(
            nn.Conv2d(
                in_channels,
                in_channels,
                gen_kernel_size,
                stride,
                gen_kernel_size // 2,
                groups=in_channels))
        stride = 1
    layers += [
        nn.Conv2d(in_channels, head * kernel_size**2, 1, stride=stride),
        FilterNorm(head, kernel_size, 'spatial', nonlinearity)
    ]
    return nn.Sequential(*layers)


def build_channel_branch(channels: int,
                         kernel_size: int,
                         se_ratio: float = 0.2,
                         nonlinearity: str = 'relu') -> nn.Sequential:
    """Channel filter branch: GAP -> 1x1 -> ReLU -> 1x1 -> FilterNorm.

    Laid out as the official ``channel_branch`` (same state-dict keys).
    """
    hidden = _hidden_channels(channels, se_ratio)
    check_allocation(hidden * channels * kernel_size**2,
                     'the DDF channel branch',
                     f'se_ratio ({se_ratio}) or kernel_size ({kernel_size})')
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1),
        nn.ReLU(inplace=True), nn.Conv2d(hidden, channels * kernel_size**2, 1),
        FilterNorm(
            channels, kernel_size, 'channel', nonlinearity,
            learnable_std=True))


def _plain_1x1(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` that is a linear map on a 1x1
    map: a 1x1 kernel, no groups, padding, stride or dilation."""
    return type(conv) is nn.Conv2d and conv.groups == 1 and all(
        value == (size, size)
        for value, size in ((conv.kernel_size, 1), (conv.padding, 0),
                            (conv.stride, 1), (conv.dilation, 1)))


def pooled_channel_filters(branch: nn.Sequential,
                           x: torch.Tensor) -> torch.Tensor:
    """The channel branch's output for ``x`` ([B, C*k*k, 1, 1]) with its two
    1x1 convs applied to the pooled features [B, C] as matrix products.

    On a 1x1 map a 1x1 conv is a linear map, and the two conv calls cost more
    than the products. The branch's own modules run instead when its layout
    is not the one :func:`build_channel_branch` makes (a replaced module) or
    one of its modules has hooks.
    """
    if len(branch) != 5 or any(
            m._forward_hooks or m._forward_pre_hooks
            for m in (branch, *branch)):
        return branch(x)
    pool, fc1, act, fc2, norm = branch
    global_pool = type(pool) is nn.AdaptiveAvgPool2d and \
        pool.output_size in (1, (1, 1))
    if not (global_pool and _plain_1x1(fc1) and type(act) is nn.ReLU
            and _plain_1x1(fc2) and isinstance(norm, FilterNorm)):
        return branch(x)
    hidden = F.relu(linear_1x1(x.mean((2, 3)), fc1))
    return norm(linear_1x1(hidden, fc2)[:, :, None, None])


def _init_branch(branch: nn.Sequential) -> None:
    """Timm's ResNet init as the official models get it: fan_out kaiming conv
    weights, PyTorch's default (uniform) conv biases."""
    for m in branch.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
            nn.init.kaiming_normal_(
                m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, FilterNorm):
            m.reset_parameters()


def _branch_madds(branch: nn.Sequential, hw: Tuple[int, int]) -> int:
    """Multiply-adds of the convs of a filter branch run at ``hw`` (the channel
    branch's convs run on the 1x1 pooled map)."""
    total = 0
    pooled = isinstance(branch[0], nn.AdaptiveAvgPool2d)
    for m in branch:
        if isinstance(m, nn.Conv2d):
            pix = 1 if pooled else hw[0] * hw[1]
            k = m.kernel_size[0] * m.kernel_size[1]
            total += m.out_channels * (m.in_channels // m.groups) * k * pix
    return total


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')


# --------------------------------------------------------------------------
# DDF module
# --------------------------------------------------------------------------
class DDFConv2d(DynamicConv2dBase):
    """The DDF module (official ``DDFPack``) as a conv layer.

    Replaces a k x k conv with ``in_channels == out_channels``: the spatial
    branch (1x1 conv C -> head*k*k with bias and the layer's stride, then a
    spatial FilterNorm) and the channel branch (GAP -> 1x1 C -> floor(
    se_ratio*C) -> ReLU -> 1x1 -> C*k*k, then a channel FilterNorm with a
    learnable std) predict the filters, which :func:`ddf` applies. Parameters
    per layer (k = 3, head = 1): (9C + 9) + (C*h + h) + (h*9C + 9C) + 9C
    with h = floor(0.2C), plus C with ``bias=True``. The submodule names
    (``spatial_branch``, ``channel_branch``) and their indices are the
    official ones, so official state dicts load.

    Output size: that of ``nn.Conv2d(C, C, k, stride, padding=(k-1)/2*d)``,
    which is the official H // stride whenever the official operator runs
    (it refuses inputs not divisible by the stride).

    Args:
        in_channels (int): Channels C.
        out_channels (int): Must equal ``in_channels``.
        kernel_size (int): Odd k. Default: 3.
        stride (int): Stride. Default: 1.
        padding (int | None): Implied: dilation*(k-1)/2. Accepted for the
            ``nn.Conv2d`` contract; a contradicting value raises
            ``ValueError``. Default: None.
        dilation (int): Dilation. Default: 1.
        groups (int): 1 or ``in_channels`` (both mean the same DDF); accepted
            for the contract. Default: 1.
        bias (bool): Add a learnable output bias (official DDF has none).
            Default: False.
        head (int): Channel groups with their own spatial filter.
            Default: 1.
        se_ratio (float): Hidden width ratio of the channel branch.
            Default: 0.2.
        combine (str): ``'mul'`` or ``'add'``. Default: ``'mul'``.
        nonlinearity (str): Gain of the filter norms. Default: ``'relu'``.
        gen_kernel_size (int): If > 1, a depthwise conv of this size before
            the spatial branch's 1x1 conv (official option). Default: 1.
        impl (str): Operator implementation, see :func:`ddf`.
            Default: ``'auto'``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 3,
                 stride: int = 1,
                 padding: Optional[int] = None,
                 dilation: int = 1,
                 groups: int = 1,
                 bias: bool = False,
                 head: int = 1,
                 se_ratio: float = 0.2,
                 combine: str = 'mul',
                 nonlinearity: str = 'relu',
                 gen_kernel_size: int = 1,
                 impl: str = 'auto'):
        check_positive(in_channels, 'in_channels')
        check_positive(out_channels, 'out_channels')
        if in_channels != out_channels:
            raise ValueError(
                'DDFConv2d is a depthwise-style layer (every channel is '
                'filtered by its own dynamic filter, nothing mixes channels):'
                ' it needs in_channels == out_channels, got DDFConv2d('
                f'in_channels={in_channels}, out_channels={out_channels}, '
                f'kernel_size={kernel_size!r}, stride={stride!r}). Keep a '
                'static conv where the channel count changes (a stem, a '
                'projection shortcut)')
        k = kernel_size if isinstance(kernel_size, int) else None
        if isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 \
                and kernel_size[0] == kernel_size[1]:
            k = kernel_size[0]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or \
                k % 2 == 0:
            raise ValueError('kernel_size must be an odd int (or a square '
                             f'pair), got {kernel_size!r}')
        for name, v in (('stride', stride), ('dilation', dilation)):
            if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1]:
                v = v[0]
            check_positive(v, name)
        stride = stride[0] if isinstance(stride, (tuple, list)) else stride
        dilation = dilation[0] if isinstance(dilation,
                                             (tuple, list)) else dilation
        implied = dilation * (k - 1) // 2
        if padding is not None and padding not in (implied, (implied, implied),
                                                   [implied, implied]):
            raise ValueError(f'padding must be dilation*(kernel_size-1)/2 = '
                             f'{implied} for DDFConv2d (or None), got '
                             f'{padding!r}')
        if groups not in (1, in_channels):
            raise ValueError(f'groups must be 1 or in_channels '
                             f'({in_channels}) for DDFConv2d, got {groups!r}')
        super().__init__(in_channels, out_channels, k, stride, implied,
                         dilation, groups, bias)
        check_ddf_config(k, dilation, head, combine, stride, impl, se_ratio,
                         ('in_channels', in_channels))
        check_positive(gen_kernel_size, 'gen_kernel_size')
        self.head = head
        self.se_ratio = se_ratio
        self.combine = combine
        self.impl = impl
        #: The DDF path of the latest forward: 'fused', 'taps',
        #: 'reference' or 'triton' (see :mod:`mmdyn.ops.accel.paths`).
        self.last_path = None
        self.spatial_branch = build_spatial_branch(in_channels, k, head,
                                                   stride, nonlinearity,
                                                   gen_kernel_size)
        self.channel_branch = build_channel_branch(in_channels, k, se_ratio,
                                                   nonlinearity)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter('bias', None)
        self.init_weights()

    def init_weights(self) -> None:
        _init_branch(self.spatial_branch)
        _init_branch(self.channel_branch)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def filters(self, x: torch.Tensor, pooled_matmuls: bool = False):
        """The (channel filter [B, C, k, k], spatial filter [B, head*k*k, Ho,
        Wo]) this layer applies to ``x``; ``pooled_matmuls``: the channel
        branch by :func:`pooled_channel_filters` (the forward), else by its
        modules (the reference)."""
        k = self.kernel_size[0]
        cf = pooled_channel_filters(self.channel_branch, x) if \
            pooled_matmuls else self.channel_branch(x)
        cf = cf.view(x.shape[0], self.in_channels, k, k)
        return cf, self.spatial_branch(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result by the path
        :func:`~mmdyn.ops.accel.paths.ddf_path` decides, once per call
        (recorded in :attr:`last_path`)."""
        out = self.forward_prologue(x)
        if out is not None:  # traced by torch.fx, or an empty batch
            return out
        if export_forms.exporting() and ddf_path(self.impl, x) == 'taps':
            # The filter norms' centring folded into the branches' convs.
            self.last_path = 'taps'
            out = ddf_export_forms.ddf_conv(self, x)
            if self.bias is not None:
                out = out + self.bias.view(1, -1, 1, 1)
            return out.to(x.dtype)
        cf, sf = self.filters(x, pooled_matmuls=True)
        path = self.last_path = ddf_path(self.impl, x, (cf, sf),
                                         (self.kernel_size, self.dilation,
                                          self.stride, self.combine,
                                          self.head), self._ddf)
        out = self._ddf(path, x, cf, sf)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: the two filters, then :func:`ddf_reference` (an
        explicit unfold and sum)."""
        out = self.check_input_or_empty(x)
        if out is not None:
            return out
        cf, sf = self.filters(x)
        out = self._ddf('reference', x, cf, sf)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)

    def _ddf(self, path: str, x: torch.Tensor, cf: torch.Tensor,
             sf: torch.Tensor) -> torch.Tensor:
        """:func:`ddf` with this layer's settings, by ``path``."""
        k, d, s = self.kernel_size[0], self.dilation[0], self.stride[0]
        checked = _check_ddf_args(x, cf, sf, k, d, s, self.combine, self.head)
        return _ddf_by_path(path, x, cf, sf, checked, k, d, s, self.combine,
                            self.head)

    def madds_per_sample(self, input_hw) -> dict:
        """Multiply-adds for one sample of spatial size ``input_hw``
        (convention of :mod:`mmdyn.analysis.flops`: conv and agg are both
        C*Ho*Wo*k*k)."""
        Ho, Wo = self.output_hw(*input_hw)
        k2 = self.kernel_size[0] * self.kernel_size[1]
        apply = self.in_channels * Ho * Wo * k2
        # Every spatial-branch conv runs at the output size (the first one
        # carries the stride).
        att = (
            _branch_madds(self.spatial_branch,
                          (Ho, Wo)) + _branch_madds(self.channel_branch,
                                                    (1, 1)))
        return dict(conv=int(apply), att=int(att), agg=int(apply), scal=0)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', head={self.head}, '
                f'se_ratio={self.se_ratio}, combine={self.combine!r}')


# --------------------------------------------------------------------------
# DDF-Up
# --------------------------------------------------------------------------
class DDFUpsample(nn.Module):
    """DDF-Up: content-aware upsampling with ``scale_factor**2`` DDFs.

    Reading of the paper and the official ``DDFUpPack``: branch p (one per
    sub-pixel phase p = (py, px), p = py*s + px) has its own spatial and
    channel filter branches and runs a stride-1 DDF on the low-resolution
    input x; its output fills the output pixels (y*s + py, x*s + px)
    (a pixel shuffle of the s*s branch outputs). The filter norms use the
    ``'linear'`` gain (std 1/k), the official default for DDF-Up.

    Guided (joint) upsampling, ``guided=True``: the channel filters still
    come from x, but the spatial filters come from a guidance map with
    ``guide_channels`` channels through a depthwise
    ``gen_kernel_size`` (at least 3) conv and a 1x1 conv per branch, as the
    official joint branch. The official op needs the guidance at the
    resolution of x; here a high-resolution guidance (e.g. the FPN lateral
    feature the upsampled map is added to, of size about s*H x s*W) is
    accepted too: branch p then reads the guidance pixels of its own phase
    (``guidance[..., py::s, px::s]``), so each output pixel's spatial filter
    is predicted from the guidance at that very pixel. A guidance whose size
    is not exactly s*H x s*W (odd sizes, ``ceil(Hg / s) == H``) is
    edge-padded to it.

    Registered as ``'ddf_up'`` / ``'DDFUpsample'`` with CARAFE's calling
    convention: ``build_upsample_layer(dict(type='ddf_up'), channels,
    scale_factor)``.

    Args:
        channels (int): Channels C of x (and of the output).
        scale_factor (int): Upsampling factor s. Default: 2.
        kernel_size (int): Odd DDF kernel size. Default: 3.
        dilation (int): DDF dilation. Default: 1.
        head (int): Spatial-filter heads. Default: 1.
        se_ratio (float): Channel-branch hidden ratio. Default: 0.2.
        combine (str): ``'mul'`` or ``'add'``. Default: ``'mul'``.
        guided (bool): Predict the spatial filters from a guidance input.
            Default: False.
        guide_channels (int | None): Channels of the guidance; defaults to
            ``channels`` when guided.
        nonlinearity (str): Gain of the filter norms. Default: ``'linear'``.
        gen_kernel_size (int): Depthwise conv before the spatial 1x1 conv
            (forced to >= 3 when guided, as the official code). Default: 1.
        impl (str): Operator implementation, see :func:`ddf`.
            Default: ``'auto'``.
    """

    def __init__(self,
                 channels: int,
                 scale_factor: int = 2,
                 kernel_size: int = 3,
                 dilation: int = 1,
                 head: int = 1,
                 se_ratio: float = 0.2,
                 combine: str = 'mul',
                 guided: bool = False,
                 guide_channels: Optional[int] = None,
                 nonlinearity: str = 'linear',
                 gen_kernel_size: int = 1,
                 impl: str = 'auto'):
        super().__init__()
        check_positive(channels, 'channels')
        check_positive(scale_factor, 'scale_factor')
        check_ddf_config(kernel_size, dilation, head, combine, 1, impl,
                         se_ratio, ('channels', channels))
        check_positive(gen_kernel_size, 'gen_kernel_size')
        if guide_channels is not None and not guided:
            raise ValueError('guide_channels is only used with guided=True')
        if guided:
            guide_channels = channels if guide_channels is None else \
                guide_channels
            check_positive(guide_channels, 'guide_channels')
            gen_kernel_size = max(gen_kernel_size, 3)
        self.channels = channels
        self.scale_factor = scale_factor
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.head = head
        self.combine = combine
        self.guided = guided
        self.guide_channels = guide_channels
        self.impl = impl
        #: The DDF path of the latest forward: 'fused', 'taps',
        #: 'reference' or 'triton' (see :mod:`mmdyn.ops.accel.paths`).
        self.last_path = None
        spatial_in = guide_channels if guided else channels
        self.spatial_branch = nn.ModuleList(
            build_spatial_branch(spatial_in, kernel_size, head, 1,
                                 nonlinearity, gen_kernel_size)
            for _ in range(scale_factor**2))
        self.channel_branch = nn.ModuleList(
            build_channel_branch(channels, kernel_size, se_ratio, nonlinearity)
            for _ in range(scale_factor**2))
        self.init_weights()

    def init_weights(self) -> None:
        for branch in (*self.spatial_branch, *self.channel_branch):
            _init_branch(branch)

    def _phase_guidance(self, x: torch.Tensor,
                        guidance: Optional[torch.Tensor]):
        """One guidance map per branch, each at the resolution of x."""
        n = self.scale_factor**2
        if not self.guided:
            if guidance is not None:
                raise ValueError('guidance given to a DDFUpsample built with '
                                 'guided=False')
            return [x] * n
        if guidance is None:
            raise ValueError('DDFUpsample(guided=True) needs a guidance '
                             'input: forward(x, guidance)')
        if (guidance.dim() != 4 or guidance.shape[0] != x.shape[0]
                or guidance.shape[1] != self.guide_channels):
            raise ValueError(
                f'guidance must be [B, {self.guide_channels}, Hg, Wg] with '
                f'B = {x.shape[0]}, got {tuple(guidance.shape)}')
        H, W = x.shape[-2:]
        Hg, Wg = guidance.shape[-2:]
        s = self.scale_factor
        if (Hg, Wg) == (H, W):
            return [guidance] * n
        if -(-Hg // s) != H or -(-Wg // s) != W:
            raise ValueError(
                f'guidance must be {H}x{W} (the size of x) or about '
                f'{s * H}x{s * W} (ceil(Hg/{s}) == {H}), got {Hg}x{Wg}')
        if (Hg, Wg) != (s * H, s * W):
            guidance = F.pad(
                guidance, (0, s * W - Wg, 0, s * H - Hg), mode='replicate')
        return [
            guidance[:, :, py::s, px::s] for py in range(s) for px in range(s)
        ]

    def _spatial_filters_batched(self, x: torch.Tensor):
        """The s*s spatial branches (1x1 conv + norm) on one input as one
        conv and one norm: same result, a quarter of the small ops."""
        convs = [b[0] for b in self.spatial_branch]
        raw = F.conv2d(x, torch.cat([c.weight for c in convs]),
                       torch.cat([c.bias for c in convs]))
        norm = self.spatial_branch[0][1]
        n = len(convs)
        sf = normalize_filters(raw, n * self.head, self.kernel_size**2)
        return (sf * norm.gain).chunk(n, dim=1)

    def forward(self,
                x: torch.Tensor,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Upsample x [B, C, H, W] to [B, C, s*H, s*W]."""
        leaf = fx_leaf(self, x, guidance)
        if leaf is not None:  # torch.fx tracing: the layer as a leaf
            return leaf
        cfs, sfs = self._filters(x, guidance)
        empty = is_empty_batch(x)
        path = ddf_path(self.impl, x)
        if export_forms.exporting() and path == 'taps':
            # The phases together, the norms' centring folded; the filters
            # above (their checks) unused: the exporter drops their nodes.
            self.last_path = path
            return ddf_export_forms.ddf_upsample(self, x, guidance).to(x.dtype)
        self.last_path = 'empty' if empty else path
        return self._upsample(path, x, cfs, sfs, empty)

    def _filters(self, x: torch.Tensor, guidance: Optional[torch.Tensor]):
        """Check the inputs; the s*s channel filters [B, C, k, k] and spatial
        filters [B, head*k*k, H, W] of the phases."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or \
                x.shape[1] != self.channels:
            raise ValueError(
                f'DDFUpsample expects x of shape [B, {self.channels}, H, W], '
                f'got {getattr(x, "shape", type(x).__name__)}')
        check_input_dtype(self, x)
        B, C, H, W = x.shape
        if not graph_capture() and (H == 0 or W == 0):  # as nn.Upsample
            raise ValueError('DDFUpsample needs an input x with a height and '
                             f'a width >= 1, got {tuple(x.shape)}')
        k = self.kernel_size
        guides = self._phase_guidance(x, guidance)
        cfs = [b(x).view(B, C, k, k) for b in self.channel_branch]
        if len(self.spatial_branch[0]) == 2 and not self.guided:
            sfs = self._spatial_filters_batched(x)
        else:
            sfs = [b(g) for b, g in zip(self.spatial_branch, guides)]
        return cfs, sfs

    def forward_reference(self,
                          x: torch.Tensor,
                          guidance: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
        """The paper's forward: per phase the filters and
        :func:`ddf_reference`, the phases interleaved."""
        cfs, sfs = self._filters(x, guidance)
        return self._upsample('reference', x, cfs, sfs, is_empty_batch(x))

    def _upsample(self, path: str, x: torch.Tensor, cfs, sfs,
                  empty: bool) -> torch.Tensor:
        """The s*s phase DDFs by ``path``, interleaved."""
        B, C, H, W = x.shape
        k, s = self.kernel_size, self.scale_factor
        add = self.combine == 'add'
        if path == 'fused' and self.head == 1 and not empty:
            return ddf_paths.ddf_up_fused(x, cfs, sfs, k, self.dilation, add,
                                          s)
        if path == 'triton' and not empty:  # the sub-pixel Triton kernels
            return ddf_paths.ddf_up_triton(x, cfs, sfs, k, self.dilation, add,
                                           self.head, s)
        phases = []
        for cf, sf in zip(cfs, sfs):
            checked = _check_ddf_args(x, cf, sf, k, self.dilation, 1,
                                      self.combine, self.head)
            phases.append(
                _ddf_by_path(path, x, cf, sf, checked, k, self.dilation, 1,
                             self.combine, self.head))
        if export_forms.exporting():  # a Transpose, not index assignments
            return ddf_export_forms.interleave_phases(phases, s).to(x.dtype)
        # Interleave the phases by strided copies into the output viewed as
        # [B, C, H, s, W, s] (stack + pixel_shuffle is ~3x slower on CPU).
        out = phases[0].new_empty((B, C, H, s, W, s))
        for p, phase in enumerate(phases):
            out[:, :, :, p // s, :, p % s] = phase
        return out.view(B, C, s * H, s * W).to(x.dtype)

    def madds_per_sample(self, input_hw) -> dict:
        """Multiply-adds per sample for a low-resolution input of size
        ``input_hw``: s*s DDFs (conv, agg) and their filter branches."""
        H, W = input_hw
        k2 = self.kernel_size**2
        n = self.scale_factor**2
        apply = n * self.channels * H * W * k2
        att = sum(_branch_madds(b, (H, W)) for b in self.spatial_branch) + sum(
            _branch_madds(b, (1, 1)) for b in self.channel_branch)
        return dict(conv=int(apply), att=int(att), agg=int(apply), scal=0)

    def extra_repr(self) -> str:
        s = (f'{self.channels}, scale_factor={self.scale_factor}, '
             f'kernel_size={self.kernel_size}, combine={self.combine!r}')
        if self.guided:
            s += f', guided=True, guide_channels={self.guide_channels}'
        return s
