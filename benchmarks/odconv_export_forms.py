# Copyright (c) mmdyn contributors. All rights reserved.
"""Timings of the exact export forms of a one-kernel ODConv.

In ONNX Runtime: the scaled im2col columns; the tap maps (``Z =
Conv1x1(alpha_c * x, W as [C_out*k*k, C_in])``, ``Z * alpha_s``, the taps
summed by one grouped one-hot ``Conv``, then ``alpha_f``; stride-1
layers); the per-sample kernels times the unscaled columns (early layers);
in the exported ODConv-1x ResNet-50, against the exported static
ResNet-50.

    python benchmarks/odconv_export_forms.py [--threads 2] [--repeat 10] \
        [--sessions 2] [--batch-sizes 8 1] [--shape 224]

The four files run alternately in one process (ratios: paired medians to
the static ResNet-50). ``mmdyn.ops.accel.export_forms.ODCONV_ONE_KERNEL_FORM``
is the form the export uses; run this on a quiet machine before changing
it.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import mmdyn.compat  # noqa: E402

R50 = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
ODCONV = 'configs/odconv/resnet50-odconv1x_8xb32_in1k.py'


def export(config: str, path: str, shape: int, form: str = None) -> str:
    from mmdyn.analysis.onnx_export import export_config
    from mmdyn.ops.accel import export_forms
    saved = export_forms.ODCONV_ONE_KERNEL_FORM
    if form is not None:
        export_forms.ODCONV_ONE_KERNEL_FORM = form
    try:
        export_config(config, path, shape=(shape, shape))
    finally:
        export_forms.ODCONV_ONE_KERNEL_FORM = saved
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--sessions',
        type=int,
        default=2,
        help='ONNX Runtime sessions per file, run in turn')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 1])
    parser.add_argument('--shape', type=int, default=224)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    mmdyn.compat.apply()
    from mmdyn.analysis.runtime_benchmark import ratio_table
    work = tempfile.mkdtemp(prefix='mmdyn_odconv_forms_')
    names = [
        'ResNet-50', 'ODConv-1x, columns', 'ODConv-1x, tap maps',
        'ODConv-1x, sample kernels'
    ]
    files = [
        export(R50, osp.join(work, 'r50.onnx'), args.shape),
        export(ODCONV, osp.join(work, 'columns.onnx'), args.shape, 'columns'),
        export(ODCONV, osp.join(work, 'taps.onnx'), args.shape, 'taps'),
        export(ODCONV, osp.join(work, 'kernels.onnx'), args.shape, 'kernels'),
    ]
    print('\n'.join(
        ratio_table(files, names, args.batch_sizes, (args.shape, args.shape),
                    args.threads, args.repeat, args.warmup, args.sessions,
                    'form')))


if __name__ == '__main__':
    main()
