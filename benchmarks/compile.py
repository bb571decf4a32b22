# Copyright (c) mmdyn contributors. All rights reserved.
"""``torch.compile`` against eager on CPU: first-compile and steady-state time
of the ResNet-50 backbones and of single layers.

For each model (eval, no_grad, batch 8, 224x224 by default) and each layer
(ODConv/DyConv/CondConv/KW 3x3, 128 -> 128 channels, 28x28, batch 8),
after an eager warm-up call: the first compiled call (compilation
included; Inductor's caches empty for each row unless ``--warm-cache``,
so it is the cost of a first compile on a new machine), the part of it spent
tracing (TorchDynamo) and in the backend (AOTAutograd and Inductor), the
number of graphs and graph breaks, then eager and compiled calls
alternately (``--repeat`` each; medians) and compiled / eager.
``--train`` adds forward + backward rows for the layers (train mode);
``--path-operators`` lets the attentions into the graph (only the C-loop
paths as ``mmdyn::`` operators) instead of one operator per layer.
Prints Markdown tables for benchmarks/compile.md, under a header that
names the CPU, its ISA and the load
(:func:`mmdyn.analysis.machine.header_lines`).

Usage::

    python benchmarks/compile.py                      # every model, layer
    python benchmarks/compile.py --quick              # the layers only
    python benchmarks/compile.py --models od1x kw1x --layers
    python benchmarks/compile.py --layers odconv kw --train
"""
import argparse
import contextlib
import statistics
import time

import torch
import torch._dynamo
from resnet50_backbones import BACKBONES
from torch._dynamo.utils import compilation_time_metrics, counters
from torch._inductor.utils import fresh_cache

from mmdyn.models.backbones.kw_resnet import KW_1X_CFG
from mmdyn.ops import CondConv2d, DyConv2d, KWConv2d, ODConv2d

#: key -> (name, constructor) of the ResNet-50 backbones.
MODELS = BACKBONES

#: key -> (name, constructor) of the single layers (3x3, 128 channels).
LAYERS = {
    'odconv':
    ('ODConv2d K=1',
     lambda: ODConv2d(128, 128, 3, padding=1, kernel_num=1, reduction=0.0625)),
    'dyconv': ('DyConv2d K=4', lambda: DyConv2d(128, 128, 3, padding=1)),
    'condconv': ('CondConv2d K=4', lambda: CondConv2d(128, 128, 3, padding=1)),
    'kw': ('KWConv2d', lambda: KWConv2d(128, 128, 3, padding=1, **KW_1X_CFG)),
}

#: Keys of :data:`compilation_time_metrics`: TorchDynamo's bytecode
#: tracing, and the backend (AOTAutograd + Inductor) it calls.
TRACING, BACKEND = 'bytecode_tracing', 'OutputGraph.call_user_compiler'


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _seconds(key):
    return sum(compilation_time_metrics.get(key, ()))


def measure(build, shape, backend, repeat, train=False, cold=True):
    """Times of ``build()`` on a random input of ``shape``: a dict with eager,
    first, tracing, backend, graphs, breaks, compiled, ratio.

    ``cold``: Inductor's caches empty (a new cache folder, the in-memory
    caches cleared), as on a new machine.
    """
    with fresh_cache() if cold else contextlib.nullcontext():
        return _measure(build, shape, backend, repeat, train)


def _measure(build, shape, backend, repeat, train):
    torch.manual_seed(0)
    model = build()
    model.train(train)  # mmpretrain's ResNet.train returns None
    x = torch.randn(shape)

    def step(fn):
        if not train:
            with torch.no_grad():
                return fn(x)
        out = fn(x)
        out = out[-1] if isinstance(out, tuple) else out
        out.float().sum().backward()

    step(model)  # warm-up: C loops built, workspaces allocated
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    result = dict(
        first=timed(lambda: step(compiled)),
        tracing=_seconds(TRACING),
        backend=_seconds(BACKEND),
        graphs=counters['stats']['unique_graphs'],
        breaks=sum(counters['graph_break'].values()))
    # Alternating calls: a change of load affects both alike.
    eager, steady = [], []
    for _ in range(repeat):
        eager.append(timed(lambda: step(model)))
        steady.append(timed(lambda: step(compiled)))
    result['eager'] = statistics.median(eager)
    result['compiled'] = statistics.median(steady)
    result['ratio'] = result['compiled'] / result['eager']
    return result


