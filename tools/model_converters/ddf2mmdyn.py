"""Convert an official theFoxofSky/ddfnet DDF-ResNet checkpoint to mmdyn.

ddf_{mul,add}_resnet50/101: mul and add have the same weights, so pass
--config (e.g. configs/ddf/resnet50-ddf-add_8xb128-130e_in1k.py).

    python tools/model_converters/ddf2mmdyn.py IN OUT [--config CONFIG]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG (default: the one mmdyn
config the checkpoint fits exactly); unknown keys, missing keys and shape
mismatches are refused with a list of them. OUT is an mmengine checkpoint
(load it with ``load_from`` or ``init_cfg=dict(type='Pretrained')``).
"""
import argparse
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output mmdyn checkpoint')
    parser.add_argument('--config', default=None,
                        help='target mmdyn config (default: found by shapes)')
    args = parser.parse_args()
    from mmdyn.analysis.converters import ConversionError, convert_file
    try:
        convert_file('ddf', args.src, args.dst, args.config)
    except ConversionError as err:
        sys.exit(f'conversion refused: {err}')


if __name__ == '__main__':
    main()
