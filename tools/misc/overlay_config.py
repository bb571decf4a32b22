# Copyright (c) mmdyn contributors. All rights reserved.
"""Write a config with some top-level variables replaced by other files'.

    python tools/misc/overlay_config.py CONFIG [OVERLAY ...] [--demo]
        [--keep-pretrained] [--cfg-options KEY=VALUE ...] --out FILE.py

mmengine refuses two bases that define the same key, so a data or schedule
base cannot be listed beside a complete config (a stock detector defines its
own). This tool reads CONFIG, replaces each top-level variable that an
OVERLAY file defines (as a whole: dataloaders, evaluators, schedule), merges
``--cfg-options`` and writes the result as a plain config that every
OpenMMLab tool reads. ``--demo`` puts a detector or classifier on mmdyn's
synthetic demo data: the demo data (detection: with masks for a model with
a mask head) and schedule, every ``num_classes`` set to the demo's (3
detection, 4 classification classes) and the backbone's pretrained weights
dropped (``--keep-pretrained`` keeps them), e.g.::

    python tools/misc/overlay_config.py \\
        mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py --demo \\
        --out work_dirs/fcos_demo.py
    python tools/train.py work_dirs/fcos_demo.py

Configs whose hooks or dataset wrappers are built around their own data
(YOLOX, RTMDet) are refused with the reason.
"""
import argparse
import os
import os.path as osp

from mmengine.config import DictAction

import mmdyn.compat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Write CONFIG with variables replaced by OVERLAYs')
    parser.add_argument('config', help='config file or package::path')
    parser.add_argument(
        'overlays',
        nargs='*',
        help='config files or package::paths whose variables replace '
        "CONFIG's, in order")
    parser.add_argument(
        '--demo',
        action='store_true',
        help="put a detector or classifier on mmdyn's demo data and "
        'schedule')
    parser.add_argument(
        '--keep-pretrained',
        action='store_true',
        help="with --demo: keep the backbone's pretrained init_cfg")
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='settings merged last, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--out', required=True, help='config file to write')
    args = parser.parse_args(argv)
    if not args.demo and not args.overlays:
        parser.error('give OVERLAY files or --demo')
    if args.keep_pretrained and not args.demo:
        parser.error('--keep-pretrained goes with --demo')
    if not args.out.endswith('.py'):
        parser.error(f'--out must be a .py file, got {args.out}')
    return args


def main(argv=None):
    args = parse_args(argv)
    mmdyn.compat.apply()  # docs/compat.md
    from mmdyn.engine.config_bases import (load_config, on_demo_data,
                                           overlay_config)
    cfg = load_config(args.config)
    if args.demo:
        cfg = on_demo_data(cfg, keep_pretrained=args.keep_pretrained)
    if args.overlays:
        cfg = overlay_config(cfg, args.overlays)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    folder = osp.dirname(osp.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    cfg.dump(args.out)
    print(f'wrote {args.out}')
    return args.out


if __name__ == '__main__':
    main()
