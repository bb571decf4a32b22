# Copyright (c) mmdyn contributors. All rights reserved.
"""PAFPN whose top-down upsampling is a learnable upsampler (DDF-Up by
default).

mmdet's :class:`~mmdet.models.necks.PAFPN` upsamples with a hard-wired
``F.interpolate(..., mode='nearest')``, so no config key can put DDF-Up into
it. :class:`DDFUpPAFPN` keeps PAFPN's arguments, layers (state-dict keys
included) and bottom-up path, and replaces each top-down nearest-neighbour
step with an upsampler built from ``upsample_cfg``, exactly as
:class:`~mmdyn.models.necks.DDFUpFPN` does for FPN.
"""
from typing import List, Sequence, Tuple, Union

from mmdet.models.necks import PAFPN
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, MultiConfig, OptConfigType
from mmengine.model import ModuleList
from torch import Tensor

from .ddf_up_fpn import TopDownUpsamplingMixin, build_upsampler
from .pyramid_args import check_feature_maps, check_pyramid_levels


def check_upsampler_channels(neck: str, out_channels,
                             upsample_cfg: dict) -> None:
    """Raise a one-line ``ValueError`` naming the config key when a channel-
    preserving upsampler cannot work in ``neck``.

    A DDF-Up (or CARAFE) step maps ``out_channels`` channels to the same
    number and is guided by a lateral of ``out_channels`` channels, so every
    pyramid level must have the same width.

    Args:
        neck (str): Neck class name, for the message.
        out_channels: The neck's ``out_channels``.
        upsample_cfg: The neck's ``upsample_cfg``.
    """
    if isinstance(out_channels, bool) or not isinstance(out_channels,
                                                        int) or \
            out_channels <= 0:
        raise ValueError(
            f'{neck}: neck.out_channels must be one positive int shared by '
            'every level (DDF-Up maps a level into the next with the same '
            f'channels), got {out_channels!r}; set neck.out_channels to an '
            'int or keep the nearest-neighbour neck')
    if not isinstance(upsample_cfg, dict) or 'type' not in upsample_cfg:
        raise ValueError(f'{neck}: neck.upsample_cfg must be a dict with a '
                         f'"type" key (an mmcv upsample layer such as '
                         f'"ddf_up"), got {upsample_cfg!r}')
    guide = upsample_cfg.get('guide_channels')
    if guide is not None and guide != out_channels:
        raise ValueError(
            f'{neck}: neck.upsample_cfg.guide_channels ({guide}) must equal '
            f'neck.out_channels ({out_channels}): the guidance is the '
            'lateral feature of the finer level; remove guide_channels')


@MODELS.register_module()
class DDFUpPAFPN(TopDownUpsamplingMixin, PAFPN):
    """PAFPN with a learnable upsampler in every top-down step.

    Same arguments, layers and outputs as mmdet's :class:`PAFPN`, except
    that ``upsample_cfg`` is an mmcv upsample-layer config (``ddf_up``,
    guided by the lateral feature it merges into, by default; ``carafe``,
    ``pixel_shuffle``, ``deconv``, ``nearest`` or ``bilinear`` work too, see
    :func:`~mmdyn.models.necks.ddf_up_fpn.build_upsampler`) and one
    upsampler is built per top-down step (``upsamplers``). The bottom-up
    path and the extra levels are PAFPN's.

    Args:
        in_channels (list[int]): Input channels per scale.
        out_channels (int): Output channels at each scale.
        num_outs (int): Number of output scales.
        start_level (int): First backbone level used. Defaults to 0.
        end_level (int): Last backbone level used (inclusive), -1 for the
            last. Defaults to -1.
        add_extra_convs (bool | str): As in :class:`PAFPN`.
            Defaults to False.
        relu_before_extra_convs (bool): Defaults to False.
        no_norm_on_lateral (bool): Defaults to False.
        conv_cfg (dict, optional): Defaults to None.
        norm_cfg (dict, optional): Defaults to None.
        act_cfg (dict, optional): Defaults to None.
        upsample_cfg (dict): Upsampler config. Defaults to
            ``dict(type='ddf_up', guided=True)``.
        init_cfg (dict | list[dict]): Defaults to Xavier-uniform on Conv2d
            as in :class:`PAFPN`; the upsamplers keep their own init.
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
        check_upsampler_channels('DDFUpPAFPN', out_channels, upsample_cfg)
        check_pyramid_levels('DDFUpPAFPN', in_channels, num_outs, start_level,
                             end_level, add_extra_convs)
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
            init_cfg=init_cfg)
        self.upsample_cfg = dict(upsample_cfg)
        self.upsamplers = ModuleList([
            build_upsampler(self.upsample_cfg, out_channels, 2)
            for _ in range(len(self.lateral_convs) - 1)
        ])

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Build the pyramid from the backbone features ``inputs``."""
        check_feature_maps('DDFUpPAFPN', inputs, self.in_channels)
        return self._bottom_up_outputs(inputs, self._top_down(inputs))

    def _bottom_up_outputs(self, inputs: Sequence[Tensor],
                           laterals: List[Tensor]) -> Tuple[Tensor, ...]:
        """PAFPN's output convs, bottom-up path and extra levels."""
        levels = len(laterals)
        inter_outs = [self.fpn_convs[i](laterals[i]) for i in range(levels)]
        for i in range(levels - 1):
            inter_outs[i + 1] = inter_outs[i + 1] + self.downsample_convs[i](
                inter_outs[i])
        outs = [inter_outs[0]] + [
            self.pafpn_convs[i - 1](inter_outs[i]) for i in range(1, levels)
        ]
        return self._with_extra_levels(outs, inputs, laterals)
