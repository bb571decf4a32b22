# Copyright (c) mmdyn contributors. All rights reserved.
"""ResNet with KernelWarehouse convolutions (KW ResNet-18/34/50/101/152).

Paper: "KernelWarehouse: Rethinking the Design of Dynamic Convolution"
(Li & Yao, ICML 2024), https://arxiv.org/abs/2406.07879
"""
from typing import Optional

from mmcv.cnn.bricks import DropPath
from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmpretrain.registry import MODELS
from torch import nn

from mmdyn.ops import WarehouseManager
from ..utils import build_on_cpu_if_meta, freeze_warehouses, kw_like

#: The ``kw_cfg`` of the KW-1x ResNet configs
#: (``configs/kernelwarehouse/resnet*-kw1x_*.py``).
KW_1X_CFG = dict(
    reduction=1 / 16,
    cell_num_ratio=1,
    cell_inplane_ratio=1,
    cell_outplane_ratio=1,
    nonlocal_basis_ratio=1,
    attention_norm='bn_batch1')


@MODELS.register_module()
class KWResNet(ResNet):
    """ResNet (v1.5) whose block convs come from per-stage kernel warehouses.

    The network is mmpretrain's :class:`ResNet` (same state-dict names for
    the static layers: stem, norms, plain convs) with these convs replaced
    by :class:`~mmdyn.ops.KWConv2d` layers of one
    :class:`~mmdyn.ops.WarehouseManager` (``self.warehouse_manager``):

    * every block conv, except ResNet-50's (Bottleneck) stage-0 first conv1;
    * every stride-2 downsample 1x1 conv (a stride-1 shortcut stays plain).

    One warehouse per stage S holds stage S's convs except the first block's
    conv1 and shortcut, which go to stage S-1 (the hand-over rule; a
    BasicBlock's stage-0 conv1 stays in stage 0). The stem, the norms and the
    classifier are static and KW convs have no bias.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        kw_cfg (dict, optional): :class:`~mmdyn.ops.WarehouseManager`
            options: ``cell_num_ratio``, ``cell_inplane_ratio``,
            ``cell_outplane_ratio``, ``reduction``, ``nonlocal_basis_ratio``,
            ``attention_norm``, ``fc1_bias``, ``sharing_range`` (default
            ``('layer', 'conv')``). Default: None (all defaults: KW 1x).
        drop_path_rate (float): Stochastic depth rate, the same for every
            block (KW does not increase it with depth). Default: 0.
        zero_init_residual (bool): Zero-init the last norm of each block.
            The KW models use the plain 1/0 norm init. Default: False.
        **kwargs: Other :class:`mmpretrain.models.ResNet` arguments.
    """

    def __init__(self,
                 depth: int,
                 kw_cfg: Optional[dict] = None,
                 drop_path_rate: float = 0.0,
                 zero_init_residual: bool = False,
                 **kwargs):
        if drop_path_rate < 0 or drop_path_rate >= 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got '
                             f'{drop_path_rate!r}')
        with build_on_cpu_if_meta(self):
            super().__init__(
                depth,
                zero_init_residual=zero_init_residual,
                drop_path_rate=0.0,
                **kwargs)
        kw_cfg = dict(kw_cfg or {})
        kw_cfg.setdefault('sharing_range', ('layer', 'conv'))
        manager = WarehouseManager(**kw_cfg)
        self._replace_convs(manager)
        self.drop_path_rate = drop_path_rate
        for layer_name in self.res_layers:
            for block in getattr(self, layer_name):
                block.drop_path = DropPath(drop_path_rate) \
                    if drop_path_rate > 0 else nn.Identity()
        self.warehouse_manager = manager
        manager.finalize(self)
        self._freeze_stages()

    def _replace_convs(self, manager: WarehouseManager) -> None:
        # Names follow the official model: block convs are
        # stage{S}_layer{L}_conv{0,1,2}, L counting blocks continuously.
        layer_idx = 0
        for stage, layer_name in enumerate(self.res_layers):
            for j, block in enumerate(getattr(self, layer_name)):
                first = j == 0
                conv1_stage = stage - 1 if first else stage
                if isinstance(block, BasicBlock):
                    conv1_stage = max(conv1_stage, 0)
                    convs = ('conv1', 'conv2')
                elif isinstance(block, Bottleneck):
                    convs = ('conv1', 'conv2', 'conv3')
                else:
                    raise TypeError(f'unsupported block {type(block)}')
                rest_idx = 0 if first else layer_idx
                for k, conv_name in enumerate(convs):
                    if k == 0:
                        if conv1_stage < 0:
                            continue
                        name = f'stage{conv1_stage}_layer{layer_idx}_conv0'
                    else:
                        name = f'stage{stage}_layer{rest_idx}_conv{k}'
                    setattr(block, conv_name,
                            kw_like(manager, name, getattr(block, conv_name)))
                if first and block.downsample is not None and \
                        self.strides[stage] != 1:
                    name = f'stage{stage - 1}_layer{layer_idx + 1}_conv0'
                    for idx, module in enumerate(block.downsample):
                        if isinstance(module, nn.Conv2d):
                            block.downsample[idx] = kw_like(
                                manager, name, module)
                layer_idx = 1 if first else layer_idx + 1

    def _freeze_stages(self):
        super()._freeze_stages()
        # The cells live in the warehouse manager, not in the frozen layers:
        # freeze the warehouses that only frozen stages use. (The stock
        # constructor calls this before the manager exists.)
        manager = getattr(self, 'warehouse_manager', None)
        if manager is None or self.frozen_stages < 0:
            return
        frozen = [
            getattr(self, name)
            for name in self.res_layers[:self.frozen_stages]
        ]
        freeze_warehouses(manager, frozen)

    def train(self, mode: bool = True) -> 'KWResNet':
        # mmpretrain's ResNet.train (frozen stages, norm_eval) returns None;
        # nn.Module's contract (and `net.eval()` chaining) expects the module.
        super().train(mode)
        return self
