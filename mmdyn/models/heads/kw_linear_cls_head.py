# Copyright (c) mmdyn contributors. All rights reserved.
"""Classification head whose fully connected layer is a KernelWarehouse linear
layer (the classifier of the paper's 1/2x KW-MobileNetV2)."""
from typing import Optional, Sequence, Tuple, Union

import torch
from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS
from torch import nn

from mmdyn.ops import WarehouseManager


@MODELS.register_module()
class KWLinearClsHead(ClsHead):
    """``Dropout -> KWLinear`` classifier with its own one-warehouse manager.

    The defaults are the paper's 1/2x KW-MobileNetV2 classifier (reduction
    1/32, cell number ratio 1/2, cell input ratio 0.025, cell output ratio
    1: for 1280 -> 1000 that is 20 cells of [1000, 32]). A warehouse only
    couples the layers it holds, so keeping this one in the head gives the
    same model as the paper's single manager.

    Args:
        num_classes (int): Number of classes.
        in_channels (int): Input feature channels.
        dropout_ratio (float): Dropout before the classifier. Default: 0.
        reduction (float): Attention hidden width ratio. Default: 1/32.
        cell_num_ratio (float): Default: 0.5.
        cell_inplane_ratio (float): Default: 0.025.
        cell_outplane_ratio (float): Default: 1.
        attention_norm (str): Norm in the attention branch.
            Default: ``'bn_batch1'``.
        init_cfg (dict, optional): mmengine init config; the KW layer is
            initialised at construction, so the default None keeps the
            paper's init. Default: None.
        **kwargs: :class:`mmpretrain.models.heads.ClsHead` arguments
            (``loss``, ``topk``, ``cal_acc``).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 dropout_ratio: float = 0.,
                 reduction: float = 1 / 32,
                 cell_num_ratio: float = 0.5,
                 cell_inplane_ratio: float = 0.025,
                 cell_outplane_ratio: float = 1,
                 attention_norm: str = 'bn_batch1',
                 init_cfg: Optional[Union[dict, Sequence[dict]]] = None,
                 **kwargs):
        super().__init__(init_cfg=init_cfg, **kwargs)
        if isinstance(
                num_classes,
                bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(
                f'num_classes must be a positive int, got {num_classes!r}')
        if not 0 <= dropout_ratio < 1:
            raise ValueError(
                f'dropout_ratio must be in [0, 1), got {dropout_ratio!r}')
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.dropout = nn.Dropout(dropout_ratio)
        self.warehouse_manager = WarehouseManager(
            reduction=reduction,
            cell_num_ratio=cell_num_ratio,
            cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio,
            sharing_range=('layer', ),
            attention_norm=attention_norm)
        self.fc = self.warehouse_manager.reserve(
            name='classifier',
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=1,
            bias=True,
            layer_type='linear')
        self.warehouse_manager.finalize(self)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The last stage's pooled features [B, C]."""
        return feats[-1]

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.dropout(self.pre_logits(feats)))
