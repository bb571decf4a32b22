# Copyright (c) mmdyn contributors. All rights reserved.
"""Exported models' inference time in ONNX Runtime or OpenVINO (CPU).

    python tools/analysis_tools/benchmark_onnx.py CONFIG_OR_ONNX \
        [--compare CONFIG_OR_ONNX ...] [--runtime onnxruntime|openvino] \
        [--batch-size 8] [--shape 224 224] [--threads 2] [--repeat 10] \
        [--warmup 2] [--sessions 1] [--backbone-only] \
        [--work-dir work_dirs/onnx] [--nodes-by-scope DEPTH] [--nodes-only]

Configs are exported first (random weights, dynamic batch, as
``tools/deployment/pytorch2onnx.py --dynamic-batch``); ``.onnx`` files are
timed as they are. The models run alternately in one process and the
table gives each one's time ratio to the first (the median of the
per-round ratios), e.g. an exported ODConv ResNet-50 against the exported
ResNet-50::

    python tools/analysis_tools/benchmark_onnx.py \
        mmpretrain::resnet/resnet50_8xb32_in1k.py \
        --compare configs/odconv/resnet50-odconv1x_8xb32_in1k.py \
        --batch-size 8 --threads 2

OpenVINO (``--runtime openvino``) needs ``pip install openvino`` (the
``deploy`` extra). ``--sessions 3`` opens each file three times and runs
the sessions in turn: two ONNX Runtime sessions of one file can differ by
several per cent, so a ratio of single sessions is off by that much.
``--nodes-by-scope 5`` also lists where each file's
nodes come from (per module scope, e.g. per conv layer of a ResNet: the
node names of the export); ``--nodes-only`` lists them without timing.
"""
import argparse
import os.path as osp
import sys

import mmdyn.compat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Time exported models in an inference runtime')
    parser.add_argument('model', help='config file or .onnx file')
    parser.add_argument(
        '--compare',
        nargs='+',
        default=[],
        help='other configs / .onnx files, run alternately')
    parser.add_argument(
        '--runtime',
        default='onnxruntime',
        choices=('onnxruntime', 'openvino'))
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224, 224],
        help='input H W (one value: square)')
    parser.add_argument(
        '--threads',
        type=int,
        default=2,
        help='intra-op threads of the runtime')
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--sessions',
        type=int,
        default=1,
        help='sessions per file, run in turn (each warmed --warmup times)')
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help="export model.backbone's feature maps")
    parser.add_argument(
        '--nodes-by-scope',
        type=int,
        default=0,
        metavar='DEPTH',
        help='list each file\'s node count per module scope of DEPTH parts '
        '(5: per layer of a ResNet), with the op types of the largest')
    parser.add_argument(
        '--nodes-only',
        action='store_true',
        help='with --nodes-by-scope: count, do not time')
    parser.add_argument(
        '--work-dir',
        default='work_dirs/onnx',
        help='where configs are exported')
    return parser.parse_args(argv)


def print_nodes_by_scope(name: str, path: str, depth: int, top: int = 10):
    """The node count of ``path`` per module scope, largest first."""
    from mmdyn.analysis.runtime_benchmark import (count_nodes_by_scope,
                                                  op_types_in_scope)
    scopes = count_nodes_by_scope(path, depth)
    print(f'{name}: {sum(scopes.values())} nodes in {len(scopes)} scopes; '
          f'the {top} largest:')
    for scope, count in scopes.most_common(top):
        ops = ', '.join(
            f'{op} {n}'
            for op, n in op_types_in_scope(path, scope).most_common())
        print(f'  {count:5d}  {scope}  ({ops})')


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # see docs/compat.md
    from mmdyn.analysis.benchmark import paired_ratio
    from mmdyn.analysis.runtime_benchmark import (benchmark_onnx_files,
                                                  count_nodes,
                                                  export_config_file,
                                                  runtime_available)
    if len(args.shape) not in (1, 2):
        sys.exit(f'--shape takes 1 or 2 values, got {args.shape}')
    if not runtime_available(args.runtime):
        sys.exit(f'{args.runtime} is not installed: pip install '
                 f'{args.runtime}')
    shape = (args.shape[0], args.shape[-1])
    models = [args.model, *args.compare]
    files = [
        m if m.endswith('.onnx') else export_config_file(
            m, args.work_dir, shape, args.backbone_only) for m in models
    ]
    names = [osp.splitext(osp.basename(m.split('::')[-1]))[0] for m in models]
    if args.nodes_by_scope:
        for name, path in zip(names, files):
            print_nodes_by_scope(name, path, args.nodes_by_scope)
        if args.nodes_only:
            return None
    results = benchmark_onnx_files(
        files,
        names,
        args.runtime,
        args.batch_size,
        shape,
        args.threads,
        args.repeat,
        args.warmup,
        sessions=args.sessions)
    print('| model | runtime | batch | median (ms) | ONNX nodes | '
          'time ratio vs first (paired median) |\n|---|---|---:|---:|---:|'
          '---:|')
    for name, path, result in zip(names, files, results):
        print(f'| {name} | {args.runtime} | {args.batch_size} | '
              f'{result.median * 1e3:.1f} | {count_nodes(path)} | '
              f'{paired_ratio(result, results[0]):.2f}x |')
    return results


if __name__ == '__main__':
    main()
