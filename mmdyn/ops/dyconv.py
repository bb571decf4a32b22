# Copyright (c) mmdyn contributors. All rights reserved.
"""Mixture-of-kernels dynamic convolutions: CondConv and DyConv.

* CondConv: Yang, Bender, Le, Ngiam. "CondConv: Conditionally Parameterized
  Convolutions for Efficient Inference", NeurIPS 2019.
  https://arxiv.org/abs/1904.04971
* DyConv: Chen, Dai, Liu, Chen, Yuan, Liu. "Dynamic Convolution: Attention
  over Convolution Kernels", CVPR 2020. https://arxiv.org/abs/1912.03458

Both convolve each sample with its own kernel, a mixture of a bank of ``K``
kernels weighted by routing weights computed from the globally pooled input::

    W_b = sum_i pi[b, i] * W_i        b_b = sum_i pi[b, i] * bias_i
    y_b = conv(x_b, W_b) + b_b

They differ only in the routing function:

* CondConv: ``pi = sigmoid(fc(GAP(x)) / T)`` with one linear layer
  ``C_in -> K`` (with bias), as in the CondConv paper (its routing is
  ``Sigmoid(GlobalAveragePool(x) R)``). It has no temperature schedule: T
  stays 1.
* DyConv: ``pi = softmax(fc2(ReLU(fc1(GAP(x)))) / T)``, following the common
  unofficial implementation (kaijieshi7/Dynamic-convolution-Pytorch):
  ``fc1`` ``C_in -> h`` without bias, ``fc2`` ``h -> K`` with bias,
  ``h = int(C_in * ratio) + 1`` (``h = K`` when ``C_in == 3``), no
  norm, T annealed 30 -> 1 over 10 epochs (the paper's schedule shape;
  the unofficial code's 34 - 3 per epoch is not used, and inference uses
  T = 1).

Each layer's ``forward_reference`` computes exactly these formulas;
``forward`` returns the same result by the path that
:mod:`mmdyn.ops.accel.paths` chooses for the input (``impl`` selects one,
``last_path`` names the one taken).

torch only.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .accel.paths import (PER_SAMPLE_IMPLS, check_impl, choose_path,
                          mixture_conv_then_mix, path_names)
from .base import (DynamicConv2dBase, IntOrPair, TemperatureMixin,
                   build_attention_norm, check_allocation, check_positive,
                   init_attention_weights, linear_1x1)
from .per_sample_conv import per_sample_conv2d

ROUTINGS = ('sigmoid', 'softmax')


class RoutingAttention(nn.Module):
    """Routing logits [B, K] from pooled features [B, C_in].

    With ``hidden_channels=None`` it is one 1x1 layer ``fc`` (``C_in -> K``,
    with bias); otherwise ``fc1`` (no bias) -> norm -> ReLU -> ``fc2`` (with
    bias).

    Args:
        in_channels (int): Input channels.
        kernel_num (int): Number of kernels ``K``.
        hidden_channels (int, optional): Hidden width. Default: None.
        attention_norm (str): Norm after ``fc1``, see
            :func:`~mmdyn.ops.base.build_attention_norm`. Default: 'none'.
    """

    def __init__(self,
                 in_channels: int,
                 kernel_num: int,
                 hidden_channels: Optional[int] = None,
                 attention_norm: Optional[str] = 'none'):
        super().__init__()
        self.in_channels = in_channels
        self.kernel_num = kernel_num
        self.hidden_channels = hidden_channels
        if hidden_channels is None:
            self.fc = nn.Conv2d(in_channels, kernel_num, 1)
        else:
            self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
            self.norm = build_attention_norm(attention_norm, hidden_channels)
            self.fc2 = nn.Conv2d(hidden_channels, kernel_num, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """fan_out kaiming, zero biases, norm 1/0."""
        init_attention_weights(self)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.hidden_channels is None:
            return linear_1x1(pooled, self.fc)
        s = F.relu(self.norm(linear_1x1(pooled, self.fc1)))
        return linear_1x1(s, self.fc2)

    def madds(self) -> int:
        if self.hidden_channels is None:
            return self.in_channels * self.kernel_num
        return self.hidden_channels * (self.in_channels + self.kernel_num)


class _MixtureOfKernelsConv2d(TemperatureMixin, DynamicConv2dBase):
    """Shared implementation of :class:`CondConv2d` and :class:`DyConv2d`.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int | tuple[int, int]): Kernel size.
        stride (int | tuple[int, int]): Stride. Default: 1.
        padding (int | tuple[int, int] | str): Zero padding. Default: 0.
        dilation (int | tuple[int, int]): Dilation. Default: 1.
        groups (int): Groups. Default: 1.
        bias (bool): Whether to learn a bias bank [K, C_out] (mixed with the
            same routing weights). Default: True.
        kernel_num (int): Number of kernels ``K``. Default: 4.
        routing (str): ``'sigmoid'`` or ``'softmax'``.
        hidden_channels (int, optional): Routing MLP hidden width; None for a
            single linear layer. Default: None.
        attention_norm (str): Norm in the routing MLP. Default: 'none'.
        impl (str): ``'auto'`` (the fastest path for the input),
            ``'reference'`` (the paper's forward), a path of
            :data:`~mmdyn.ops.accel.paths.MIXTURE_PATHS`, or a per-sample
            conv (``'loop'``, ``'grouped'``, ``'unfold'``: the reference
            forward with it). See :mod:`mmdyn.ops.accel.paths`.
            Default: ``'auto'``.
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
                 kernel_num: int = 4,
                 routing: str = 'softmax',
                 hidden_channels: Optional[int] = None,
                 attention_norm: Optional[str] = 'none',
                 impl: str = 'auto',
                 **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, **kwargs)
        check_positive(kernel_num, 'kernel_num')
        if routing not in ROUTINGS:
            raise ValueError(f'routing must be one of {ROUTINGS}, got '
                             f'{routing!r}')
        if hidden_channels is not None:
            check_positive(hidden_channels, 'hidden_channels')
        self.kernel_num = kernel_num
        self.routing = routing
        self.impl = check_impl(impl, path_names('mixture'))
        #: The path of the latest forward (see :mod:`mmdyn.ops.accel.paths`).
        self.last_path = None
        self.init_temperature(1.0)
        kh, kw = self.kernel_size
        check_allocation(
            kernel_num * out_channels * (in_channels // groups) * kh * kw,
            f'the {type(self).__name__} kernel bank',
            f'kernel_num ({kernel_num})')
        if hidden_channels is not None:
            check_allocation(hidden_channels * (in_channels + kernel_num),
                             f'the {type(self).__name__} routing layers',
                             f'ratio / hidden_channels ({hidden_channels})')
        self.attention = RoutingAttention(in_channels, kernel_num,
                                          hidden_channels, attention_norm)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_channels, in_channels // groups,
                        *self.kernel_size))
        if self.with_bias:
            self.bias = nn.Parameter(torch.empty(kernel_num, out_channels))
        else:
            self.register_parameter('bias', None)
        self.init_weights()

    def init_weights(self) -> None:
        """Each kernel kaiming-uniform (fan_in, ReLU gain); bias bank 0."""
        for i in range(self.kernel_num):
            nn.init.kaiming_uniform_(
                self.weight.data[i], mode='fan_in', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.init_weights()

    def reset_parameters(self) -> None:
        self.init_weights()

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``pi`` [B, K] for input ``x``."""
        logits = self.attention(x.mean((2, 3))) / self.temperature
        if self.routing == 'softmax':
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    def conv_then_mix(self, x: torch.Tensor) -> bool:
        """Whether ``impl='auto'`` convolves with all ``K`` kernels and.

        mixes the outputs (path ``'conv_then_mix'``): CPU with
        autograd, ``(K - 1) * H_out * W_out`` at most the threshold of
        :data:`~mmdyn.ops.accel.paths.THRESHOLDS` ``['mixture']``.
        """
        return self.impl == 'auto' and mixture_conv_then_mix(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result by the path that
        :func:`~mmdyn.ops.accel.paths.choose_path` chooses (recorded in
        :attr:`last_path`)."""
        out = self.forward_prologue(x)
        if out is not None:  # traced by torch.fx, or an empty batch
            return out
        pi = self.routing_weights(x).to(self.weight.dtype)
        path = choose_path('mixture', self, x, (pi, ))
        self.last_path = path.name
        return path.run(self, x, pi)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: routing weights ``pi``, the per-sample kernel
        ``W_b = sum_i pi[b, i] W_i`` and bias, one conv per sample."""
        out = self.check_input_or_empty(x)
        if out is not None:
            return out
        return self.reference_from_routing(
            x,
            self.routing_weights(x).to(self.weight.dtype))

    def reference_from_routing(self, x: torch.Tensor,
                               pi: torch.Tensor) -> torch.Tensor:
        """The reference forward from the routing weights ``pi`` of ``x``."""
        bias = pi @ self.bias if self.bias is not None else None
        weight = (pi @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])
        impl = self.impl if self.impl in PER_SAMPLE_IMPLS else 'auto'
        return per_sample_conv2d(x, weight, bias, self.stride, self.padding,
                                 self.dilation, self.groups, impl)

    def madds_per_sample(self, input_hw: Tuple[int, int]) -> Dict[str, int]:
        """Multiply-adds per sample for an ``input_hw`` input (convention of
        :mod:`mmdyn.analysis.flops`):

        ``conv`` one conv with the mixed kernel, ``att`` the routing layers,
        ``agg`` ``K * numel(W)``, ``scal`` 0.
        """
        h_out, w_out = self.output_hw(int(input_hw[0]), int(input_hw[1]))
        kh, kw = self.kernel_size
        c_in_g = self.in_channels // self.groups
        numel_w = self.out_channels * c_in_g * kh * kw
        conv = self.out_channels * h_out * w_out * c_in_g * kh * kw
        return dict(
            conv=conv,
            att=self.attention.madds(),
            agg=self.kernel_num * numel_w,
            scal=0)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', kernel_num={self.kernel_num}, '
                f'routing={self.routing!r}')


class CondConv2d(_MixtureOfKernelsConv2d):
    """CondConv: per-sample mixture of ``K`` kernels, sigmoid routing.

    ``pi = sigmoid(fc(GAP(x)))`` with a single linear layer ``C_in -> K``
    (``attention.fc``, with bias). CondConv has no temperature schedule
    (:attr:`TEMPERATURE_SCHEDULE` is the constant 1); the temperature buffer
    exists only to share the interface.

    ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups`` and ``bias`` are those of
    ``nn.Conv2d`` (``bias`` is a bank [K, C_out]).

    Args:
        kernel_num (int): Number of experts ``K``. Default: 4.
        impl (str): Per-sample conv implementation. Default: ``'auto'``.
        **kwargs: ``padding_mode='zeros'``.
    """

    TEMPERATURE_SCHEDULE = dict(start=1.0, end=1.0, epochs=1)

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = True,
                 kernel_num: int = 4,
                 impl: str = 'auto',
                 **kwargs):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            kernel_num=kernel_num,
            routing='sigmoid',
            hidden_channels=None,
            impl=impl,
            **kwargs)


class DyConv2d(_MixtureOfKernelsConv2d):
    """Dynamic convolution (DyConv): softmax attention over ``K`` kernels.

    Layout and init of the common unofficial code
    (kaijieshi7/Dynamic-convolution-Pytorch):
    ``attention.fc1`` (1x1, ``C_in -> h``, no bias), ReLU, ``attention.fc2``
    (1x1, ``h -> K``, bias), softmax(z / T); ``h = int(C_in * ratio) + 1``,
    or ``K`` for a 3-channel input; no norm by default; bank [K, C_out,
    C_in/g, kh, kw] with each kernel kaiming-uniform (fan_in, ReLU gain);
    optional bias bank [K, C_out] initialised to 0.

    ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups`` and ``bias`` are those of
    ``nn.Conv2d`` (``bias`` is a bank [K, C_out]).

    Args:
        kernel_num (int): Number of kernels ``K``. Default: 4.
        ratio (float): Routing hidden width ratio. Default: 0.25.
        attention_norm (str): Norm after ``fc1``; ``'none'`` as the
            reference code (works at batch size 1). Default: ``'none'``.
        impl (str): Per-sample conv implementation. Default: ``'auto'``.
        **kwargs: ``padding_mode='zeros'``.
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
                 kernel_num: int = 4,
                 ratio: float = 0.25,
                 attention_norm: Optional[str] = 'none',
                 impl: str = 'auto',
                 **kwargs):
        check_positive(ratio, 'ratio', allow_float=True)
        check_positive(kernel_num, 'kernel_num')
        check_positive(in_channels, 'in_channels')
        if in_channels == 3:
            hidden = kernel_num
        else:
            hidden = int(in_channels * ratio) + 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            kernel_num=kernel_num,
            routing='softmax',
            hidden_channels=hidden,
            attention_norm=attention_norm,
            impl=impl,
            **kwargs)
        self.ratio = ratio
