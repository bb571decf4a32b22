# Copyright (c) mmdyn contributors. All rights reserved.
"""Where the time of KW-1x ResNet-50 goes on CPU, inference and training.

Builds the KW-1x ResNet-50 backbone (the options of
``configs/kernelwarehouse/``) and the static ResNet-50, then for each mode
(``infer``: ``eval()`` under ``no_grad``; ``train``: one forward + backward
of ``train()`` mode, loss = mean of squares of the last stage):

* per KW layer group: the process CPU time of every KW layer's forward,
  summed by (kernel size, path taken), with the share spent in the
  attention branch (GAP, fc1/fc2, CAF) and in the path itself (kernel
  assembly and conv);
* the top operators of the ``torch.profiler`` table (self CPU time), for
  the dynamic and the static model;
* the model totals and their ratio (dynamic / static);
* ``--variants``: instead, the KW model's step under each dispatch variant
  of :data:`VARIANTS` (the C cell product or MKL; the training path before
  ``'mixture_gemm'``, and ``'mixture_gemm'`` keeping or rebuilding the
  mixtures) and the static model's, interleaved in one process.

Process CPU time (``time.process_time``) with ``--threads 1`` is the
steadiest clock on a shared machine; on a quiet one use wall time
(``--clock wall``) and the thread count of the measurement that matters.

Usage::

    python benchmarks/kw_profile.py                        # both modes
    python benchmarks/kw_profile.py --modes train --threads 1 --repeat 3
    python benchmarks/kw_profile.py --clock wall --threads 2 --top 25
    python benchmarks/kw_profile.py --variants --clock wall --threads 2
"""
import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_models():
    from resnet50_backbones import BACKBONES
    torch.manual_seed(0)
    return BACKBONES['kw1x'][1](), BACKBONES['r50'][1]()


def make_clock(name: str):
    return time.process_time if name == 'process' else time.perf_counter


class LayerTimer:
    """Times every KW layer's forward, by (kernel size, path), and the
    attention branch inside it."""

    def __init__(self, model, clock):
        from mmdyn.ops import KWConv2d
        self.clock = clock
        self.totals = collections.defaultdict(float)
        self.attention = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.layers = [m for m in model.modules() if isinstance(m, KWConv2d)]
        self._patched = []

    @contextlib.contextmanager
    def active(self):
        for layer in self.layers:
            self._wrap(layer)
        try:
            yield self
        finally:
            for layer, name in self._patched:
                del layer.__dict__[name]
            self._patched = []

    def _wrap(self, layer):
        forward, attention = layer.forward, layer._attention_weights
        seen = {}

        def timed_attention(pooled):
            start = self.clock()
            out = attention(pooled)
            seen['att'] = self.clock() - start
            return out

        def timed_forward(x):
            start = self.clock()
            out = forward(x)
            key = (f'{layer.kernel_size[0]}x{layer.kernel_size[1]}',
                   layer.last_path)
            self.totals[key] += self.clock() - start
            self.attention[key] += seen.pop('att', 0.0)
            self.calls[key] += 1
            return out

        layer.__dict__['forward'] = timed_forward
        layer.__dict__['_attention_weights'] = timed_attention
        self._patched += [(layer, 'forward'), (layer, '_attention_weights')]


def run_step(model, x, mode):
    if mode == 'infer':
        with torch.no_grad():
            model(x)
        return
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else (out, )
    sum(o.float().square().mean() for o in outs).backward()
    model.zero_grad(set_to_none=True)


def prepare(model, mode):
    model.train(mode == 'train')


def profile_ops(model, x, mode, top):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(model, x, mode)
    return prof.key_averages().table(
        sort_by='self_cpu_time_total', row_limit=top)


def _set(table: dict, key: str, value) -> None:
    if value is _DEFAULT:
        return
    table[key] = value


_DEFAULT = object()

#: The dispatch variants ``--variants`` compares, per mode: (name,
#: C-loop columns threshold, KW recompute threshold, 'mixture_gemm' taken).
VARIANTS = {
    'infer':
    (('C cell product (AVX2 rule)', 4096, _DEFAULT, True),
     ('matmul, conv from the cells layout (default on AVX-512)', _DEFAULT,
      _DEFAULT, True), ('matmul, conv from rearranged mixtures', 'cells_off',
                        _DEFAULT, True)),
    'train':
    (('before (autograd position_major, kept mixtures)', _DEFAULT, 0.01,
      False), ('mixture_gemm, mixtures kept', _DEFAULT, 0.0, True),
     ('default (mixture_gemm, rebuilt)', _DEFAULT, _DEFAULT, True)),
}


