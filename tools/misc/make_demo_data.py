# Copyright (c) mmdyn contributors. All rights reserved.
"""Generate the synthetic demo data sets (normally made on first use).

python tools/misc/make_demo_data.py [--root data] [--seed 0]     [--only
{det,cls}]

Writes ROOT/demo_det (COCO instance segmentation, 3 classes) and ROOT/demo_cls
(image folders, 4 classes). An existing complete folder is left as it is.
"""
import argparse
import os.path as osp

from mmdyn.datasets import make_demo_classification, make_demo_detection


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='data', help='parent folder')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--only', choices=['det', 'cls'])
    args = parser.parse_args(argv)
    jobs = dict(
        det=(make_demo_detection, 'demo_det'),
        cls=(make_demo_classification, 'demo_cls'))
    for kind, (make, name) in jobs.items():
        if args.only not in (None, kind):
            continue
        root = osp.join(args.root, name)
        made = make(root, seed=args.seed)
        print(f'{root}: {"generated" if made else "already present"}')


if __name__ == '__main__':
    main()
