# Copyright (c) mmdyn contributors. All rights reserved.
"""CPU speed and memory of the DDF operator, DDFConv2d and DDF-Up.

Compares, on the CPU this runs on:

* ``ddf`` (fused C kernel, ``impl='auto'``), the pure-PyTorch tap loop
  (``impl='taps'``) and the unfold reference with a depthwise 3x3 conv
  ``nn.Conv2d(C, C, 3, padding=1, groups=C)`` of the same shape, forward and
  forward+backward, batch 1 / 8 / 32, 256ch 14x14 and 64ch 56x56;
* ``DDFConv2d`` (whole module, filter branches included) with a dense 3x3
  conv;
* ``DDFUpsample`` (x2) with nearest ``F.interpolate`` (mmcv's CARAFE has no
  CPU kernel).

Timing: the candidates of one row are run interleaved, round after round;
each round times a few calls of each; the table gives each candidate's
median time and the median over rounds of its ratio to the baseline of the
same round. By default everything runs on one thread and is timed by that
thread's CPU time (``time.thread_time``), which a shared, overloaded CPU
does not inflate the way it inflates wall time; ``--threads N`` (N > 1)
times wall clock instead. Peak memory: the largest sum of
bytes allocated and not yet freed during one call, from the PyTorch
profiler's allocation events (``profile_memory=True``), in units of the
output size (inputs and parameters excluded).

With ``--device cuda`` (a GPU and Triton needed; a clear error otherwise)
it compares instead, in float32 and float16, forward and forward+backward:
``ddf`` by the Triton kernels (:mod:`mmdyn.ops.accel.ddf_triton`), the tap loop
and a depthwise 3x3 conv; and for x2 upsampling, DDF-Up's Triton sub-pixel
kernels, mmcv's CARAFE op (``carafe``, k_up 5, when mmcv has its CUDA ops)
and nearest interpolation. Times are wall clock with
``torch.cuda.synchronize()``; peak memory is
``torch.cuda.max_memory_allocated`` above the memory allocated before the
call, in units of the output size.

Each mode rewrites only its own section (``## DDF on CPU`` / ``## DDF on
CUDA``) of the output file; a CPU run with the instruction set capped
(``python -m mmdyn.analysis.machine --cap avx2 -- python benchmarks/ddf.py``)
writes ``## DDF on CPU (ISA capped to AVX2)``.

Usage::

    python benchmarks/ddf.py [--rounds 7] [--threads 2] [--quick] \
        [--out benchmarks/ddf.md]
    python benchmarks/ddf.py --device cuda [--quick]
"""
import argparse
import os
import os.path as osp
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmdyn.analysis.machine import header_lines, isa_cap
from mmdyn.ops import DDFConv2d, DDFUpsample, ddf
from mmdyn.ops.ddf import ddf_reference


def peak_bytes(fn) -> int:
    """Peak of live bytes allocated by ``fn`` (CPU allocator events)."""
    with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == '[memory]'
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


CLOCK = {'fn': time.perf_counter}


