# Copyright (c) mmdyn contributors. All rights reserved.
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
:mod:`mmdyn.ops.accel.paths` chooses for the input (``impl`` selects one,
``last_path`` names the one taken).

torch only.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .accel.paths import (PER_SAMPLE_IMPLS, check_impl, choose_path,
                          odconv_folds, odconv_scaled_columns, path_names)
from .base import (DynamicConv2dBase, IntOrPair, TemperatureMixin,
                   build_attention_norm, check_allocation, check_positive,
                   init_attention_weights, linear_1x1)
from .capture import graph_capture
from .per_sample_conv import per_sample_conv2d


def mix_kernels_reference(kernel: torch.Tensor, bank: torch.Tensor,
                          spatial: torch.Tensor) -> torch.Tensor:
    """[B, rows*P] = (kernel [B, K] @ bank [K, rows*P]) * spatial [B, P] in the
    dtype of ``bank``, by plain autograd (autocast off, except under graph
    capture)."""
    dtype = bank.dtype
    kernel, spatial = kernel.to(dtype), spatial.to(dtype)

    def mix():
        return ((kernel @ bank).view(kernel.shape[0], -1, spatial.shape[1]) *
                spatial.unsqueeze(1)).flatten(1)

    if graph_capture():
        return mix()
    with torch.autocast(bank.device.type, enabled=False):
        return mix()


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
        channel = torch.sigmoid(linear_1x1(s, self.channel_fc) / temperature)
        filt = spatial = kernel = None
        if not self.is_depthwise:
            filt = torch.sigmoid(linear_1x1(s, self.filter_fc) / temperature)
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
            :data:`~mmdyn.ops.accel.paths.ODCONV_PATHS`, or a per-sample conv
            of :func:`~mmdyn.ops.per_sample_conv.per_sample_conv2d`
            (``'loop'``, ``'grouped'``, ``'unfold'``: the reference forward
            with it). See :mod:`mmdyn.ops.accel.paths`. Default: ``'auto'``.
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
        self.impl = check_impl(impl, path_names('odconv'))
        #: The path of the latest forward (see :mod:`mmdyn.ops.accel.paths`).
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
        """The attentions ``(channel, filter, spatial, kernel)`` for ``x`` (see
        :meth:`ODAttention.forward`)."""
        return self.attention(x.mean((2, 3)), self.temperature)

    def aggregate_weight(self,
                         spatial: Optional[torch.Tensor],
                         kernel: Optional[torch.Tensor],
                         mix: Optional[Callable] = None) -> torch.Tensor:
        """Per-sample kernel ``sum_i kernel[b,i] * (spatial[b] * W_i)``.

        ``mix(kernel, bank, spatial)``: the product ``(kernel @ bank) *
        spatial`` ([B, K], [K, numel(W)], [B, kh*kw]); default (and under
        graph capture) :func:`mix_kernels_reference`.

        Returns:
            Tensor: [B, C_out, C_in/g, kh, kw], or [1, ...] when nothing
            depends on the sample.
        """
        bank = self.weight
        if spatial is not None:
            if kernel is None:  # K == 1: a one-kernel mixture
                kernel = spatial.new_ones(spatial.shape[0], 1)
            if mix is None or graph_capture():
                mix = mix_kernels_reference
            weight = mix(kernel, bank.flatten(1), spatial)
            return weight.view(-1, *bank.shape[1:])
        if kernel is None:
            return bank
        # [B, K] x [K, numel(W)]
        weight = kernel.to(bank.dtype) @ bank.flatten(1)
        return weight.view(-1, *bank.shape[1:])

    def fold_attentions(self, input_hw: Tuple[int, int]) -> bool:
        """Whether ``alpha_c``/``alpha_f`` are cheaper folded into the kernel
        than applied to the feature maps (path ``'folded'``; see
        :func:`~mmdyn.ops.accel.paths.odconv_folds`)."""
        return odconv_folds(self, input_hw)

    def use_scaled_columns(self, input_hw: Tuple[int, int]) -> bool:
        """Whether this one-kernel layer pays to run as the static kernel times
        scaled im2col columns (path ``'scaled_columns'``; see
        :func:`~mmdyn.ops.accel.paths.odconv_scaled_columns`)."""
        return odconv_scaled_columns(self, input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result by the path that
        :func:`~mmdyn.ops.accel.paths.choose_path` chooses (recorded in
        :attr:`last_path`)."""
        out = self.forward_prologue(x)
        if out is not None:  # traced by torch.fx, or an empty batch
            return out
        attentions = self.attentions(x)
        path = choose_path('odconv', self, x, attentions)
        self.last_path = path.name
        return path.run(self, x, *attentions)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: the four attentions, the per-sample kernel.

        ``W_b = sum_i alpha_w[b, i] * (alpha_s[b] * W_i)``, then
        ``alpha_f[b] * conv(alpha_c[b] * x_b, W_b)`` (+ bias).
        """
        out = self.check_input_or_empty(x)
        if out is not None:
            return out
        return self.reference_from_attentions(x, *self.attentions(x))

    def reference_from_attentions(self,
                                  x,
                                  channel,
                                  filt,
                                  spatial,
                                  kernel,
                                  mix: Optional[Callable] = None):
        """The reference forward from the attentions of ``x`` (``mix``: see
        :meth:`aggregate_weight`)."""
        weight = self.aggregate_weight(spatial, kernel, mix)
        x = x * channel[:, :, None, None]
        if weight.shape[0] == 1:  # nothing depends on the sample
            out = F.conv2d(x, weight[0], None, self.stride, self.padding,
                           self.dilation, self.groups)
        else:
            out = self.per_sample_conv(x, weight)
        return self.filter_and_bias(out, filt)

    def per_sample_conv(self,
                        x: torch.Tensor,
                        weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``conv(x[b], weight[b])`` with the layer's geometry.

        The per-sample conv is the one ``impl`` selects, see
        :func:`~mmdyn.ops.per_sample_conv.per_sample_conv2d`.
        """
        impl = self.impl if self.impl in PER_SAMPLE_IMPLS else 'auto'
        return per_sample_conv2d(x, weight, bias, self.stride, self.padding,
                                 self.dilation, self.groups, impl)

    def filter_and_bias(self, out: torch.Tensor,
                        filt: Optional[torch.Tensor]) -> torch.Tensor:
        """``alpha_f * out + bias``."""
        if filt is not None:
            scale = filt[:, :, None, None].to(out.dtype)
            out = out * scale if torch.is_grad_enabled() else out.mul_(scale)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

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
        conv = self.out_channels * h_out * w_out * (self.in_channels //
                                                    self.groups) * kh * kw
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
