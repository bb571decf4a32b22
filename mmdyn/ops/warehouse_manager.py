# Copyright (c) mmdyn contributors. All rights reserved.
"""The KernelWarehouse manager: creates, stores and allocates the kernel
warehouses of a network (see :mod:`mmdyn.ops.kernel_warehouse` for the
layers and their life cycle).

torch only.
"""
import math
from functools import reduce
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .accel.kw_cells import PackedCells
from .base import (ATTENTION_NORMS, check_allocation, check_positive,
                   kernel_bank_safe)

Ratio = Union[float, Sequence[float]]

LAYER_TYPES = ('conv2d', 'linear')
#: The KW layer class of each layer type, filled in by
#: :mod:`mmdyn.ops.kernel_warehouse` (which imports this module) through
#: :func:`register_layer_class`.
LAYER_CLASSES: Dict[str, type] = {}


def register_layer_class(layer_type: str, cls: type) -> None:
    """Make ``cls`` the layer :meth:`WarehouseManager.reserve` builds for
    ``layer_type`` (and one :meth:`WarehouseManager.finalize` allocates)."""
    if layer_type not in LAYER_TYPES:
        raise ValueError(f'layer_type must be one of {LAYER_TYPES}, got '
                         f'{layer_type!r}')
    LAYER_CLASSES[layer_type] = cls


def _prod(values) -> int:
    return reduce(lambda a, b: a * b, values, 1)


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
                 sharing_range: Union[str, Sequence[str]] = ('layer', 'conv'),
                 nonlocal_basis_ratio: float = 1,
                 attention_norm: str = 'bn_batch1',
                 fc1_bias: Optional[bool] = None):
        super().__init__()
        for name, value in (('reduction', reduction), ('cell_num_ratio',
                                                       cell_num_ratio),
                            ('cell_inplane_ratio', cell_inplane_ratio),
                            ('cell_outplane_ratio', cell_outplane_ratio)):
            self._check_ratio(value, name)
        check_positive(
            nonlocal_basis_ratio, 'nonlocal_basis_ratio', allow_float=True)
        if attention_norm not in ATTENTION_NORMS and attention_norm is not \
                None:
            raise ValueError(f'attention_norm must be one of '
                             f'{ATTENTION_NORMS}, got {attention_norm!r}')
        if isinstance(sharing_range, str):
            sharing_range = (sharing_range, )
        sharing_range = tuple(sharing_range)
        if not all(
                isinstance(s, str) and s and '_' not in s
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
        #: The warehouses cut into column strips for the CPU cell product.
        self.packed = PackedCells()

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
            return LAYER_CLASSES['linear'](
                in_channels,
                out_channels,
                bias=bias,
                warehouse_manager=self,
                warehouse_name=name)
        return LAYER_CLASSES['conv2d'](
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            warehouse_manager=self,
            warehouse_name=name,
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
        layer_classes = tuple(LAYER_CLASSES.values())
        found = [
            m for m in network.modules()
            if isinstance(m, layer_classes) and m.warehouse_manager is self
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
            total = sum((s[0] // cell_out) * (s[1] // cell_in) * _prod(s[2:])
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
                                  self._num_ratios[idx], self._reductions[idx],
                                  self.attention_norm, self.fc1_bias,
                                  self.nonlocal_basis_ratio)
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
        """Warehouse ``index`` cut into the column strips of the CPU cell
        product, kept until the cells change (see
        :class:`~mmdyn.ops.accel.kw_cells.PackedCells`).

        Returns:
            Tensor | None: The strips; None when switched off
            (``MMDYN_KW_PACKED_CELLS=0``) or not in float32 CPU inference.
        """
        return self.packed.get(index, self.weights[index], self.training)

    def clear_packed_cells(self) -> None:
        """Drop the packed copies of the warehouses (see
        :meth:`packed_cells`)."""
        self.packed.clear()

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
        return ', '.join(
            f'{name}: {w.shape[0]}x{list(w.shape[1:])}'
            for name, w in zip(self.warehouse_names, self.weights))
