# Copyright (c) mmdyn contributors. All rights reserved.
"""Pieces shared by every dynamic convolution in :mod:`mmdyn.ops`.

* :class:`DynamicConv2dBase`: the ``nn.Conv2d`` contract (constructor
  arguments, the attributes mmcv's ``ConvModule`` reads, argument checks that
  raise ``ValueError`` naming the argument, input checks naming the tensor).
* :class:`TemperatureMixin`: the softmax/attention temperature kept in a
  registered buffer (so it is saved in checkpoints) with
  ``update_temperature(t)``.
* :func:`build_attention_norm`: the normalisation used inside attention
  branches on pooled features, configurable so that training works at batch
  size 1.
* :func:`check_allocation`: the one size guard every layer applies to its
  parameters before allocating them (budget: :func:`allocation_budget`).
* :func:`empty_batch_output`: the result of a layer on an empty batch.
* :func:`kernel_bank_safe`: lets ``module.to(memory_format=...)`` pass over
  the 5-D kernel banks.

torch only: no OpenMMLab imports here.
"""
import math
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import switches
from .accel.custom_ops import layer_forward_operator
from .accel.kept_copies import release_layer_copies
from .capture import fx_leaf, graph_capture

IntOrPair = Union[int, Tuple[int, int]]


def to_pair(value: IntOrPair, name: str, minimum: int = 0) -> Tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a tuple, checking bounds.

    Raises:
        ValueError: naming ``name`` if the value is not an int/pair of ints
            or is below ``minimum``.
    """
    if isinstance(value, bool):
        raise ValueError(f'{name} must be an int or a pair of ints, '
                         f'got {value!r}')
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise ValueError(f'{name} must be an int or a pair of ints, '
                             f'got {value!r}') from None
        if len(pair) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise ValueError(f'{name} must be an int or a pair of ints, '
                             f'got {value!r}')
    if min(pair) < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return pair


def check_positive(value, name: str, allow_float: bool = False):
    """Raise ``ValueError`` naming ``name`` unless ``value`` is > 0 (and
    finite: NaN and inf are refused)."""
    types = (int, float) if allow_float else (int, )
    if isinstance(value, bool) or not isinstance(value, types) or \
            not math.isfinite(value) or value <= 0:
        kind = 'a positive finite number' if allow_float else \
            'a positive int'
        raise ValueError(f'{name} must be {kind}, got {value!r}')
    return value


#: Environment variable that sets the allocation budget, in bytes.
ALLOCATION_BUDGET_ENV = switches.MAX_ALLOC_BYTES
#: Default budget: the largest parameter tensor one layer (or one KW
#: warehouse) may allocate, in bytes. The largest tensors of the shipped
#: models are a few hundred MiB (a KW-4x warehouse).
DEFAULT_ALLOCATION_BUDGET = 4 * 2**30


def allocation_budget() -> int:
    """The allocation budget in bytes: ``$MMDYN_MAX_ALLOC_BYTES`` when set,
    else :data:`DEFAULT_ALLOCATION_BUDGET`."""
    return switches.max_alloc_bytes(DEFAULT_ALLOCATION_BUDGET)


def check_allocation(numel: int,
                     what: str,
                     arguments: str,
                     itemsize: int = 4) -> None:
    """Raise ``ValueError`` before a tensor of ``numel`` elements larger than
    :func:`allocation_budget` is allocated.

    Args:
        numel (int): Elements of the tensor about to be allocated.
        what (str): What it is (for the message).
        arguments (str): The arguments that set its size, with their values
            (for the message).
        itemsize (int): Bytes per element. Default: 4 (float32).
    """
    size = int(numel) * itemsize
    budget = allocation_budget()
    if size > budget:
        raise ValueError(
            f'{what} would allocate {_bytes(size)}, above the '
            f'{_bytes(budget)} budget: reduce {arguments}, or raise the '
            f'budget with the environment variable {ALLOCATION_BUDGET_ENV} '
            '(bytes)')


def _bytes(size: int) -> str:
    for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if size >= scale:
            return f'{size / scale:.3g} {unit}'
    return f'{size} B'


def is_empty_batch(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no sample (never while a graph is traced or
    exported: a captured graph keeps its batch dimension symbolic)."""
    return not graph_capture() and x.shape[0] == 0


