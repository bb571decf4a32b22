# Copyright (c) mmdyn contributors. All rights reserved.
"""MobileNetV2 with KernelWarehouse convolutions (KW-MobileNetV2).

`KernelWarehouse: Rethinking the Design of Dynamic Convolution
<https://arxiv.org/abs/2406.07879>`_ (ICML 2024).

Two backbones, both mmpretrain's ``MobileNetV2`` (``conv1``,
``layer1``..``layer7``, ``conv2``; ``out_indices`` 0..7, ``frozen_stages``,
``norm_eval``) whose convs are replaced by KW convs after construction:

* :class:`KWMobileNetV2` (the paper's kw1x / kw4x models): every conv is a
  KW conv.
* :class:`KW1d2xMobileNetV2` (the 1/2x models): the paper's hard-wired
  setting. The expansion/projection 1x1 convs of KW stages 1-5 stay plain,
  reduction is 1/32 and the nine backbone warehouses get their own ratios.
  The tenth warehouse of the paper (the KW classifier) lives in
  :class:`mmdyn.models.heads.KWLinearClsHead`: warehouses are independent, so
  the split leaves the model and its parameter count unchanged.

Warehouse grouping follows the paper's layer names
``stage{S}_layer{L}_{pwconv0|dwconv0|pwconv1}``: the seven block settings map
to the KW stages ``(1, 2, 3, 4, 5, 6, 6)``, the stem is ``stage0_conv0`` (its
own warehouse), the final 1x1 conv to 1280 is a stage-6 ``pwconv1``, and the
whole first block of a setting that starts a new KW stage is handed over to
the previous stage.
"""
from typing import Optional, Sequence, Union

from mmcv.cnn import ConvModule
from mmpretrain.models.backbones.mobilenet_v2 import MobileNetV2
from mmpretrain.models.utils import make_divisible
from mmpretrain.registry import MODELS

from mmdyn.ops import WarehouseManager
from ..utils import (freeze_warehouses, init_dynamic_layers, kw_like,
                     register_first)

Ratio = Union[float, Sequence[float]]


