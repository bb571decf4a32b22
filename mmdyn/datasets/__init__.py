# Copyright (c) mmdyn contributors. All rights reserved.
"""Dataset utilities: the built-in demo data generator."""
from .demo_data import (CLS_CLASSES, DET_CLASSES, demo_kind, ensure_demo_data,
                        make_demo_classification, make_demo_detection)

__all__ = [
    'CLS_CLASSES', 'DET_CLASSES', 'demo_kind', 'ensure_demo_data',
    'make_demo_classification', 'make_demo_detection'
]
