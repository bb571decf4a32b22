# Copyright (c) mmdyn contributors. All rights reserved.
"""Command-line options shared by ``tools/train.py`` and ``tools/test.py``.

argparse only: the tools build their parsers from this module so that
``--help`` and usage errors answer before torch, mmengine's runner and the
OpenMMLab model libraries are imported (``mmdyn.engine.launch`` applies the
parsed options).
"""
import argparse

__all__ = ['positive_int', 'add_runtime_arguments']


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = 'positive int'  # argparse names it in its error


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that ``tools/train.py`` and ``tools/test.py`` share:

    ``--allow-partial-load`` and ``--threads``.
    """
    parser.add_argument(
        '--allow-partial-load',
        action='store_true',
        help='load a checkpoint that leaves more than half of a dynamic '
        'layer family (ODConv, DyConv, KW, DDF) without weights, with a '
        'warning (default: an error); same as allow_partial_load=True in '
        'the config')
    parser.add_argument(
        '--threads',
        type=positive_int,
        default=None,
        help='torch CPU threads (default: torch\'s, one per core); 1 is '
        'fastest on a busy machine (README, "Threads")')
