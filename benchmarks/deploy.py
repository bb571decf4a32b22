# Copyright (c) mmdyn contributors. All rights reserved.
"""Exported ResNet-50s in the runtimes against the exported static ResNet-50
and PyTorch eager, written to benchmarks/deploy.md.

    python benchmarks/deploy.py [--threads 2] [--repeat 9] [--warmup 1] \
        [--sessions 3] [--batch-sizes 8 1] [--skip-eager] [--quick] \
        [--out benchmarks/deploy.md]

Per batch size: the ResNet-50 families (ODConv-1x, KW-1x, DDF-mul) and the
static ResNet-50 exported as ``tools/deployment/pytorch2onnx.py
--dynamic-batch`` does, timed alternately in one process in ONNX Runtime
(CPU) and in OpenVINO (CPU, when installed), and in PyTorch eager
(``tools/analysis_tools/benchmark.py``'s method); then the Faster R-CNN
backbone + neck fallback (ODConv-1x backbone with the DDF-Up FPN against
R-50 with the stock FPN, ``pytorch2onnx.py --backbone-only
--with-neck``), batch 1, timed against R-50 with the stock FPN. The
header records the CPU and its ISA (:func:`mmdyn.analysis.machine.
header_lines`, and ``grep -c avx512 /proc/cpuinfo``), the thread count and
the load average: run it on a quiet machine. About 5 minutes with the
defaults on 2 threads. ``--quick`` (2 repeats, no warm-up, the detector at
512x768) checks that everything runs in about a minute; its timings are
not for the record.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import mmdyn.compat  # noqa: E402

R50 = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
MODELS = {
    'ResNet-50': R50,
    'ODConv-1x': 'configs/odconv/resnet50-odconv1x_8xb32_in1k.py',
    'KW-1x': 'configs/kernelwarehouse/resnet50-kw1x_8xb128-300e_in1k.py',
    'DDF-mul': 'configs/ddf/resnet50-ddf-mul_8xb128-130e_in1k.py',
}
#: Targets of the exported families in ONNX Runtime, batch 8, time ratio
#: to the exported static ResNet-50.
TARGETS = {'ODConv-1x': 1.3, 'KW-1x': 2.0, 'DDF-mul': 1.0}
#: Nodes of the first exports (the im2col/tap-loop forms, not simplified).
NODES_BEFORE = {
    'ResNet-50': '176',
    'ODConv-1x': '3,191',
    'KW-1x': '5,042',
    'DDF-mul': '6,760'
}
#: Why the detector is not exported through mmdeploy here (kept in the
#: written file).
MMDEPLOY_NOTE = """## Faster R-CNN through mmdeploy 1.3.1

mmdeploy 1.3.1 (`pip install mmdeploy==1.3.1`, with its pure-Python
dependencies `aenum`, `terminaltables`, `prettytable`, `multiprocess`)
imports on this stack (torch 2.14.1, numpy 2.4.6, mmcv 2.1.0, mmengine
0.10.7), but `mmdeploy.apis.torch2onnx` of Faster R-CNN (ODConv-1x R-50,
DDF-Up FPN, ONNX Runtime deploy config, dynamic batch/height/width) stops at
its first call of `torch.onnx.export`: mmdeploy passes no `dynamo=` argument,
torch 2.14 defaults to the `torch.export`-based exporter, which refuses
mmdeploy's `dynamic_axes`:

    torch.onnx._internal.exporter._errors.TorchExportError: Failed to export
    the model with torch.export. ... UserError: Detected mismatch between the
    structure of `inputs` and `dynamic_shapes`: `inputs[0]` is a <class
    'tuple'>, but `dynamic_shapes[0]` is a <class 'dict'>

With the TorchScript exporter forced (`torch.onnx.export(...,
dynamo=False)` patched in), the export goes further and stops at
mmdeploy's RoIAlign symbolic, which imports a helper torch has removed:

    File "mmdeploy/mmcv/ops/roi_align.py", line 59, in roi_align_default
        from torch.onnx.symbolic_opset9 import _cast_Long
    ImportError: cannot import name '_cast_Long' from
    'torch.onnx.symbolic_opset9'

