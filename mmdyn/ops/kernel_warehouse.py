"""KernelWarehouse (KW): dynamic convolution from shared kernel cells.

Paper: "KernelWarehouse: Rethinking the Design of Dynamic Convolution"
(Li & Yao, ICML 2024), https://arxiv.org/abs/2406.07879

Every KW layer's static kernel ``W`` ([C_out, C_in/g, kh, kw]) is split into
``m`` equal *mixtures* (spatially 1x1 blocks of ``c_o x c_i`` channels). Each
mixture is a per-sample linear combination of the ``n`` cells of a
*warehouse* that is shared by a group of layers (usually one stage).

Life cycle (a network with shared warehouses)::

    manager = WarehouseManager(cell_num_ratio=1, sharing_range=('layer',
                                                                'conv'))
    # 1. reserve: every layer records its name and weight shape; no weights.
    self.conv = manager.reserve('stage0_layer0_conv1', 64, 64, 3, padding=1,
                                bias=False)
    ...
    self.warehouse_manager = manager      # registered: it owns the cells
    # 2. store + allocate, once all layers exist and are registered:
    manager.finalize(self)

``finalize`` creates the warehouses (``manager.weights.<i>``, numbered in the
order of their first reservation), then walks ``network.modules()`` in order
and gives each KW layer its attention branch, its contiguous slice of cells,
its one-to-one attention initialisation (``beta``) and initialises that
slice. A KW layer holds its manager without registering it as a submodule,
and raises ``ValueError`` when it is run before ``finalize``.

Standalone use as a drop-in conv: ``KWConv2d(in, out, k, ...)`` without a
``warehouse_manager`` creates a private manager with one warehouse
(registered as the layer's ``warehouse`` submodule) and finalises itself.

The temperature ``tau`` (buffer ``temperature``) is 0 at construction, which
is the inference value; :class:`~mmdyn.engine.hooks.DynamicTemperatureHook`
anneals it from 1 to 0 at the start of training.

torch only.
"""
import math
import os
from functools import reduce
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import (ATTENTION_NORMS, DynamicConv2dBase, TemperatureMixin,
                   build_attention_norm, check_allocation, check_positive,
                   empty_batch_output, kernel_bank_safe)
from .kernel_warehouse_cpu import (Scatter, pack_columns, small_rows_matmul,
                                   uses_small_rows_matmul)
from .per_sample_conv import (PER_SAMPLE_CONV_IMPLS, chunked_per_sample_conv2d,
                              kernel_workspace, per_sample_conv2d,
                              uses_chunked_kernels)
from .winograd import (chunked_winograd_conv2d, uses_winograd,
                       winograd_block_conv2d)

Ratio = Union[float, Sequence[float]]

LAYER_TYPES = ('conv2d', 'linear')
CAF_EPS = 1e-3


def _prod(values) -> int:
    return reduce(lambda a, b: a * b, values, 1)


