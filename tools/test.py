# Copyright (c) mmdyn contributors. All rights reserved.
"""Evaluate a checkpoint with the config's test loop and metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--allow-partial-load] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm,mpi}]

``--out`` dumps the raw predictions to a pickle (mmdet's ``DumpDetResults``
for detection, which stores masks as RLE; mmengine's ``DumpResults``
otherwise). ``--show-dir`` saves images with the predictions drawn, under
``WORK_DIR/TIMESTAMP/SHOW_DIR`` for detection and ``SHOW_DIR`` for
classification.
"""
import argparse
import os
import os.path as osp

from mmengine.config import DictAction

import mmdyn.compat
from mmdyn.tool_args import add_runtime_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument(
        '--out', help='dump predictions to this pickle file (.pkl)')
    parser.add_argument(
        '--show', action='store_true', help='show predictions in a window')
    parser.add_argument(
        '--show-dir', help='save images with predictions drawn in this dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='seconds per shown image')
    add_runtime_arguments(parser)
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, e.g. '
        'test_dataloader.batch_size=4')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file, got {args.out}')
    return args


def enable_visualization(cfg, show, show_dir, wait_time):
    """Turn on the config's visualization hook (mmdet or mmpretrain)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError(
            '--show/--show-dir need default_hooks.visualization in the '
            f'config (scope {cfg.get("default_scope")!r} has none)')
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        hook.draw = True
        if show_dir:
            hook.test_out_dir = show_dir
    elif scope == 'mmpretrain':
        hook.enable = True
        if show_dir:
            hook.out_dir = osp.abspath(show_dir)
    else:
        raise ValueError('--show/--show-dir support mmdet and mmpretrain '
                         f'configs, not default_scope={scope!r}')
    hook.show = show
    hook.wait_time = wait_time
    hook.interval = 1


def add_dump(cfg, out):
    """Append a predictions-dumping metric to the test evaluator."""
    if cfg.get('default_scope') == 'mmdet':
        dump = dict(type='DumpDetResults', out_file_path=out)
    else:
        dump = dict(type='mmengine.DumpResults', out_file_path=out)
    evaluator = cfg.test_evaluator
    if isinstance(evaluator, (list, tuple)):
        cfg.test_evaluator = list(evaluator) + [dump]
    elif 'metrics' in evaluator:
        metrics = evaluator.metrics
        metrics = list(metrics) if isinstance(metrics, (list, tuple)) \
            else [metrics]
        evaluator.metrics = metrics + [dump]
    else:
        cfg.test_evaluator = [evaluator, dump]


def main(argv=None):
    args = parse_args(argv)
    # imported after parsing: --help needs no torch (mmdyn/tool_args.py)
    from mmdyn.engine.launch import (apply_runtime_arguments, build_runner,
                                     close_process_group, load_config)

    mmdyn.compat.apply()  # docs/compat.md
    cfg = load_config(args.config, args.cfg_options, args.launcher,
                      args.work_dir)
    apply_runtime_arguments(args, cfg)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show, args.show_dir, args.wait_time)
    if args.out:
        add_dump(cfg, args.out)
    runner = build_runner(cfg)
    finished = False
    try:
        metrics = runner.test()
        finished = True
        return metrics
    finally:
        runner = None  # freed before the process group is closed
        close_process_group(cfg, synchronize=finished)


if __name__ == '__main__':
    main()
