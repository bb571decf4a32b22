# Copyright (c) mmdyn contributors. All rights reserved.
"""Speed and memory of each mmdyn conv layer against a static conv.

For ResNet-50 stage shapes (stage 3: 256->256 at 14x14, stage 1: 64->64 at
56x56, 3x3 kernels) and batch sizes 1/8/32, times the forward (eval,
no_grad) and forward+backward (train, gradients to input and parameters) of
each layer and of ``nn.Conv2d`` of the same shape (DDF against a depthwise
3x3 conv), interleaving the candidates within each repeat and reporting
medians, so that the ratios hold on a shared CPU. Peak memory is the peak
of tensor bytes allocated during one call, from the torch profiler's
allocation records (it excludes oneDNN scratch buffers).

Usage::

    python benchmarks/ops.py                      # print the table
    python benchmarks/ops.py --write              # also update README.md
    python benchmarks/ops.py --batch-sizes 8 --repeat 11 --layers ODConv2d-1x
"""
import argparse
import datetime
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

# 'process' (CPU time of this process) is much less disturbed than wall
# time when other jobs share the cores; with one thread it measures the work.
CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}

SHAPES = {
    'stage3 256->256 14x14': (256, 14),
    'stage1 64->64 56x56': (64, 56),
}


def layer_factories() -> Dict[str, Callable[[int], nn.Module]]:
    """Name -> constructor for every layer importable now.

    A layer a helper has not finished yet (placeholder raising, import error)
    is left out of the table instead of failing the benchmark.
    """
    from mmdyn import ops
    factories = {
        'nn.Conv2d':
        lambda c: nn.Conv2d(c, c, 3, padding=1, bias=False),
        'ODConv2d-1x':
        lambda c: ops.ODConv2d(c, c, 3, padding=1, bias=False, kernel_num=1),
        'ODConv2d-4x':
        lambda c: ops.ODConv2d(c, c, 3, padding=1, bias=False, kernel_num=4),
        'DyConv2d-K4':
        lambda c: ops.DyConv2d(c, c, 3, padding=1, bias=False, kernel_num=4),
        'CondConv2d-K4':
        lambda c: ops.CondConv2d(c, c, 3, padding=1, bias=False, kernel_num=4),
        'KWConv2d-1x':
        lambda c: ops.KWConv2d(c, c, 3, padding=1, bias=False),
        'depthwise nn.Conv2d':
        lambda c: nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        'DDFConv2d-mul':
        lambda c: ops.DDFConv2d(c, c, 3, padding=1, bias=False),
    }
    usable = {}
    for name, make in factories.items():
        try:
            make(16)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f'skipping {name}: {type(err).__name__}: {err}')
            continue
        usable[name] = make
    return usable


def baseline_of(name: str) -> str:
    return 'depthwise nn.Conv2d' if name.startswith('DDF') else 'nn.Conv2d'


def make_step(layer: nn.Module, x: torch.Tensor, train: bool) -> Callable:
    if train:
        layer.train()
        xg = x.clone().requires_grad_()

        def step():
            layer(xg).sum().backward()
            layer.zero_grad(set_to_none=True)
            xg.grad = None
    else:
        layer.eval()

        def step():
            with torch.no_grad():
                layer(x)

    return step


def peak_tensor_bytes(step: Callable) -> int:
    """Peak of live tensor bytes allocated during ``step()``."""
    with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += (
            event.cpu_memory_usage
            if event.name == '[memory]' else event.self_cpu_memory_usage)
        peak = max(peak, live)
    return peak


def measure(names: List[str],
            factories,
            channels: int,
            size: int,
            batch: int,
            train: bool,
            repeat: int,
            warmup: int,
            clock: Callable[[], float] = time.perf_counter):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    steps = {n: make_step(factories[n](channels), x, train) for n in names}
    times = {n: [] for n in names}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeat):
        for n, step in steps.items():
            start = clock()
            step()
            times[n].append(clock() - start)
    return {
        n: (statistics.median(times[n]), peak_tensor_bytes(steps[n]))
        for n in names
    }


def run(args) -> str:
    torch.set_num_threads(args.threads)
    factories = layer_factories()
    names = [
        n for n in factories
        if args.layers is None or n in args.layers or n in (
            'nn.Conv2d', 'depthwise nn.Conv2d')
    ]
    lines = [
        '| shape | batch | layer | fwd ms | fwd ratio | fwd+bwd ms | '
        'fwd+bwd ratio | fwd peak MB | fwd+bwd peak MB |',
        '|---|---:|---|---:|---:|---:|---:|---:|---:|'
    ]
    for shape_name, (channels, size) in SHAPES.items():
        for batch in args.batch_sizes:
            results = {}
            for train in (False, True):
                results[train] = measure(names, factories, channels, size,
                                         batch, train, args.repeat,
                                         args.warmup, CLOCKS[args.clock])
            for n in names:
                base = baseline_of(n)
                fwd, fwd_mem = results[False][n]
                bwd, bwd_mem = results[True][n]
                row = (f'| {shape_name} | {batch} | {n} | {fwd * 1e3:.1f} | '
                       f'{fwd / results[False][base][0]:.2f} | '
                       f'{bwd * 1e3:.1f} | '
                       f'{bwd / results[True][base][0]:.2f} | '
                       f'{fwd_mem / 2**20:.1f} | {bwd_mem / 2**20:.1f} |')
                lines.append(row)
                print(row, flush=True)
    return '\n'.join(lines)


def conditions(args) -> str:
    try:
        load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    except OSError:
        load = 'n/a'
    return (f'{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; '
            f'torch {torch.__version__}, '
            f'{args.threads} threads, {args.clock} clock, '
            f'{args.malloc} malloc (mmdyn.engine.malloc), '
            f'{args.repeat} interleaved repeats '
            f'(median) after {args.warmup} warm-up; load average before the '
            f'run: {load}')


def write_readme(table: str, cond: str, header: str, path: str) -> None:
    begin, end = '<!-- ops-table-begin -->', '<!-- ops-table-end -->'
    block = f'{begin}\n{header}\n\nMeasured {cond}.\n\n{table}\n{end}'
    text = open(path).read() if os.path.exists(path) else ''
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) +
                                                       len(end):]
    else:
        text = text + '\n' + block + '\n'
    with open(path, 'w') as f:
        f.write(text)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--batch-sizes', type=int, nargs='+', default=[1, 8, 32])
    parser.add_argument('--repeat', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument(
        '--clock',
        choices=sorted(CLOCKS),
        default='wall',
        help="'process': CPU time, for a shared machine")
    parser.add_argument(
        '--layers',
        nargs='+',
        default=None,
        help='only these layers (plus their baselines)')
    parser.add_argument(
        '--write',
        action='store_true',
        help='update the table in benchmarks/README.md')
    return parser.parse_args()


def main():
    args = parse_args()
    from mmdyn.analysis.machine import header_lines
    from mmdyn.engine.malloc import tune_malloc
    args.malloc = 'tuned' if tune_malloc() else 'default'
    cond = conditions(args)
    header = '\n'.join(header_lines(args.threads))
    print(header)
    print(cond)
    table = run(args)
    if args.write:
        write_readme(table, cond, header,
                     os.path.join(os.path.dirname(__file__), 'README.md'))


if __name__ == '__main__':
    main()
