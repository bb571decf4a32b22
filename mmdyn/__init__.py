"""mmdyn: dynamic convolutions (CondConv/DyConv, ODConv, KernelWarehouse, DDF)
as drop-in layers for the OpenMMLab ecosystem.

``import mmdyn`` needs torch only. ``import mmdyn.models`` registers the
layers, backbones, necks and heads into the OpenMMLab registries and
``import mmdyn.engine`` registers the hooks and the checkpoint compatibility
fixes.
"""
from .version import __version__

__all__ = ['__version__']
