# Copyright (c) mmdyn contributors. All rights reserved.
"""NAS-FPN whose upsampling merges use a learnable upsampler (DDF-Up by
default).

In each stage of mmdet's :class:`~mmdet.models.necks.NASFPN` three merge
cells bring a coarser input up to their output level with a hard-wired
``F.interpolate`` (mmcv's ``BaseMergeCell._resize``): ``gp_64_4`` (P6 to P4,
x4), ``sum_43_3`` (P4 to P3, x2) and ``gp_75_6`` (P7 to P6, x2). The cells
apply no conv to their inputs, so upsampling the coarse input before the
cell is the same computation with another upsampler. :class:`DDFUpNASFPN`
does that with one upsampler per such merge (``upsamplers[stage][cell]``);
everything else (layers, state-dict keys) is NASFPN's.
"""
from typing import List, Sequence, Tuple

from mmdet.models.necks import NASFPN
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, MultiConfig, OptConfigType
from mmengine.model import ModuleList
from torch import Tensor, nn

from .ddf_up_fpn import build_upsampler, fit_to_size
from .ddf_up_pafpn import check_upsampler_channels
from .pyramid_args import check_feature_maps, check_pyramid_levels

# The merge cells of a NAS-FPN stage that upsample their first input, and
# by how much.
UPSAMPLING_CELLS = (('gp_64_4', 4), ('sum_43_3', 2), ('gp_75_6', 2))


@MODELS.register_module()
class DDFUpNASFPN(NASFPN):
    """NAS-FPN with a learnable upsampler in its upsampling merges.

    Same arguments, layers and outputs as mmdet's :class:`NASFPN` (five
    levels P3-P7), plus ``upsample_cfg``: an mmcv upsample-layer config,
    unguided (``ddf_up`` without ``guided``, ``carafe``, ``pixel_shuffle``,
    ``deconv``, ``nearest``, ``bilinear``). ``guided=True`` is refused: the
    P7 -> P6 merge has no feature at the output resolution to guide it.

    Args:
        in_channels (list[int]): Input channels per scale.
        out_channels (int): Output channels at each scale.
        num_outs (int): Number of output scales (5).
        stack_times (int): Number of NAS-FPN stages.
        start_level (int): First backbone level used. Defaults to 0.
        end_level (int): Last backbone level used, -1 for the last.
            Defaults to -1.
        norm_cfg (dict, optional): Defaults to None.
        upsample_cfg (dict): Upsampler config, built for each merge with its
            scale factor. Defaults to ``dict(type='ddf_up')``.
        init_cfg (dict | list[dict]): Defaults to Caffe2Xavier on Conv2d as
            in :class:`NASFPN`.
    """

    def __init__(
        self,
        in_channels: List[int],
        out_channels: int,
        num_outs: int,
        stack_times: int,
        start_level: int = 0,
        end_level: int = -1,
        norm_cfg: OptConfigType = None,
        upsample_cfg: ConfigType = dict(type='ddf_up'),
        init_cfg: MultiConfig = dict(type='Caffe2Xavier', layer='Conv2d')
    ) -> None:
        check_upsampler_channels('DDFUpNASFPN', out_channels, upsample_cfg)
        if upsample_cfg.get('guided', False):
            raise ValueError(
                'DDFUpNASFPN: neck.upsample_cfg.guided must be False (the '
                'P7 -> P6 merge has no guidance at its output size); remove '
                'guided=True')
        if num_outs != 5:
            raise ValueError('DDFUpNASFPN: neck.num_outs must be 5 (NAS-FPN '
                             f'builds P3-P7), got {num_outs!r}')
        check_pyramid_levels('DDFUpNASFPN', in_channels, num_outs, start_level,
                             end_level)
        super().__init__(
            in_channels=list(in_channels),
            out_channels=out_channels,
            num_outs=num_outs,
            stack_times=stack_times,
            start_level=start_level,
            end_level=end_level,
            norm_cfg=norm_cfg,
            init_cfg=init_cfg)
        self.upsample_cfg = dict(upsample_cfg)
        self.upsamplers = ModuleList([
            nn.ModuleDict({
                cell:
                build_upsampler(self.upsample_cfg, out_channels, factor)
                for cell, factor in UPSAMPLING_CELLS
            }) for _ in range(stack_times)
        ])

    @staticmethod
    def _up(upsampler: nn.Module, x: Tensor, like: Tensor) -> Tensor:
        return fit_to_size(upsampler(x), like.shape[-2:])

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Build P3-P7 from the backbone features ``inputs``."""
        check_feature_maps('DDFUpNASFPN', inputs, self.in_channels)
        feats = [
            lateral_conv(inputs[i + self.start_level])
            for i, lateral_conv in enumerate(self.lateral_convs)
        ]
        for downsample in self.extra_downsamples:
            feats.append(downsample(feats[-1]))
        p3, p4, p5, p6, p7 = feats
        for stage, up in zip(self.fpn_stages, self.upsamplers):
            p4_1 = stage['gp_64_4'](
                self._up(up['gp_64_4'], p6, p4), p4, out_size=p4.shape[-2:])
            p4_2 = stage['sum_44_4'](p4_1, p4, out_size=p4.shape[-2:])
            p3 = stage['sum_43_3'](
                self._up(up['sum_43_3'], p4_2, p3), p3, out_size=p3.shape[-2:])
            p4 = stage['sum_34_4'](p3, p4_2, out_size=p4.shape[-2:])
            p5_tmp = stage['gp_43_5'](p4, p3, out_size=p5.shape[-2:])
            p5 = stage['sum_55_5'](p5, p5_tmp, out_size=p5.shape[-2:])
            p7_tmp = stage['gp_54_7'](p5, p4_2, out_size=p7.shape[-2:])
            p7 = stage['sum_77_7'](p7, p7_tmp, out_size=p7.shape[-2:])
            p6 = stage['gp_75_6'](
                self._up(up['gp_75_6'], p7, p6), p5, out_size=p6.shape[-2:])
        return p3, p4, p5, p6, p7
