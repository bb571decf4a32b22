# Copyright (c) mmdyn contributors. All rights reserved.
from .ddf_resnet import DDFResNet
from .dynamic_mobilenet_v2 import DynamicMobileNetV2
from .dynamic_resnet import DynamicResNet
from .kw_convnext import KWConvNeXt
from .kw_mobilenet_v2 import KW1d2xMobileNetV2, KWMobileNetV2
from .kw_resnet import KWResNet

__all__ = [
    'KWConvNeXt', 'KWMobileNetV2', 'KW1d2xMobileNetV2', 'KWResNet',
    'DDFResNet', 'DynamicMobileNetV2', 'DynamicResNet'
]
