# Copyright (c) mmdyn contributors. All rights reserved.
"""Activation memory and CPU time of a training step of the dynamic ResNet-50s
against ResNet-50, with and without the ``'recompute'`` path (per-sample
kernels rebuilt in the backward, :mod:`mmdyn.ops.accel. recompute`).

For ODConv-1x, KW-1x and DyConv-4x ResNet-50 and the static ResNet-50
(backbones, ``train()`` mode, loss = mean of squares of the last stage):

* saved MiB: the bytes of the distinct storages autograd keeps for the
  backward of one step (:class:`mmdyn.analysis.memory.SavedTensorBytes`,
  parameters and buffers excluded), which is the step's peak of saved
  activations; a count, not a timing, exact on any machine;
* step s (``--time``): the median wall time of forward + backward, the
  policies interleaved step by step in one process (a loaded machine slows
  them alike).

Three policies, set through ``THRESHOLDS['recompute']`` (one CPU
threshold per family):

* ``old``: 0, the path never taken on CPU (the paths before it; KW's
  ``groups=1`` layers still take ``'mixture_gemm'``, keeping their
  mixtures);
* ``default``: the CPU defaults of :mod:`mmdyn.ops.accel.thresholds`
  (KW: ``'mixture_gemm'`` rebuilding the mixtures where ``n <= H' W'``);
* ``always``: infinity, every dynamic layer in training (what
  ``impl='auto'`` does on accelerators).

``--capture``: the per-sample conv under ``torch.compile`` in training
(forward + backward of ``per_sample_conv2d`` at ResNet-50's four 3x3
shapes): im2col + matmul (``impl='unfold'``, what ``'auto'`` compiled to
before) against ``impl='auto'`` (now the form eager takes: one conv per
sample on CPU with autograd, the batch folded into the groups elsewhere),
the largest tensor of the compiled graphs
(:func:`mmdyn.analysis.memory.largest_graph_tensors`) and, with
``--time``, the median step time with ``--backend``.

Prints Markdown tables under a header naming the machine (CPU model and
ISA read from ``/proc/cpuinfo``, threads, load average, date;
:func:`mmdyn.analysis.machine.header_lines`) for benchmarks/memory.md.

Usage::

    python benchmarks/memory.py                        # memory, 224x224
    python benchmarks/memory.py --time --repeat 5      # and step times
    python benchmarks/memory.py --size 64 --models kw1x
    python benchmarks/memory.py --capture --time --models
"""
import argparse
import math
import statistics
import time

import torch
from resnet50_backbones import BACKBONES

from mmdyn.analysis.machine import header_lines
from mmdyn.analysis.memory import largest_graph_tensors, saved_bytes_of_step
from mmdyn.ops.accel.thresholds import THRESHOLDS

MODELS = {key: BACKBONES[key] for key in ('r50', 'od1x', 'kw1x', 'dy4x')}
POLICIES = ('old', 'default', 'always')


def set_policy(policy: str, default: dict) -> None:
    """Set ``THRESHOLDS['recompute']`` (``default``: its CPU defaults)."""
    for family, value in default.items():
        THRESHOLDS['recompute'][family] = {
            'old': 0.0,
            'default': value,
            'always': math.inf
        }[policy]


def step(model, x) -> None:
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else (out, )
    sum(o.float().square().mean() for o in outs).backward()
    model.zero_grad(set_to_none=True)


def machine() -> str:
    """The machine header (CPU model and ISA, cores, threads, torch, load,
    date; :func:`mmdyn.analysis.machine.header_lines`), one Markdown line
    each."""
    return '\n'.join(header_lines(torch.get_num_threads()))


#: ResNet-50's 3x3 convs at 224x224: (channels, input side).
CAPTURE_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))


