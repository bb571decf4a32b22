# Copyright (c) mmdyn contributors. All rights reserved.
"""Mask R-CNN FCN mask head whose upsampler can be any mmcv upsample layer.

mmdet's :class:`FCNMaskHead` accepts only ``deconv``, ``nearest``,
``bilinear`` and ``carafe``; this subclass also accepts DDF-Up
(``dict(type='ddf_up', scale_factor=2)``, from `Decoupled Dynamic Filter
Networks <https://arxiv.org/abs/2104.14107>`_) and any other layer registered
with the CARAFE calling convention ``(channels, scale_factor, ...)``.
"""
from mmcv.cnn import build_conv_layer
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS
from mmdet.utils import ConfigType

from ..necks.ddf_up_fpn import build_upsampler

# Upsamplers the stock head builds itself (with their own conventions).
_STOCK_UPSAMPLERS = (None, 'deconv', 'nearest', 'bilinear', 'carafe')


@MODELS.register_module()
class DDFUpFCNMaskHead(FCNMaskHead):
    """FCN mask head with a content-aware upsampler (DDF-Up by default).

    Every argument of :class:`FCNMaskHead` is kept. Stock upsampler types
    behave exactly as in the parent; any other ``upsample_cfg['type']`` is
    built by :func:`~mmdyn.models.necks.ddf_up_fpn.build_upsampler` (for
    ``ddf_up``: ``build_upsample_layer(cfg, channels, scale_factor=s)``) with
    ``channels`` the width of the last mask conv, and is followed by the
    logits conv without an activation (as for ``carafe``). RoI features have
    no finer guidance map, so guided upsamplers are refused.

    Args:
        upsample_cfg (dict): Upsampler config with ``type`` and
            ``scale_factor``. Defaults to
            ``dict(type='ddf_up', scale_factor=2)``.
        **kwargs: The other :class:`FCNMaskHead` arguments (``num_convs``,
            ``in_channels``, ``conv_out_channels``, ``num_classes``,
            ``class_agnostic``, ``conv_cfg``, ``norm_cfg``,
            ``predictor_cfg``, ``loss_mask``, ...).
    """

    def __init__(self,
                 *args,
                 upsample_cfg: ConfigType = dict(
                     type='ddf_up', scale_factor=2),
                 **kwargs) -> None:
        if not isinstance(upsample_cfg, dict) or 'type' not in upsample_cfg:
            raise ValueError('upsample_cfg must be a dict with a "type" key, '
                             f'got {upsample_cfg!r}')
        if upsample_cfg['type'] in _STOCK_UPSAMPLERS:
            super().__init__(*args, upsample_cfg=upsample_cfg, **kwargs)
            return
        upsample_cfg = dict(upsample_cfg)
        scale_factor = upsample_cfg.pop('scale_factor', 2)
        if not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError('upsample_cfg scale_factor must be a positive '
                             f'int, got {scale_factor!r}')
        if upsample_cfg.get('guided', False):
            raise ValueError('upsample_cfg guided=True is not supported: the '
                             'mask head has no guidance feature')
        # Build the stock head without an upsampler, then add ours; the
        # upsampler keeps the channel count, so the logits conv built by the
        # parent (on the upsampler's input width) stays valid.
        super().__init__(*args, upsample_cfg=dict(type=None), **kwargs)
        self.upsample_cfg = dict(upsample_cfg, scale_factor=scale_factor)
        self.upsample_method = upsample_cfg['type']
        self.scale_factor = scale_factor
        channels = (
            self.conv_out_channels if self.num_convs > 0 else self.in_channels)
        self.upsample = build_upsampler(upsample_cfg, channels, scale_factor)
        out_channels = 1 if self.class_agnostic else self.num_classes
        self.conv_logits = build_conv_layer(self.predictor_cfg, channels,
                                            out_channels, 1)

    def init_weights(self) -> None:
        """Initialise as :class:`FCNMaskHead`, then the upsampler itself.

        The parent's loop would treat any module with ``weight`` and ``bias``
        as a conv; a dynamic upsampler initialises itself instead.
        """
        upsample = self.upsample
        is_custom = self.upsample_method not in _STOCK_UPSAMPLERS
        if is_custom:
            self.upsample = None
        try:
            super().init_weights()
        finally:
            self.upsample = upsample
        if is_custom and hasattr(upsample, 'init_weights'):
            upsample.init_weights()
