"""Analysis and deployment helpers shared by ``tools/`` and the tests:
multiply-add counting that understands dynamic layers (:mod:`.flops`),
whole-model latency/memory benchmarks (:mod:`.benchmark`), official
checkpoint converters (:mod:`.converters`) and ONNX export
(:mod:`.onnx_export`). torch + mmengine at import time; mmpretrain/mmdet only
when a config needs them.
"""
from .flops import (COLUMNS, LayerMAdds, MAddsReport, count_config_madds,
                    count_madds, count_params, format_report,
                    static_layer_madds)

__all__ = [
    'COLUMNS', 'LayerMAdds', 'MAddsReport', 'count_config_madds',
    'count_madds', 'count_params', 'format_report', 'static_layer_madds'
]
