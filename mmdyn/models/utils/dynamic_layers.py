# Copyright (c) mmdyn contributors. All rights reserved.
"""Swap static convolutions for dynamic ones, initialise and freeze them."""
from typing import Sequence, Tuple

from mmcv.cnn import build_conv_layer
from torch import nn

from mmdyn.ops import DynamicConv2dBase, KWConv2d, KWLinear, WarehouseManager


def check_dyconv_cfg(dyconv_cfg) -> dict:
    """Return a copy of ``dyconv_cfg`` after checking it names a layer type.

    Raises:
        ValueError: naming ``dyconv_cfg`` if it is not a dict with ``type``.
    """
    if not isinstance(dyconv_cfg, dict) or 'type' not in dyconv_cfg:
        raise ValueError('dyconv_cfg must be a dict with a "type" key, got '
                         f'{dyconv_cfg!r}')
    return dict(dyconv_cfg)


def conv_geometry(conv: nn.Conv2d) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` that build a conv with the geometry of ``conv``:

    channels, kernel, stride, padding, dilation, groups and bias.
    """
    return ((conv.in_channels, conv.out_channels, conv.kernel_size),
            dict(
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None))


def dynamic_like(conv: nn.Conv2d, dyconv_cfg: dict) -> nn.Module:
    """Build a layer from ``dyconv_cfg`` with the geometry of ``conv``.

    Args:
        conv (nn.Conv2d): The static convolution to mirror (channels, kernel,
            stride, padding, dilation, groups, bias).
        dyconv_cfg (dict): Layer config, e.g. ``dict(type='ODConv2d',
            kernel_num=4, reduction=0.0625)``. Looked up in the current
            scope's ``MODELS`` (falling back to mmengine's root registry,
            where :mod:`mmdyn.models.layers` registers the layers).

    Returns:
        nn.Module: The new layer (on the device of ``conv``'s weight).
    """
    args, kwargs = conv_geometry(conv)
    layer = build_conv_layer(dyconv_cfg, *args, **kwargs)
    return layer.to(conv.weight.device)


def kw_like(manager: WarehouseManager, name: str, conv: nn.Conv2d) -> KWConv2d:
    """Reserve a KW conv with the geometry of ``conv`` from ``manager``.

    Args:
        manager (WarehouseManager): The (not yet finalised) manager.
        name (str): The layer name that groups it into a warehouse
            (``stage{S}_layer{L}_{kind}{J}``).
        conv (nn.Conv2d): The static convolution to mirror (channels, kernel,
            stride, padding, dilation, groups, bias).

    Returns:
        KWConv2d: The reserved layer, usable once ``manager`` is finalised.
    """
    args, kwargs = conv_geometry(conv)
    return manager.reserve(name, *args, **kwargs)


def init_dynamic_layers(module: nn.Module) -> None:
    """Call ``init_weights`` of every dynamic layer under ``module``.

    mmengine's init walk only descends through ``BaseModule`` children and
    stops at mmcv's ``ConvModule``; calling the layers' own initialisation
    makes it authoritative wherever a layer sits, and undoes what an
    ``init_cfg`` (e.g. ``Kaiming`` on ``Conv2d`` of a backbone, or the
    trunc-normal ``Linear`` init of mmpretrain's ConvNeXt classifier) did to
    the attention branches. KW warehouse cells are initialised by their
    manager, not here.
    """
    for m in module.modules():
        if isinstance(m, (DynamicConv2dBase, KWLinear)) and hasattr(
                m, 'init_weights'):
            m.init_weights()


def is_pretrained(init_cfg) -> bool:
    """Whether ``init_cfg`` loads a checkpoint (``type='Pretrained'``)."""
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def freeze_warehouses(manager: WarehouseManager,
                      frozen: Sequence[nn.Module]) -> None:
    """Stop the gradient of warehouses used only by frozen modules.

    The cells live in the manager, not in the layers, so freezing a stage's
    parameters leaves them trainable; a warehouse shared with a layer that is
    still trained stays trainable.
    """
    frozen_ids = {
        id(m)
        for module in frozen
        for m in module.modules() if isinstance(m, (KWConv2d, KWLinear))
    }
    trained = set()
    for layer in manager._layers:
        if id(layer) not in frozen_ids:
            trained.add(layer.warehouse_id)
    for idx, cells in enumerate(manager.weights):
        if idx not in trained:
            cells.requires_grad = False
