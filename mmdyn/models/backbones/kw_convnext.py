# Copyright (c) mmdyn contributors. All rights reserved.
"""ConvNeXt with KernelWarehouse convolutions (KW-ConvNeXt).

`KernelWarehouse: Rethinking the Design of Dynamic Convolution
<https://arxiv.org/abs/2406.07879>`_ (ICML 2024).

Every conv is a KW conv with a bias: the 4x4 stem, the three 2x2 downsample
convs, the 7x7 depthwise convs and both pointwise convs of every block, the
latter as 1x1 convs on NCHW maps. The KW attention branches use LayerNorm
(so their first linear layer has a bias). With the default
``sharing_range=('layer', 'pwconv')`` there are 12 warehouses: the stem, each
downsample conv, and per stage one depthwise and one pointwise warehouse.

The backbone is mmpretrain's ``ConvNeXt`` (``arch``, ``out_indices``,
``gap_before_final_norm``, ``frozen_stages``, its forward and output norms)
with its stem and downsample convs replaced by KW convs and its stages
filled with :class:`KWConvNeXtBlock`, whose names (``dwconv``, ``pwconv1``,
``pwconv2``, ``gamma``) are the official KW model's. With the defaults the
output is the final LayerNorm of the pooled last stage, ready for a
``LinearClsHead``.
"""
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmpretrain.models.backbones.convnext import ConvNeXt
from mmpretrain.models.utils import LayerNorm2d
from mmpretrain.registry import MODELS

from mmdyn.ops import WarehouseManager
from ..utils import (freeze_warehouses, init_dynamic_layers, kw_like,
                     register_first)

Ratio = Union[float, Sequence[float]]