(mmdeploy 1.3.1 was released for torch 1.x-2.0.) The fallback is the
backbone + neck export above (`tools/deployment/pytorch2onnx.py
--backbone-only --with-neck`), checked against PyTorch by `--verify`.
"""

DET_SHAPE = (800, 1216)
#: The detector's input with ``--quick``.
QUICK_DET_SHAPE = (512, 768)
DETECTORS = {
    'R-50 + FPN': ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', {}),
    'ODConv-1x R-50 + DDF-Up FPN':
    ('configs/odconv/faster-rcnn_r50-odconv1x_fpn_1x_coco.py', {
        'model.backbone.init_cfg': None,
        'model.neck.type': 'DDFUpFPN',
        'model.neck.upsample_cfg': dict(type='ddf_up', guided=True),
    }),
}


def cpu_header(threads: int) -> list:
    """The machine (:func:`mmdyn.analysis.machine.header_lines`), the
    ``avx512`` count of ``/proc/cpuinfo``, the runtimes' versions."""
    from mmdyn.analysis.machine import header_lines
    try:
        with open('/proc/cpuinfo') as f:
            avx512 = sum('avx512' in line for line in f)
    except OSError:
        avx512 = 'unknown'
    return [
        *header_lines(threads),
        f'- `grep -c avx512 /proc/cpuinfo`: {avx512}; {threads} threads '
        'for ONNX Runtime (intra-op), OpenVINO (inference) and torch; '
        'input 224x224; all in float32 (OpenVINO: INFERENCE_PRECISION_HINT '
        'f32, not the bfloat16 it picks on CPUs with AMX/AVX512-BF16)',
        f'- torch {torch.__version__}, onnxruntime {_version("onnxruntime")}'
        f', openvino {_version("openvino")}',
    ]


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return 'not installed'


def runtime_rows(files,
                 names,
                 runtimes,
                 batch,
                 threads,
                 repeat,
                 warmup,
                 shape=(224, 224),
                 sessions=1):
    from mmdyn.analysis.benchmark import paired_ratio
    from mmdyn.analysis.runtime_benchmark import (benchmark_onnx_files,
                                                  runtime_available)
    ratios = {}
    for runtime in runtimes:
        if not runtime_available(runtime):
            continue
        results = benchmark_onnx_files(
            files,
            names,
            runtime,
            batch,
            shape,
            threads,
            repeat,
            warmup,
            log=None,
            sessions=sessions)
        for name, result in zip(names, results):
            ratios[(runtime, name)] = (result.median,
                                       paired_ratio(result, results[0]))
    return ratios


