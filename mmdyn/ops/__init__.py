"""Dynamic convolution operators (torch only).

One method per file, each layer with a reference forward that follows its
paper: :mod:`.dyconv` (CondConv/DyConv), :mod:`.odconv`,
:mod:`.kernel_warehouse` (the layers; their manager in
:mod:`.warehouse_manager`), :mod:`.ddf` (DDF and DDF-Up). Which faster path
a layer takes, and every threshold of that choice, is in :mod:`.fast_paths`;
the CPU paths and their C loops are in :mod:`.kernel_warehouse_cpu`,
:mod:`.ddf_cpu`, :mod:`.winograd` (Winograd F(2x2, 3x3) inference of
per-sample 3x3 kernels) and :mod:`.per_sample_conv`. Shared pieces live in
:mod:`.base` and :mod:`.c_library` (building and loading the C loops,
whose sources are in ``csrc/``); :mod:`.custom_ops` makes each C loop a
``torch.library`` operator of the ``mmdyn`` namespace.
"""
from .base import (ATTENTION_NORMS, DynamicConv2dBase, TemperatureMixin,
                   build_attention_norm)
from .ddf import DDFConv2d, DDFUpsample, ddf
from .dyconv import CondConv2d, DyConv2d
from .kernel_warehouse import KWConv2d, KWLinear
from .warehouse_manager import WarehouseManager
from .odconv import ODConv2d
from .per_sample_conv import per_sample_conv2d

__all__ = [
    'ATTENTION_NORMS', 'DynamicConv2dBase', 'TemperatureMixin',
    'build_attention_norm', 'per_sample_conv2d', 'CondConv2d', 'DyConv2d',
    'ODConv2d', 'KWConv2d', 'KWLinear', 'WarehouseManager', 'ddf',
    'DDFConv2d', 'DDFUpsample'
]