def time_interleaved(candidates: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call and median ratio to the first candidate."""
    clock = CLOCK['fn']
    names = list(candidates)
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for fn in candidates.values():  # warm up (builds, caches)
        fn()
    for _ in range(rounds):
        this_round = {}
        for n in names:
            start = clock()
            for _ in range(calls):
                candidates[n]()
            this_round[n] = (clock() - start) / calls
            times[n].append(this_round[n])
        for n in names:
            ratios[n].append(this_round[n] / this_round[names[0]])
    return {
        n: (statistics.median(times[n]), statistics.median(ratios[n]))
        for n in names
    }


def fwd_bwd(fn, tensors):

    def run():
        for t in tensors:
            t.grad = None
        fn().sum().backward()

    return run


def op_rows(rounds, quick):
    rows = []
    shapes = [(256, 14), (64, 56)]
    batches = [1, 8] if quick else [1, 8, 32]
    for C, H in shapes:
        for B in batches:
            x = torch.randn(B, C, H, H, requires_grad=True)
            cf = torch.randn(B, C, 3, 3, requires_grad=True)
            sf = torch.randn(B, 9, H, H, requires_grad=True)
            dw = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)
            out_bytes = x.numel() * 4
            small = B * C * H * H <= 8 * 256 * 196
            with torch.no_grad():
                fwd = {
                    'depthwise 3x3': lambda: dw(x),
                    'ddf fused': lambda: ddf(x, cf, sf, 3),
                    'ddf taps': lambda: ddf(x, cf, sf, 3, impl='taps'),
                }
                if small:
                    fwd['ddf unfold'] = lambda: ddf_reference(x, cf, sf, 3)
                res = time_interleaved(fwd, rounds, 3)
                mem = {n: peak_bytes(f) / out_bytes for n, f in fwd.items()}
            rows += [('forward', f'{B}x{C}x{H}x{H}', n, t, r, mem[n])
                     for n, (t, r) in res.items()]
            both = {
                'depthwise 3x3':
                fwd_bwd(lambda: dw(x), [x]),
                'ddf fused':
                fwd_bwd(lambda: ddf(x, cf, sf, 3), [x, cf, sf]),
                'ddf taps':
                fwd_bwd(lambda: ddf(x, cf, sf, 3, impl='taps'), [x, cf, sf]),
            }
            res = time_interleaved(both, rounds, 2)
            mem = {n: peak_bytes(f) / out_bytes for n, f in both.items()}
            rows += [('fwd+bwd', f'{B}x{C}x{H}x{H}', n, t, r, mem[n])
                     for n, (t, r) in res.items()]
    return rows


def module_rows(rounds):
    rows = []
    for C, H in [(256, 14), (64, 56)]:
        B = 8
        x = torch.randn(B, C, H, H)
        dense = nn.Conv2d(C, C, 3, padding=1, bias=False)
        layer = DDFConv2d(C, C, 3)
        with torch.no_grad():
            res = time_interleaved(
                {
                    'dense 3x3 conv': lambda: dense(x),
                    'DDFConv2d': lambda: layer(x)
                }, rounds, 3)
        rows += [('module fwd', f'{B}x{C}x{H}x{H}', n, t, r, float('nan'))
                 for n, (t, r) in res.items()]
        up = DDFUpsample(C, 2)
        with torch.no_grad():
            res = time_interleaved(
                {
                    'nearest x2': lambda: F.interpolate(x, scale_factor=2),
                    'DDFUpsample x2': lambda: up(x)
                }, rounds, 3)
        rows += [('upsample fwd', f'{B}x{C}x{H}x{H}', n, t, r, float('nan'))
                 for n, (t, r) in res.items()]
    return rows


def _cuda_clock() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA bytes ``fn`` allocates above those allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cuda_inputs(shape, k, dtype, phases=0):
    """X and DDF filters on CUDA (``phases`` > 0: stacked DDF-Up filters
    [phases, B, C, k*k] and [phases, B, k*k, H, W])."""
    B, C, H, W = shape
    lead = (phases, ) if phases else ()
    make = dict(device='cuda', dtype=dtype, requires_grad=True)
    return (torch.randn(B, C, H, W,
                        **make), torch.randn(*lead, B, C, k * k, **make),
            torch.randn(*lead, B, k * k, H, W, **make))


def _timed_rows(kind, shape, dtype, candidates, tensors, rounds):
    """Forward and forward+backward rows of ``candidates`` (name -> a function
    returning the output), the first one the baseline."""
    rows = []
    tag = f'{kind}, {str(dtype).replace("torch.", "")}'
    out_bytes = candidates[next(iter(candidates))]().numel() * \
        torch.finfo(dtype).bits // 8
    with torch.no_grad():
        res = time_interleaved(candidates, rounds, 10)
        mem = {
            n: cuda_peak_bytes(f) / out_bytes
            for n, f in candidates.items()
        }
    rows += [(f'{tag} forward', shape, n, t, r, mem[n])
             for n, (t, r) in res.items()]
    both = {n: fwd_bwd(f, tensors) for n, f in candidates.items()}
    res = time_interleaved(both, rounds, 5)
    mem = {n: cuda_peak_bytes(f) / out_bytes for n, f in both.items()}
    rows += [(f'{tag} fwd+bwd', shape, n, t, r, mem[n])
             for n, (t, r) in res.items()]
    return rows


def _carafe_or_reason():
    """Mmcv's ``carafe`` op, or the reason it cannot run on CUDA here."""
    try:
        from mmcv.ops import carafe
        x = torch.zeros(1, 1, 2, 2, device='cuda')
        carafe(x, torch.zeros(1, 25, 4, 4, device='cuda'), 5, 1, 2)
        return carafe, None
    except Exception as e:  # mmcv without its CUDA ops
        return None, f'{type(e).__name__}: {str(e).splitlines()[0]}'


def cuda_rows(rounds, quick):
    """The ``--device cuda`` comparisons (see the module docstring)."""
    from mmdyn.ops.accel import ddf_triton
    rows, notes = [], []
    carafe, why = _carafe_or_reason()
    if carafe is None:
        notes.append(f'mmcv CARAFE not measured: {why}.')
    batches = [8] if quick else [8, 32]
    for dtype in (torch.float32, torch.float16):
        for C, H in [(256, 14), (64, 56)]:
            for B in batches:
                x, cf, sf = _cuda_inputs((B, C, H, H), 3, dtype)
                dw = nn.Conv2d(
                    C, C, 3, padding=1, groups=C,
                    bias=False).to('cuda', dtype)
                cf4 = cf.view(B, C, 3, 3)
                rows += _timed_rows(
                    'ddf', f'{B}x{C}x{H}x{H}', dtype, {
                        'depthwise 3x3':
                        lambda: dw(x),
                        'ddf triton':
                        lambda: ddf_triton.ddf(x, cf, sf, 3, 1, 1, False, 1),
                        'ddf taps':
                        lambda: ddf(x, cf4, sf, 3, impl='taps'),
                    }, [x, cf, sf], rounds)
        for C, H in [(256, 25), (256, 50)]:
            B = 2
            x, cf, sf = _cuda_inputs((B, C, H, H), 3, dtype, phases=4)
            masks = torch.randn(
                B, 25, 2 * H, 2 * H, device='cuda',
                dtype=dtype).softmax(1).requires_grad_()
            ups = {
                'nearest x2':
                lambda: F.interpolate(x, scale_factor=2),
                'ddf-up triton x2':
                lambda: ddf_triton.ddf_up(x, cf, sf, 3, 1, False, 1, 2),
            }
            if carafe is not None:
                ups['carafe x2 (k_up 5)'] = lambda: carafe(x, masks, 5, 1, 2)
            rows += _timed_rows('upsample', f'{B}x{C}x{H}x{H}', dtype, ups,
                                [x, cf, sf, masks], rounds)
    return rows, notes


def write_section(path: str, title: str, body: str) -> None:
    """Replace the ``## title`` section of ``path`` (or append it)."""
    sections, current = [], None
    if osp.exists(path):
        with open(path) as f:
            for line in f.read().splitlines(keepends=True):
                if line.startswith('## ') or current is None:
                    current = [line]
                    sections.append(current)
                else:
                    current.append(line)
    text = f'## {title}\n\n{body.strip()}\n'
    for i, sec in enumerate(sections):
        if sec[0].strip() == f'## {title}':
            sections[i] = [text + ('\n' if i < len(sections) - 1 else '')]
            break
    else:
        if sections:
            sections[-1].append('\n')
        sections.append([text])
    with open(path, 'w') as f:
        f.write(''.join(''.join(sec) for sec in sections))


def cuda_main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA GPU is available to torch '
                         'here (torch.cuda.is_available() is False)')
    from mmdyn.ops.accel import ddf_triton
    if not ddf_triton.available('cuda'):
        raise SystemExit('--device cuda: the Triton DDF kernels need the '
                         'triton package, which could not be imported')
    torch.manual_seed(0)
    CLOCK['fn'] = _cuda_clock
    rows, notes = cuda_rows(args.rounds, args.quick)
    table = format_table(rows)
    header = (f'torch {torch.__version__}, {torch.cuda.get_device_name()}, '
              f'wall time with synchronisation, {args.rounds} interleaved '
              'rounds')
    print(header)
    print(table)
    notes = ' '.join(notes + [
        '`ddf triton` is the Triton kernel (the default on CUDA), `ddf '
        'taps` the pure-PyTorch tap loop; half-precision inputs are summed '
        'in float32. Upsampling: DDF-Up\'s four sub-pixel DDFs (k 3) by '
        'the Triton kernels against mmcv\'s CARAFE op and nearest '
        'interpolation. Peak memory above what was allocated before the '
        'call, in units of the output size. Reproduce: `python '
        'benchmarks/ddf.py --device cuda`.'
    ])
    write_section(args.out, 'DDF on CUDA',
                  header + '\n\n' + table + '\n\n' + notes)
    print(f'written to {args.out}')


