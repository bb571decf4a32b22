# Copyright (c) mmdyn contributors. All rights reserved.
"""How the attention-branch BatchNorms of dynamic convs interact with SyncBN
conversion and ``norm_eval`` (documented in README, "Distributed training,
SyncBN and norm_eval").

* The attention BNs (``attention_norm='bn_batch1'``, the default) are
  ``_BatchNorm`` subclasses, so ``nn.SyncBatchNorm.convert_sync_batchnorm``
  (mmengine's ``sync_bn='torch'``) converts them with the backbone's BNs and
  their pooled statistics are then averaged over ranks; the batch-1 fallback
  is lost, so a per-rank batch of 1 needs ``attention_norm='ln'`` there.
* ``norm_eval=True`` freezes them like every other BN of the backbone.
"""
import copy

import pytest
import torch
from mmengine.model.utils import revert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdyn.models.backbones import DynamicResNet


def _attention_norms(model):
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith('attention.bn')
    }


@pytest.fixture
def backbone():
    return DynamicResNet(
        depth=18, dyconv_cfg=dict(type='ODConv2d', kernel_num=1))


def test_sync_bn_conversion_covers_attention_norms(backbone):
    norms = _attention_norms(backbone)
    assert len(norms) == 16  # 8 BasicBlocks x 2 ODConv layers
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone))
    synced_norms = _attention_norms(synced)
    assert set(synced_norms) == set(norms)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in synced_norms.values())
    # Same parameters and buffers: checkpoints move between the two freely.
    assert synced.state_dict().keys() == backbone.state_dict().keys()
    # And back (mmengine's helper, used for CPU evaluation of SyncBN models).
    reverted = revert_sync_batchnorm(synced)
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    reverted.eval()
    for a, b in zip(backbone(x), reverted(x)):
        torch.testing.assert_close(a, b)


def test_default_attention_norm_trains_at_batch_one_unlike_plain_bn(backbone):
    backbone.train()
    # 64 px: the backbone's own BNs see 2x2 maps in the last stage.
    out = backbone(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(o).all() for o in out)
    plain = DynamicResNet(
        depth=18,
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, attention_norm='bn'))
    plain.train()
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        plain(torch.randn(1, 3, 64, 64))


def test_norm_eval_freezes_attention_norms():
    backbone = DynamicResNet(
        depth=18,
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1),
        norm_eval=True)
    backbone.train()
    norms = _attention_norms(backbone)
    assert norms and all(not m.training for m in norms.values())
    assert all(not m.training for m in backbone.modules()
               if isinstance(m, _BatchNorm))
    before = {n: m.running_mean.clone() for n, m in norms.items()}
    backbone(torch.randn(2, 3, 32, 32))
    for name, module in norms.items():
        torch.testing.assert_close(module.running_mean, before[name])
