# Copyright (c) mmdyn contributors. All rights reserved.
"""``np.in1d`` for mmpretrain's retrieval metrics.

numpy 2.4 removed ``np.in1d`` (deprecated since 2.0 in favour of
``np.isin``). mmpretrain 1.2's ``RetrievalRecall`` and
``RetrievalAveragePrecision`` (``mmpretrain/evaluation/metrics/
retrieval.py``, the only caller in the pinned stack) call it and fail with
``AttributeError: module 'numpy' has no attribute 'in1d'``. The fix gives
that one module a numpy namespace that also has ``in1d`` (``np.isin`` of
the flattened input, its documented equivalent); numpy itself is left
unchanged.
"""
import importlib

import numpy as np

PACKAGE = 'mmpretrain'
VERSIONS = '>=1.2.0,<1.3'
SUMMARY = ('numpy >= 2.4 has no np.in1d: mmpretrain\'s retrieval metrics '
           'raise AttributeError')
UPSTREAM = 'none'

MODULE = 'mmpretrain.evaluation.metrics.retrieval'


class NumpyWithIn1d:
    """Numpy's namespace plus the ``in1d`` that numpy 2.4 removed."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique=False, invert=False):
        return np.isin(
            np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def is_needed():
    if hasattr(np, 'in1d'):
        return False
    return importlib.import_module(MODULE).np is np


def apply():
    importlib.import_module(MODULE).np = NumpyWithIn1d()
