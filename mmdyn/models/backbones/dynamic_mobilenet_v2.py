# Copyright (c) mmdyn contributors. All rights reserved.
"""MobileNetV2 whose convolutions are swapped for a dynamic convolution.

The official OD_MobileNetV2 (ODConv, ICLR 2022) makes every convolution of
the inverted residual blocks dynamic (the expansion 1x1, the depthwise 3x3 and
the projection 1x1) as well as the final 1x1 conv to 1280 channels, and keeps
the 3x3 stem and the classifier static. Channel widths are mmpretrain's
(``make_divisible(c * widen_factor, 8)``, 1280 final channels for widen
factors <= 1), which are the official ones.
"""
from typing import Iterator, Sequence, Tuple

from mmpretrain.models.backbones.mobilenet_v2 import MobileNetV2
from mmpretrain.registry import MODELS
from torch import nn

from ..utils import (check_dyconv_cfg, dynamic_like, init_dynamic_layers,
                     is_pretrained)

BLOCK_CONVS = ('expand', 'depthwise', 'project')


@MODELS.register_module()
class DynamicMobileNetV2(MobileNetV2):
    """MobileNetV2 with dynamic convolutions (ODConv, DyConv, ...).

    Args:
        widen_factor (float): Width multiplier. Default: 1.0.
        dyconv_cfg (dict): Config of the dynamic layer, built with the static
            layer's geometry. Default: ``dict(type='ODConv2d', kernel_num=4,
            reduction=0.0625)``. A depthwise ODConv2d drops its filter
            attention by itself (C_in == groups == C_out).
        dyconv_layers (Sequence[str]): Which convs of each inverted residual
            block to replace, a subset of ``('expand', 'depthwise',
            'project')``. Default: all three.
        dyconv_final (bool): Replace the final 1x1 conv (``conv2``, to 1280
            channels). Default: True.
        dyconv_stem (bool): Replace the 3x3 stem conv. Default: False.
        **kwargs: The remaining :class:`mmpretrain.models.MobileNetV2`
            arguments (``out_indices``, ``frozen_stages``, ``norm_eval``,
            ...).
    """

    def __init__(self,
                 widen_factor: float = 1.,
                 dyconv_cfg: dict = dict(
                     type='ODConv2d', kernel_num=4, reduction=0.0625),
                 dyconv_layers: Sequence[str] = BLOCK_CONVS,
                 dyconv_final: bool = True,
                 dyconv_stem: bool = False,
                 **kwargs):
        self.dyconv_cfg = check_dyconv_cfg(dyconv_cfg)
        if isinstance(dyconv_layers, str):
            dyconv_layers = (dyconv_layers, )
        if set(dyconv_layers) - set(BLOCK_CONVS):
            raise ValueError(f'dyconv_layers must be a subset of '
                             f'{BLOCK_CONVS}, got {tuple(dyconv_layers)!r}')
        self.dyconv_layers = tuple(dyconv_layers)
        self.dyconv_final = bool(dyconv_final)
        self.dyconv_stem = bool(dyconv_stem)
        super().__init__(widen_factor=widen_factor, **kwargs)
        for conv_module in list(self._conv_modules_to_replace()):
            conv_module.conv = dynamic_like(conv_module.conv, self.dyconv_cfg)
        self._freeze_stages()

    def _conv_modules_to_replace(self) -> Iterator[nn.Module]:
        """Yield the mmcv ``ConvModule`` s whose ``conv`` becomes dynamic."""
        if self.dyconv_stem:
            yield self.conv1
        for layer_name in self.layers:
            if layer_name == 'conv2':
                continue
            for block in getattr(self, layer_name):
                for kind, conv_module in self._block_convs(block):
                    if kind in self.dyconv_layers:
                        yield conv_module
        if self.dyconv_final:
            yield self.conv2

    @staticmethod
    def _block_convs(block: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
        """Name the ConvModules of an InvertedResidual block by role."""
        conv_modules = list(block.conv)
        if len(conv_modules) == 3:
            yield 'expand', conv_modules[0]
        yield 'depthwise', conv_modules[-2]
        yield 'project', conv_modules[-1]

    def train(self, mode: bool = True) -> 'DynamicMobileNetV2':
        # mmpretrain's MobileNetV2.train returns None; nn.Module's contract
        # (and `net.eval()` chaining) expects the module back.
        super().train(mode)
        return self

    def init_weights(self):
        super().init_weights()
        if is_pretrained(self.init_cfg):
            return
        init_dynamic_layers(self)
