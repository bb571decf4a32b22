# Copyright (c) mmdyn contributors. All rights reserved.
"""Analysis and deployment helpers shared by ``tools/`` and the tests:

multiply-add counting that understands dynamic layers (:mod:`.flops`),
whole-model latency/memory benchmarks (:mod:`.benchmark`), official
checkpoint converters (:mod:`.converters`) and ONNX export
(:mod:`.onnx_export`). torch + mmengine once a submodule is used (not on
``import mmdyn.analysis``); mmpretrain/mmdet only
when a config needs them.
"""
# The names of .flops are loaded on first use (PEP 562), so that importing
# a light submodule (e.g. .converter_args, which the converter tools' --help
# needs) does not import torch.
_FLOPS_NAMES = ('COLUMNS', 'LayerMAdds', 'MAddsReport', 'count_config_madds',
                'count_madds', 'count_params', 'format_report',
                'static_layer_madds')

__all__ = list(_FLOPS_NAMES)


def __getattr__(name):
    if name in _FLOPS_NAMES:
        from . import flops
        return getattr(flops, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