def eager_rows(configs, names, batch, threads, repeat, warmup):
    from mmdyn.analysis.benchmark import benchmark_configs, paired_ratio
    torch.set_num_threads(threads)
    results = benchmark_configs(
        configs,
        'infer',
        batch, (224, 224),
        'cpu',
        repeat=repeat,
        warmup=warmup,
        log=None,
        measure_memory=False)
    return {
        name: (r.median, paired_ratio(r, results[0]))
        for name, r in zip(names, results)
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=9)
    parser.add_argument(
        '--sessions',
        type=int,
        default=3,
        help='runtime sessions per model, run in turn (see '
        'tools/analysis_tools/benchmark_onnx.py)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 1])
    parser.add_argument('--skip-eager', action='store_true')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='2 repeats, no warm-up, the detector at '
        f'{QUICK_DET_SHAPE[0]}x{QUICK_DET_SHAPE[1]}: checks that everything '
        'runs, not timings for the record')
    parser.add_argument(
        '--out',
        default=None,
        help='the Markdown file written (default: benchmarks/deploy.md; '
        'with --quick: none, the tables are printed)')
    args = parser.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = osp.join(ROOT, 'benchmarks', 'deploy.md')
    det_shape = DET_SHAPE
    if args.quick:
        args.repeat, args.warmup, det_shape = 2, 0, QUICK_DET_SHAPE
        args.sessions = 1
    os.chdir(ROOT)
    mmdyn.compat.apply()
    torch.set_num_threads(args.threads)
    from mmdyn.analysis.models import build_model
    from mmdyn.analysis.onnx_export import export_onnx, exportable
    from mmdyn.analysis.runtime_benchmark import (count_nodes,
                                                  export_config_file)
    header = cpu_header(args.threads)
    work = tempfile.mkdtemp(prefix='mmdyn_deploy_')
    names = list(MODELS)
    files = [export_config_file(MODELS[n], work) for n in names]
    nodes = {n: count_nodes(f) for n, f in zip(names, files)}
    runtimes = ('onnxruntime', 'openvino')
    lines = [
        '# Deployed ResNet-50s: ONNX Runtime, OpenVINO, PyTorch eager', '',
        'Written by `python benchmarks/deploy.py` (models timed '
        'alternately in one process; ratios are paired medians to the '
        'static ResNet-50 of the same runtime; '
        f'{args.repeat} rounds after {args.warmup}, {args.sessions} '
        'runtime sessions per model run in turn).', '', *header, '',
        'Targets (ONNX Runtime, batch 8): ' +
        ', '.join(f'{n} <= {t}x'
                  for n, t in TARGETS.items()) + '.', '', '## ONNX nodes', '',
        '`tools/deployment/pytorch2onnx.py --dynamic-batch`, 224x224, '
        'simplified; `tools/analysis_tools/benchmark_onnx.py FILE '
        '--nodes-by-scope 5 --nodes-only` lists them per layer.', '',
        '| model | nodes | / ResNet-50 | before the export forms (not '
        'simplified) |', '|---|---:|---:|---:|', *[
            f'| {n} | {nodes[n]} | {nodes[n] / nodes[names[0]]:.1f}x | '
            f'{NODES_BEFORE.get(n, "")} |' for n in names
        ], ''
    ]
    for batch in args.batch_sizes:
        rt = runtime_rows(
            files,
            names,
            runtimes,
            batch,
            args.threads,
            args.repeat,
            args.warmup,
            sessions=args.sessions)
        eager = {} if args.skip_eager else eager_rows(
            [MODELS[n] for n in names], names, batch, args.threads,
            args.repeat, args.warmup)
        lines += [
            f'## Batch {batch}', '',
            '| ResNet-50 family | ONNX nodes | ONNX Runtime ms | ORT / '
            'R-50 | target (batch 8) | OpenVINO ms | OpenVINO / R-50 | '
            'PyTorch eager ms | eager / R-50 |',
            '|---|---:|---:|---:|---:|---:|---:|---:|---:|'
        ]
        for n in names:
            cells = []
            for key in (('onnxruntime', n), ('openvino', n)):
                ms, ratio = rt.get(key, (None, None))
                cells += [
                    '-' if ms is None else f'{ms * 1e3:.1f}',
                    '-' if ratio is None else f'{ratio:.2f}x'
                ]
            ms, ratio = eager.get(n, (None, None))
            target = f'<= {TARGETS[n]}x' if n in TARGETS else ''
            lines.append(
                f'| {n} | {nodes[n]} | {cells[0]} | {cells[1]} | {target} | '
                f'{cells[2]} | {cells[3]} | '
                f'{"-" if ms is None else f"{ms * 1e3:.1f}"} | '
                f'{"-" if ratio is None else f"{ratio:.2f}x"} |')
        lines.append('')
    # Detector fallback: backbone + neck.
    det_files, det_names = [], list(DETECTORS)
    for name in det_names:
        config, options = DETECTORS[name]
        model = build_model(config, options or None)
        module = exportable(model, backbone_only=True, with_neck=True)
        path = osp.join(work,
                        name.replace(' ', '_').replace('+', '') + '.onnx')
        export_onnx(module, path, det_shape)
        det_files.append(path)
    lines += [
        f'## Faster R-CNN backbone + neck ({det_shape[0]}x{det_shape[1]}, '
        'batch 1, ONNX Runtime)', '',
        '| model | ONNX nodes | ONNX Runtime ms | / R-50 + FPN |',
        '|---|---:|---:|---:|'
    ]
    rt = runtime_rows(det_files, det_names, ('onnxruntime', ), 1, args.threads,
                      args.repeat, args.warmup, det_shape)
    for name, path in zip(det_names, det_files):
        ms, ratio = rt[('onnxruntime', name)]
        lines.append(f'| {name} | {count_nodes(path)} | {ms * 1e3:.1f} | '
                     f'{ratio:.2f}x |')
    lines += ['', MMDEPLOY_NOTE]
    print('\n'.join(lines))
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print(f'written to {args.out}')


if __name__ == '__main__':
    main()
