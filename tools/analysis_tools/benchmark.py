# Copyright (c) mmdyn contributors. All rights reserved.
"""Whole-model inference / training-step latency, throughput and memory.

    python tools/analysis_tools/benchmark.py CONFIG [--compare CONFIG2 ...] \
        [--batch-size 8] [--shape 224 224] [--device cpu|cuda] [--amp] \
        [--mode infer|train] [--repeat 10] [--warmup 2] [--threads N] \
        [--profile]

With ``--compare``, the models are built in one process and their
iterations alternate, and the table gives each one's time ratio to CONFIG
(the median of the per-round ratios). Peak memory: CUDA
``max_memory_allocated``; CPU the resident-set growth during one iteration
(see :mod:`mmdyn.analysis.benchmark`).

On a GPU, a training step of Faster R-CNN R-50 with the DDF-Up FPN against
the stock FPN (DDF-Up runs its Triton kernels on CUDA)::

    python tools/analysis_tools/benchmark.py \
        configs/ddf/faster-rcnn_r50_fpn-ddfup_1x_coco.py \
        --compare mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py \
        --mode train --device cuda --batch-size 2 [--amp]

``--device cuda`` where torch sees no GPU stops with a one-line error.
"""
import argparse

from mmengine.config import DictAction

import mmdyn.compat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Benchmark inference or a training step of configs')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--compare',
        nargs='+',
        default=[],
        help='other config(s), run alternately in the same process')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=None,
        help='H W (default: 224 224 for classifiers, 800 1333 for '
        'detectors)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    parser.add_argument('--amp', action='store_true', help='autocast')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer')
    parser.add_argument(
        '--repeat',
        type=int,
        default=10,
        help='timed rounds (median reported)')
    parser.add_argument(
        '--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch CPU threads (default: torch default)')
    parser.add_argument(
        '--no-memory', action='store_true', help='skip the memory pass')
    parser.add_argument(
        '--profile',
        action='store_true',
        help='print the top operators of one iteration of '
        'each model (torch profiler)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='overrides applied to every config')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # see docs/compat.md
    import torch

    from mmdyn.analysis.benchmark import (benchmark_configs, check_device,
                                          format_results)
    from mmdyn.analysis.progress import tool_logger
    try:
        check_device(args.device)
    except RuntimeError as e:
        raise SystemExit(f'--device: {e}')
    from mmdyn.engine.malloc import MALLOC_TUNING_ENV, tune_malloc
    malloc_tuned = tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = None
    if args.shape is not None:
        if len(args.shape) not in (1, 2):
            raise ValueError(f'--shape takes 1 or 2 values, got {args.shape}')
        shape = (args.shape[0], args.shape[-1])
    results = benchmark_configs(
        [args.config] + list(args.compare),
        mode=args.mode,
        batch_size=args.batch_size,
        shape=shape,
        device=args.device,
        amp=args.amp,
        repeat=args.repeat,
        warmup=args.warmup,
        cfg_options=args.cfg_options,
        measure_memory=not args.no_memory,
        profile=args.profile,
        log=tool_logger().info)
    from mmdyn.analysis.machine import header_lines
    print('\n'.join(header_lines(torch.get_num_threads())))
    print(f'device {args.device}, torch threads {torch.get_num_threads()}, '
          f'amp {args.amp}, {args.repeat} timed rounds after {args.warmup} '
          'warm-up rounds, malloc ' +
          ('tuned' if malloc_tuned else f'defaults ({MALLOC_TUNING_ENV}=0 or '
           'not glibc)'))
    print(format_results(results, args.device))


if __name__ == '__main__':
    main()
