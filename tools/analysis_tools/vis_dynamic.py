# Copyright (c) mmdyn contributors. All rights reserved.
"""Pictures of what the dynamic layers of a model do on some images.

    python tools/analysis_tools/vis_dynamic.py CONFIG CHECKPOINT IMAGE \
        [IMAGE ...] [--out-dir DIR] [--pixels X,Y ...] [--layers REGEX] \
        [--filter-images N] [--device cpu] [--cfg-options k=v ...]

Writes under ``--out-dir`` (default ``work_dirs/vis_dynamic``):

* ``summary.png`` / ``summary.json``: per ODConv / DyConv / CondConv /
  KernelWarehouse layer, the normalised entropy of its kernel attention and
  the variance of its attentions over the images (how input-dependent the
  layer is; use several images);
* ``attention/<layer>.png``: each attention of a layer, images x entries;
* ``ddf/<layer>_img<i>.png``: for DDF and DDF-Up layers, the k x k spatial
  filter at each ``--pixels`` point (x,y of the resized network input;
  default: centre and two quarter points) and the channel filters'
  statistics, for the first ``--filter-images`` images.

Images go through the config's test pipeline (annotation loaders dropped).
CHECKPOINT may be ``none`` to look at a freshly initialised model.
"""
import argparse

from mmengine.config import DictAction

import mmdyn.compat


def parse_pixel(text: str):
    try:
        x, y = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--pixels takes X,Y integer pairs, got {text!r}') from None
    return x, y


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Visualise the filters and attentions of the dynamic '
        'layers (DDF, DDF-Up, ODConv, DyConv, CondConv, KernelWarehouse)')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        'checkpoint', help='checkpoint file, or "none" for a fresh model')
    parser.add_argument('images', nargs='+', help='image file(s)')
    parser.add_argument(
        '--out-dir', default='work_dirs/vis_dynamic', help='output folder')
    parser.add_argument(
        '--pixels',
        type=parse_pixel,
        nargs='+',
        default=None,
        help='X,Y pixels of the resized network input where the DDF spatial '
        'filters are shown')
    parser.add_argument(
        '--layers',
        default=None,
        help='regular expression: only layers whose module name matches')
    parser.add_argument(
        '--filter-images',
        type=int,
        default=1,
        help='DDF pictures for the first N images (default 1)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu, cuda:0')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as in tools/train.py')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # see docs/compat.md
    from mmdyn.analysis.progress import tool_logger
    from mmdyn.analysis.vis_dynamic import visualize
    tool_logger()
    checkpoint = None if args.checkpoint.lower() == 'none' else \
        args.checkpoint
    return visualize(
        args.config,
        checkpoint,
        args.images,
        args.out_dir,
        pixels=args.pixels,
        layers=args.layers,
        filter_images=args.filter_images,
        device=args.device,
        cfg_options=args.cfg_options)


if __name__ == '__main__':
    main()