def capture_table(batch: int, backend: str, timed: bool, repeat: int) -> None:
    """The per-sample conv of a training step under ``torch.compile``:

    ``'unfold'`` against ``'auto'`` (see the module docstring).
    """
    from mmdyn.ops.per_sample_conv import per_sample_conv2d
    print(f'\n{machine()}\n\nbatch {batch}, '
          f'torch.compile backend {backend!r}\n')
    header = [
        'C x H x W', 'largest graph tensor MiB unfold',
        'largest graph tensor MiB auto'
    ]
    if timed:
        header += ['step ms unfold', 'step ms auto']
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for channels, side in CAPTURE_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, side, side, requires_grad=True)
        weight = torch.randn(
            batch, channels, channels, 3, 3, requires_grad=True)
        largest, times = {}, {}
        for impl in ('unfold', 'auto'):

            def fn(a, w, impl=impl):
                return per_sample_conv2d(a, w, None, padding=(1, 1), impl=impl)

            torch._dynamo.reset()
            recorder, record = largest_graph_tensors()
            torch.compile(fn, backend=recorder)(x, weight).sum().backward()
            largest[impl] = record.largest * 4 / 2**20
            if timed:
                torch._dynamo.reset()
                compiled = torch.compile(fn, backend=backend)
                compiled(x, weight).sum().backward()  # compile
                samples = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    compiled(x, weight).sum().backward()
                    samples.append(time.perf_counter() - start)
                times[impl] = statistics.median(samples) * 1e3
        cells = [
            f'{channels} x {side} x {side}', f'{largest["unfold"]:.1f}',
            f'{largest["auto"]:.1f}'
        ]
        if timed:
            cells += [f'{times["unfold"]:.0f}', f'{times["auto"]:.0f}']
        print('| ' + ' | '.join(cells) + ' |', flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument(
        '--models',
        nargs='*',
        default=list(MODELS),
        choices=list(MODELS),
        help='dynamic ResNet-50s to measure (none: skip)')
    parser.add_argument(
        '--capture',
        action='store_true',
        help='the per-sample conv under torch.compile')
    parser.add_argument(
        '--backend',
        default='inductor',
        help='torch.compile backend of --capture --time')
    parser.add_argument(
        '--time',
        action='store_true',
        help='also time the steps (a quiet machine only)')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.capture:
        capture_table(args.batch, args.backend, args.time, args.repeat)
    if not args.models:
        return
    default = dict(THRESHOLDS['recompute'])
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows, base = [], None
    try:
        for key in args.models:
            name, build = MODELS[key]
            torch.manual_seed(0)
            model = build()
            model.train()
            saved, times = {}, {p: [] for p in POLICIES}
            for policy in POLICIES:
                set_policy(policy, default)
                saved[policy] = saved_bytes_of_step(model, x)
                model.zero_grad(set_to_none=True)
            if key == 'r50':
                base = saved['old']
            if args.time:
                for policy in POLICIES:  # warm-up
                    set_policy(policy, default)
                    step(model, x)
                for _ in range(args.repeat):
                    for policy in POLICIES:
                        set_policy(policy, default)
                        start = time.perf_counter()
                        step(model, x)
                        times[policy].append(time.perf_counter() - start)
            rows.append((name, saved, times))
            print(
                f'{name}: ' + ', '.join(f'{p} {saved[p] / 2**20:.1f} MiB'
                                        for p in POLICIES),
                flush=True)
    finally:
        set_policy('default', default)

    print(f'\n{machine()}\n\nbatch {args.batch}, '
          f'{args.size}x{args.size}, CPU defaults of THRESHOLDS'
          f"['recompute'] {default}\n")
    header = ['model'] + [f'saved MiB {p} (x R-50)' for p in POLICIES]
    if args.time:
        header += [f'step s {p}' for p in POLICIES]
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for name, saved, times in rows:
        cells = [name]
        for p in POLICIES:
            ratio = f' ({saved[p] / base:.2f})' if base else ''
            cells.append(f'{saved[p] / 2**20:.1f}{ratio}')
        if args.time:
            cells += [f'{statistics.median(times[p]):.2f}' for p in POLICIES]
        print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
