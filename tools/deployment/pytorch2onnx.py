# Copyright (c) mmdyn contributors. All rights reserved.
"""Export a classification config (or a detector's backbone) to ONNX.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] \
        --output-file model.onnx [--shape 224 224] [--dynamic-batch] \
        [--backbone-only [--with-neck]] [--verify] [--opset 17] \
        [--no-simplify]

Classifiers are exported as ``inputs [B, 3, H, W] -> logits [B, classes]``
(no preprocessing: feed normalised images), backbones as ``inputs -> one
output per feature map`` (with ``--with-neck``, the maps after the neck:
a detector's backbone + FPN, the deployable part of a detector whose
proposal selection is data dependent). ``--dynamic-batch`` makes the batch
dimension dynamic; dynamic convolutions export with their batch-independent
export forms (im2col as one Conv, batched MatMuls). ``--verify`` runs the
file with onnxruntime at batch 1 and 4, compares with PyTorch (fails above
``--tolerance``) and prints one run's time of each. Checkpoints load through
``mmdyn.engine.checkpoint.load_model_weights`` (integrity and fit checks).
torch's TracerWarnings (the layers' shape checks, fixed at trace time) are
counted in one line; ``--show-tracer-warnings`` prints them.
"""
import argparse
import sys

from mmengine.config import DictAction

import mmdyn.compat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a config to ONNX')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        default=None,
        help='checkpoint (default: random weights)')
    parser.add_argument('--output-file', required=True, help='.onnx path')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224, 224],
        help='input H W (one value: square)')
    parser.add_argument(
        '--dynamic-batch',
        action='store_true',
        help='make the batch dimension dynamic')
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help="export model.backbone's feature maps (for "
        'detectors)')
    parser.add_argument(
        '--with-neck',
        action='store_true',
        help='with --backbone-only: export the features '
        "after the model's neck (e.g. a detector's FPN)")
    parser.add_argument('--opset', type=int, default=17)
    parser.add_argument(
        '--verify',
        action='store_true',
        help='compare with onnxruntime at batch 1 and 4')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='max abs difference accepted by --verify')
    parser.add_argument(
        '--show-tracer-warnings',
        action='store_true',
        help="show torch's TracerWarnings (by default counted in one line: "
        'they are shape checks fixed at trace time, see '
        'mmdyn/analysis/onnx_export.py)')
    parser.add_argument(
        '--no-simplify',
        action='store_true',
        help='keep the exported graph as traced (by default constants are '
        'folded and identities dropped when onnxscript is installed)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='config overrides')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # see docs/compat.md
    from mmdyn.analysis.models import build_model
    from mmdyn.analysis.onnx_export import (compare_with_onnxruntime,
                                            export_onnx, exportable)
    if len(args.shape) not in (1, 2):
        sys.exit(f'--shape takes 1 or 2 values, got {args.shape}')
    shape = (args.shape[0], args.shape[-1])
    model = build_model(args.config, args.cfg_options)
    if args.checkpoint:
        from mmdyn.engine.checkpoint import load_model_weights
        load_model_weights(model, args.checkpoint)
    module = exportable(model, args.backbone_only, args.with_neck)
    names = export_onnx(
        module,
        args.output_file,
        shape,
        args.dynamic_batch,
        args.opset,
        args.show_tracer_warnings,
        simplify=not args.no_simplify)
    print(f'exported {args.output_file} (input [B, 3, {shape[0]}, '
          f'{shape[1]}], outputs {names}, dynamic batch: '
          f'{args.dynamic_batch})')
    if args.verify:
        batches = (1, 4) if args.dynamic_batch else (2, )
        worst = 0.0
        timings = []
        diffs = compare_with_onnxruntime(
            module, args.output_file, shape, batches, timings=timings)
        for (batch, diff), (_, ort_s, torch_s) in zip(diffs, timings):
            print(f'onnxruntime vs PyTorch, batch {batch}: max abs '
                  f'difference {diff:.3g}; one run: onnxruntime '
                  f'{ort_s * 1e3:.1f} ms, PyTorch {torch_s * 1e3:.1f} ms')
            worst = max(worst, diff)
        if worst > args.tolerance:
            sys.exit(f'verification failed: {worst:.3g} > {args.tolerance}')


if __name__ == '__main__':
    main()