def compare_variants(kw_model, static, x, mode, clock, repeat):
    """The KW model's step under each of :data:`VARIANTS` ``[mode]`` and the
    static model's, interleaved, median of ``repeat``."""
    from mmdyn.ops.accel import kw_paths, paths
    cells_layout_pays = kw_paths.cells_layout_pays
    from mmdyn.ops.accel.thresholds import THRESHOLDS
    kw_t, rec_t = THRESHOLDS['kernel_warehouse'], THRESHOLDS['recompute']
    saved = (kw_t['c_loop_min_columns'], rec_t['kernel_warehouse'],
             paths.kw_mixture_gemm)
    variants = VARIANTS[mode]
    times = [[] for _ in range(len(variants) + 1)]
    try:
        for model in (kw_model, static):
            prepare(model, mode)
        for i in range(repeat + 1):
            for j, (_, columns, limit, gemm) in enumerate(variants):
                kw_t['c_loop_min_columns'], rec_t['kernel_warehouse'] = \
                    saved[:2]
                kw_paths.cells_layout_pays = cells_layout_pays
                if columns == 'cells_off':
                    kw_paths.cells_layout_pays = lambda *args: False
                else:
                    _set(kw_t, 'c_loop_min_columns', columns)
                _set(rec_t, 'kernel_warehouse', limit)
                paths.kw_mixture_gemm = saved[2] if gemm else \
                    (lambda layer, x: False)
                start = clock()
                run_step(kw_model, x, mode)
                if i:
                    times[j].append(clock() - start)
            start = clock()
            run_step(static, x, mode)
            if i:
                times[-1].append(clock() - start)
    finally:
        kw_t['c_loop_min_columns'], rec_t['kernel_warehouse'] = saved[:2]
        paths.kw_mixture_gemm = saved[2]
        kw_paths.cells_layout_pays = cells_layout_pays
    static_s = statistics.median(times[-1])
    print(f'\n## {mode}: variants, interleaved (ResNet-50 {static_s:.2f} s)'
          '\n\n| variant | KW-1x s | ratio to ResNet-50 |\n|---|---:|---:|')
    for (name, *_), samples in zip(variants, times):
        median = statistics.median(samples)
        print(f'| {name} | {median:.2f} | {median / static_s:.2f}x |')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--modes', nargs='*', default=['infer', 'train'])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument(
        '--clock', choices=('process', 'wall'), default='process')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument(
        '--variants',
        action='store_true',
        help='compare the dispatch variants of VARIANTS instead of profiling')
    parser.add_argument(
        '--top',
        type=int,
        default=20,
        help='operator rows (0: no torch.profiler table)')
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from mmdyn.engine.malloc import tune_malloc
    tune_malloc()
    torch.set_num_threads(args.threads)
    clock = make_clock(args.clock)
    kw_model, static = build_models()
    x = torch.randn(args.batch, 3, args.size, args.size)
    from mmdyn.analysis.machine import header_lines
    print('\n'.join(header_lines(args.threads)) + '\n')
    print(f'torch {torch.__version__}, {args.threads} threads, {args.clock} '
          f'clock, batch {args.batch}, {args.size}x{args.size}, median of '
          f'{args.repeat}; load average '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())}')
    for mode in args.modes:
        if args.variants:
            compare_variants(kw_model, static, x, mode, clock, args.repeat)
            continue
        for model in (kw_model, static):
            prepare(model, mode)
            run_step(model, x, mode)  # warm-up (builds, caches)
        timer = LayerTimer(kw_model, clock)
        totals = {'kw': [], 'static': []}
        for _ in range(args.repeat):
            for name, model in (('kw', kw_model), ('static', static)):
                start = clock()
                if name == 'kw':
                    with timer.active():
                        run_step(model, x, mode)
                else:
                    run_step(model, x, mode)
                totals[name].append(clock() - start)
        kw_s = statistics.median(totals['kw'])
        static_s = statistics.median(totals['static'])
        print(f'\n## {mode}: KW-1x {kw_s:.2f} s, ResNet-50 {static_s:.2f} s,'
              f' ratio {kw_s / static_s:.2f}x')
        print('\nKW layer forwards (sum over the repeats / repeats; in train'
              ' mode the backward is outside these):\n')
        print('| kernel | path | layers | forward ms | of which attention '
              'ms |')
        print('|---|---|---:|---:|---:|')
        for key in sorted(timer.totals, key=lambda k: -timer.totals[k]):
            print(f'| {key[0]} | {key[1]} | '
                  f'{timer.calls[key] // args.repeat} | '
                  f'{timer.totals[key] / args.repeat * 1e3:.0f} | '
                  f'{timer.attention[key] / args.repeat * 1e3:.0f} |')
        if args.top:
            for name, model in (('KW-1x ResNet-50', kw_model), ('ResNet-50',
                                                                static)):
                print(f'\n### {mode} operators, {name}\n')
                print(profile_ops(model, x, mode, args.top))


if __name__ == '__main__':
    main()