def empty_batch_output(shape: Sequence[int], x: torch.Tensor,
                       tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Zeros of ``shape`` (an empty batch's output) in the graph of ``x`` and
    of ``tensors`` (the layer's parameters).

    As ``nn.Conv2d`` on an empty batch, the backward then gives ``x`` an
    empty gradient and every parameter a zero gradient (not ``None``, which
    distributed training would report as an unused parameter), and nothing
    else runs: no attention, no update of a norm's running statistics.
    """
    out = x.new_zeros(shape)
    linked = [t for t in tensors if t.requires_grad]
    if x.requires_grad:
        linked.append(x)
    if not linked or not torch.is_grad_enabled():
        return out
    return out + sum(t.sum() for t in linked).to(out.dtype) * 0


def kernel_bank_safe(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Wrap an ``nn.Module._apply`` function so that 5-D tensors (kernel banks
    [K, C_out, C_in/g, kh, kw]) pass ``module.to(memory_format=
    torch.channels_last)``.

    torch refuses a 4-D memory format for a 5-D tensor. A bank is no
    activation: it keeps its own (contiguous) layout, and the other
    conversions of ``fn`` (device, dtype) still apply to it, on a 4-D
    view. Every other tensor gets ``fn`` unchanged.
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 5:
            return fn(t)
        try:
            return fn(t)
        except RuntimeError as error:
            if 'rank 4' not in str(error):
                raise
        shape = t.shape
        return fn(t.flatten(0, 1)).contiguous().view(shape)

    return apply


#: Input dtypes autocast casts to the dtype of its region.
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def parameter_dtype(layer: nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``layer``'s first floating point parameter (None when it
    has none)."""
    for param in layer.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def check_input_dtype(layer: nn.Module, x: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the layer class, the dtype of ``x`` and the
    dtype expected (that of the layer's parameters) unless ``x`` is a floating
    point tensor of that dtype.

    Under ``torch.autocast`` for the device of ``x``, any float16, bfloat16
    or float32 input is accepted: autocast casts the operands itself.
    """
    expected = parameter_dtype(layer)
    if x.is_floating_point():
        if expected is None or x.dtype == expected:
            return
        if (torch.is_autocast_enabled(x.device.type)
                and x.dtype in AUTOCAST_DTYPES
                and expected in AUTOCAST_DTYPES):
            return
    message = (f'{type(layer).__name__} got an input x of dtype {x.dtype}, '
               f'expected {expected or "a floating point dtype"}')
    if expected is not None:
        message += f' (the dtype of its parameters): convert the input ' \
            f'(x.to({expected}))'
        if x.is_floating_point():
            message += f' or the layer (layer.to({x.dtype}))'
        if x.dtype in (torch.float16, torch.bfloat16) and \
                expected == torch.float32:
            message += (
                f'; to run a float32 layer in {x.dtype}, keep it float32 '
                f"and call it under torch.autocast('{x.device.type}', "
                f'dtype={x.dtype})')
    raise ValueError(message)


class DynamicConv2dBase(nn.Module):
    """Base class giving a dynamic conv the ``nn.Conv2d`` interface.

    It subclasses ``nn.Module`` (not ``nn.Conv2d``) on purpose: mmengine's
    ``init_cfg`` matches layers by class name, and a kernel bank initialised
    as one ``nn.Conv2d`` weight would get the wrong fan. Subclasses own their
    ``init_weights()``/``reset_parameters()``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int | tuple[int, int]): Kernel size.
        stride (int | tuple[int, int]): Stride. Default: 1.
        padding (int | tuple[int, int] | str): Zero padding, or ``'same'``
            (stride 1 only) / ``'valid'``, as ``nn.Conv2d``. Default: 0.
        dilation (int | tuple[int, int]): Dilation. Default: 1.
        groups (int): Groups. Default: 1.
        bias (bool): Whether the layer has a bias. Default: True.
        padding_mode (str): Only ``'zeros'`` is supported; accepted so that
            ``nn.Conv2d``-style call sites work.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: Union[IntOrPair, str] = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros'):
        super().__init__()
        check_positive(in_channels, 'in_channels')
        check_positive(out_channels, 'out_channels')
        check_positive(groups, 'groups')
        if in_channels % groups:
            raise ValueError(f'in_channels ({in_channels}) must be divisible '
                             f'by groups ({groups})')
        if out_channels % groups:
            raise ValueError(f'out_channels ({out_channels}) must be '
                             f'divisible by groups ({groups})')
        if padding_mode != 'zeros':
            raise ValueError(f"padding_mode must be 'zeros' (the only "
                             f'padding of dynamic convs), got '
                             f'{padding_mode!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_pair(kernel_size, 'kernel_size', minimum=1)
        self.stride = to_pair(stride, 'stride', minimum=1)
        self.dilation = to_pair(dilation, 'dilation', minimum=1)
        if isinstance(padding, str):
            if padding == 'valid':
                padding = 0
            elif padding == 'same':
                if self.stride != (1, 1):
                    raise ValueError("padding='same' needs stride 1, got "
                                     f'stride={stride!r}')
                total = [
                    d * (k - 1)
                    for d, k in zip(self.dilation, self.kernel_size)
                ]
                if any(t % 2 for t in total):
                    raise ValueError(
                        "padding='same' needs an even dilation*(kernel-1); "
                        f'got kernel_size={kernel_size!r}, '
                        f'dilation={dilation!r}')
                padding = (total[0] // 2, total[1] // 2)
            else:
                raise ValueError("padding must be an int, a pair, 'same' or "
                                 f"'valid', got {padding!r}")
        self.padding = to_pair(padding, 'padding', minimum=0)
        self.groups = groups
        self.padding_mode = padding_mode
        # Read by mmcv's ConvModule and by code written for nn.Conv2d.
        self.transposed = False
        self.output_padding = (0, 0)
        self.with_bias = bool(bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not a [B, C_in, H, W] tensor of the
        layer's dtype (:func:`check_input_dtype`)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f'{type(self).__name__} expects a tensor input '
                             f'x, got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects input x of '
                             f'shape [B, C, H, W], got {tuple(x.shape)}')
        check_input_dtype(self, x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects input x with '
                             f'{self.in_channels} channels (in_channels), '
                             f'got {x.shape[1]} (shape {tuple(x.shape)})')
        for i, name in ((0, 'height'), (1, 'width')):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            if x.shape[2 + i] + 2 * self.padding[i] < span:
                raise ValueError(
                    f'{type(self).__name__}: input x {name} '
                    f'{x.shape[2 + i]} (+2x padding {self.padding[i]}) is '
                    f'smaller than the kernel span {span}')

    def _apply(self, fn, *args, **kwargs):
        release_layer_copies(self)
        # model.to(memory_format=torch.channels_last) with 5-D kernel banks.
        return super()._apply(kernel_bank_safe(fn), *args, **kwargs)

    def train(self, mode: bool = True) -> 'DynamicConv2dBase':
        """``nn.Module.train``; also drops the rearranged kernels the inference
        paths keep on the layer (:mod:`~mmdyn.ops.accel.kept_copies`)."""
        release_layer_copies(self)
        return super().train(mode)

    def check_input_or_empty(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Check ``x`` (:meth:`check_input`); for an empty batch return the
        layer's output (:meth:`empty_output`), else None."""
        self.check_input(x)
        return self.empty_output(x) if is_empty_batch(x) else None

    def forward_prologue(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """What every dispatching ``forward`` starts with: under ``torch.fx``
        tracing, the layer as a graph leaf; under ``torch.compile`` in CPU
        inference, the layer as one operator
        (:func:`~mmdyn.ops.accel.custom_ops.layer_forward_operator`); then
        :meth:`check_input_or_empty` (``last_path`` ``'empty'``).

        Returns the output when one of these ends the forward, else None.
        """
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        whole = layer_forward_operator(self, x)
        if whole is not None:  # compiled inference: one mmdyn:: operator
            return whole
        out = self.check_input_or_empty(x)
        if out is not None:
            self.last_path = 'empty'
        return out

    def empty_output(self, x: torch.Tensor, *extra:
                     torch.Tensor) -> torch.Tensor:
        """The output for an empty batch ``x`` (see
        :func:`empty_batch_output`); ``extra`` are parameters the layer reads
        but does not own (a shared warehouse)."""
        h_out, w_out = self.output_hw(*x.shape[-2:])
        return empty_batch_output((0, self.out_channels, h_out, w_out), x,
                                  (*self.parameters(), *extra))

    def output_hw(self, h: int, w: int) -> Tuple[int, int]:
        """Spatial output size for an ``h x w`` input, as ``nn.Conv2d``."""
        out = []
        for i, size in enumerate((h, w)):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out.append((size + 2 * self.padding[i] - span) // self.stride[i] +
                       1)
        return out[0], out[1]

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, '
             f'kernel_size={self.kernel_size}, stride={self.stride}')
        if self.padding != (0, 0):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if not self.with_bias:
            s += ', bias=False'
        return s


class TemperatureMixin:
    """Keeps an attention temperature in a registered float32 buffer.

    Call :meth:`init_temperature` in ``__init__`` (after
    ``nn.Module.__init__``). The buffer is saved in and restored from
    checkpoints, so a resumed run continues with the value it had.
    """

    def init_temperature(self, value: float) -> None:
        self.register_buffer('temperature',
                             torch.tensor(float(value), dtype=torch.float32))

    def update_temperature(self, value: float) -> None:
        """Set the temperature (in place, so the buffer stays registered)."""
        self.temperature.fill_(float(value))


ATTENTION_NORMS = ('bn', 'bn_batch1', 'ln', 'none')


class BatchNormBatch1(nn.BatchNorm1d):
    """``BatchNorm1d`` that uses its running statistics for a batch of one.

    ``nn.BatchNorm1d`` raises in training mode when it sees a single value per
    channel. This subclass keeps the official BN semantics (and state-dict
    layout) for batches > 1 and normalises a batch of one with the running
    statistics instead of failing. It has the same parameters as BN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean,
                                            self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
        return super().forward(x)


def linear_1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a 1x1 ``conv`` to pooled features [B, C] as a matmul.

    The attention layers of the official codes are 1x1 convs (their checkpoint
    layout); on a 1x1 map a matmul is the same and avoids the conv call
    overhead.
    """
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def init_attention_weights(module: nn.Module) -> None:
    """The official init of an attention branch: fan_out kaiming (ReLU
    gain) for every conv and linear weight, zero biases, norms 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(
                m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_attention_norm(norm: Optional[str], num_features: int) -> nn.Module:
    """Normalisation for an attention branch on pooled features [B, C].

    Args:
        norm (str | None): ``'bn'`` (``BatchNorm1d``, the official choice,
            fails in training at batch size 1), ``'bn_batch1'`` (BN that
            falls back to its running statistics for a batch of one; same
            parameters and state-dict keys as ``'bn'``), ``'ln'``
            (``LayerNorm``, same parameter count as BN) or ``'none'``/None.
        num_features (int): Channels.

    Returns:
        nn.Module: the norm; it takes [B, C] inputs.
    """
    if norm is None or norm == 'none':
        return nn.Identity()
    if norm == 'bn':
        return nn.BatchNorm1d(num_features)
    if norm == 'bn_batch1':
        return BatchNormBatch1(num_features)
    if norm == 'ln':
        return nn.LayerNorm(num_features)
    raise ValueError(f'attention_norm must be one of {ATTENTION_NORMS}, got '
                     f'{norm!r}')
