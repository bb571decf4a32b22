"""Dynamic convolution operators (torch only).

One method per file: :mod:`.dyconv` (CondConv/DyConv), :mod:`.odconv`,
:mod:`.kernel_warehouse`, :mod:`.ddf` (DDF and DDF-Up). Shared pieces live in
:mod:`.base` and :mod:`.per_sample_conv`.
"""
from .base import (ATTENTION_NORMS, DynamicConv2dBase, TemperatureMixin,
                   build_attention_norm)
from .ddf import DDFConv2d, DDFUpsample, ddf
from .dyconv import CondConv2d, DyConv2d
from .kernel_warehouse import KWConv2d, KWLinear, WarehouseManager
from .odconv import ODConv2d
from .per_sample_conv import per_sample_conv2d

__all__ = [
    'ATTENTION_NORMS', 'DynamicConv2dBase', 'TemperatureMixin',
    'build_attention_norm', 'per_sample_conv2d', 'CondConv2d', 'DyConv2d',
    'ODConv2d', 'KWConv2d', 'KWLinear', 'WarehouseManager', 'ddf',
    'DDFConv2d', 'DDFUpsample'
]
