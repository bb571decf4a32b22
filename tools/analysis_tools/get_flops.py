# Copyright (c) mmdyn contributors. All rights reserved.
"""Multiply-adds and parameters of configs, dynamic layers counted right.

    python tools/analysis_tools/get_flops.py CONFIG [CONFIG ...] \
        [--shape H W] [--per-layer] [--markdown] [--cfg-options k=v ...]

Counting convention (docs/flops.md): multiply-adds per image;
``conv`` = every conv/linear on feature maps or logits (out_elems * C_in/g *
prod(k); a dynamic conv counts as one conv with its per-sample kernel),
``att`` = attention / filter-generating branches, ``agg`` = building the
per-sample kernel, ``scal`` = ODConv's input/output scalings. Norms,
activations, pooling and softmax are not counted. Classifiers are counted at
224x224 by default (``model(x, mode='tensor')``), detectors at 800x1333
(backbone, neck, RPN convs; the RoI heads of two-stage detectors on a
fixed number of proposals, ``--proposals``, by default the config's
``test_cfg.rpn.max_per_img`` (1000 in mmdet's COCO configs), mask heads on
the first 100 of them; the image padded by the data preprocessor).

With several configs, or ``--markdown``, a markdown table (one row per
config) is printed.
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

import mmdyn.compat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Count multiply-adds (dynamic layers included) and '
        'parameters of a model config')
    parser.add_argument('config', nargs='+', help='config file path(s)')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=None,
        help='input size: H W, or one value for a square (default: 224 224 '
        'for classifiers, 800 1333 for detectors)')
    parser.add_argument(
        '--proposals',
        type=int,
        default=None,
        help='proposals per image the RoI heads of two-stage detectors are '
        'counted on (default: the config\'s test_cfg.rpn.max_per_img, 1000 '
        'for mmdet\'s COCO configs)')
    parser.add_argument(
        '--per-layer', action='store_true', help='print every counted layer')
    parser.add_argument(
        '--markdown',
        action='store_true',
        help='print a markdown table with one row per config')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as in tools/train.py')
    return parser.parse_args(argv)


def markdown_table(rows) -> str:
    """rows: list of (name, MAddsReport)."""
    lines = [
        '| config | Params (M) | conv (M) | att (M) | agg (M) | scal (M) '
        '| MAdds (G) |', '|---|---:|---:|---:|---:|---:|---:|'
    ]
    for name, report in rows:
        t = report.per_image()
        cells = [
            f'{t[c] / 1e6:.1f}' if t[c] else ''
            for c in ('conv', 'att', 'agg', 'scal')
        ]
        lines.append(f'| {name} | {report.params / 1e6:.2f} | ' +
                     ' | '.join(cells) + f' | {t["total"] / 1e9:.3f} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # see docs/compat.md
    from mmdyn.analysis.flops import count_config_madds, format_report
    if args.shape is None:
        shape = None
    elif len(args.shape) == 1:
        shape = (args.shape[0], args.shape[0])
    elif len(args.shape) == 2:
        shape = tuple(args.shape)
    else:
        raise ValueError(f'--shape takes 1 or 2 values, got {args.shape}')
    from mmdyn.analysis.progress import tool_logger
    logger = tool_logger()
    rows = []
    for index, config in enumerate(args.config):
        logger.info(f'[{index + 1}/{len(args.config)}] counting {config}')
        report = count_config_madds(
            config, shape, args.cfg_options, num_proposals=args.proposals)
        name = osp.splitext(osp.basename(config))[0]
        rows.append((name, report))
        if not args.markdown:
            print(
                format_report(
                    report, per_layer=args.per_layer, title=f'== {config}'))
            print()
    if args.markdown or len(rows) > 1:
        print(markdown_table(rows))


if __name__ == '__main__':
    main()
