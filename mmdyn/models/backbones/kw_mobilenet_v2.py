"""MobileNetV2 with KernelWarehouse convolutions (KW-MobileNetV2).

`KernelWarehouse: Rethinking the Design of Dynamic Convolution
<https://arxiv.org/abs/2406.07879>`_ (ICML 2024).

Two backbones, both with mmpretrain's ``MobileNetV2`` interface (``conv1``,
``layer1``..``layer7``, ``conv2``; ``out_indices`` 0..7, ``frozen_stages``,
``norm_eval``):

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
from collections import OrderedDict
from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from mmpretrain.models.utils import make_divisible
from mmpretrain.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from mmdyn.ops import KWConv2d, KWLinear, WarehouseManager

Ratio = Union[float, Sequence[float]]


def reinit_kw_layers(module: nn.Module) -> None:
    """Restore the paper's init of the KW attention branches and biases.

    A parent's ``init_cfg`` (e.g. mmpretrain's ConvNeXt classifier, which
    draws every ``Linear`` from a trunc-normal) reaches the attention
    branches before a backbone's own ``init_weights`` runs.
    """
    for m in module.modules():
        if isinstance(m, (KWConv2d, KWLinear)):
            m.init_weights()


def freeze_warehouses(manager: WarehouseManager,
                      frozen: Sequence[nn.Module]) -> None:
    """Stop the gradient of warehouses used only by frozen modules.

    The cells live in the manager, not in the layers, so freezing a stage's
    parameters leaves them trainable; a warehouse shared with a layer that
    is still trained must stay trainable.
    """
    frozen_ids = {
        id(m)
        for module in frozen for m in module.modules()
        if isinstance(m, (KWConv2d, KWLinear))
    }
    trained = set()
    for layer in manager._layers:
        if id(layer) not in frozen_ids:
            trained.add(layer.warehouse_id)
    for idx, cells in enumerate(manager.weights):
        if idx not in trained:
            cells.requires_grad = False


def _conv_norm_act(conv: nn.Module, channels: int, norm_cfg: dict,
                   act_cfg: Optional[dict]) -> nn.Sequential:
    """``conv -> norm [-> act]`` with ConvModule's child names."""
    norm_name, norm = build_norm_layer(norm_cfg, channels)
    layers = [('conv', conv), (norm_name, norm)]
    if act_cfg is not None:
        layers.append(('activate', build_activation_layer(act_cfg)))
    return nn.Sequential(OrderedDict(layers))


class KWInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual whose convs come from a warehouse.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the depthwise 3x3 conv (1 or 2).
        expand_ratio (int): Hidden width / ``in_channels``; 1 drops the
            expansion conv.
        warehouse_manager (WarehouseManager): Manager reserving the KW convs.
        kw_stage (int): KW stage the block's convs are named with.
        layer_idx (int): Block index in the layer names.
        kw_pointwise (bool): Whether the expansion and projection 1x1 convs
            are KW convs (else plain ``nn.Conv2d``). Default: True.
        norm_cfg (dict): Norm config. Default: ``dict(type='BN')``.
        act_cfg (dict): Activation config. Default: ``dict(type='ReLU6')``.
        with_cp (bool): Use gradient checkpointing. Default: False.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 stride: int,
                 expand_ratio: int,
                 warehouse_manager: WarehouseManager,
                 kw_stage: int,
                 layer_idx: int,
                 kw_pointwise: bool = True,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU6'),
                 with_cp: bool = False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}')
        self.stride = stride
        self.with_cp = with_cp
        self.use_res_connect = stride == 1 and in_channels == out_channels
        hidden = int(round(in_channels * expand_ratio))
        prefix = f'stage{kw_stage}_layer{layer_idx}'

        def pointwise(cin, cout, kind):
            if not kw_pointwise:
                return nn.Conv2d(cin, cout, 1, bias=False)
            return warehouse_manager.reserve(
                name=f'{prefix}_{kind}',
                in_channels=cin,
                out_channels=cout,
                kernel_size=1,
                bias=False)

        layers = []
        if expand_ratio != 1:
            layers.append(
                _conv_norm_act(
                    pointwise(in_channels, hidden, 'pwconv0'), hidden,
                    norm_cfg, act_cfg))
        depthwise = warehouse_manager.reserve(
            name=f'{prefix}_dwconv0',
            in_channels=hidden,
            out_channels=hidden,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=hidden,
            bias=False)
        layers.append(_conv_norm_act(depthwise, hidden, norm_cfg, act_cfg))
        layers.append(
            _conv_norm_act(
                pointwise(hidden, out_channels, 'pwconv1'), out_channels,
                norm_cfg, None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):

        def _inner_forward(x):
            out = self.conv(x)
            return x + out if self.use_res_connect else out

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


@MODELS.register_module()
class KWMobileNetV2(BaseBackbone):
    """MobileNetV2 whose convs are KernelWarehouse convs.

    With the defaults this is the paper's ``kw1x_mobilenetv2`` (13
    warehouses); ``cell_num_ratio=4, sharing_range=('layer', )`` gives
    ``kw4x`` (19 warehouses). Pair it with a plain ``GlobalAveragePooling``
    neck and ``LinearClsHead``, as mmpretrain's MobileNetV2.

    Args:
        widen_factor (float): Width multiplier; channels are
            ``make_divisible(c * widen_factor, 8)`` and the last conv has
            ``1280 * max(1, widen_factor)`` channels. Default: 1.0.
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

    # expand ratio, channels, blocks, stride of the first block
    arch_settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2],
                     [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                     [6, 320, 1, 1]]
    # KW stage of each arch setting.
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
        super().__init__(init_cfg)
        if isinstance(widen_factor, bool) or not isinstance(
                widen_factor, (int, float)) or widen_factor <= 0:
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
        self.widen_factor = widen_factor
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        self.warehouse_manager = WarehouseManager(
            reduction=reduction,
            cell_num_ratio=cell_num_ratio,
            cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio,
            sharing_range=tuple(sharing_range),
            nonlocal_basis_ratio=nonlocal_basis_ratio,
            attention_norm=attention_norm)

        in_channels = make_divisible(32 * widen_factor, 8)
        stem = self.warehouse_manager.reserve(
            name='stage0_conv0',
            in_channels=3,
            out_channels=in_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            bias=False)
        self.conv1 = _conv_norm_act(stem, in_channels, norm_cfg, act_cfg)

        self.layers = []
        layer_idx = 0
        for i, (expand, channels, num_blocks,
                stride) in enumerate(self.arch_settings):
            out_channels = make_divisible(channels * widen_factor, 8)
            stage = self.kw_stage_settings[i]
            blocks = []
            for j in range(num_blocks):
                handover = (j == 0 and i > 0
                            and stage != self.kw_stage_settings[i - 1])
                block_stage = stage - 1 if handover else stage
                blocks.append(
                    KWInvertedResidual(
                        in_channels,
                        out_channels,
                        stride if j == 0 else 1,
                        expand,
                        self.warehouse_manager,
                        kw_stage=block_stage,
                        layer_idx=layer_idx,
                        kw_pointwise=block_stage in kw_pointwise_stages,
                        norm_cfg=norm_cfg,
                        act_cfg=act_cfg,
                        with_cp=with_cp))
                in_channels = out_channels
                # The paper restarts the block count after a hand-over; it
                # only shows in the (fused-away) layer index of the names.
                layer_idx = 0 if handover else layer_idx + 1
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.layers.append(f'layer{i + 1}')

        self.out_channel = make_divisible(1280 * max(1.0, widen_factor), 8)
        last_stage = self.kw_stage_settings[-1]
        last = self.warehouse_manager.reserve(
            name=f'stage{last_stage}_layer{layer_idx}_pwconv1',
            in_channels=in_channels,
            out_channels=self.out_channel,
            kernel_size=1,
            bias=False)
        self.conv2 = _conv_norm_act(last, self.out_channel, norm_cfg,
                                    act_cfg)
        self.layers.append('conv2')

        self._init_static_layers()
        self.warehouse_manager.finalize(self)
        self._freeze_stages()

    def _init_static_layers(self):
        """The paper's init of the layers outside the warehouses."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self):
        if not self._is_init:
            reinit_kw_layers(self)
        super().init_weights()

    def forward(self, x) -> Tuple:
        x = self.conv1(x)
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = [self.conv1] + [
            getattr(self, f'layer{i}')
            for i in range(1, self.frozen_stages + 1)
        ]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
        freeze_warehouses(self.warehouse_manager, frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                # Includes the attention-branch BNs, as the paper's
                # detection backbone does.
                if isinstance(m, _BatchNorm):
                    m.eval()
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
