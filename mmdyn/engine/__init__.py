# Copyright (c) mmdyn contributors. All rights reserved.
"""Mmdyn's training components for mmengine's Runner.

Importing this package registers mmdyn's hooks in mmengine's ``HOOKS`` and
``CPUAmpOptimWrapper`` in ``OPTIM_WRAPPERS``, and changes nothing else in
mmengine, mmcv, mmdet, mmpretrain or torch (tested in
``tests/test_engine/test_import_changes_nothing.py``). Configs choose the
components by name; what the pinned libraries need to run on today's torch,
numpy and setuptools is applied explicitly by :func:`mmdyn.compat.apply`.
"""
from .amp import CPUAmpOptimWrapper
from .checkpoint import CheckpointLoadError, CheckpointShapeCheckHook
from .hooks import (AtomicCheckpointHook, DynamicTemperatureHook,
                    ExactResumeHook)
from .sanity import EmptyDatasetCheckHook

__all__ = [
    'AtomicCheckpointHook', 'CheckpointLoadError', 'CheckpointShapeCheckHook',
    'CPUAmpOptimWrapper', 'DynamicTemperatureHook', 'EmptyDatasetCheckHook',
    'ExactResumeHook'
]