def warm_up_compiler(backend):
    """One small compile first, so that the first row does not also pay the
    compiler's one-time start (imports, compile workers)."""
    with fresh_cache():
        torch.compile(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
            backend=backend)(
                torch.randn(1, 3, 8, 8))
    torch._dynamo.reset()


def print_table(title, rows, backend, repeat, cold):
    print(f'\n{title}\n')
    print('| | eager (s) | first compiled call (s) | of which tracing / '
          'backend (s) | graphs / breaks | compiled (s) | compiled / eager '
          '|')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for name, build, shape, train in rows:
        r = measure(build, shape, backend, repeat, train, cold)
        print(
            f"| {name} | {r['eager']:.4f} | {r['first']:.1f} | "
            f"{r['tracing']:.1f} / {r['backend']:.1f} | "
            f"{r['graphs']} / {r['breaks']} | {r['compiled']:.4f} | "
            f"{r['ratio']:.2f} |",
            flush=True)


def header():
    try:
        from mmdyn.analysis.machine import header_lines
        return list(header_lines())
    except ImportError:  # an older tree: the essentials by hand
        import os
        flags = open('/proc/cpuinfo').read().count('avx512f')
        return [
            f'- CPU flags avx512f on {flags} of {os.cpu_count()} CPUs; '
            f'load average {os.getloadavg()}; torch {torch.__version__}'
        ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        nargs='*',
        choices=list(MODELS),
        help='ResNet-50 backbones (default: all; none with --quick)')
    parser.add_argument(
        '--layers',
        nargs='*',
        choices=list(LAYERS),
        help='single layers (default and with no names: all)')
    parser.add_argument('--quick', action='store_true', help='the layers only')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--layer-size', type=int, default=28)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument(
        '--train',
        action='store_true',
        help='also forward + backward of the layers (train mode)')
    parser.add_argument(
        '--path-operators',
        action='store_true',
        help='attentions in the graph, only the C-loop paths as operators '
        '(mmdyn.ops.accel.custom_ops.WHOLE_LAYER_TYPES emptied)')
    parser.add_argument(
        '--warm-cache',
        action='store_true',
        help="keep Inductor's caches (default: empty for each row)")
    args = parser.parse_args(argv)
    # No selection: everything; --quick: the layers; --models or --layers
    # alone: only what they name (either with no names: all of its kind).
    models = args.models or (list(MODELS) if args.models is not None else [])
    layers = args.layers or (list(LAYERS) if args.layers is not None else [])
    if args.models is None and args.layers is None:
        models = [] if args.quick else list(MODELS)
        layers = list(LAYERS)
    cold = not args.warm_cache
    operators = 'one per dynamic layer'
    if args.path_operators:
        from mmdyn.ops.accel import custom_ops
        custom_ops.WHOLE_LAYER_TYPES = ()
        operators = 'the C-loop paths'

    print('\n'.join(header()))
    print(f'- {torch.get_num_threads()} threads; backend {args.backend}; '
          f'median of {args.repeat}; Inductor caches '
          f"{'kept' if args.warm_cache else 'empty for each row (cold)'}; "
          f'mmdyn:: operators: {operators}')
    warm_up_compiler(args.backend)
    if models:
        print_table(
            f'Models: eval, no_grad, batch {args.batch}, '
            f'{args.size}x{args.size}',
            [(MODELS[k][0], MODELS[k][1],
              (args.batch, 3, args.size, args.size), False)
             for k in models], args.backend, args.repeat, cold)
    shape = (args.batch, 128, args.layer_size, args.layer_size)
    if layers:
        print_table(
            f'Layers: eval, no_grad, batch {args.batch}, 128 channels, '
            f'{args.layer_size}x{args.layer_size}',
            [(LAYERS[k][0], LAYERS[k][1], shape, False) for k in layers],
            args.backend, args.repeat, cold)
    if layers and args.train:
        print_table('Layers: train, forward + backward',
                    [(LAYERS[k][0], LAYERS[k][1], shape, True)
                     for k in layers], args.backend, args.repeat, cold)


if __name__ == '__main__':
    main()