@MODELS.register_module()
class KWMobileNetV2(MobileNetV2):
    """Mmpretrain's MobileNetV2 whose convs are KernelWarehouse convs.

    With the defaults this is the paper's ``kw1x_mobilenetv2`` (13
    warehouses); ``cell_num_ratio=4, sharing_range=('layer', )`` gives
    ``kw4x`` (19 warehouses). Pair it with a plain ``GlobalAveragePooling``
    neck and ``LinearClsHead``, as mmpretrain's MobileNetV2.

    Args:
        widen_factor (float): Width multiplier; channels are
            ``make_divisible(c * widen_factor, 8)``, the last conv's
            ``make_divisible(1280 * max(1, widen_factor), 8)``.
            Default: 1.0.
        out_indices (Sequence[int]): Outputs to return, 0..6 for
            ``layer1``..``layer7`` and 7 for ``conv2``. Default: (7, ).
        frozen_stages (int): Freeze ``conv1`` and ``layer1``..``layerN``;
            -1 freezes nothing. Default: -1.
        norm_cfg (dict): Norm config of the feature maps.
            Default: ``dict(type='BN')``.
        act_cfg (dict): Activation config. Default: ``dict(type='ReLU6')``.
        norm_eval (bool): Keep every BN layer (attention branches included)
            in eval mode while training. Default: False.
        with_cp (bool): Gradient checkpointing in the blocks.
            Default: False.
        reduction (float | Sequence[float]): Attention hidden width ratio.
            Default: 1/16.
        cell_num_ratio (float | Sequence[float]): Warehouse cells / cells
            the member layers are split into. Default: 1.
        cell_inplane_ratio (float | Sequence[float]): Cell input channels /
            gcd of the members' input channels. Default: 1.
        cell_outplane_ratio (float | Sequence[float]): Cell output channels
            / gcd of the members' output channels. Default: 1.
        sharing_range (Sequence[str]): Name tokens that are merged when
            grouping layers into warehouses. Default: ``('layer', 'pwconv')``.
        nonlocal_basis_ratio (float): Non-local basis ratio of the KW
            attention (1 disables the basis). Default: 1.
        attention_norm (str): Norm in the KW attention branches, see
            :func:`mmdyn.ops.build_attention_norm`. Default: ``'bn_batch1'``.
        kw_pointwise_stages (Sequence[int], optional): KW stages (1..6) whose
            expansion/projection 1x1 convs are KW convs; the others are plain
            ``nn.Conv2d``. None means all. The stem, the depthwise convs and
            the final 1x1 conv are always KW convs. Default: None.
        init_cfg (dict | list[dict], optional): mmengine init config. The
            network is initialised as the paper's at construction (fan-out
            Kaiming for plain convs, BN 1/0, then the warehouses), so the
            default None keeps that. Default: None.
    """

    # KW stage of each of mmpretrain's seven block settings.
    kw_stage_settings = (1, 2, 3, 4, 5, 6, 6)

    def __init__(self,
                 widen_factor: float = 1.0,
                 out_indices: Sequence[int] = (7, ),
                 frozen_stages: int = -1,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU6'),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 reduction: Ratio = 1 / 16,
                 cell_num_ratio: Ratio = 1,
                 cell_inplane_ratio: Ratio = 1,
                 cell_outplane_ratio: Ratio = 1,
                 sharing_range: Sequence[str] = ('layer', 'pwconv'),
                 nonlocal_basis_ratio: float = 1,
                 attention_norm: str = 'bn_batch1',
                 kw_pointwise_stages: Optional[Sequence[int]] = None,
                 init_cfg=None):
        if isinstance(
                widen_factor,
                bool) or not isinstance(widen_factor,
                                        (int, float)) or widen_factor <= 0:
            raise ValueError('widen_factor must be a positive number, got '
                             f'{widen_factor!r}')
        out_indices = tuple(out_indices)
        for index in out_indices:
            if index not in range(0, 8):
                raise ValueError('out_indices must be in range(0, 8), got '
                                 f'{out_indices}')
        if frozen_stages not in range(-1, 8):
            raise ValueError('frozen_stages must be in range(-1, 8), got '
                             f'{frozen_stages}')
        if kw_pointwise_stages is None:
            kw_pointwise_stages = range(1, 7)
        kw_pointwise_stages = set(kw_pointwise_stages)
        if not kw_pointwise_stages <= set(range(1, 7)):
            raise ValueError('kw_pointwise_stages must be KW stages in 1..6, '
                             f'got {sorted(kw_pointwise_stages)}')
        manager = WarehouseManager(
            reduction=reduction,
            cell_num_ratio=cell_num_ratio,
            cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio,
            sharing_range=tuple(sharing_range),
            nonlocal_basis_ratio=nonlocal_basis_ratio,
            attention_norm=attention_norm)
        # ConvModule initialises its plain conv (fan-out Kaiming) and norm
        # (1 / 0) as the paper does.
        super().__init__(
            widen_factor=widen_factor,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            norm_eval=norm_eval,
            with_cp=with_cp,
            init_cfg=init_cfg)
        out_channel = make_divisible(1280 * max(1.0, widen_factor), 8)
        if out_channel != self.out_channel:
            # mmpretrain truncates 1280 * widen_factor > 1280 instead.
            self.out_channel = out_channel
            self.conv2 = ConvModule(
                self.in_channels,
                out_channel,
                1,
                norm_cfg=norm_cfg,
                act_cfg=act_cfg)
        register_first(self, 'warehouse_manager', manager)
        self._replace_convs(kw_pointwise_stages)
        manager.finalize(self)
        self._freeze_stages()

    def _replace_convs(self, kw_pointwise_stages: set) -> None:
        """Reserve the KW convs in the paper's order and names.

        The stem is ``stage0_conv0``; the convs of a block are
        ``stage{S}_layer{L}_{pwconv0|dwconv0|pwconv1}``, where a block
        setting that starts a new KW stage hands its whole first block over
        to the previous stage, and the final 1x1 conv is a ``pwconv1`` of
        the last stage.
        """
        manager = self.warehouse_manager
        self.conv1.conv = kw_like(manager, 'stage0_conv0', self.conv1.conv)
        layer_idx = 0
        for i, stage in enumerate(self.kw_stage_settings):
            for j, block in enumerate(getattr(self, f'layer{i + 1}')):
                handover = (
                    j == 0 and i > 0
                    and stage != self.kw_stage_settings[i - 1])
                block_stage = stage - 1 if handover else stage
                prefix = f'stage{block_stage}_layer{layer_idx}'
                *expand, depthwise, project = block.conv
                kw_pointwise = block_stage in kw_pointwise_stages
                if expand and kw_pointwise:
                    expand[0].conv = kw_like(manager, f'{prefix}_pwconv0',
                                             expand[0].conv)
                depthwise.conv = kw_like(manager, f'{prefix}_dwconv0',
                                         depthwise.conv)
                if kw_pointwise:
                    project.conv = kw_like(manager, f'{prefix}_pwconv1',
                                           project.conv)
                # The paper restarts the block count after a hand-over; it
                # only shows in the (fused-away) layer index of the names.
                layer_idx = 0 if handover else layer_idx + 1
        self.conv2.conv = kw_like(
            manager, f'stage{self.kw_stage_settings[-1]}_layer{layer_idx}'
            '_pwconv1', self.conv2.conv)

    def init_weights(self):
        if not self._is_init:
            init_dynamic_layers(self)
        super().init_weights()

    def _freeze_stages(self):
        super()._freeze_stages()
        if self.frozen_stages < 0:
            return
        # mmpretrain leaves the stem's norm in training mode.
        self.conv1.eval()
        frozen = [self.conv1] + [
            getattr(self, f'layer{i}')
            for i in range(1, self.frozen_stages + 1)
        ]
        freeze_warehouses(self.warehouse_manager, frozen)

    def train(self, mode: bool = True) -> 'KWMobileNetV2':
        # mmpretrain's MobileNetV2.train (frozen stages, and norm_eval for
        # every BN, the attention branches' included, as the paper's
        # detection backbone does) returns None.
        super().train(mode)
        return self


