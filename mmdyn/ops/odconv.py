"""Omni-dimensional dynamic convolution (ODConv).

Li, Zhou, Yao. "Omni-Dimensional Dynamic Convolution", ICLR 2022.
https://openreview.net/forum?id=DmpCfq6Mg39

A bank of ``K`` kernels is modulated per sample by four attentions computed
from the globally pooled input: over input channels (``alpha_c``), output
channels (``alpha_f``), kernel positions (``alpha_s``) and kernels
(``alpha_w``)::

    s       = ReLU(norm(fc(GAP(x))))
    W_b     = sum_i alpha_w[b, i] * (alpha_s[b] * W_i)
    y_b     = alpha_f[b] * conv(alpha_c[b] * x_b, W_b)  (+ bias)

The sub-module and parameter names (``weight``, ``attention.fc``,
``attention.bn``, ``attention.channel_fc``/``filter_fc``/``spatial_fc``/
``kernel_fc``) follow the official layout so that its checkpoints map 1:1.

Each layer's ``forward_reference`` computes exactly these formulas;
``forward`` returns the same result by the path that
:mod:`mmdyn.ops.fast_paths` chooses for the input (``impl`` selects one,
``last_path`` names the one taken).

torch only.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (DynamicConv2dBase, IntOrPair, TemperatureMixin,
                   build_attention_norm, check_allocation, check_positive,
                   init_attention_weights, linear_1x1)
from .per_sample_conv import chunked_per_sample_conv2d, per_sample_conv2d
from .fast_paths import (ODCONV_PATHS, PER_SAMPLE_IMPLS, check_impl,
                         graph_capture, odconv_folds, odconv_path,
                         odconv_scaled_columns)
from .winograd import winograd_per_sample_conv2d


def _repeat_positions(rows: int) -> Tuple[int, int]:
    """Layout for scaling a [B, rows*P] kernel by a [B, P] attention.

    Broadcasting a [B, 1, P] factor over a [B, rows, P] view runs an inner
    loop of only P (9) elements; repeating the factor R times gives rows of
    9R contiguous elements, faster on CPU. Returns (R, rows / R).
    """
    repeat = math.gcd(rows, 64)
    return repeat, rows // repeat


def _mix_kernels_forward(kernel: Optional[torch.Tensor], bank: torch.Tensor,
                         spatial: torch.Tensor,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P],
    written into ``out`` when given; ``kernel`` None means one kernel with
    attention 1. No autograd: the forward of :class:`_MixKernels` and the
    chunked per-sample kernels."""
    batch, positions = spatial.shape
    repeat, rows = _repeat_positions(bank.shape[1] // positions)
    scale = spatial.repeat(1, repeat).unsqueeze(1)
    if out is None:
        out = bank.new_empty(batch, bank.shape[1])
    mixed = out.view(batch, rows, positions * repeat)
    if kernel is None or kernel.shape[1] == 1:
        # One kernel: a broadcast product, one pass over the output
        # (a [B, 1] x [1, N] matmul is an outer product MKL runs slowly).
        if kernel is not None:
            scale = scale * kernel.view(-1, 1, 1)
        torch.mul(bank.view(1, rows, positions * repeat), scale, out=mixed)
    else:
        torch.matmul(kernel, bank, out=out)
        mixed.mul_(scale)
    return out


class _MixKernels(torch.autograd.Function):
    """``(kernel @ bank) * spatial`` with a memory-lean backward.

    ``bank`` [K, rows*P], ``kernel`` [B, K], ``spatial`` [B, P] -> [B,
    rows*P]. Plain autograd would keep the mixed kernel, a [B, numel(W)]
    tensor per layer, for the spatial gradient; here it is recomputed in the
    backward by one cheap [B, K] x [K, numel(W)] matmul, and the output is
    scaled in place.
    """

    @staticmethod
    def forward(ctx, kernel, bank, spatial):
        ctx.save_for_backward(kernel, bank, spatial)
        return _mix_kernels_forward(kernel, bank, spatial)

    @staticmethod
    def backward(ctx, grad):
        kernel, bank, spatial = ctx.saved_tensors
        batch, positions = spatial.shape
        grad = grad.to(bank.dtype).contiguous()
        grad_kernel = grad_bank = grad_spatial = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            repeat, rows = _repeat_positions(bank.shape[1] // positions)
            scaled = (grad.view(batch, rows, positions * repeat) *
                      spatial.repeat(1, repeat).unsqueeze(1)).view(batch, -1)
            if ctx.needs_input_grad[0]:
                grad_kernel = scaled @ bank.t()
            if ctx.needs_input_grad[1]:
                grad_bank = kernel.t() @ scaled
        if ctx.needs_input_grad[2]:
            repeat, rows = _repeat_positions(bank.shape[1] // positions)
            mixed = (kernel @ bank).view(batch, rows, positions * repeat)
            grad_spatial = (grad.view_as(mixed) * mixed).sum(1).view(
                batch, repeat, positions).sum(1)
        return grad_kernel, grad_bank, grad_spatial


def _mix_kernels(kernel: torch.Tensor, bank: torch.Tensor,
                 spatial: torch.Tensor) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P]."""
    dtype = bank.dtype
    kernel, spatial = kernel.to(dtype), spatial.to(dtype)
    if graph_capture():
        # Plain ops for graph capture (tracing, export, compile).
        return ((kernel @ bank).view(kernel.shape[0], -1, spatial.shape[1]) *
                spatial.unsqueeze(1)).flatten(1)
    with torch.autocast(bank.device.type, enabled=False):
        return _MixKernels.apply(kernel, bank, spatial)


class ODAttention(nn.Module):
    """The four attentions of ODConv, from pooled features.

    Args:
        in_channels (int): Input channels of the conv.
        out_channels (int): Output channels of the conv.
        kernel_size (tuple[int, int]): Kernel size of the conv.
        groups (int): Groups of the conv. Default: 1.
        reduction (float): Hidden width ratio. Default: 1/16.
        kernel_num (int): Number of kernels ``K``. Default: 4.
        min_channels (int): Lower bound of the hidden width. Default: 16.
        attention_norm (str): Norm after ``fc``, see
            :func:`~mmdyn.ops.base.build_attention_norm`.
            Default: ``'bn_batch1'``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: Tuple[int, int],
                 groups: int = 1,
                 reduction: float = 1 / 16,
                 kernel_num: int = 4,
                 min_channels: int = 16,
                 attention_norm: Optional[str] = 'bn_batch1'):
        super().__init__()
        self.hidden_channels = max(int(in_channels * reduction), min_channels)
        hidden = self.hidden_channels
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = build_attention_norm(attention_norm, hidden)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        # Only a true depthwise conv has no filter attention (official rule).
        self.is_depthwise = in_channels == groups == out_channels
        if not self.is_depthwise:
            self.filter_fc = nn.Conv2d(hidden, out_channels, 1)
        self.num_positions = kernel_size[0] * kernel_size[1]
        if self.num_positions > 1:
            self.spatial_fc = nn.Conv2d(hidden, self.num_positions, 1)
        self.kernel_num = kernel_num
        if kernel_num > 1:
            self.kernel_fc = nn.Conv2d(hidden, kernel_num, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """fan_out kaiming for the attention convs, zero biases, BN 1/0."""
        init_attention_weights(self)

    def forward(self, pooled: torch.Tensor, temperature: torch.Tensor):
        """Attentions for pooled features ``pooled`` [B, C_in].

        Returns:
            tuple: ``(channel [B, C_in], filter [B, C_out] | None,
            spatial [B, kh*kw] | None, kernel [B, K] | None)``; ``None`` is
            an attention that is the constant 1 for this layer.
        """
        s = F.relu(self.bn(linear_1x1(pooled, self.fc)))
        channel = torch.sigmoid(
            linear_1x1(s, self.channel_fc) / temperature)
        filt = spatial = kernel = None
        if not self.is_depthwise:
            filt = torch.sigmoid(
                linear_1x1(s, self.filter_fc) / temperature)
        if self.num_positions > 1:
            spatial = torch.sigmoid(
                linear_1x1(s, self.spatial_fc) / temperature)
        if self.kernel_num > 1:
            kernel = torch.softmax(
                linear_1x1(s, self.kernel_fc) / temperature, dim=1)
        return channel, filt, spatial, kernel


class ODConv2d(TemperatureMixin, DynamicConv2dBase):
    """Omni-dimensional dynamic 2-D convolution, a drop-in ``nn.Conv2d``.

    Follows the official ODConv layer (see the module docstring), with
    the special cases: no filter attention for a depthwise conv
    (``in_channels == groups == out_channels``), no spatial attention for a
    1x1 kernel, no kernel attention for ``kernel_num == 1``, and for a 1x1
    kernel with ``kernel_num == 1`` a plain conv with the input scaled by
    ``alpha_c`` and the output by ``alpha_f``.

    The official layer has no bias. ``bias=True`` (the ``nn.Conv2d``
    default) adds a [C_out] bias, zero-initialised, added after the filter
    attention; mmcv's ``ConvModule`` and mmdet's ``ResNet(dcn=...)`` pass
    ``bias=False`` when a norm follows, which gives the official layer and
    parameter count.

    The temperature ``T`` divides every attention logit. It is 1 at
    construction (the inference value) and is annealed in training by
    ``DynamicTemperatureHook`` with :attr:`TEMPERATURE_SCHEDULE`.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int | tuple[int, int]): Kernel size.
        stride (int | tuple[int, int]): Stride. Default: 1.
        padding (int | tuple[int, int] | str): Zero padding. Default: 0.
        dilation (int | tuple[int, int]): Dilation. Default: 1.
        groups (int): Groups. Default: 1.
        bias (bool): Add a [C_out] bias (not in the official layer).
            Default: True.
        reduction (float): Attention hidden width ratio ``r``; the hidden
            width is ``max(int(in_channels * r), min_channels)``.
            Default: 1/16.
        kernel_num (int): Number of kernels ``K`` in the bank. Default: 4.
        min_channels (int): Minimum attention hidden width. Default: 16.
        attention_norm (str): Norm after the first attention layer:
            ``'bn_batch1'`` (official BN, also trainable at batch size 1),
            ``'bn'``, ``'ln'`` or ``'none'``. Default: ``'bn_batch1'``.
        impl (str): ``'auto'`` (the fastest path for the input),
            ``'reference'`` (the paper's forward), a path of
            :data:`~mmdyn.ops.fast_paths.ODCONV_PATHS`, or a per-sample conv
            of :func:`~mmdyn.ops.per_sample_conv.per_sample_conv2d`
            (``'loop'``, ``'grouped'``, ``'unfold'``: the reference forward
            with it). See :mod:`mmdyn.ops.fast_paths`. Default: ``'auto'``.
        **kwargs: ``padding_mode='zeros'``, as ``nn.Conv2d``.
    """

    TEMPERATURE_SCHEDULE = dict(start=30.0, end=1.0, epochs=10)

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = True,
                 reduction: float = 1 / 16,
                 kernel_num: int = 4,
                 min_channels: int = 16,
                 attention_norm: Optional[str] = 'bn_batch1',
                 impl: str = 'auto',
                 **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, **kwargs)
        check_positive(kernel_num, 'kernel_num')
        check_positive(reduction, 'reduction', allow_float=True)
        check_positive(min_channels, 'min_channels')
        self.kernel_num = kernel_num
        self.reduction = reduction
        self.impl = check_impl(impl, ODCONV_PATHS)
        #: The path of the latest forward (see :mod:`mmdyn.ops.fast_paths`).
        self.last_path = None
        self.init_temperature(1.0)
        kh, kw = self.kernel_size
        check_allocation(
            kernel_num * out_channels * (in_channels // groups) * kh * kw,
            'the ODConv2d kernel bank', f'kernel_num ({kernel_num})')
        hidden = max(int(in_channels * reduction), min_channels)
        check_allocation(
            hidden * (2 * in_channels + out_channels + kh * kw + kernel_num),
            'the ODConv2d attention',
            f'reduction ({reduction}) or min_channels ({min_channels})')
        self.attention = ODAttention(in_channels, out_channels,
                                     self.kernel_size, groups, reduction,
                                     kernel_num, min_channels, attention_norm)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_channels, in_channels // groups,
                        *self.kernel_size))
        if self.with_bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter('bias', None)
        self.is_pointwise_1x = self.kernel_size == (1, 1) and kernel_num == 1
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: each kernel fan_out kaiming; attention as official;
        the (non-official) bias zero."""
        for i in range(self.kernel_num):
            nn.init.kaiming_normal_(
                self.weight.data[i], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.init_weights()

    def reset_parameters(self) -> None:
        self.init_weights()

    def attentions(self, x: torch.Tensor):
        """The attentions ``(channel, filter, spatial, kernel)`` for ``x``
        (see :meth:`ODAttention.forward`)."""
        return self.attention(x.mean((2, 3)), self.temperature)

    def aggregate_weight(self,
                         spatial: Optional[torch.Tensor],
                         kernel: Optional[torch.Tensor],
                         channel: Optional[torch.Tensor] = None,
                         filt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample kernel ``sum_i kernel[b,i] * (spatial[b] * W_i)``.

        ``channel`` [B, C_in] and ``filt`` [B, C_out], when given, are folded
        into the kernel's input/output-channel dimensions (which equals
        scaling the input and the output).

        Returns:
            Tensor: [B, C_out, C_in/g, kh, kw], or [1, ...] when nothing
            depends on the sample.
        """
        bank = self.weight
        c_out, c_in_g = bank.shape[1:3]
        positions = bank.shape[3] * bank.shape[4]
        if channel is None and filt is None and spatial is not None:
            if kernel is None:  # K == 1: a one-kernel mixture
                kernel = spatial.new_ones(spatial.shape[0], 1)
            weight = _mix_kernels(kernel, bank.flatten(1), spatial)
            return weight.view(-1, *bank.shape[1:])
        if kernel is None:
            weight = bank
        else:
            # [B, K] x [K, numel(W)]: mixing before the spatial product is
            # the same sum with K times fewer multiplications.
            weight = kernel.to(bank.dtype) @ bank.flatten(1)
        if channel is not None or filt is not None:
            fresh = kernel is not None and not torch.is_grad_enabled()
            scale = self._channel_scale(channel, filt, c_out, c_in_g)
            if spatial is not None:
                scale = scale.unsqueeze(-1) * spatial.to(
                    scale.dtype)[:, None, None, :]
            else:
                scale = scale.unsqueeze(-1).expand(-1, -1, -1, positions)
            weight = weight.reshape(-1, c_out, c_in_g, positions)
            weight = weight.mul_(scale) if fresh else weight * scale
        return weight.view(-1, *bank.shape[1:])

    def _mix_into(self, spatial, kernel, start: int, stop: int,
                  out: torch.Tensor) -> torch.Tensor:
        """Samples ``start:stop``'s kernels (spatial and kernel attentions
        only) written into ``out`` [stop - start, numel(W)]: the products of
        :func:`_mix_kernels` without autograd (see
        :func:`~mmdyn.ops.per_sample_conv.chunked_per_sample_conv2d`)."""
        dtype = self.weight.dtype
        bank = self.weight.flatten(1)
        kernel = None if kernel is None else kernel[start:stop].to(dtype)
        with torch.autocast(bank.device.type, enabled=False):
            if spatial is None:
                return torch.matmul(kernel, bank, out=out)
            return _mix_kernels_forward(kernel, bank,
                                        spatial[start:stop].to(dtype), out)

    def _channel_scale(self, channel, filt, c_out, c_in_g):
        """[B, C_out, C_in/g] product of the channel and filter attentions
        laid out as the kernel's (output, input-in-group) dimensions."""
        scale = None
        if channel is not None:
            groups = self.groups
            scale = channel.view(-1, groups, 1, c_in_g).expand(
                -1, groups, c_out // groups, c_in_g).reshape(
                    -1, c_out, c_in_g)
        if filt is not None:
            f = filt[:, :, None]
            scale = f.expand(-1, c_out, c_in_g) if scale is None else (
                scale * f)
        return scale.to(self.weight.dtype)

    def fold_attentions(self, input_hw: Tuple[int, int]) -> bool:
        """Whether ``alpha_c``/``alpha_f`` are cheaper folded into the
        kernel than applied to the feature maps (path ``'folded'``; see
        :func:`~mmdyn.ops.fast_paths.odconv_folds`)."""
        return odconv_folds(self, input_hw)

    def use_scaled_columns(self, input_hw: Tuple[int, int]) -> bool:
        """Whether this one-kernel layer pays to run as the static kernel
        times scaled im2col columns (path ``'scaled_columns'``; see
        :func:`~mmdyn.ops.fast_paths.odconv_scaled_columns`)."""
        return odconv_scaled_columns(self, input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result by the path that
        :func:`~mmdyn.ops.fast_paths.odconv_path` chooses (recorded in
        :attr:`last_path`)."""
        out = self.forward_prologue(x)
        if out is not None:  # traced by torch.fx, or an empty batch
            return out
        channel, filt, spatial, kernel = self.attentions(x)
        path = self.last_path = odconv_path(
            self, x, spatial is not None or kernel is not None)
        if path == 'reference':
            return self._forward_reference(x, channel, filt, spatial, kernel)
        if path == 'folded':  # filter attention and bias in the kernel conv
            return self._forward_folded(x, channel, filt, spatial, kernel)
        if path == 'scaled_columns':
            out = self._forward_scaled_columns(x, channel, spatial)
            return self._filter_and_bias(out, filt)
        x = x * channel[:, :, None, None]
        if path == 'winograd':
            out = winograd_per_sample_conv2d(x, self.weight, kernel, spatial,
                                             self.padding)
        else:  # 'chunked'
            out = self._forward_chunked(x, spatial, kernel)
        return self._filter_and_bias(out, filt)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: the four attentions, the per-sample kernel
        ``W_b = sum_i alpha_w[b, i] * (alpha_s[b] * W_i)``, then
        ``alpha_f[b] * conv(alpha_c[b] * x_b, W_b)`` (+ bias)."""
        out = self.check_input_or_empty(x)
        if out is not None:
            return out
        return self._forward_reference(x, *self.attentions(x))

    def _forward_reference(self, x, channel, filt, spatial, kernel):
        weight = self.aggregate_weight(spatial, kernel)
        x = x * channel[:, :, None, None]
        if weight.shape[0] == 1:  # nothing depends on the sample
            out = F.conv2d(x, weight[0], None, self.stride, self.padding,
                           self.dilation, self.groups)
        else:
            out = per_sample_conv2d(x, weight, None, self.stride,
                                    self.padding, self.dilation, self.groups,
                                    self._per_sample_impl)
        return self._filter_and_bias(out, filt)

    def _filter_and_bias(self, out: torch.Tensor,
                         filt: Optional[torch.Tensor]) -> torch.Tensor:
        """``alpha_f * out + bias``."""
        if filt is not None:
            scale = filt[:, :, None, None].to(out.dtype)
            out = out * scale if torch.is_grad_enabled() else out.mul_(scale)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

    @property
    def _per_sample_impl(self) -> str:
        return self.impl if self.impl in PER_SAMPLE_IMPLS else 'auto'

    # Fast paths: the reference's result, faster for some shapes on CPU
    # (chosen by mmdyn.ops.fast_paths.odconv_path).

    def _forward_folded(self, x, channel, filt, spatial, kernel):
        """``alpha_c`` and ``alpha_f`` folded into the per-sample kernel
        (the smaller tensor on high-resolution maps)."""
        weight = self.aggregate_weight(spatial, kernel, channel, filt)
        return per_sample_conv2d(x, weight, self.bias, self.stride,
                                 self.padding, self.dilation, self.groups,
                                 self._per_sample_impl)

    def _forward_chunked(self, x, spatial, kernel):
        """Kernels built a chunk of samples at a time into the reused
        workspace, then batch-1 convs (inference)."""
        return chunked_per_sample_conv2d(
            x, lambda start, stop, buffer: self._mix_into(
                spatial, kernel, start, stop, buffer),
            self.weight.shape[1:], self.weight.dtype, self.stride,
            self.padding, self.dilation, self.groups)

    def _forward_scaled_columns(self, x, channel, spatial):
        """One kernel: ``conv(alpha_c[b] * x_b, alpha_s[b] * W)`` scales
        input channel ``c`` and kernel position ``p`` of sample ``b``, which
        is scaling the im2col columns of (c, p): one GEMM of the static
        kernel, no per-sample kernel (cheaper when the kernel is larger than
        the columns)."""
        h_out, w_out = self.output_hw(int(x.shape[2]), int(x.shape[3]))
        positions = self.attention.num_positions
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding,
                        self.stride)  # [B, C_in * P, L]
        # -1 for the batch: no batch size baked into an exported graph.
        cols = cols.view(-1, self.in_channels, positions, h_out * w_out)
        scale = (channel[:, :, None] * spatial[:, None, :]).to(cols.dtype)
        scale = scale.unsqueeze(-1)
        cols = cols * scale if torch.is_grad_enabled() else cols.mul_(scale)
        kernel = self.weight.view(self.out_channels, -1)
        out = torch.matmul(
            kernel.to(cols.dtype),
            cols.view(-1, self.in_channels * positions, h_out * w_out))
        return out.view(-1, self.out_channels, h_out, w_out)

    def madds_per_sample(self, input_hw: Tuple[int, int]) -> Dict[str, int]:
        """Multiply-adds per sample for an ``input_hw`` input, in the
        convention of :mod:`mmdyn.analysis.flops`.

        ``conv``: one conv with the per-sample kernel; ``att``: the attention
        layers; ``agg``: building the kernel (``K * numel(W)``, ``numel(W)``
        for ``K == 1`` with ``k > 1``, 0 on the 1x1 ``K == 1`` path);
        ``scal``: the ``alpha_c * x`` and ``alpha_f * y`` products.
        """
        h, w = int(input_hw[0]), int(input_hw[1])
        h_out, w_out = self.output_hw(h, w)
        kh, kw = self.kernel_size
        numel_w = self.out_channels * (self.in_channels //
                                       self.groups) * kh * kw
        conv = self.out_channels * h_out * w_out * (
            self.in_channels // self.groups) * kh * kw
        att = self.attention
        hidden = att.hidden_channels
        att_madds = 2 * self.in_channels * hidden
        if not att.is_depthwise:
            att_madds += hidden * self.out_channels
        if att.num_positions > 1:
            att_madds += hidden * att.num_positions
        if self.kernel_num > 1:
            att_madds += hidden * self.kernel_num
        if self.kernel_num > 1:
            agg = self.kernel_num * numel_w
        elif kh * kw > 1:
            agg = numel_w
        else:
            agg = 0
        # Depthwise layers have no filter attention: no alpha_f * y product.
        scal = self.in_channels * h * w
        if not att.is_depthwise:
            scal += self.out_channels * h_out * w_out
        return dict(conv=conv, att=att_madds, agg=agg, scal=scal)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', kernel_num={self.kernel_num}, '
                f'reduction={self.reduction}')
