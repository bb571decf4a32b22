"""Registers the :mod:`mmdyn.ops` layers in mmengine's root ``MODELS``.

mmcv's ``build_conv_layer``/``build_upsample_layer`` look layer names up from
the current scope's registry, which falls back to the root: registering here
makes the layers reachable from mmdet, mmpretrain and plain mmengine configs
(``conv_cfg=dict(type='ODConv2d', ...)``, ``dcn=dict(type='ODConv2d')``,
``upsample_cfg=dict(type='ddf_up')``).
"""
from mmengine.registry import MODELS

from mmdyn import ops

CONV_LAYERS = ('CondConv2d', 'DyConv2d', 'ODConv2d', 'KWConv2d', 'KWLinear',
               'DDFConv2d')

for _name in CONV_LAYERS:
    MODELS.register_module(name=_name, module=getattr(ops, _name), force=True)
# DDF-Up, under its class name and, like mmcv's 'carafe', a short name.
MODELS.register_module(name='DDFUpsample', module=ops.DDFUpsample, force=True)
MODELS.register_module(name='ddf_up', module=ops.DDFUpsample, force=True)
