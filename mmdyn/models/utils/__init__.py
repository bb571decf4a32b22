# Copyright (c) mmdyn contributors. All rights reserved.
"""Helpers shared by the mmdyn backbones.

:mod:`.construction` holds the construction workarounds (building on the
``meta`` device, registering a submodule first); :mod:`.dynamic_layers`
swaps static convolutions for dynamic ones and initialises or freezes them.
"""
from .construction import build_on_cpu_if_meta, register_first
from .dynamic_layers import (check_dyconv_cfg, dynamic_like, freeze_warehouses,
                             init_dynamic_layers, is_pretrained, kw_like)

__all__ = [
    'build_on_cpu_if_meta', 'register_first', 'check_dyconv_cfg',
    'dynamic_like', 'kw_like', 'init_dynamic_layers', 'is_pretrained',
    'freeze_warehouses'
]
