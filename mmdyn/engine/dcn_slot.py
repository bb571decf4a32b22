"""Clear errors for the limits of the ``dcn=`` slot of stock ResNets.

mmdet's ``ResNet(dcn=dict(type='ODConv2d', ...))`` builds the 3x3 conv of
every ``Bottleneck`` of the chosen stages with the given conv type: an easy
way to put a dynamic conv into a stock detector. Its limits (documented
with the paper-faithful alternatives in ``docs/dcn_slot.md``):

* ResNet-18/34 are made of ``BasicBlock``s, which have no ``dcn`` slot:
  mmdet only asserts ``'Not implemented yet.'``. Applied by
  ``import mmdyn.engine``, :func:`patch_dcn_slot_errors` turns that into an
  error that names the way forward (``mmpretrain.DynamicResNet`` /
  ``mmpretrain.KWResNet``, which take depth 18 and 34).
* mmpretrain's ``ResNet`` has no ``dcn`` argument at all (a ``TypeError``
  about an unexpected keyword): the same error, naming the alternatives.
* ``KWConv2d`` in the slot works, but each layer gets a private warehouse,
  not the warehouses shared across a stage that KernelWarehouse's
  parameter budget relies on: that is documented, not an error.
"""
import functools
import importlib.abc
import sys

__all__ = ['DcnSlotError', 'patch_dcn_slot_errors']

_PAPER_BACKBONES = (
    "the papers' backbones take any depth: backbone=dict(_delete_=True, "
    "type='mmpretrain.DynamicResNet', depth=18, out_indices=(0, 1, 2, 3), "
    "dyconv_cfg=dict(type='ODConv2d', kernel_num=1)) (ODConv, DyConv, "
    "CondConv) or type='mmpretrain.KWResNet' (KernelWarehouse, shared "
    'warehouses); see docs/dcn_slot.md')


class DcnSlotError(ValueError):
    """A ``dcn=`` setting that the chosen stock backbone cannot take."""


def _basic_block_init(original):

    @functools.wraps(original)
    def __init__(self, *args, dcn=None, **kwargs):
        if dcn is not None:
            layer = dcn.get('type') if isinstance(dcn, dict) else dcn
            raise DcnSlotError(
                f'mmdet ResNet-18/34 (BasicBlock) has no dcn= slot, got dcn='
                f'{layer!r}: use depth=50/101/152 (Bottleneck blocks have the '
                f'slot), or {_PAPER_BACKBONES}')
        return original(self, *args, dcn=dcn, **kwargs)

    __init__.__mmdyn_wrapped__ = original
    return __init__


def _mmpretrain_resnet_init(original):

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if 'dcn' in kwargs or 'stage_with_dcn' in kwargs:
            raise DcnSlotError(
                f'mmpretrain {type(self).__name__} has no dcn= argument '
                "(that is mmdet's ResNet; mmpretrain's conv_cfg would "
                'convert the stem, the 1x1 convs and the shortcuts too): '
                "use mmdet's ResNet (type='mmdet.ResNet', depth >= 50), or "
                f'{_PAPER_BACKBONES}')
        return original(self, *args, **kwargs)

    __init__.__mmdyn_wrapped__ = original
    return __init__


def _patch_basic_block(module):
    block = module.BasicBlock
    if not hasattr(block.__init__, '__mmdyn_wrapped__'):
        block.__init__ = _basic_block_init(block.__init__)


def _patch_mmpretrain_resnet(module):
    resnet = module.ResNet
    if not hasattr(resnet.__init__, '__mmdyn_wrapped__'):
        resnet.__init__ = _mmpretrain_resnet_init(resnet.__init__)


_PATCHES = {
    'mmdet.models.backbones.resnet': _patch_basic_block,
    'mmpretrain.models.backbones.resnet': _patch_mmpretrain_resnet,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Applies a patch of :data:`_PATCHES` as soon as its module has been
    executed, so that ``import mmdyn.engine`` does not import mmdet's and
    mmpretrain's model packages (two seconds) only to patch them."""

    def find_spec(self, name, path=None, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def patch_dcn_slot_errors():
    """Wrap mmdet's ``BasicBlock`` and mmpretrain's ``ResNet`` constructors
    to raise :class:`DcnSlotError` for a ``dcn`` they cannot take
    (idempotent; other arguments pass through unchanged). Modules not
    imported yet are patched when they are."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


patch_dcn_slot_errors()
