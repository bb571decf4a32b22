# Copyright (c) mmdyn contributors. All rights reserved.
"""Every execution path of ODConv (one kernel) and DyConv (K kernels) on the
ResNet-50 3x3 layers, as a ratio to ``nn.Conv2d`` of the same shape.

For each 3x3 layer shape of a ResNet-50 at 224 px (stages 1-4, the stride-2
first layers of stages 2-4 included), each batch size and each mode (eval:
forward under ``no_grad``; train: forward and backward, gradients to the
input and the parameters), times ``nn.Conv2d`` and the layer with every
path of its family's table (:data:`mmdyn.ops.accel.paths.PATHS`) that can
run there forced by ``impl``, plus ``impl='auto'`` (the threshold rule,
tuning off; the path it took is printed). The candidates alternate within
each repeat and the medians are reported, so that the ratios hold on a
shared CPU; ``--clock process`` (CPU time of this process) is the less
disturbed clock there.

The output names the machine (:func:`mmdyn.analysis.machine.header_lines`:
CPU model, ISA, threads, load): the rules of
:mod:`mmdyn.ops.accel.thresholds` are set from these tables, per ISA.

Usage::

    python benchmarks/vendor_paths.py                     # all, 1 thread
    python benchmarks/vendor_paths.py --threads 2 --clock wall
    python benchmarks/vendor_paths.py --layers ODConv2d-1x --batch-sizes 8
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}

#: ResNet-50 3x3 convs at 224 px: name -> (channels, input size, stride).
SHAPES = {
    'stage1 64 56x56': (64, 56, 1),
    'stage2 128 56->28 s2': (128, 56, 2),
    'stage2 128 28x28': (128, 28, 1),
    'stage3 256 28->14 s2': (256, 28, 2),
    'stage3 256 14x14': (256, 14, 1),
    'stage4 512 14->7 s2': (512, 14, 2),
    'stage4 512 7x7': (512, 7, 1),
}


def layer_factories() -> Dict[str, Tuple[str, Callable]]:
    """Name -> (path family, constructor ``(channels, stride, impl)``)."""
    from mmdyn import ops
    return {
        'ODConv2d-1x': ('odconv', lambda c, s, impl: ops.ODConv2d(
            c, c, 3, s, 1, bias=False, kernel_num=1, impl=impl)),
        'DyConv2d-K4': ('mixture', lambda c, s, impl: ops.DyConv2d(
            c, c, 3, s, 1, bias=False, kernel_num=4, impl=impl)),
    }


def runnable_paths(family: str, layer, x: torch.Tensor,
                   train: bool) -> List[str]:
    """The paths of ``family``'s table that can run ``layer`` on ``x`` in this
    mode (``export`` left out: a graph form)."""
    from mmdyn.ops.accel.paths import PATHS
    with torch.set_grad_enabled(train):
        context = layer.attentions(x) if family == 'odconv' else \
            (layer.routing_weights(x), )
        return [
            path.name for path in PATHS[family]
            if path.name != 'export' and path.can_run(layer, x, context)
        ]


def step(module: nn.Module, x: torch.Tensor, train: bool) -> None:
    if not train:
        with torch.no_grad():
            module(x)
        return
    x = x.detach().requires_grad_()
    module(x).sum().backward()


def measure(name: str, family: str, factory: Callable, shape: tuple,
            batch: int, train: bool, args) -> str:
    """One table row: ``nn.Conv2d``'s time and every path's ratio to it."""
    channels, size, stride = shape
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    conv = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
    auto = factory(channels, stride, 'auto')
    paths = runnable_paths(family, auto, x, train)
    candidates = {'nn.Conv2d': conv, 'auto': auto}
    for path in paths:
        layer = factory(channels, stride, path)
        layer.load_state_dict(auto.state_dict())
        candidates[path] = layer
    for module in candidates.values():
        module.train(train)
    clock = CLOCKS[args.clock]
    times = {key: [] for key in candidates}
    for i in range(args.warmup + args.repeat):
        for key, module in candidates.items():
            start = clock()
            step(module, x, train)
            if i >= args.warmup:
                times[key].append(clock() - start)
    base = statistics.median(times['nn.Conv2d'])
    ratios = ' '.join(f'{key} {statistics.median(times[key]) / base:.2f}'
                      for key in candidates if key != 'nn.Conv2d')
    mode = 'train' if train else 'eval'
    return (f'| {name} | {shape_name(shape)} | b{batch} {mode} | '
            f'{base * 1e3:.1f} ms | {auto.last_path} | {ratios} |')


def shape_name(shape: tuple) -> str:
    for name, value in SHAPES.items():
        if value == shape:
            return name
    return str(shape)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument(
        '--modes',
        nargs='+',
        choices=['eval', 'train'],
        default=['eval', 'train'])
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument(
        '--clock',
        choices=sorted(CLOCKS),
        default='process',
        help="'process': CPU time (one thread, a shared machine)")
    parser.add_argument(
        '--layers', nargs='+', default=None, help='only these layers')
    parser.add_argument(
        '--shapes',
        nargs='+',
        default=None,
        help='only shapes whose name contains one of these words')
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from mmdyn.analysis.machine import header_lines
    from mmdyn.ops.accel import autotune
    autotune.disable()  # 'auto' is the threshold rule here
    print('\n'.join(header_lines(torch.get_num_threads())))
    print(f'- clock {args.clock}; median of {args.repeat} repeats after '
          f'{args.warmup} warm-up; ratios: time / nn.Conv2d\n')
    print('| layer | shape | batch, mode | nn.Conv2d | auto took | '
          'time / nn.Conv2d per path |')
    print('|---|---|---|---|---|---|')
    for name, (family, factory) in layer_factories().items():
        if args.layers and name not in args.layers:
            continue
        for shape_key, shape in SHAPES.items():
            if args.shapes and not any(w in shape_key for w in args.shapes):
                continue
            for batch in args.batch_sizes:
                for mode in args.modes:
                    print(
                        measure(name, family, factory, shape, batch,
                                mode == 'train', args),
                        flush=True)


if __name__ == '__main__':
    main()
