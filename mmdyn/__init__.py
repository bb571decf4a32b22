# Copyright (c) mmdyn contributors. All rights reserved.
"""mmdyn: dynamic convolutions (CondConv/DyConv, ODConv, KernelWarehouse, DDF)
as drop-in layers for the OpenMMLab ecosystem.

``import mmdyn`` needs torch only. ``import mmdyn.models`` registers the
layers, backbones, necks and heads into the OpenMMLab registries and
``import mmdyn.engine`` registers the hooks, training loops and optimizer
wrapper; importing them changes nothing else in other libraries. The fixes
that the pinned OpenMMLab releases need on today's torch, numpy and
setuptools are applied explicitly, by :func:`mmdyn.compat.apply`.
"""
from .version import __version__

__all__ = ['__version__']
