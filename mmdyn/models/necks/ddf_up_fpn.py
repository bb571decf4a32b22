# Copyright (c) mmdyn contributors. All rights reserved.
"""FPN whose top-down upsampling is a learnable upsampler (DDF-Up by default).

DDF-Up comes from `Decoupled Dynamic Filter Networks
<https://arxiv.org/abs/2104.14107>`_ (CVPR 2021), whose detection experiments
replace the nearest-neighbour upsampling of Faster R-CNN's FPN with DDF-Up.
The upsampler of each top-down step can be guided by the lateral feature of
the finer level it merges into (the high-resolution map the result is added
to), which is what a guided ``ddf_up`` receives here.
"""
from typing import List, Sequence, Tuple, Union

import torch.nn.functional as F
from mmcv.cnn import build_upsample_layer
from mmdet.models.necks import FPN
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, MultiConfig, OptConfigType
from mmengine.model import ModuleList
from torch import Tensor, nn

from .pyramid_args import check_feature_maps, check_pyramid_levels

# Upsamplers that mmcv registers with a constructor other than
# ``(channels, scale_factor, ...)``; each gets its own argument mapping.
_INTERPOLATION_UPSAMPLERS = ('nearest', 'bilinear')


def build_upsampler(upsample_cfg: dict,
                    channels: int,
                    scale_factor: int = 2) -> nn.Module:
    """Build a channel-preserving upsampler from an mmcv upsample config.

    Upsamplers with the CARAFE calling convention (``carafe``, ``ddf_up``
    and any layer registered like them) are built as
    ``build_upsample_layer(cfg, channels, scale_factor=scale_factor)``. mmcv's
    ``nearest``/``bilinear`` (``nn.Upsample``), ``deconv`` and
    ``pixel_shuffle`` take other arguments and are mapped here.

    Args:
        upsample_cfg (dict): mmcv upsample config with a ``type``. ``deconv``
            and ``pixel_shuffle`` read an optional ``upsample_kernel``
            (default 4 and 3).
        channels (int): Input and output channels.
        scale_factor (int): Upsampling ratio. Defaults to 2.

    Returns:
        nn.Module: maps ``[B, channels, H, W]`` to
        ``[B, channels, s*H, s*W]``.
    """
    if not isinstance(upsample_cfg, dict) or 'type' not in upsample_cfg:
        raise ValueError('upsample_cfg must be a dict with a "type" key, '
                         f'got {upsample_cfg!r}')
    cfg = dict(upsample_cfg)
    requested = cfg.pop('scale_factor', scale_factor)
    if requested != scale_factor:
        raise ValueError(f'upsample_cfg scale_factor must be {scale_factor} '
                         f'here, got {requested!r}')
    layer_type = cfg['type']
    if layer_type in _INTERPOLATION_UPSAMPLERS:
        # nn.Upsample: align_corners=None silences the nearest-mode warning.
        cfg.setdefault('align_corners',
                       None if layer_type == 'nearest' else False)
        return build_upsample_layer(cfg, scale_factor=scale_factor)
    if layer_type == 'deconv':
        kernel = cfg.pop('upsample_kernel', 4)
        padding = (kernel - 1) // 2
        # out = (in - 1) * s - 2p + k + output_padding == s * in
        output_padding = scale_factor - kernel + 2 * padding
        if not 0 <= output_padding < scale_factor:
            raise ValueError('upsample_cfg upsample_kernel '
                             f'{kernel} cannot give an exact x{scale_factor} '
                             'transposed convolution')
        cfg.update(
            in_channels=channels,
            out_channels=channels,
            kernel_size=kernel,
            stride=scale_factor,
            padding=padding,
            output_padding=output_padding)
        return build_upsample_layer(cfg)
    if layer_type == 'pixel_shuffle':
        cfg.setdefault('upsample_kernel', 3)
        cfg.update(
            in_channels=channels,
            out_channels=channels,
            scale_factor=scale_factor)
        return build_upsample_layer(cfg)
    return build_upsample_layer(cfg, channels, scale_factor=scale_factor)


