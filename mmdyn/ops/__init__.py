# Copyright (c) mmdyn contributors. All rights reserved.
"""Dynamic convolution operators (torch only).

The paper's math, one method per file: :mod:`.dyconv` (CondConv/DyConv),
:mod:`.odconv`, :mod:`.kernel_warehouse` (the layers; their manager in
:mod:`.warehouse_manager`), :mod:`.ddf` (DDF and DDF-Up). Each layer has
the attentions, a reference forward in plain PyTorch autograd
(``forward_reference``) and the ``nn.Conv2d`` contract (:mod:`.base`);
:mod:`.per_sample_conv` is the plain per-sample convolution they end with.
:mod:`.families` is the table of layer families that registration,
checkpoint checks, pictures and FLOPs counting read; :mod:`.switches`
parses every ``MMDYN_*`` environment switch; :mod:`.capture` tells when a
forward is captured into a graph.

The accelerators are in :mod:`.accel`: the registry of execution paths per
layer family and their thresholds (:mod:`.accel.paths`), the faster paths
themselves, the C loops (:mod:`.accel.c_library`, sources in
``accel/csrc/``), the ``mmdyn::`` custom operators and the Triton DDF
kernels.
"""
from .base import (ATTENTION_NORMS, DynamicConv2dBase, TemperatureMixin,
                   build_attention_norm)
from .ddf import DDFConv2d, DDFUpsample, ddf
from .dyconv import CondConv2d, DyConv2d
from .families import FAMILIES, LayerFamily, family_of
from .kernel_warehouse import KWConv2d, KWLinear
from .odconv import ODConv2d
from .per_sample_conv import per_sample_conv2d
from .warehouse_manager import WarehouseManager

__all__ = [
    'ATTENTION_NORMS', 'DynamicConv2dBase', 'TemperatureMixin',
    'build_attention_norm', 'per_sample_conv2d', 'CondConv2d', 'DyConv2d',
    'ODConv2d', 'KWConv2d', 'KWLinear', 'WarehouseManager', 'ddf', 'DDFConv2d',
    'DDFUpsample', 'FAMILIES', 'LayerFamily', 'family_of'
]
