# Copyright (c) mmdyn contributors. All rights reserved.
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

Each layer's ``forward_reference`` computes exactly these formulas;
``forward`` returns the same result by the path that
:mod:`mmdyn.ops.accel.paths` chooses for the input (``impl`` selects one,
``last_path`` names the one taken).

torch only.
"""
import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .accel import kw_cells, kw_paths
from .accel.kw_cells import MIXTURE_LAYOUTS
from .accel.paths import (PER_SAMPLE_IMPLS, check_impl, choose_path,
                          kw_position_major, path_names, uses_c_cell_product)
from .base import (DynamicConv2dBase, TemperatureMixin, build_attention_norm,
                   check_allocation, check_input_dtype, check_positive,
                   empty_batch_output, init_attention_weights)
from .capture import fx_leaf
from .per_sample_conv import per_sample_conv2d
from .warehouse_manager import WarehouseManager  # noqa: F401
from .warehouse_manager import register_layer_class

CAF_EPS = 1e-3
#: The official lower bound of the attention's hidden width and of the
#: non-local basis size.
MIN_HIDDEN_CHANNELS = 16
_prod = math.prod


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
    cell (the official rule). That rule selects floor(m/p) cells for m
    mixtures when p*p divides m, and up to one more otherwise (49 mixtures
    at r = 1/2: 25 for a warehouse of int(49/2) = 24 cells, which the
    official code refuses with an assertion); a selection past the
    warehouse's last cell takes the zero cell instead.

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
            if i % period == (i // period) % period and cursor < num_cells:
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

    #: The ``eps`` of the contrasting attention
    #: (:func:`contrasting_attention`).
    caf_eps = CAF_EPS

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
        init_attention_weights(self)
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
        ],
                           dim=-1)
        return logits + self.basis_bias.reshape(self.num_mixtures, -1)

    def madds(self) -> int:
        """Multiply-adds of fc1, fc2 (and fc3) for one sample."""
        total = self.fc1.in_features * self.fc1.out_features
        total += self.fc2.in_features * self.fc2.out_features
        if self.num_basis is not None:
            total += (
                self.num_mixtures * self.fc3.in_features *
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
        #: The product of the latest :meth:`mix_cells`: 'c_loop' or
        #: 'matmul'.
        self.last_mixture_product = None
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
            warehouse_manager._register_layer(self, warehouse_name, layer_type)

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

    def _allocate(self, cell_shape: Tuple[int,
                                          ...], num_cells: int, start: int,
                  cell_num_ratio: float, reduction: float, attention_norm: str,
                  fc1_bias: bool, nonlocal_basis_ratio: float) -> int:
        """Build the attention branch and beta; return the new cursor."""
        c_out, c_in_g = self.weight_shape[:2]
        cell_out, cell_in = cell_shape[:2]
        groups_out, groups_in = c_out // cell_out, c_in_g // cell_in
        groups_spatial = _prod(self.weight_shape[2:])
        num_mixtures = groups_spatial * groups_out * groups_in
        self._kw_layout = (groups_spatial, groups_out, groups_in, cell_out,
                           cell_in)
        in_channels = self._kw_in_channels()
        hidden = max(int(in_channels * reduction), MIN_HIDDEN_CHANNELS)
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
                num_basis=max(
                    int(num_nonlocal * nonlocal_basis_ratio),
                    MIN_HIDDEN_CHANNELS),
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
        """Mix the warehouse cells into per-sample kernels (the reference: one
        ``torch.matmul``, then the kernel layout).

        Args:
            attention (Tensor): [B, m, n] CAF attentions.

        Returns:
            Tensor: [B, *weight_shape]; mixture ``(s * G_o + o) * G_i + c``
            fills output block o, input block c, spatial position s.
        """
        cells = self._cell_rows()
        if not torch.is_autocast_enabled(attention.device.type):
            attention = attention.to(cells.dtype)
        mixtures = torch.matmul(attention, cells).view(-1, *self._kw_layout)
        return mixtures.permute(0, 2, 4, 3, 5,
                                1).reshape(-1, *self.weight_shape)

    def check_input(self, x: torch.Tensor) -> None:
        """:meth:`DynamicConv2dBase.check_input`, and the layer must belong to
        a finalized warehouse manager."""
        super().check_input(x)
        self._check_finalized()

    def empty_output(self, x: torch.Tensor, *extra:
                     torch.Tensor) -> torch.Tensor:
        # The warehouse is a parameter of the manager, not of this layer.
        return super().empty_output(x, self._cells(), *extra)

    def _cells(self) -> torch.Tensor:
        """This layer's warehouse (a parameter of the manager)."""
        return self.warehouse_manager.weights[self.warehouse_id]

    def _cell_rows(self) -> torch.Tensor:
        """This layer's warehouse as [n, cell_size]: the right operand of every
        mixture product."""
        cells = self._cells()
        return cells.reshape(cells.shape[0], -1)

    #: Layouts of :meth:`mix_cells` (see
    #: :data:`~mmdyn.ops.accel.kw_cells.MIXTURE_LAYOUTS`).
    MIXTURE_LAYOUTS = MIXTURE_LAYOUTS

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

        The product runs in :func:`~mmdyn.ops.accel.kw_cells.
        mix_cells` (float32 CPU inference: the C loop on the manager's
        packed cells, writing the layout directly; otherwise
        ``torch.matmul``); :attr:`last_mixture_product` records which.
        """
        if layout not in self.MIXTURE_LAYOUTS:
            raise ValueError(f'layout must be one of {self.MIXTURE_LAYOUTS}'
                             f', got {layout!r}')
        cells = self._cell_rows()
        if not torch.is_autocast_enabled(attention.device.type):
            attention = attention.to(cells.dtype)
        mixtures, self.last_mixture_product = kw_cells.mix_cells(
            attention, cells, self._kw_layout, layout, reuse_buffer,
            lambda: self.warehouse_manager.packed_cells(self.warehouse_id),
            uses_c_cell_product(attention, cells))
        return mixtures

    def uses_c_cell_product(self, attention: torch.Tensor) -> bool:
        """Whether :meth:`mix_cells` runs the C cell product for these
        attentions now (see :func:`~mmdyn.ops.accel.paths.

        uses_c_cell_product`).
        """
        return uses_c_cell_product(attention, self._cell_rows())

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
        impl (str): ``'auto'`` (the fastest path for the input),
            ``'reference'`` (the paper's forward), a path of
            :data:`~mmdyn.ops.accel.paths.KERNEL_WAREHOUSE_PATHS`, or a
            per-sample conv (``'loop'``, ``'grouped'``, ``'unfold'``: the
            reference forward with it). See :mod:`mmdyn.ops.accel.paths`.
            Default: ``'auto'``.
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
        self.impl = check_impl(impl, path_names('kernel_warehouse'))
        #: The path of the latest forward (see :mod:`mmdyn.ops.accel.paths`).
        self.last_path = None
        self._setup_kw(
            (out_channels, in_channels // groups, *self.kernel_size), bias,
            warehouse_manager, warehouse_name, manager_kwargs, 'conv2d')

    def _kw_in_channels(self) -> int:
        return self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result by the path that
        :func:`~mmdyn.ops.accel.paths.choose_path` chooses.

        The path is recorded in :attr:`last_path`; the paths are in
        :mod:`~mmdyn.ops.accel.kw_paths`.
        """
        out = self.forward_prologue(x)
        if out is not None:  # traced by torch.fx, or an empty batch
            return out
        attention = self._attention_weights(x.mean(dim=(2, 3)))
        path = choose_path('kernel_warehouse', self, x, (attention, ))
        self.last_path = path.name
        return path.run(self, x, attention)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: the attentions (CAF), the per-sample kernel
        assembled from the warehouse cells (:meth:`assemble_kernel`), one conv
        per sample."""
        out = self.check_input_or_empty(x)
        if out is not None:
            return out
        attention = self._attention_weights(x.mean(dim=(2, 3)))
        kernel = self.assemble_kernel(attention)
        if not torch.is_autocast_enabled(x.device.type):
            kernel = kernel.to(x.dtype)
        return self.reference_from_attention(x, attention, kernel)

    def reference_from_attention(self, x: torch.Tensor,
                                 attention: torch.Tensor,
                                 kernel: torch.Tensor) -> torch.Tensor:
        """One conv per sample with the per-sample ``kernel`` (assembled from
        ``attention``), plus the bias."""
        impl = self.impl if self.impl in PER_SAMPLE_IMPLS else 'auto'
        return per_sample_conv2d(
            x,
            kernel,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            impl=impl)

    def uses_position_major(self, x: torch.Tensor) -> bool:
        """Whether ``impl='auto'`` may convolve straight from the mixtures
        (path ``'position_major'``; see
        :func:`~mmdyn.ops.accel.paths.kw_position_major`)."""
        return self.impl == 'auto' and kw_position_major(self, x)

    def madds_per_sample(self, input_hw: Tuple[int, int]) -> Dict[str, int]:
        """Multiply-adds per sample for an ``input_hw`` input (convention of
        :mod:`mmdyn.analysis.flops`)."""
        self._check_finalized()
        h_out, w_out = self.output_hw(*input_hw)
        conv = h_out * w_out * _prod(self.weight_shape)
        return dict(
            conv=conv,
            att=self.attention.madds(),
            agg=self._agg_madds(),
            scal=0)


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
        self._setup_kw((out_features, in_features, 1), bias, warehouse_manager,
                       warehouse_name, manager_kwargs, 'linear')

    def _kw_in_channels(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference`'s result, the kernels assembled by the
        layer's ``mix_cells`` (the C cell product in float32 CPU inference, see
        :func:`~mmdyn.ops.accel.kw_paths.assembled_kernel`)."""
        leaf = fx_leaf(self, x)
        if leaf is not None:  # torch.fx tracing: the layer as a leaf
            return leaf
        return self._forward(x, kw_paths.assembled_kernel)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward: the attentions (CAF), the per-sample kernel
        (:meth:`assemble_kernel`), one matmul per sample."""
        return self._forward(x, type(self).assemble_kernel)

    def _forward(self, x: torch.Tensor, assemble) -> torch.Tensor:
        """Check ``x``; the layer with kernels from ``assemble(self,
        attention)``."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or \
                x.shape[-1] != self.in_features:
            raise ValueError(f'KWLinear expects an input x of shape [B, ..., '
                             f'{self.in_features}] (in_features), got '
                             f'{getattr(x, "shape", type(x).__name__)}')
        check_input_dtype(self, x)
        self._check_finalized()
        shape = x.shape
        if x.numel() == 0:  # as nn.Linear: an empty output
            return empty_batch_output((*shape[:-1], self.out_features), x,
                                      (*self.parameters(), self._cells()))
        tokens = x.reshape(shape[0], -1, shape[-1])  # [B, L, C_in]
        attention = self._attention_weights(tokens.mean(dim=1))
        kernel = assemble(self, attention).squeeze(-1)  # [B, O, I]
        if not torch.is_autocast_enabled(x.device.type):
            kernel = kernel.to(x.dtype)
        out = torch.matmul(tokens, kernel.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def madds_per_sample(self,
                         input_hw: Tuple[int, int] = (1, 1)) -> Dict[str, int]:
        """Multiply-adds per sample; ``input_hw`` gives the token count."""
        self._check_finalized()
        tokens = input_hw[0] * input_hw[1]
        return dict(
            conv=tokens * _prod(self.weight_shape),
            att=self.attention.madds(),
            agg=self._agg_madds(),
            scal=0)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, '
                f'out_features={self.out_features}, '
                f'bias={self.bias is not None}')


KW_LAYERS = (KWConv2d, KWLinear)
register_layer_class('conv2d', KWConv2d)
register_layer_class('linear', KWLinear)