def contrasting_attention(logits: torch.Tensor, beta: torch.Tensor,
                          tau: Union[float, torch.Tensor]) -> torch.Tensor:
    """The contrasting-driven attention function (CAF).

    Args:
        logits (Tensor): [B, m, n + 1] logits, the last column being the
            zero cell.
        beta (Tensor): [m, n + 1] one-hot initial attention.
        tau (float | Tensor): blend factor, 1 = ``beta`` only.

    Returns:
        Tensor: [B, m, n] attentions (the zero-cell column dropped), in at
        least float32.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    # z / (sum|z| + eps) computed on z scaled by its row maximum (when that
    # exceeds 1) so that huge logits cannot overflow the sum; exactly the
    # same value in real arithmetic.
    scale = z.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    z = z / scale
    z = z / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS / scale)
    tau = tau.to(dtype) if isinstance(tau, torch.Tensor) else tau
    att = (1.0 - tau) * z + tau * beta.to(dtype)
    return att[..., :-1]


def one_to_one_beta(num_mixtures: int, num_cells: int, start: int,
                    cell_num_ratio: float) -> Tuple[torch.Tensor, int]:
    """The one-hot initial attention ``beta`` of one layer.

    With ``cell_num_ratio`` r >= 1, mixture i selects cell
    ``start + i * floor(r)``; with r < 1 (p = floor(1/r)), mixtures with
    ``i % p == (i // p) % p`` select successive cells and the others the zero
    cell.

    Returns:
        tuple[Tensor, int]: ``beta`` [m, n + 1] (float32) and the cursor after
        this layer.
    """
    beta = torch.zeros(num_mixtures, num_cells + 1)
    cursor = start
    if cell_num_ratio >= 1:
        step = int(cell_num_ratio)
        for i in range(num_mixtures):
            if cursor < num_cells:
                beta[i, cursor] = 1.0
            cursor += step
    else:
        period = int(1.0 / cell_num_ratio)
        for i in range(num_mixtures):
            if i % period == (i // period) % period:
                if cursor < num_cells:
                    beta[i, cursor] = 1.0
                cursor += 1
            else:
                beta[i, num_cells] = 1.0
    return beta, cursor


class KWAttention(nn.Module):
    """Attention branch of one KW layer: logits for its m mixtures.

    GAP -> fc1 -> norm -> ReLU -> fc2 (m * (n + 1) logits). With
    ``num_basis`` set (the non-local basis variant), fc2 only predicts the
    layer's own cells, ``num_basis`` basis logits and the zero cell, and fc3
    maps the basis to the other layers' cells.

    Args:
        in_channels (int): Input channels of the layer.
        hidden_channels (int): Width of fc1.
        num_mixtures (int): m.
        num_cells (int): n, the warehouse size.
        attention_norm (str): See :func:`build_attention_norm`.
        fc1_bias (bool): Whether fc1 has a bias.
        num_local_cells (int): Cells owned by this layer (basis variant).
            Default: 0.
        num_basis (int | None): Basis size; None disables the variant.
            Default: None.
        start_cell (int): First owned cell (basis variant). Default: 0.
    """

    def __init__(self,
                 in_channels: int,
                 hidden_channels: int,
                 num_mixtures: int,
                 num_cells: int,
                 attention_norm: str,
                 fc1_bias: bool,
                 num_local_cells: int = 0,
                 num_basis: Optional[int] = None,
                 start_cell: int = 0):
        super().__init__()
        self.num_mixtures = num_mixtures
        self.num_cells = num_cells
        self.num_basis = num_basis
        self.num_local_cells = num_local_cells
        self.start_cell = start_cell
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=fc1_bias)
        self.norm1 = build_attention_norm(attention_norm, hidden_channels)
        self.act1 = nn.ReLU(inplace=True)
        per_mixture = num_cells + 1
        if num_basis is None:
            self.fc2 = nn.Linear(hidden_channels, num_mixtures * per_mixture)
        else:
            num_nonlocal = num_cells - num_local_cells
            self.fc2 = nn.Linear(
                hidden_channels,
                num_mixtures * (num_local_cells + num_basis + 1),
                bias=False)
            self.fc3 = nn.Linear(num_basis, num_nonlocal, bias=False)
            self.basis_bias = nn.Parameter(
                torch.zeros(num_mixtures * per_mixture))
        self.init_weights()

    def init_weights(self) -> None:
        """fan_out kaiming Linear weights, zero biases, norm 1 / 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(
                    module.weight, mode='fan_out', nonlinearity='relu')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.num_basis is not None:
            nn.init.zeros_(self.basis_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, C_in] pooled features -> [B, m, n + 1] logits."""
        hidden = self.act1(self.norm1(self.fc1(pooled)))
        logits = self.fc2(hidden)
        if self.num_basis is None:
            return logits.reshape(-1, self.num_mixtures, self.num_cells + 1)
        logits = logits.reshape(-1, self.num_mixtures,
                                self.num_local_cells + self.num_basis + 1)
        local = logits[..., :self.num_local_cells]
        nonlocal_ = self.fc3(logits[..., self.num_local_cells:-1])
        zero = logits[..., -1:]
        # Cell order of the warehouse: other layers' cells before this
        # layer's slice, its own cells, the rest, then the zero cell.
        logits = torch.cat([
            nonlocal_[..., :self.start_cell], local,
            nonlocal_[..., self.start_cell:], zero
        ], dim=-1)
        return logits + self.basis_bias.reshape(self.num_mixtures, -1)

    def madds(self) -> int:
        """Multiply-adds of fc1, fc2 (and fc3) for one sample."""
        total = self.fc1.in_features * self.fc1.out_features
        total += self.fc2.in_features * self.fc2.out_features
        if self.num_basis is not None:
            total += (self.num_mixtures * self.fc3.in_features *
                      self.fc3.out_features)
        return total


class _KWLayerMixin(TemperatureMixin):
    """Bookkeeping shared by :class:`KWConv2d` and :class:`KWLinear`."""

    TEMPERATURE_SCHEDULE = dict(start=1.0, end=0.0, epochs=20)

    def _setup_kw(self, weight_shape: Tuple[int, ...], bias: bool,
                  warehouse_manager: Optional['WarehouseManager'],
                  warehouse_name: Optional[str], manager_kwargs: dict,
                  layer_type: str) -> None:
        self.weight_shape = tuple(weight_shape)
        self.init_temperature(0.0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(weight_shape[0]))
        else:
            self.register_parameter('bias', None)
        self.attention = None
        self.register_buffer('beta', None, persistent=False)
        self.warehouse_id = None
        self.cell_range = None
        self._kw_layout = None
        if warehouse_manager is None:
            manager = WarehouseManager(sharing_range=(), **manager_kwargs)
            self._manager_ref = (manager, )
            self.warehouse_name = warehouse_name or 'private'
            manager._register_layer(self, self.warehouse_name, layer_type)
            # A private manager is owned (registered) by its only layer.
            self.warehouse = manager
            manager.finalize(self)
        else:
            if manager_kwargs:
                raise ValueError(
                    'warehouse options '
                    f'{sorted(manager_kwargs)} must be given to the '
                    'WarehouseManager, not to a layer that uses one')
            if not isinstance(warehouse_manager, WarehouseManager):
                raise ValueError('warehouse_manager must be a '
                                 'WarehouseManager, got '
                                 f'{type(warehouse_manager).__name__}')
            if warehouse_name is None:
                raise ValueError('warehouse_name is required when a '
                                 'warehouse_manager is given')
            self._manager_ref = (warehouse_manager, )
            self.warehouse_name = warehouse_name
            warehouse_manager._register_layer(self, warehouse_name,
                                              layer_type)

    @property
    def warehouse_manager(self) -> 'WarehouseManager':
        """The manager holding this layer's warehouse (not a submodule)."""
        return self._manager_ref[0]

    @property
    def finalized(self) -> bool:
        return self.attention is not None

    def _check_finalized(self) -> None:
        if self.attention is None:
            raise ValueError(
                f'{type(self).__name__} {self.warehouse_name!r} is used '
                'before WarehouseManager.finalize(network) was called: '
                'reserve all layers, register them and the manager in the '
                'network, then call finalize')

    def _allocate(self, cell_shape: Tuple[int, ...], num_cells: int,
                  start: int, cell_num_ratio: float, reduction: float,
                  attention_norm: str, fc1_bias: bool,
                  nonlocal_basis_ratio: float) -> int:
        """Build the attention branch and beta; return the new cursor."""
        c_out, c_in_g = self.weight_shape[:2]
        cell_out, cell_in = cell_shape[:2]
        groups_out, groups_in = c_out // cell_out, c_in_g // cell_in
        groups_spatial = _prod(self.weight_shape[2:])
        num_mixtures = groups_spatial * groups_out * groups_in
        self._kw_layout = (groups_spatial, groups_out, groups_in, cell_out,
                           cell_in)
        in_channels = self._kw_in_channels()
        hidden = max(int(in_channels * reduction), 16)
        check_allocation(
            max(hidden, num_mixtures) * num_mixtures * (num_cells + 1),
            f'the attention of KW layer {self.warehouse_name!r} '
            f'({num_mixtures} mixtures x {num_cells + 1} cells)',
            f'cell_num_ratio ({cell_num_ratio}) or reduction ({reduction})')
        check_allocation(in_channels * hidden,
                         f'the attention of KW layer {self.warehouse_name!r}',
                         f'reduction ({reduction})')
        beta, cursor = one_to_one_beta(num_mixtures, num_cells, start,
                                       cell_num_ratio)
        basis = {}
        if nonlocal_basis_ratio < 1:
            num_local = int(cell_num_ratio * num_mixtures)
            num_nonlocal = num_cells - num_local
            basis = dict(
                num_local_cells=num_local,
                num_basis=max(int(num_nonlocal * nonlocal_basis_ratio), 16),
                start_cell=start)
        device = self.temperature.device
        with torch.device(device):
            self.attention = KWAttention(in_channels, hidden, num_mixtures,
                                         num_cells, attention_norm, fc1_bias,
                                         **basis)
        self.beta = beta.to(device)
        self.cell_range = (start, cursor)
        self.num_mixtures = num_mixtures
        self.num_cells = num_cells
        return cursor

    def init_weights(self) -> None:
        """Re-initialise the attention branch and zero the bias.

        The warehouse cells are initialised by the manager (its
        ``init_weights``), slice by slice.
        """
        if self.attention is not None:
            self.attention.init_weights()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if 'warehouse' in self._modules:
            self.warehouse.init_weights()

    def _attention_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.attention(pooled)
        return contrasting_attention(logits, self.beta, self.temperature)

    def assemble_kernel(self, attention: torch.Tensor) -> torch.Tensor:
        """Mix the warehouse cells into per-sample kernels.

        Args:
            attention (Tensor): [B, m, n] CAF attentions.

        Returns:
            Tensor: [B, *weight_shape]; mixture ``(s * G_o + o) * G_i + c``
            fills output block o, input block c, spatial position s.
        """
        if self._kw_layout[0] == 1:  # one position: no transposition
            kernel = self.mix_cells(attention, layout='position_major')
        else:
            kernel = self.mix_cells(attention).permute(0, 2, 4, 3, 5, 1)
        return kernel.reshape(-1, *self.weight_shape)

    def _cells(self) -> torch.Tensor:
        """This layer's warehouse (a parameter of the manager)."""
        return self.warehouse_manager.weights[self.warehouse_id]

    def _cell_rows(self) -> torch.Tensor:
        """This layer's warehouse as [n, cell_size]: the right operand of
        every mixture product."""
        cells = self._cells()
        return cells.reshape(cells.shape[0], -1)

    #: Layouts of :meth:`mix_cells`: the cell product's own, the kernel
    #: position by position, the kernel with each output channel's
    #: positions side by side.
    MIXTURE_LAYOUTS = ('cells', 'position_major', 'output_major')

    def mix_cells(self,
                  attention: torch.Tensor,
                  reuse_buffer: bool = False,
                  layout: str = 'cells') -> torch.Tensor:
        """The mixtures ``attention @ cells``.

        Args:
            attention (Tensor): [B, m, n] attentions.
            reuse_buffer (bool): In inference, write the mixtures into this
                thread's reused ``'kw_mixtures'`` workspace, valid until the
                next such call: a fresh tensor above glibc's mmap threshold
                (a ResNet-50 stage-4 layer's 75 MB at batch 8) costs about
                as much in page faults as the product itself.
            layout (str): 'cells': [B, g_s, g_o, g_i, c_o, c_i] (kernel
                position, output block, input block, then the cell);
                'position_major': [B, g_s, C_out, C_in];
                'output_major': [B, C_out, g_s, C_in].

        Float32 CPU inference runs the product as
        :func:`~mmdyn.ops.kernel_warehouse_cpu.small_rows_matmul` on the
        manager's packed copy of the cells
        (:meth:`WarehouseManager.packed_cells`), writing the layout
        directly; otherwise ``torch.matmul``, then a rearranging copy.
        """
        if layout not in self.MIXTURE_LAYOUTS:
            raise ValueError(f'layout must be one of {self.MIXTURE_LAYOUTS}'
                             f', got {layout!r}')
        cells = self._cell_rows()
        if not torch.is_autocast_enabled(attention.device.type):
            attention = attention.to(cells.dtype)
        g_s, g_o, g_i, c_o, c_i = self._kw_layout
        batch = attention.shape[0]
        shape = {
            'cells': (batch, *self._kw_layout),
            'position_major': (batch, g_s, g_o * c_o, g_i * c_i),
            'output_major': (batch, g_o * c_o, g_s, g_i * c_i)
        }[layout]
        # Whether the layout is the cell product's own, row after row.
        plain = layout == 'cells' or (g_i == 1 and (
            layout == 'position_major' or g_s == 1))
        c_loop = uses_small_rows_matmul(attention, cells)
        rows_shape = (*attention.shape[:-1], cells.shape[1])
        out = None
        if reuse_buffer and not torch.is_grad_enabled() and (plain or c_loop):
            out = kernel_workspace(math.prod(shape), attention.dtype,
                                   attention.device, 'kw_mixtures').view(shape)
        if c_loop:
            if out is None:
                out = attention.new_empty(shape)
            scatter, target = None, out
            if plain:
                target = out.view(rows_shape)
            else:
                scatter = self._mixture_scatter(batch, layout)
            small_rows_matmul(attention, cells, target,
                              packed_b=self.warehouse_manager.packed_cells(
                                  self.warehouse_id),
                              scatter=scatter)
            return out
        if plain:
            return torch.matmul(
                attention, cells,
                out=None if out is None else out.view(rows_shape)).view(shape)
        mixtures = torch.matmul(attention, cells).view(-1, *self._kw_layout)
        order = (0, 1, 2, 4, 3, 5) if layout == 'position_major' else \
            (0, 2, 4, 1, 3, 5)
        return mixtures.permute(order).reshape(shape)

    def _mixture_scatter(self, batch: int, layout: str) -> Scatter:
        """Where mixture (b, s, o, i) starts in the 'position_major' or
        'output_major' layout; its rows of c_i columns are C_in apart, or
        g_s * C_in."""
        g_s, g_o, g_i, c_o, c_i = self._kw_layout
        sample, position, block_out, block_in = torch.meshgrid(
            *(torch.arange(n, device='cpu') for n in (batch, g_s, g_o, g_i)),
            indexing='ij')
        c_out, c_in = g_o * c_o, g_i * c_i
        if layout == 'position_major':
            starts = ((sample * g_s + position) * c_out +
                      block_out * c_o) * c_in + block_in * c_i
            return Scatter(starts.flatten(), c_i, c_in)
        starts = ((sample * c_out + block_out * c_o) * g_s +
                  position) * c_in + block_in * c_i
        return Scatter(starts.flatten(), c_i, g_s * c_in)

    def _agg_madds(self) -> int:
        return _prod(self.weight_shape) * self.num_cells


class KWConv2d(_KWLayerMixin, DynamicConv2dBase):
    """KernelWarehouse 2-D convolution.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int | tuple[int, int]): Kernel size.
        stride (int | tuple[int, int]): Stride. Default: 1.
        padding (int | tuple[int, int] | str): Padding. Default: 0.
        dilation (int | tuple[int, int]): Dilation. Default: 1.
        groups (int): Groups. Default: 1.
        bias (bool): Whether to add a bias (initialised to 0).
            Default: True.
        warehouse_manager (WarehouseManager, optional): Manager holding the
            shared warehouse; None creates a private one-warehouse manager
            and finalises it at once (drop-in use). Default: None.
        warehouse_name (str, optional): Layer name used for warehouse
            grouping (``stage{S}_layer{L}_conv{J}``); required with a
            manager. Default: None.
        impl (str): ``per_sample_conv2d`` implementation. Default: 'auto'.
        padding_mode (str): ``'zeros'`` only, as accepted by ``nn.Conv2d``.
            Default: ``'zeros'``.
        **manager_kwargs: Options of the private :class:`WarehouseManager`
            (``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``,
            ``cell_outplane_ratio``, ``attention_norm``, ``fc1_bias``,
            ``nonlocal_basis_ratio``); only without ``warehouse_manager``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 warehouse_manager: Optional['WarehouseManager'] = None,
                 warehouse_name: Optional[str] = None,
                 impl: str = 'auto',
                 padding_mode: str = 'zeros',
                 **manager_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, padding_mode)
        if impl not in PER_SAMPLE_CONV_IMPLS:
            raise ValueError(f'impl must be one of {PER_SAMPLE_CONV_IMPLS}, '
                             f'got {impl!r}')
        self.impl = impl
        self._setup_kw(
            (out_channels, in_channels // groups, *self.kernel_size), bias,
            warehouse_manager, warehouse_name, manager_kwargs, 'conv2d')

    def _kw_in_channels(self) -> int:
        return self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self._check_finalized()
        if x.shape[0] == 0:
            return self.empty_output(x, self._cells())
        attention = self._attention_weights(x.mean(dim=(2, 3)))
        if uses_winograd(x, self):
            out = self._winograd_conv(x, attention)
            if self.bias is not None:
                out += self.bias.reshape(1, -1, 1, 1)
            return out
        if self.uses_position_major(x):
            return self._position_major_conv(x, attention)
        if uses_chunked_kernels(x, _prod(self.weight_shape),
                                self.out_channels,
                                self.output_hw(*x.shape[-2:]), self.impl):
            out = chunked_per_sample_conv2d(
                x, lambda start, stop, _: self.assemble_kernel(
                    attention[start:stop]).flatten(1).to(x.dtype),
                self.weight_shape, None, self.stride, self.padding,
                self.dilation, self.groups)
            if self.bias is not None:
                out += self.bias.reshape(1, -1, 1, 1).to(out.dtype)
            return out
        kernel = self.assemble_kernel(attention)
        if not torch.is_autocast_enabled(x.device.type):
            kernel = kernel.to(x.dtype)
        if self.impl == 'auto' and self._is_pointwise:
            return self._pointwise_conv(x, kernel)
        return per_sample_conv2d(x, kernel, self.bias, self.stride,
                                 self.padding, self.dilation, self.groups,
                                 impl=self.impl)

    def _winograd_conv(self, x: torch.Tensor,
                       attention: torch.Tensor) -> torch.Tensor:
        """Deep 3x3 stride-1 layers in CPU inference: Winograd F(2x2, 3x3)
        (mmdyn/ops/winograd.py), no bias.

        When every mixture is a whole [C_out, C_in] kernel position
        (``g_o = g_i = 1``) and the C loop runs the cell product, it writes
        the transformed kernels ``G W_b G^T`` directly (each strip of the
        product transformed while in the L1 cache: the per-sample kernels
        are never stored); otherwise they are built from the mixtures.
        """
        g_o, g_i = self._kw_layout[1:3]
        cells = self._cell_rows()
        if g_o == g_i == 1 and uses_small_rows_matmul(attention, cells):
            packed = self.warehouse_manager.packed_cells(self.warehouse_id)
            return chunked_winograd_conv2d(
                x, self.out_channels, self.padding,
                lambda start, stop, out: small_rows_matmul(
                    attention[start:stop], cells, out, packed_b=packed,
                    winograd=True).view(stop - start, 16, self.out_channels,
                                        self.in_channels))
        return winograd_block_conv2d(
            x, self.mix_cells(attention, reuse_buffer=True), self.padding)

    def uses_position_major(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` convolves straight from the mixtures.

        For ``impl='auto'``, ``groups == 1``, on CPU: 1x1 kernels (one
        batched matmul, the mixtures written straight into the kernel
        layout and the reused buffer), and larger kernels when one sample's
        kernel is larger than its input and output maps together (deep
        layers; every layer of a small-input network), where im2col costs
        less than building the kernel. See :meth:`_position_major_conv`.
        """
        if self.impl != 'auto' or self.groups != 1 or \
                x.device.type != 'cpu' or torch.jit.is_tracing() or \
                torch.onnx.is_in_onnx_export():
            return False
        if self._kw_layout[0] == 1:
            return True
        h_out, w_out = self.output_hw(*x.shape[-2:])
        features = (self.in_channels * x.shape[-2] * x.shape[-1] +
                    self.out_channels * h_out * w_out)
        return _prod(self.weight_shape) > features

    def _position_major_conv(self, x: torch.Tensor,
                             attention: torch.Tensor) -> torch.Tensor:
        """The conv from the mixtures without the [C_out, C_in, kh, kw]
        kernel layout.

        Permuting the mixtures into that layout is a stride-``kh*kw``
        transposition of the largest tensor of the layer (and again in the
        backward). In training the conv is ``sum_p mixtures[:, p] @
        columns[:, :, p]``: position-major mixtures [B, kh*kw, C_out, C_in]
        (:meth:`mix_cells`) against the im2col columns, kernel position by
        kernel position. In inference the cell product writes the mixtures
        output-major, [B, C_out, kh*kw * C_in], and the conv is one batched
        matmul with position-major columns (inner size kh*kw * C_in; 9-22
        % less time than nine accumulated ones at ResNet-50's stage 3-4
        shapes, benchmarks/README.md). Same result as the per-sample conv
        with :meth:`assemble_kernel`.
        """
        g_s = self._kw_layout[0]
        h_out, w_out = self.output_hw(*x.shape[-2:])
        cast = (lambda t: t) if torch.is_autocast_enabled(x.device.type) \
            else (lambda t: t.to(x.dtype))
        if g_s == 1:  # 1x1: strided input, one batched matmul
            if self.padding != (0, 0):
                x = torch.nn.functional.pad(
                    x, (self.padding[1], ) * 2 + (self.padding[0], ) * 2)
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            mixtures = self.mix_cells(attention, True, 'position_major')
            out = torch.bmm(
                cast(mixtures.view(-1, self.out_channels, self.in_channels)),
                x.reshape(x.shape[0], self.in_channels, -1))
        elif not torch.is_grad_enabled():
            kernels = self.mix_cells(attention, True, 'output_major')
            out = torch.bmm(
                cast(kernels.reshape(x.shape[0], self.out_channels, -1)),
                self._position_major_columns(x, h_out, w_out))
        else:
            mixtures = self.mix_cells(attention, True, 'position_major')
            # unbind, not indexing: its backward is one stack, where nine
            # selects would each scatter into a zero tensor of full size.
            columns = torch.nn.functional.unfold(
                x, self.kernel_size, self.dilation, self.padding,
                self.stride).view(x.shape[0], self.in_channels, g_s,
                                  -1).unbind(2)
            parts = cast(mixtures).unbind(1)
            out = torch.bmm(parts[0], columns[0])
            for part, column in zip(parts[1:], columns[1:]):
                out = torch.baddbmm(out, part, column)
        out = out.view(-1, self.out_channels, h_out, w_out)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1).to(out.dtype)
        return out

    def _position_major_columns(self, x: torch.Tensor, h_out: int,
                                w_out: int) -> torch.Tensor:
        """im2col with the kernel positions outermost: [B, kh*kw * C_in,
        H' W'] (``F.unfold`` puts the channels outermost)."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        (sh, sw), (dh, dw) = self.stride, self.dilation
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        views = [
            x[:, :, i * dh:i * dh + sh * (h_out - 1) + 1:sh,
              j * dw:j * dw + sw * (w_out - 1) + 1:sw] for i in range(kh)
            for j in range(kw)
        ]
        return torch.stack(views, 1).view(x.shape[0], -1, h_out * w_out)

    @property
    def _is_pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.padding == (0, 0)
                and self.groups == 1)

    def _pointwise_conv(self, x: torch.Tensor,
                        kernel: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv with per-sample kernels is one batched matmul. On this
        # project's CPU it measured ~2x faster than the grouped conv for
        # ResNet-50's 1x1 shapes at batch 8, and its graph has no batch
        # size baked in (so it also serves export).
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        batch, channels, height, width = x.shape
        out = torch.bmm(
            kernel.reshape(batch, self.out_channels, channels),
            x.reshape(batch, channels, height * width))
        out = out.reshape(batch, self.out_channels, height, width)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1).to(out.dtype)
        return out

    def madds_per_sample(self, input_hw: Tuple[int, int]) -> Dict[str, int]:
        """Multiply-adds per sample (spec 5.1) for an ``input_hw`` input."""
        self._check_finalized()
        h_out, w_out = self.output_hw(*input_hw)
        conv = h_out * w_out * _prod(self.weight_shape)
        return dict(conv=conv, att=self.attention.madds(),
                    agg=self._agg_madds(), scal=0)


class KWLinear(_KWLayerMixin, nn.Module):
    """KernelWarehouse linear layer (a length-1 KW conv).

    Input [B, C_in] (or [B, ..., C_in]: the attention then pools over the
    middle dimensions, one kernel per sample).

    Args:
        in_features (int): Input features.
        out_features (int): Output features.
        bias (bool): Whether to add a bias (initialised to 0). Default: True.
        warehouse_manager (WarehouseManager, optional): See
            :class:`KWConv2d`. Default: None.
        warehouse_name (str, optional): See :class:`KWConv2d`.
            Default: None.
        **manager_kwargs: Private manager options, see :class:`KWConv2d`.
    """

    def __init__(self,
                 in_features: int,
                 out_features: int,
                 bias: bool = True,
                 warehouse_manager: Optional['WarehouseManager'] = None,
                 warehouse_name: Optional[str] = None,
                 **manager_kwargs):
        nn.Module.__init__(self)
        check_positive(in_features, 'in_features')
        check_positive(out_features, 'out_features')
        self.in_features = in_features
        self.out_features = out_features
        self._setup_kw((out_features, in_features, 1), bias,
                       warehouse_manager, warehouse_name, manager_kwargs,
                       'linear')

    def _kw_in_channels(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or \
                x.shape[-1] != self.in_features or not x.is_floating_point():
            raise ValueError(
                f'KWLinear expects a float input x of shape [B, ..., '
                f'{self.in_features}] (in_features), got '
                f'{getattr(x, "shape", type(x).__name__)}')
        self._check_finalized()
        shape = x.shape
        if x.numel() == 0:  # as nn.Linear: an empty output
            return empty_batch_output(
                (*shape[:-1], self.out_features), x,
                (*self.parameters(), self._cells()))
        tokens = x.reshape(shape[0], -1, shape[-1])  # [B, L, C_in]
        attention = self._attention_weights(tokens.mean(dim=1))
        kernel = self.assemble_kernel(attention).squeeze(-1)  # [B, O, I]
        if not torch.is_autocast_enabled(x.device.type):
            kernel = kernel.to(x.dtype)
        out = torch.matmul(tokens, kernel.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def madds_per_sample(self,
                         input_hw: Tuple[int, int] = (1, 1)
                         ) -> Dict[str, int]:
        """Multiply-adds per sample; ``input_hw`` gives the token count."""
        self._check_finalized()
        tokens = input_hw[0] * input_hw[1]
        return dict(conv=tokens * _prod(self.weight_shape),
                    att=self.attention.madds(), agg=self._agg_madds(),
                    scal=0)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, '
                f'out_features={self.out_features}, '
                f'bias={self.bias is not None}')


KW_LAYERS = (KWConv2d, KWLinear)


class WarehouseManager(nn.Module):
    """Creates, stores and allocates the kernel warehouses of a network.

    Args:
        reduction (float | tuple[float]): Attention hidden width ratio,
            ``h = max(int(C_in * reduction), 16)``. Default: 1/16.
        cell_num_ratio (float | tuple[float]): Warehouse size over the total
            number of mixtures of its layers (the budget ``b``). Default: 1.
        cell_inplane_ratio (float | tuple[float]): Cell input channels over
            the gcd of the layers' input channels (per group). Default: 1.
        cell_outplane_ratio (float | tuple[float]): Cell output channels over
            the gcd of the layers' output channels. Default: 1.
        sharing_range (tuple[str]): Name tokens that start with one of these
            are replaced by it before grouping (``stage2_layer3_conv1`` ->
            ``stage2_layer_conv`` with ``('layer', 'conv')``); layers with
            equal fused names share a warehouse. Default: ('layer', 'conv').
        nonlocal_basis_ratio (float): < 1 enables the non-local basis
            attention. Default: 1.
        attention_norm (str): Attention norm, see
            :func:`~mmdyn.ops.build_attention_norm`. Default: 'bn_batch1'.
        fc1_bias (bool, optional): fc1 bias; None follows the official rule
            (bias iff the norm is not BatchNorm). Default: None.

    Ratios given as tuples hold one value per warehouse, in the order of
    their first reservation (a 1-tuple applies to all).
    """

    def __init__(self,
                 reduction: Ratio = 1 / 16,
                 cell_num_ratio: Ratio = 1,
                 cell_inplane_ratio: Ratio = 1,
                 cell_outplane_ratio: Ratio = 1,
                 sharing_range: Union[str, Sequence[str]] = ('layer',
                                                             'conv'),
                 nonlocal_basis_ratio: float = 1,
                 attention_norm: str = 'bn_batch1',
                 fc1_bias: Optional[bool] = None):
        super().__init__()
        for name, value in (('reduction', reduction),
                            ('cell_num_ratio', cell_num_ratio),
                            ('cell_inplane_ratio', cell_inplane_ratio),
                            ('cell_outplane_ratio', cell_outplane_ratio)):
            self._check_ratio(value, name)
        check_positive(nonlocal_basis_ratio, 'nonlocal_basis_ratio',
                       allow_float=True)
        if attention_norm not in ATTENTION_NORMS and attention_norm is not \
                None:
            raise ValueError(f'attention_norm must be one of '
                             f'{ATTENTION_NORMS}, got {attention_norm!r}')
        if isinstance(sharing_range, str):
            sharing_range = (sharing_range, )
        sharing_range = tuple(sharing_range)
        if not all(isinstance(s, str) and s and '_' not in s
                   for s in sharing_range):
            raise ValueError('sharing_range must be a tuple of non-empty '
                             "name tokens without '_', got "
                             f'{sharing_range!r}')
        if fc1_bias is not None and not isinstance(fc1_bias, bool):
            raise ValueError(f'fc1_bias must be None or a bool, got '
                             f'{fc1_bias!r}')
        self.reduction = reduction
        self.cell_num_ratio = cell_num_ratio
        self.cell_inplane_ratio = cell_inplane_ratio
        self.cell_outplane_ratio = cell_outplane_ratio
        self.sharing_range = sharing_range
        self.nonlocal_basis_ratio = nonlocal_basis_ratio
        self.attention_norm = attention_norm or 'none'
        if fc1_bias is None:
            fc1_bias = self.attention_norm not in ('bn', 'bn_batch1')
        self.fc1_bias = fc1_bias
        # fused warehouse name -> list of member weight shapes, in
        # reservation order (dicts keep insertion order).
        self.warehouse_shapes: Dict[str, List[Tuple[int, ...]]] = {}
        self._layers: List[nn.Module] = []
        self.cell_shapes: List[Tuple[int, ...]] = []
        self.slices: List[Tuple[int, int, int]] = []
        self.finalized = False
        # warehouse index -> ((data_ptr, version, shape), sampled values,
        # packed cells)
        self._packed: Dict[int, Tuple[tuple, torch.Tensor,
                                      torch.Tensor]] = {}

    @staticmethod
    def _check_ratio(value, name: str) -> None:
        values = value if isinstance(value, (tuple, list)) else (value, )
        if len(values) == 0:
            raise ValueError(f'{name} must not be empty')
        for v in values:
            check_positive(v, name, allow_float=True)

    @staticmethod
    def _per_warehouse(value, name: str, count: int) -> List[float]:
        if not isinstance(value, (tuple, list)):
            return [value] * count
        if len(value) == 1:
            return list(value) * count
        if len(value) != count:
            raise ValueError(f'{name} has {len(value)} values but the '
                             f'network has {count} warehouses')
        return list(value)

    def fuse_name(self, name: str) -> str:
        """The warehouse a layer named ``name`` belongs to."""
        tokens = []
        for token in name.split('_'):
            for prefix in self.sharing_range:
                if token.startswith(prefix):
                    token = prefix
            tokens.append(token)
        return '_'.join(tokens)

    @property
    def warehouse_names(self) -> List[str]:
        return list(self.warehouse_shapes)

    def _register_layer(self, layer: nn.Module, name: str,
                        layer_type: str) -> None:
        if self.finalized:
            raise ValueError(f'cannot reserve layer {name!r}: the '
                             'WarehouseManager is already finalized')
        if not isinstance(name, str) or not name:
            raise ValueError(f'name must be a non-empty str, got {name!r}')
        fused = self.fuse_name(name)
        members = self.warehouse_shapes.setdefault(fused, [])
        if members and len(members[0]) != len(layer.weight_shape):
            raise ValueError(
                f'layer {name!r} ({layer_type}) cannot share warehouse '
                f'{fused!r} with layers of another dimensionality; adjust '
                'name or sharing_range')
        members.append(layer.weight_shape)
        layer.warehouse_id = self.warehouse_names.index(fused)
        self._layers.append(layer)

    def reserve(self,
                name: str,
                in_channels: int,
                out_channels: int,
                kernel_size=1,
                stride=1,
                padding=0,
                dilation=1,
                groups: int = 1,
                bias: bool = False,
                layer_type: str = 'conv2d',
                **layer_kwargs) -> nn.Module:
        """Create a KW layer whose kernel will come from a warehouse.

        Args:
            name (str): Layer name used for grouping
                (``stage{S}_layer{L}_{kind}{J}``).
            in_channels (int): Input channels (features for 'linear').
            out_channels (int): Output channels (features for 'linear').
            kernel_size, stride, padding, dilation, groups: As
                ``nn.Conv2d`` (ignored for 'linear').
            bias (bool): Whether the layer has a bias. Default: False.
            layer_type (str): 'conv2d' (-> :class:`KWConv2d`) or 'linear'
                (-> :class:`KWLinear`). Default: 'conv2d'.
            **layer_kwargs: Extra layer arguments (e.g. ``impl``).

        Returns:
            KWConv2d | KWLinear: the layer, usable after :meth:`finalize`.
        """
        if layer_type not in LAYER_TYPES:
            raise ValueError(f'layer_type must be one of {LAYER_TYPES}, got '
                             f'{layer_type!r}')
        if layer_type == 'linear':
            return KWLinear(in_channels, out_channels, bias=bias,
                            warehouse_manager=self, warehouse_name=name)
        return KWConv2d(in_channels, out_channels, kernel_size, stride,
                        padding, dilation, groups, bias,
                        warehouse_manager=self, warehouse_name=name,
                        **layer_kwargs)

    def finalize(self, network: nn.Module) -> None:
        """Store the warehouses and allocate them to the layers.

        Args:
            network (nn.Module): The module containing every reserved layer
                (walked in ``network.modules()`` order).
        """
        if self.finalized:
            raise ValueError('WarehouseManager.finalize was already called')
        if not isinstance(network, nn.Module):
            raise ValueError('network must be an nn.Module, got '
                             f'{type(network).__name__}')
        if not self._layers:
            raise ValueError('finalize called before any layer was reserved')
        found = [
            m for m in network.modules()
            if isinstance(m, KW_LAYERS) and m.warehouse_manager is self
        ]
        missing = [
            layer.warehouse_name for layer in self._layers
            if not any(layer is m for m in found)
        ]
        if missing:
            raise ValueError(
                f'reserved layers {missing} are not submodules of network; '
                'register every reserved layer before calling finalize')
        self._store()
        self._allocate(found)
        self.finalized = True

    def _store(self) -> None:
        count = len(self.warehouse_shapes)
        self._reductions = self._per_warehouse(self.reduction, 'reduction',
                                               count)
        self._num_ratios = self._per_warehouse(self.cell_num_ratio,
                                               'cell_num_ratio', count)
        in_ratios = self._per_warehouse(self.cell_inplane_ratio,
                                        'cell_inplane_ratio', count)
        out_ratios = self._per_warehouse(self.cell_outplane_ratio,
                                         'cell_outplane_ratio', count)
        weights = []
        self.cell_shapes = []
        for idx, (fused, shapes) in enumerate(self.warehouse_shapes.items()):
            gcd_out = reduce(math.gcd, (s[0] for s in shapes))
            gcd_in = reduce(math.gcd, (s[1] for s in shapes))
            cell_out = max(int(gcd_out * out_ratios[idx]), 1)
            cell_in = max(int(gcd_in * in_ratios[idx]), 1)
            if gcd_out % cell_out:
                raise ValueError(
                    f'cell_outplane_ratio {out_ratios[idx]} gives '
                    f'{cell_out}-channel cells that do not divide the '
                    f'output channels of warehouse {fused!r} (gcd '
                    f'{gcd_out})')
            if gcd_in % cell_in:
                raise ValueError(
                    f'cell_inplane_ratio {in_ratios[idx]} gives '
                    f'{cell_in}-channel cells that do not divide the input '
                    f'channels of warehouse {fused!r} (gcd {gcd_in})')
            total = sum(
                (s[0] // cell_out) * (s[1] // cell_in) * _prod(s[2:])
                for s in shapes)
            num_cells = max(int(total * self._num_ratios[idx]), 1)
            cell_shape = (cell_out, cell_in) + (1, ) * (len(shapes[0]) - 2)
            check_allocation(
                num_cells * cell_out * cell_in, f'warehouse {fused!r} '
                f'({num_cells} cells of {cell_out}x{cell_in})',
                f'cell_num_ratio ({self._num_ratios[idx]}), '
                f'cell_inplane_ratio ({in_ratios[idx]}) or '
                f'cell_outplane_ratio ({out_ratios[idx]})')
            self.cell_shapes.append(cell_shape)
            weights.append(nn.Parameter(torch.empty(num_cells, *cell_shape)))
        self.weights = nn.ParameterList(weights)

    def _allocate(self, layers: List[nn.Module]) -> None:
        cursors = [0] * len(self.weights)
        self.slices = []
        for layer in layers:
            idx = layer.warehouse_id
            num_cells = self.weights[idx].shape[0]
            start = cursors[idx]
            end = layer._allocate(self.cell_shapes[idx], num_cells, start,
                                  self._num_ratios[idx],
                                  self._reductions[idx], self.attention_norm,
                                  self.fc1_bias, self.nonlocal_basis_ratio)
            if end > num_cells:
                raise ValueError(
                    f'cell_num_ratio {self._num_ratios[idx]}: layer '
                    f'{layer.warehouse_name!r} needs cells up to {end} but '
                    f'warehouse {self.warehouse_names[idx]!r} has '
                    f'{num_cells}')
            self.slices.append((idx, start, end))
            cursors[idx] = end
        for idx, cursor in enumerate(cursors):
            if cursor != self.weights[idx].shape[0]:
                raise ValueError(
                    f'cell_num_ratio {self._num_ratios[idx]}: the layers of '
                    f'warehouse {self.warehouse_names[idx]!r} select '
                    f'{cursor} cells but it holds '
                    f'{self.weights[idx].shape[0]}; use an integer ratio '
                    '>= 1 or 1/p with mixture counts the rule can realise')
        self.init_weights()

    def packed_cells(self, index: int) -> Optional[torch.Tensor]:
        """Warehouse ``index`` cut into the column strips of the CPU
        assembly loop (:func:`~mmdyn.ops.kernel_warehouse_cpu.pack_columns`),
        built on first use in inference and kept until the cells change.

        Every KW layer of a warehouse reads all of its cells; without this
        copy each of them re-cuts the warehouse (read with a stride of a
        cell row), about 14 % of KW-1x ResNet-50's assembly time
        (benchmarks/README.md). The copy costs the warehouse's size in
        memory while it lives (89 MiB for KW-1x ResNet-50): ``train()``
        and device or dtype moves drop it. It is rebuilt when the cells'
        storage, shape or version counter changes (every in-place update
        through the parameter: ``load_state_dict`` and optimiser steps), or
        any of 256 evenly spaced values of the cells (writes through
        ``.data``, which leave the version counter alone, e.g. mmengine's
        EMA parameter swap). After a ``.data`` write to only a few cells,
        call :meth:`clear_packed_cells`. ``MMDYN_KW_PACKED_CELLS=0`` turns
        it off.

        Returns:
            Tensor | None: The strips; None when switched off or not in
            float32 CPU inference.
        """
        cells = self.weights[index]
        if os.environ.get('MMDYN_KW_PACKED_CELLS', '1') == '0' or \
                self.training or torch.is_grad_enabled() or \
                cells.device.type != 'cpu' or cells.dtype != torch.float32:
            return None
        flat = cells.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 256)].clone()
        key = (cells.data_ptr(), cells._version, tuple(cells.shape))
        cached = self._packed.get(index)
        if cached is None or cached[0] != key or \
                not torch.equal(cached[1], sample):
            cached = (key, sample,
                      pack_columns(cells.reshape(cells.shape[0], -1)))
            self._packed[index] = cached
        return cached[2]

    def clear_packed_cells(self) -> None:
        """Drop the packed copies of the warehouses (see
        :meth:`packed_cells`)."""
        self._packed = {}

    def train(self, mode: bool = True) -> 'WarehouseManager':
        self.clear_packed_cells()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_packed_cells()
        # 5-D cells pass model.to(memory_format=torch.channels_last).
        return super()._apply(kernel_bank_safe(fn), *args, **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """fan_out kaiming init of every layer's cell slice."""
        for idx, start, end in self.slices:
            if end <= start:
                continue
            cells = self.weights[idx][start:end]
            fan_out = (end - start) * _prod(cells.shape[1:]) // cells.shape[2]
            cells.normal_(0.0, math.sqrt(2.0 / fan_out))

    def extra_repr(self) -> str:
        if not self.finalized:
            return f'{len(self._layers)} reserved layers, not finalized'
        return ', '.join(f'{name}: {w.shape[0]}x{list(w.shape[1:])}'
                         for name, w in zip(self.warehouse_names,
                                            self.weights))
