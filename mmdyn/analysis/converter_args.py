# Copyright (c) mmdyn contributors. All rights reserved.
"""The command line of ``tools/model_converters/<family>2mmdyn.py``.

argparse only, so that ``--help`` and usage errors answer at once, before
the converters import torch and the OpenMMLab libraries
(:func:`mmdyn.analysis.converters.converter_cli` parses with this parser).
"""
import argparse


def converter_parser(description: str) -> argparse.ArgumentParser:
    """``IN OUT [--config CONFIG] [--weights {auto,model,ema}] [--verify]
    [--trust-checkpoint]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output mmdyn checkpoint')
    parser.add_argument(
        '--config',
        default=None,
        help='target mmdyn config (default: the one config the weights fit)')
    parser.add_argument(
        '--weights',
        choices=('auto', 'model', 'ema'),
        default='auto',
        help="which weights of a training checkpoint: the model's (auto, "
        'model) or the EMA ones (ema)')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='load the result strictly into the model and print the top-5 '
        'logits and checksums of a fixed input (see the README)')
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='load pickled objects other than tensors and plain data; runs '
        'code named in the file: only for files you trust')
    return parser
