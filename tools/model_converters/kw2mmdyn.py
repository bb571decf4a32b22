"""Convert an official OSVAI/KernelWarehouse KW-ResNet checkpoint to mmdyn.

kw_resnet18/50, any budget (the config is found by the warehouse shapes).

    python tools/model_converters/kw2mmdyn.py IN OUT [--config CONFIG]

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
        convert_file('kw', args.src, args.dst, args.config)
    except ConversionError as err:
        sys.exit(f'conversion refused: {err}')


if __name__ == '__main__':
    main()