@MODELS.register_module()
class KW1d2xMobileNetV2(KWMobileNetV2):
    """The paper's 1/2x KW-MobileNetV2 backbone (hard-wired setting).

    Reduction 1/32; sharing ``('layer', )``; plain expansion/projection 1x1
    convs in KW stages 1-5; the stem, every depthwise conv, the stage-6 1x1
    convs and the final 1x1 conv are KW convs. The nine warehouses (stem, dw
    S1..S5, expansion S6, dw S6, projection S6) take the paper's first nine
    per-warehouse ratios. Use it with
    :class:`mmdyn.models.heads.KWLinearClsHead`, which holds the tenth (the
    KW classifier), to get the paper's model.

    Args:
        widen_factor (float): Width multiplier. Default: 1.0.
        **kwargs: Other :class:`KWMobileNetV2` arguments except the KW
            settings fixed here.
    """

    FIXED = dict(
        reduction=1 / 32,
        cell_num_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5),
        cell_inplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5),
        cell_outplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5),
        sharing_range=('layer', ),
        nonlocal_basis_ratio=1,
        kw_pointwise_stages=(6, ))

    def __init__(self, widen_factor: float = 1.0, **kwargs):
        fixed = sorted(set(kwargs) & set(self.FIXED))
        if fixed:
            raise ValueError(f'{fixed[0]} is fixed by KW1d2xMobileNetV2; use '
                             'KWMobileNetV2 to change it')
        super().__init__(widen_factor=widen_factor, **self.FIXED, **kwargs)