def format_table(rows) -> str:
    lines = [
        '| pass | input | implementation | median ms | ratio to first '
        '| peak extra memory (x output) |', '|---|---|---|---:|---:|---:|'
    ]
    for kind, shape, name, t, r, m in rows:
        mem = '' if m != m else f'{m:.2f}'
        lines.append(f'| {kind} | {shape} | {name} | {t * 1e3:.3f} | '
                     f'{r:.2f} | {mem} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads; 1 (default) is timed by thread CPU time')
    parser.add_argument(
        '--device',
        choices=('cpu', 'cuda'),
        default='cpu',
        help='cuda: the Triton kernels against the tap loop, a depthwise '
        'conv and CARAFE on the GPU')
    parser.add_argument(
        '--out',
        default=osp.join(osp.dirname(osp.abspath(__file__)), 'ddf.md'))
    args = parser.parse_args(argv)
    if args.device == 'cuda':
        cuda_main(args)
        return
    from mmdyn.engine.malloc import tune_malloc
    malloc = 'tuned' if tune_malloc() else 'default'
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        CLOCK['fn'] = time.thread_time
    rows = op_rows(args.rounds, args.quick) + module_rows(args.rounds)
    table = format_table(rows)
    clock = ('thread CPU time' if args.threads == 1 else 'wall time')
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    header = '\n'.join(header_lines(torch.get_num_threads())) + '\n\n' + (
        f'torch {torch.__version__}, {torch.get_num_threads()} '
        f'thread(s), {clock}, load average {load} at the end, '
        f'{args.rounds} interleaved rounds, float32, {malloc} malloc '
        '(mmdyn.engine.malloc)')
    print(header)
    print(table)
    notes = (
        '`ddf fused` is the default CPU path (C loops built on first use, '
        'explicit backward); `ddf taps` the pure-PyTorch tap loop with a '
        'tap-by-tap backward (used with no C compiler, and on CUDA where '
        'Triton is missing); `ddf '
        'unfold` the explicit unfold-and-sum reference. Ratios are medians '
        'of per-round ratios to the first row of each group. Peak extra '
        'memory: largest live total of the bytes the call allocates '
        '(profiler allocation events), in units of the output size; '
        'fwd+bwd includes the gradients themselves. Module rows time the '
        'whole layer (filter branches included) against a dense 3x3 conv '
        '(`DDFConv2d`) and nearest interpolation (`DDFUpsample`, x2; '
        'mmcv CARAFE has no CPU kernel). Reproduce: '
        '`python benchmarks/ddf.py`.')
    # A run under `python -m mmdyn.analysis.machine --cap avx2 -- ...` keeps
    # its own section beside the uncapped one.
    cap = isa_cap()
    title = 'DDF on CPU' + (f' (ISA capped to {cap.upper()})' if cap else '')
    write_section(args.out, title, header + '\n\n' + table + '\n\n' + notes)
    print(f'written to {args.out}')


if __name__ == '__main__':
    main()
