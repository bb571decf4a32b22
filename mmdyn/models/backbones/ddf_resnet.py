# Copyright (c) mmdyn contributors. All rights reserved.
"""DDF-ResNet: ResNet whose bottleneck 3x3 convs are decoupled dynamic filters.

Zhou et al., "Decoupled Dynamic Filter Networks", CVPR 2021
(https://arxiv.org/abs/2104.14107). The official ddf_{mul,add}_resnet{50,101}
are timm 0.4.5's ResNet-50/101 (the same v1.5 network as mmpretrain's ResNet,
including the zero-init of the last BN of each block) with the 3x3 ``conv2``
of every Bottleneck replaced by a DDF layer (``DDFConv2d``), stride included.
"""
from mmpretrain.models.backbones.resnet import Bottleneck
from mmpretrain.registry import MODELS

from .dynamic_resnet import DynamicResNet

COMBINES = ('mul', 'add')


@MODELS.register_module()
class DDFResNet(DynamicResNet):
    """ResNet-50/101/152 with DDF in place of every bottleneck 3x3 conv.

    Args:
        depth (int): 50, 101 or 152 (Bottleneck ResNets only).
        combine (str): How the spatial and channel filters are combined,
            ``'mul'`` or ``'add'``. Default: ``'mul'``.
        se_ratio (float): Squeeze ratio of the channel-filter branch.
            Default: 0.2.
        head (int): Filter heads. Default: 1.
        zero_init_residual (bool): Zero-init the last BN of each block, as
            timm does. Default: True.
        **kwargs: The remaining :class:`mmpretrain.models.ResNet` arguments
            (``out_indices``, ``frozen_stages``, ``norm_eval``,
            ``stage_with_dyconv``...).
    """

    def __init__(self,
                 depth: int,
                 combine: str = 'mul',
                 se_ratio: float = 0.2,
                 head: int = 1,
                 zero_init_residual: bool = True,
                 **kwargs):
        if combine not in COMBINES:
            raise ValueError(f'combine must be one of {COMBINES}, got '
                             f'{combine!r}')
        block = self.arch_settings.get(depth, (None, ))[0]
        if block is not Bottleneck:
            raise ValueError('depth must be a Bottleneck ResNet depth (50, '
                             f'101, 152) for DDF-ResNet, got {depth!r}')
        for key in ('dyconv_cfg', 'dyconv_layers', 'dyconv_downsample'):
            if key in kwargs:
                raise ValueError(f'{key} is fixed by DDFResNet; use '
                                 'DynamicResNet for other placements')
        self.combine = combine
        super().__init__(
            depth,
            dyconv_cfg=dict(
                type='DDFConv2d',
                combine=combine,
                se_ratio=se_ratio,
                head=head),
            dyconv_layers=('conv2', ),
            dyconv_downsample=False,
            zero_init_residual=zero_init_residual,
            **kwargs)
