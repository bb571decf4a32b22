# Copyright (c) mmdyn contributors. All rights reserved.
"""ResNet whose convolutions are swapped for a dynamic convolution.

ODConv (Li et al., ICLR 2022, https://openreview.net/forum?id=DmpCfq6Mg39)
and DyConv (Chen et al., CVPR 2020, https://arxiv.org/abs/1912.03458) keep
the torchvision v1.5 ResNet and only replace convolutions, so the backbone is
mmpretrain's :class:`~mmpretrain.models.ResNet` built as usual, after which the
selected ``nn.Conv2d`` modules are replaced in place by a layer built from
``dyconv_cfg`` with the same geometry. Everything that is not replaced keeps
its mmpretrain name, so the static parts of an mmpretrain ResNet checkpoint
load into this backbone.
"""
from typing import Iterator, Optional, Sequence, Tuple

from mmpretrain.models.backbones.resnet import ResNet
from mmpretrain.registry import MODELS
from torch import nn

from ..utils import (build_on_cpu_if_meta, check_dyconv_cfg, dynamic_like,
                     init_dynamic_layers, is_pretrained)

BLOCK_CONVS = ('conv1', 'conv2', 'conv3')


@MODELS.register_module()
class DynamicResNet(ResNet):
    """ResNet with dynamic convolutions (ODConv, DyConv, CondConv, ...).

    Defaults follow the official OD_ResNet: every block convolution (both 3x3
    of a BasicBlock; the 1x1, 3x3, 1x1 of a Bottleneck) is dynamic; the stem,
    the downsample shortcuts and the classifier stay static; batch-norm
    weights start at 1 (no zero-init of the last BN of a block). DyConv's
    ResNet also makes the shortcut 1x1 dynamic: ``dyconv_downsample=True``.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        dyconv_cfg (dict): Config of the dynamic layer, built like
            ``conv_cfg`` with the static layer's geometry. Default:
            ``dict(type='ODConv2d', kernel_num=4, reduction=0.0625)``.
        dyconv_layers (Sequence[str]): Block convolutions to replace, a
            subset of ``('conv1', 'conv2', 'conv3')`` (BasicBlock has no
            ``conv3``; it is ignored there). Default: all three.
        dyconv_downsample (bool): Replace the 1x1 shortcut conv of the first
            block of a stage. Default: False.
        dyconv_stem (bool): Replace the stem conv(s). Default: False.
        stage_with_dyconv (Sequence[bool]): Per stage, whether its blocks
            get dynamic layers, like mmdet's ``stage_with_dcn``.
            Default: ``(True, True, True, True)``.
        zero_init_residual (bool): Zero-init the last BN of each block.
            Default: False (the official ODConv/DyConv init).
        **kwargs: The remaining :class:`mmpretrain.models.ResNet` arguments
            (``out_indices``, ``frozen_stages``, ``norm_eval``, ...).

    Example:
        >>> import torch, mmdyn.models
        >>> net = DynamicResNet(18, dyconv_cfg=dict(type='ODConv2d',
        ...                                         kernel_num=1))
        >>> [o.shape for o in net(torch.rand(2, 3, 64, 64))]
        [torch.Size([2, 512, 2, 2])]
    """

    def __init__(self,
                 depth: int,
                 dyconv_cfg: dict = dict(
                     type='ODConv2d', kernel_num=4, reduction=0.0625),
                 dyconv_layers: Sequence[str] = BLOCK_CONVS,
                 dyconv_downsample: bool = False,
                 dyconv_stem: bool = False,
                 stage_with_dyconv: Optional[Sequence[bool]] = None,
                 zero_init_residual: bool = False,
                 **kwargs):
        self.dyconv_cfg = check_dyconv_cfg(dyconv_cfg)
        if isinstance(dyconv_layers, str):
            dyconv_layers = (dyconv_layers, )
        unknown = set(dyconv_layers) - set(BLOCK_CONVS)
        if unknown:
            raise ValueError(f'dyconv_layers must be a subset of '
                             f'{BLOCK_CONVS}, got {tuple(dyconv_layers)!r}')
        self.dyconv_layers = tuple(dyconv_layers)
        self.dyconv_downsample = bool(dyconv_downsample)
        self.dyconv_stem = bool(dyconv_stem)
        with build_on_cpu_if_meta(self):
            super().__init__(
                depth, zero_init_residual=zero_init_residual, **kwargs)
        if stage_with_dyconv is None:
            stage_with_dyconv = (True, ) * self.num_stages
        if len(stage_with_dyconv) != self.num_stages:
            raise ValueError(
                f'stage_with_dyconv must have num_stages='
                f'{self.num_stages} entries, got {tuple(stage_with_dyconv)!r}')
        self.stage_with_dyconv = tuple(bool(s) for s in stage_with_dyconv)
        self._make_dynamic()
        # Re-apply freezing: the new layers were created trainable.
        self._freeze_stages()

    def _convs_to_replace(self) -> Iterator[Tuple[nn.Module, str]]:
        """Yield ``(parent, attribute)`` of every conv to make dynamic."""
        if self.dyconv_stem:
            if self.deep_stem:
                for conv_module in self.stem:
                    yield conv_module, 'conv'
            else:
                yield self, 'conv1'
        for stage, layer_name in enumerate(self.res_layers):
            if not self.stage_with_dyconv[stage]:
                continue
            for block in getattr(self, layer_name):
                for name in self.dyconv_layers:
                    if isinstance(getattr(block, name, None), nn.Conv2d):
                        yield block, name
                if self.dyconv_downsample and block.downsample is not None:
                    for index, m in enumerate(block.downsample):
                        if isinstance(m, nn.Conv2d):
                            yield block.downsample, str(index)

    def _make_dynamic(self) -> None:
        for parent, name in list(self._convs_to_replace()):
            setattr(parent, name,
                    dynamic_like(getattr(parent, name), self.dyconv_cfg))

    def train(self, mode: bool = True) -> 'DynamicResNet':
        # mmpretrain's ResNet.train returns None; nn.Module's contract (and
        # `net.eval()` chaining) expects the module back.
        super().train(mode)
        return self

    def init_weights(self):
        super().init_weights()
        if is_pretrained(self.init_cfg):
            return
        init_dynamic_layers(self)
