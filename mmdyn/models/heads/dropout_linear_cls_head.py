# Copyright (c) mmdyn contributors. All rights reserved.
"""Linear classification head with dropout before the classifier.

The ODConv/KernelWarehouse classification models end in
GAP -> Dropout(p) -> Linear. mmpretrain's ``LinearClsHead`` has no dropout;
with its ``GlobalAveragePooling`` neck this head completes that layout.
Dropout has no parameters, so checkpoints of ``LinearClsHead`` load as is.
"""
from typing import Tuple

import torch
from mmpretrain.models.heads import LinearClsHead
from mmpretrain.registry import MODELS
from torch import nn


@MODELS.register_module()
class DropoutLinearClsHead(LinearClsHead):
    """``LinearClsHead`` with ``nn.Dropout(dropout)`` before the ``fc``.

    Args:
        num_classes (int): Number of categories.
        in_channels (int): Channels of the pooled feature.
        dropout (float): Drop probability in [0, 1). 0 disables dropout.
            Default: 0.
        **kwargs: The remaining :class:`mmpretrain.models.LinearClsHead`
            arguments (``loss``, ``topk``, ``cal_acc``, ``init_cfg``; the
            default init is ``Normal(std=0.01)`` on the Linear, as the
            official models).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 dropout: float = 0.,
                 **kwargs):
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0 <= dropout < 1):
            raise ValueError(f'dropout must be a float in [0, 1), got '
                             f'{dropout!r}')
        super().__init__(num_classes, in_channels, **kwargs)
        self.dropout = nn.Dropout(p=float(dropout)) if dropout > 0 else \
            nn.Identity()

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """Logits of the last feature, after dropout."""
        # Dropout stays out of pre_logits so extracted features are not
        # randomly masked.
        return self.fc(self.dropout(self.pre_logits(feats)))
