# Copyright (c) mmdyn contributors. All rights reserved.
from .ddf_up_mask_head import DDFUpFCNMaskHead
from .dropout_linear_cls_head import DropoutLinearClsHead
from .kw_linear_cls_head import KWLinearClsHead

__all__ = ['KWLinearClsHead', 'DDFUpFCNMaskHead', 'DropoutLinearClsHead']
