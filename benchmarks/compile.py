# Copyright (c) mmdyn contributors. All rights reserved.
"""First-compile and steady-state time of ``torch.compile`` against eager for
the ResNet-50 backbones of mmdyn on CPU (eval, no_grad).

For each model: the eager forward (median of ``--repeat`` calls after a
warm-up), the first compiled call (compile time included) and the compiled
forward after it (median). Prints a Markdown table with the date, the
machine and its load (``os.getloadavg``) for benchmarks/compile.md.

Usage::

    python benchmarks/compile.py                        # batch 8, inductor
    python benchmarks/compile.py --batch 2 --size 112 --backend aot_eager
"""
import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from mmdyn.models.backbones import DDFResNet, DynamicResNet, KWResNet

MODELS = {
    'ODConv-1x ResNet-50':
    lambda: DynamicResNet(
        50, dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625)),
    'KW-1x ResNet-50':
    lambda: KWResNet(50),
    'DDF-ResNet-50':
    lambda: DDFResNet(50),
}


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, batch, size, backend, repeat):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up: C loops built, workspaces allocated
        eager = median_time(lambda: model(x), repeat)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        compiled(x)
        first = time.perf_counter() - start
        steady = median_time(lambda: compiled(x), repeat)
    return eager, first, steady


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument(
        '--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    machine = platform.processor() or platform.machine()
    print(f'{datetime.date.today()}, {machine}, '
          f'{os.cpu_count()} CPUs, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, load average {load}; '
          f'batch {args.batch}, {args.size}x{args.size}, backend '
          f'{args.backend}, median of {args.repeat}\n')
    print('| model | eager (s) | first compiled call (s) | compiled (s) | '
          'compiled / eager |')
    print('|---|---|---|---|---|')
    for name in args.models:
        eager, first, steady = measure(name, args.batch, args.size,
                                       args.backend, args.repeat)
        print(
            f'| {name} | {eager:.3f} | {first:.1f} | {steady:.3f} | '
            f'{steady / eager:.2f} |',
            flush=True)


if __name__ == '__main__':
    main()
