# Copyright (c) mmdyn contributors. All rights reserved.
"""Registers the :mod:`mmdyn.ops` layers in mmengine's root ``MODELS``.

mmcv's ``build_conv_layer``/``build_upsample_layer`` look layer names up from
the current scope's registry, which falls back to the root: registering here
makes the layers reachable from mmdet, mmpretrain and plain mmengine configs
(``conv_cfg=dict(type='ODConv2d', ...)``, ``dcn=dict(type='ODConv2d')``,
``upsample_cfg=dict(type='ddf_up')``). The names come from the table of
layer families (:data:`mmdyn.ops.families.FAMILIES`); none of them is a
name another library registers, so nothing is registered over
(``force`` stays off).
"""
from mmengine.registry import MODELS

from mmdyn.ops.families import registry_names

#: Every registered layer name, with its class.
LAYER_NAMES = registry_names()

for _name, _cls in LAYER_NAMES.items():
    if MODELS.module_dict.get(_name) is not _cls:
        MODELS.register_module(name=_name, module=_cls)