class KWConvNeXtBlock(nn.Module):
    """ConvNeXt block: ``dwconv -> LN -> pwconv1 -> GELU -> pwconv2``, scaled
    by ``gamma`` and added to the input through drop-path.

    Args:
        channels (int): Channels.
        warehouse_manager (WarehouseManager): Manager reserving the KW convs.
        stage_idx (int): Stage index used in the layer names.
        layer_idx (int): Block index used in the layer names.
        mlp_ratio (int): Hidden width of the pointwise convs / channels.
            Default: 4.
        drop_path_rate (float): Stochastic depth rate. Default: 0.
        layer_scale_init_value (float): Initial layer scale; 0 disables
            ``gamma``. Default: 1e-6.
        with_cp (bool): Gradient checkpointing. Default: False.
    """

    def __init__(self,
                 channels: int,
                 warehouse_manager: WarehouseManager,
                 stage_idx: int,
                 layer_idx: int,
                 mlp_ratio: int = 4,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        prefix = f'stage{stage_idx}_layer{layer_idx}'
        hidden = int(mlp_ratio * channels)
        self.dwconv = warehouse_manager.reserve(
            name=f'{prefix}_dwconv0',
            in_channels=channels,
            out_channels=channels,
            kernel_size=7,
            padding=3,
            groups=channels,
            bias=True)
        self.norm = LayerNorm2d(channels, eps=1e-6)
        self.pwconv1 = warehouse_manager.reserve(
            name=f'{prefix}_pwconv1',
            in_channels=channels,
            out_channels=hidden,
            kernel_size=1,
            bias=True)
        self.act = nn.GELU()
        self.pwconv2 = warehouse_manager.reserve(
            name=f'{prefix}_pwconv2',
            in_channels=hidden,
            out_channels=channels,
            kernel_size=1,
            bias=True)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(
                torch.full((1, channels, 1, 1), float(layer_scale_init_value)))
        else:
            self.gamma = None
        self.drop_path = DropPath(
            drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):

        def _inner_forward(x):
            out = self.pwconv2(
                self.act(self.pwconv1(self.norm(self.dwconv(x)))))
            if self.gamma is not None:
                out = out * self.gamma
            return x + self.drop_path(out)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


@MODELS.register_module()
class KWConvNeXt(ConvNeXt):
    """Mmpretrain's ConvNeXt whose convs are KernelWarehouse convs.

    With the defaults and ``arch='tiny'`` this is the paper's
    ``kw1x_convnext_tiny`` backbone (the classifier Linear lives in the
    head).

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'``, ``'large'``,
            ``'xlarge'`` (mmpretrain's ConvNeXt settings) or a dict with
            ``depths`` and ``channels``. Default: ``'tiny'``.
        in_channels (int): Image channels. Default: 3.
        stem_patch_size (int): Stem kernel size and stride. Default: 4.
        drop_path_rate (float): Stochastic depth rate, increasing linearly
            over the blocks from 0. Default: 0.
        layer_scale_init_value (float): Initial layer scale. Default: 1e-6.
        out_indices (int | Sequence[int]): Stages to output (negative counts
            from the end); each gets its own LayerNorm. Default: -1.
        frozen_stages (int): Freeze the first N stages with their downsample
            layers. Default: 0.
        gap_before_final_norm (bool): Pool before the output norm and return
            [B, C] features. Default: True.
        with_cp (bool): Gradient checkpointing. Default: False.
        reduction (float | Sequence[float]): Attention hidden width ratio.
            Default: 1/16.
        cell_num_ratio (float | Sequence[float]): Default: 1.
        cell_inplane_ratio (float | Sequence[float]): Default: 1.
        cell_outplane_ratio (float | Sequence[float]): Default: 1.
        sharing_range (Sequence[str]): Name tokens merged when grouping
            layers into warehouses. Default: ``('layer', 'pwconv')``.
        nonlocal_basis_ratio (float): Default: 1.
        attention_norm (str): Norm in the KW attention branches.
            Default: ``'ln'`` (the paper's choice for ConvNeXt).
        init_cfg (dict | list[dict], optional): mmengine init config. The
            paper's init is done at construction; None keeps it.
            Default: None.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 stem_patch_size: int = 4,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6,
                 out_indices: Union[int, Sequence[int]] = -1,
                 frozen_stages: int = 0,
                 gap_before_final_norm: bool = True,
                 with_cp: bool = False,
                 reduction: Ratio = 1 / 16,
                 cell_num_ratio: Ratio = 1,
                 cell_inplane_ratio: Ratio = 1,
                 cell_outplane_ratio: Ratio = 1,
                 sharing_range: Sequence[str] = ('layer', 'pwconv'),
                 nonlocal_basis_ratio: float = 1,
                 attention_norm: str = 'ln',
                 init_cfg=None):
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'arch must be one of '
                                 f'{sorted(self.arch_settings)} or a dict, '
                                 f'got {arch!r}')
            arch = self.arch_settings[arch]
        elif not (isinstance(arch, dict) and 'depths' in arch
                  and 'channels' in arch):
            raise ValueError('arch must be a name or a dict with "depths" '
                             f'and "channels", got {arch!r}')
        depths = list(arch['depths'])
        channels = list(arch['channels'])
        if len(depths) != len(channels):
            raise ValueError('arch depths and channels must have the same '
                             f'length, got {depths} / {channels}')
        num_stages = len(depths)
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        indices = []
        for index in out_indices:
            resolved = index + num_stages if index < 0 else index
            if resolved not in range(num_stages):
                raise ValueError(f'out_indices must index the {num_stages} '
                                 f'stages, got {out_indices}')
            indices.append(resolved)
        if frozen_stages not in range(0, num_stages + 1):
            raise ValueError('frozen_stages must be in '
                             f'range(0, {num_stages + 1}), got '
                             f'{frozen_stages}')
        manager = WarehouseManager(
            reduction=reduction,
            cell_num_ratio=cell_num_ratio,
            cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio,
            sharing_range=tuple(sharing_range),
            nonlocal_basis_ratio=nonlocal_basis_ratio,
            attention_norm=attention_norm)
        # mmpretrain builds the stem, the downsample layers and the output
        # norms around empty stages; the KW blocks are added below. Freezing
        # waits for the warehouses.
        super().__init__(
            arch=dict(depths=[0] * num_stages, channels=channels),
            in_channels=in_channels,
            stem_patch_size=stem_patch_size,
            out_indices=indices,
            frozen_stages=0,
            gap_before_final_norm=gap_before_final_norm,
            with_cp=with_cp,
            init_cfg=init_cfg)
        self.depths = depths
        self.frozen_stages = frozen_stages
        register_first(self, 'warehouse_manager', manager)

        # The stem and downsample convs are reserved before the blocks, as
        # in the paper, so that warehouse indices (and per-warehouse ratio
        # tuples) match its numbering.
        for i, layer in enumerate(self.downsample_layers):
            conv_idx, name = (0, 'stem_conv0') if i == 0 else (
                1, f'stage{i - 1}_layerds_conv0')
            layer[conv_idx] = kw_like(manager, name, layer[conv_idx])

        # Linear in the block index; plain Python so that building under
        # ``torch.device('meta')`` works.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        block_idx = 0
        for i, stage in enumerate(self.stages):
            for j in range(depths[i]):
                stage.append(
                    KWConvNeXtBlock(
                        channels[i],
                        manager,
                        stage_idx=i,
                        layer_idx=j,
                        drop_path_rate=rates[block_idx + j],
                        layer_scale_init_value=layer_scale_init_value,
                        with_cp=with_cp))
            block_idx += depths[i]

        manager.finalize(self)
        self._freeze_stages()

    def init_weights(self):
        if not self._is_init:
            init_dynamic_layers(self)
        super().init_weights()

    def _freeze_stages(self):
        super()._freeze_stages()
        if self.frozen_stages > 0:
            frozen = []
            for i in range(self.frozen_stages):
                frozen += [self.downsample_layers[i], self.stages[i]]
            freeze_warehouses(self.warehouse_manager, frozen)

    def train(self, mode: bool = True) -> 'KWConvNeXt':
        # mmpretrain's ConvNeXt.train (which re-freezes) returns None.
        super().train(mode)
        return self
