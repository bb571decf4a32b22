# Copyright (c) mmdyn contributors. All rights reserved.
"""Train a model from an mmdet or mmpretrain config with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
        [--allow-partial-load] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm,mpi}]

Distributed: ``bash tools/dist_train.sh CONFIG NUM_PROCS`` (torchrun) or
``bash tools/slurm_train.sh PARTITION JOB CONFIG``. Demo data under
``data/demo_det`` / ``data/demo_cls`` is generated on first use.
"""
import argparse
import os

from mmengine.config import DictAction

import mmdyn.compat
from mmdyn.tool_args import add_runtime_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision training (bfloat16 autocast on CPU)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate with the total batch size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint, or from the latest checkpoint '
        'in the work dir when no path is given')
    add_runtime_arguments(parser)
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, e.g. '
        'train_cfg.max_epochs=2 "optim_wrapper.optimizer.lr=0.01"')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or
    # --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    # imported after parsing: --help needs no torch (mmdyn/tool_args.py)
    from mmdyn.engine.launch import (apply_runtime_arguments, build_runner,
                                     close_process_group, enable_amp,
                                     load_config, set_resume)

    # The pinned libraries' fixes for today's torch/numpy/setuptools
    # (docs/compat.md); importing mmdyn only registers its components.
    mmdyn.compat.apply()
    cfg = load_config(args.config, args.cfg_options, args.launcher,
                      args.work_dir)
    apply_runtime_arguments(args, cfg)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr.'
                             'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    set_resume(cfg, args.resume)
    runner = build_runner(cfg)
    finished = False
    try:
        runner.train()
        finished = True
    finally:
        runner = None  # freed before the process group is closed
        close_process_group(cfg, synchronize=finished)


if __name__ == '__main__':
    main()
