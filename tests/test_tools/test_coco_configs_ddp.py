# Copyright (c) mmdyn contributors. All rights reserved.
"""The COCO detection configs train under DDP with
``find_unused_parameters=False`` (mmengine's default, which the configs keep).

DDP with ``find_unused_parameters=False`` fails in the second iteration if a
trainable parameter got no gradient in the first. Each config's model (its
real structure: dynamic backbone with the frozen stem and stage 1,
norm_eval, neck, RPN, RoI heads; random weights, a tiny image, fewer
proposals) is checked to give every trainable parameter a gradient in a
training step, and one of them runs two iterations in two gloo processes on
CPU. So no config needs ``find_unused_parameters=True`` (an extra traversal
of the autograd graph every iteration).
"""
import glob
import os
import os.path as osp
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METHODS = ('odconv', 'dyconv', 'kernelwarehouse', 'ddf')
# The CARAFE config needs mmcv's CUDA op.
COCO_CONFIGS = sorted(
    osp.relpath(p, REPO) for method in METHODS
    for p in glob.glob(osp.join(REPO, 'configs', method, '*_coco.py'))
    if 'carafe' not in osp.basename(p))
DDP_CONFIG = 'configs/odconv/mask-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py'


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def build_small(config):
    """The config's model with fewer proposals and sampled RoIs (the same
    layers), in mmdet's scope."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(osp.join(REPO, config))
    init_default_scope('mmdet')
    train_cfg = cfg.model.get('train_cfg', {})
    if 'rpn_proposal' in train_cfg:
        train_cfg.rpn_proposal.update(nms_pre=64, max_per_img=32)
    rcnn = train_cfg.get('rcnn')
    for stage in (rcnn if isinstance(rcnn, list) else [rcnn]):
        if stage is not None and 'sampler' in stage:
            stage.sampler.num = 32
    model = MODELS.build(cfg.model)  # no init_weights: no download
    model.train()
    return cfg, model


def tiny_batch(cfg, seed):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    return demo_mm_inputs(
        batch_size=1,
        image_shapes=[(3, 64, 96)],
        num_items=[3],
        num_classes=80,
        with_mask='mask_head' in cfg.model.get('roi_head', {}))


@pytest.mark.parametrize('config', COCO_CONFIGS)
def test_every_trainable_parameter_gets_a_gradient(config):
    import mmdyn.engine  # noqa: F401
    cfg, model = build_small(config)
    data = model.data_preprocessor(tiny_batch(cfg, 0), True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    loss.backward()
    unused = [
        name for name, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    ]
    assert not unused, f'{config}: no gradient for {unused[:5]}'
    frozen = [
        name for name, p in model.named_parameters() if not p.requires_grad
    ]
    # the frozen stem and stage 1 are what DDP leaves out
    assert frozen and all(name.startswith('backbone.') for name in frozen)


def test_coco_configs_keep_find_unused_parameters_false():
    """No config (nor a local base of one) turns the search on; the mmdet bases
    the COCO configs inherit do not set it."""
    assert len(COCO_CONFIGS) >= 8
    setting = re.compile(r'^find_unused_parameters\s*=\s*True', re.M)
    for path in glob.glob(
            osp.join(REPO, 'configs', '**', '*.py'), recursive=True):
        with open(path) as f:
            assert not setting.search(f.read()), path


def _ddp_worker(rank, world_size, port, errors):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        from mmengine.model import MMDistributedDataParallel
        from mmengine.optim import build_optim_wrapper

        import mmdyn.engine  # noqa: F401
        cfg, model = build_small(DDP_CONFIG)
        ddp = MMDistributedDataParallel(
            module=model,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        optim_wrapper = build_optim_wrapper(
            ddp, dict(optimizer=dict(type='SGD', lr=1e-4)))
        for step in range(2):
            losses = ddp.train_step(
                tiny_batch(cfg, rank * 10 + step), optim_wrapper)
            assert torch.isfinite(
                sum(v for k, v in losses.items() if 'loss' in k))
    except Exception as err:
        errors.append(f'rank {rank}: {type(err).__name__}: {err}'[:2000])
        raise
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_without_unused_parameter_search():
    with mp.Manager() as manager:
        errors = manager.list()
        try:
            mp.spawn(
                _ddp_worker,
                args=(2, _free_port(), errors),
                nprocs=2,
                join=True)
        except mp.ProcessRaisedException:
            pass
        assert not list(errors), '\n'.join(errors)