def fit_to_size(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (bottom/right) or replicate-pad ``x`` to spatial ``size``.

    Keeps pixel ``(y, x)`` of an x2 upsampled map aligned with pixel
    ``(y, x)`` of the finer level, the alignment of nearest-neighbour x2
    upsampling, when a level is not exactly twice the next one (odd sizes).
    """
    height, width = x.shape[-2:]
    target_h, target_w = int(size[0]), int(size[1])
    if (height, width) == (target_h, target_w):
        return x
    x = x[..., :target_h, :target_w]
    pad_h, pad_w = target_h - x.shape[-2], target_w - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode='replicate')
    return x


class TopDownUpsamplingMixin:
    """The learnable top-down path and FPN's extra levels, shared by the DDF-Up
    necks built on mmdet's :class:`FPN` (:class:`DDFUpFPN`, ``DDFUpPAFPN``).

    Uses the attributes FPN builds (``lateral_convs``, ``fpn_convs``,
    ``start_level``, ``backbone_end_level``, ``num_outs``,
    ``add_extra_convs``, ``relu_before_extra_convs``) and the neck's
    ``upsamplers``, one per top-down step.
    """

    def _upsample_into(self, step: int, coarse: Tensor,
                       lateral: Tensor) -> Tensor:
        """Upsample ``coarse`` x2 to the size of the finer ``lateral``."""
        upsampler = self.upsamplers[step]
        if getattr(upsampler, 'guided', False):
            coarse_h, coarse_w = coarse.shape[-2:]
            guidance = fit_to_size(lateral, (2 * coarse_h, 2 * coarse_w))
            up = upsampler(coarse, guidance)
        else:
            up = upsampler(coarse)
        return fit_to_size(up, lateral.shape[-2:])

    def _top_down(self, inputs: Sequence[Tensor]) -> List[Tensor]:
        """The laterals after the top-down merges."""
        laterals = [
            lateral_conv(inputs[i + self.start_level])
            for i, lateral_conv in enumerate(self.lateral_convs)
        ]
        # Top-down: laterals[i - 1] is still the pure lateral when it guides.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._upsample_into(
                i - 1, laterals[i], laterals[i - 1])
        return laterals

    def _with_extra_levels(self, outs: List[Tensor], inputs: Sequence[Tensor],
                           laterals: List[Tensor]) -> tuple:
        """``outs`` (one per used level) plus FPN's extra levels, unchanged
        from :class:`FPN`: max-pooling, or convs on the input, the last lateral
        or the last output."""
        used_levels = len(laterals)
        num_extra = self.num_outs - used_levels
        if num_extra <= 0:
            return tuple(outs)
        if not self.add_extra_convs:
            for _ in range(num_extra):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return tuple(outs)
        sources = {
            'on_input': lambda: inputs[self.backbone_end_level - 1],
            'on_lateral': lambda: laterals[-1],
            'on_output': lambda: outs[-1],
        }
        outs.append(self.fpn_convs[used_levels](
            sources[self.add_extra_convs]()))
        for i in range(used_levels + 1, self.num_outs):
            previous = outs[-1]
            if self.relu_before_extra_convs:
                previous = F.relu(previous)
            outs.append(self.fpn_convs[i](previous))
        return tuple(outs)


@MODELS.register_module()
class DDFUpFPN(TopDownUpsamplingMixin, FPN):
    """FPN with a learnable upsampler in every top-down step.

    Same arguments, layers and outputs as mmdet's :class:`FPN`, except that
    ``upsample_cfg`` is an mmcv upsample-layer config (``type='ddf_up'`` by
    default; ``'carafe'``, ``'pixel_shuffle'``, ``'deconv'``, ``'nearest'``,
    ``'bilinear'`` or any layer registered with the CARAFE calling
    convention also work) and one upsampler is built per top-down step.
    An upsampler whose ``guided`` attribute is true (``ddf_up`` built with
    ``guided=True``) receives the lateral feature of the level it merges into
    as guidance. When a level is not exactly twice the size of the next one,
    the upsampled map (and the guidance) is cropped or replicate-padded at
    the bottom/right to the lateral's size.

    Args:
        in_channels (list[int]): Input channels per scale.
        out_channels (int): Output channels at each scale.
        num_outs (int): Number of output scales.
        start_level (int): First backbone level used. Defaults to 0.
        end_level (int): Last backbone level used (inclusive), -1 for the
            last. Defaults to -1.
        add_extra_convs (bool | str): As in :class:`FPN`. Defaults to False.
        relu_before_extra_convs (bool): Defaults to False.
        no_norm_on_lateral (bool): Defaults to False.
        conv_cfg (dict, optional): Defaults to None.
        norm_cfg (dict, optional): Defaults to None.
        act_cfg (dict, optional): Defaults to None.
        upsample_cfg (dict): Upsampler config, built by
            :func:`build_upsampler` with ``channels=out_channels`` and
            ``scale_factor=2``. Defaults to
            ``dict(type='ddf_up', guided=True)``.
        init_cfg (dict | list[dict]): Defaults to Xavier-uniform on Conv2d as
            in :class:`FPN`; the upsamplers' own ``init_weights`` run after
            it.
    """

    def __init__(
        self,
        in_channels: List[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        end_level: int = -1,
        add_extra_convs: Union[bool, str] = False,
        relu_before_extra_convs: bool = False,
        no_norm_on_lateral: bool = False,
        conv_cfg: OptConfigType = None,
        norm_cfg: OptConfigType = None,
        act_cfg: OptConfigType = None,
        upsample_cfg: ConfigType = dict(type='ddf_up', guided=True),
        init_cfg: MultiConfig = dict(
            type='Xavier', layer='Conv2d', distribution='uniform')
    ) -> None:
        check_pyramid_levels('DDFUpFPN', in_channels, num_outs, start_level,
                             end_level, add_extra_convs)
        if not isinstance(upsample_cfg, dict) or 'type' not in upsample_cfg:
            raise ValueError('upsample_cfg must be a dict with a "type" key '
                             f'(an mmcv upsample layer), got {upsample_cfg!r}')
        # The parent stores upsample_cfg as F.interpolate arguments; give it
        # a harmless value and keep ours.
        super().__init__(
            in_channels=list(in_channels),
            out_channels=out_channels,
            num_outs=num_outs,
            start_level=start_level,
            end_level=end_level,
            add_extra_convs=add_extra_convs,
            relu_before_extra_convs=relu_before_extra_convs,
            no_norm_on_lateral=no_norm_on_lateral,
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            upsample_cfg=dict(mode='nearest'),
            init_cfg=init_cfg)
        self.upsample_cfg = dict(upsample_cfg)
        num_steps = len(self.lateral_convs) - 1
        # mmengine's ModuleList so that init_weights reaches the upsamplers.
        self.upsamplers = ModuleList([
            build_upsampler(self.upsample_cfg, out_channels, 2)
            for _ in range(num_steps)
        ])

    def forward(self, inputs: Tuple[Tensor]) -> tuple:
        """Build the pyramid.

        Args:
            inputs (tuple[Tensor]): Backbone features, one per entry of
                ``in_channels``.

        Returns:
            tuple[Tensor]: ``num_outs`` maps with ``out_channels`` channels.
        """
        check_feature_maps('DDFUpFPN', inputs, self.in_channels)
        laterals = self._top_down(inputs)
        outs = [
            conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)
        ]
        return self._with_extra_levels(outs, inputs, laterals)
