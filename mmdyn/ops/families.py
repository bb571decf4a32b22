# Copyright (c) mmdyn contributors. All rights reserved.
"""The layer families of :mod:`mmdyn.ops`, in one table.

Everything that treats the methods differently reads this table instead of
branching per method: registering the layers (:mod:`mmdyn.models.layers`),
the checkpoint check that refuses a checkpoint leaving a family's layers
unset (:mod:`mmdyn.engine.checkpoint`), the attention and filter pictures
(:mod:`mmdyn.analysis.vis_dynamic`) and the multiply-add counter
(:mod:`mmdyn.analysis.flops`). Adding a method is adding one
:class:`LayerFamily` to :data:`FAMILIES`.

torch only.
"""
import re
from typing import Dict, NamedTuple, Optional, Tuple

from torch import nn

from .ddf import DDFConv2d, DDFUpsample
from .dyconv import CondConv2d, DyConv2d
from .kernel_warehouse import KWConv2d, KWLinear
from .odconv import ODConv2d
from .warehouse_manager import WarehouseManager


class LayerFamily(NamedTuple):
    """One method's layers.

    Attributes:
        name (str): How messages name the family (checkpoint reports).
        kind (str): Short key (the pictures' layer kind, file names).
        classes (tuple[type]): Its layer classes.
        registry_names (dict[str, type]): Names under which the layers are
            registered in mmengine's ``MODELS`` (configs' ``type=``).
        tensor_owners (tuple[type]): Modules whose parameters and
            persistent buffers belong to the family (its layers, and for
            KernelWarehouse the manager that holds the shared cells).
        state_dict_keys (tuple[str]): Regular expressions of the
            state-dict keys a layer of the family owns, relative to the
            layer (``re.fullmatch``).
        attention_modules (tuple[str]): The submodules whose outputs are
            the layer's attentions or filters (what the pictures hook).
        madds (str): The method that counts a layer's multiply-adds per
            sample, ``madds(input_hw) -> dict(conv, att, agg, scal)``.
    """
    name: str
    kind: str
    classes: Tuple[type, ...]
    registry_names: Dict[str, type]
    tensor_owners: Tuple[type, ...]
    state_dict_keys: Tuple[str, ...]
    attention_modules: Tuple[str, ...]
    madds: str = 'madds_per_sample'


#: Every family, in the order reports list them.
FAMILIES = (
    LayerFamily(
        name='ODConv',
        kind='odconv',
        classes=(ODConv2d, ),
        registry_names={'ODConv2d': ODConv2d},
        tensor_owners=(ODConv2d, ),
        state_dict_keys=(r'weight', r'bias', r'temperature',
                         r'attention\.(fc|bn|channel_fc|filter_fc|spatial_fc|'
                         r'kernel_fc)\..+'),
        attention_modules=('attention', )),
    LayerFamily(
        name='DyConv/CondConv',
        kind='dyconv',
        classes=(DyConv2d, CondConv2d),
        registry_names={
            'CondConv2d': CondConv2d,
            'DyConv2d': DyConv2d
        },
        tensor_owners=(DyConv2d, CondConv2d),
        state_dict_keys=(r'weight', r'bias', r'temperature',
                         r'attention\.(fc|fc1|fc2|norm)\..+'),
        attention_modules=('attention', )),
    LayerFamily(
        name='KernelWarehouse',
        kind='kw',
        classes=(KWConv2d, KWLinear),
        registry_names={
            'KWConv2d': KWConv2d,
            'KWLinear': KWLinear
        },
        tensor_owners=(KWConv2d, KWLinear, WarehouseManager),
        state_dict_keys=(r'bias', r'temperature',
                         r'attention\.(fc[123]|norm1)\..+',
                         r'attention\.basis_bias', r'warehouse\.weights\.\d+',
                         r'weights\.\d+'),
        attention_modules=('attention', )),
    LayerFamily(
        name='DDF',
        kind='ddf',
        classes=(DDFConv2d, ),
        registry_names={'DDFConv2d': DDFConv2d},
        tensor_owners=(DDFConv2d, ),
        state_dict_keys=(r'bias', r'spatial_branch\..+',
                         r'channel_branch\..+'),
        attention_modules=('channel_branch', 'spatial_branch')),
    LayerFamily(
        name='DDF',
        kind='ddf_up',
        classes=(DDFUpsample, ),
        # Like mmcv's 'carafe', DDF-Up also has a short name.
        registry_names={
            'DDFUpsample': DDFUpsample,
            'ddf_up': DDFUpsample
        },
        tensor_owners=(DDFUpsample, ),
        state_dict_keys=(r'spatial_branch\..+', r'channel_branch\..+'),
        attention_modules=('channel_branch', 'spatial_branch')),
)


def family_of(module: nn.Module) -> Optional[LayerFamily]:
    """The family of a layer (``classes``), or None for another module."""
    for family in FAMILIES:
        if isinstance(module, family.classes):
            return family
    return None


def owning_family(module: nn.Module) -> Optional[LayerFamily]:
    """The family whose tensors ``module`` holds (``tensor_owners``: a layer,
    or a KernelWarehouse manager), or None."""
    for family in FAMILIES:
        if isinstance(module, family.tensor_owners):
            return family
    return None


def owns_key(family: LayerFamily, key: str) -> bool:
    """Whether ``key`` (relative to a layer of ``family``) is one of the
    family's state-dict keys."""
    return any(
        re.fullmatch(pattern, key) for pattern in family.state_dict_keys)


def registry_names() -> Dict[str, type]:
    """Every registered name of every family, with its class."""
    names = {}
    for family in FAMILIES:
        names.update(family.registry_names)
    return names
