# Copyright (c) mmdyn contributors. All rights reserved.
"""Exported models timed in an inference runtime: ONNX Runtime (CPU) or
OpenVINO (CPU, when installed), several files alternating in one process
(:func:`mmdyn.analysis.benchmark.run_interleaved`), so that their time
ratios hold on a shared machine.

Used by ``tools/analysis_tools/benchmark_onnx.py`` and
``benchmarks/deploy.py``.
"""
import collections
import importlib.util
import itertools
import os
import os.path as osp
from typing import Callable, List, Optional, Sequence

import numpy as np

from .benchmark import BenchResult, run_interleaved

RUNTIMES = ('onnxruntime', 'openvino')


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime``'s Python package is installed."""
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got '
                         f'{runtime!r}')
    return importlib.util.find_spec(runtime) is not None


def onnxruntime_session_options(threads: Optional[int] = None):
    """ONNX Runtime ``SessionOptions`` for timing a session beside other
    work: ``threads`` intra-op threads (None: the runtime's default), and
    workers that stop spinning when a run returns.

    ONNX Runtime's idle intra-op workers spin for a while after a run
    returns. When another session, or PyTorch, runs next on the same cores,
    those spinning workers take cores from it: a session alternating with
    others then runs much slower than alone (most at batch 1), which pulls
    every time ratio towards 1 (``benchmarks/deploy.md`` has the
    measurements). ``session.force_spinning_stop`` ends the spinning when a
    run returns and keeps it during the run, so a session runs about as it
    does alone with the default options; turning spinning off altogether
    (``session.intra_op.allow_spinning = 0``) would slow down graphs of many
    small nodes instead.
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry('session.force_spinning_stop', '1')
    return options


def open_session(onnx_file: str,
                 runtime: str = 'onnxruntime',
                 threads: Optional[int] = None) -> Callable:
    """``run(inputs [B, 3, H, W] ndarray) -> list of output ndarrays`` of
    ``onnx_file`` in ``runtime`` on the CPU, with ``threads`` intra-op threads
    (None: the runtime's default), in float32 (OpenVINO's default on CPUs with
    bfloat16 units is bfloat16).

    ONNX Runtime's workers stop spinning when
    a run returns (:func:`onnxruntime_session_options`).
    """
    if not runtime_available(runtime):
        raise RuntimeError(f'{runtime} is not installed: pip install '
                           f'{runtime} (or the "deploy" extra of mmdyn)')
    if runtime == 'onnxruntime':
        import onnxruntime as ort
        session = ort.InferenceSession(
            onnx_file,
            onnxruntime_session_options(threads),
            providers=['CPUExecutionProvider'])
        return lambda x: session.run(None, {'input': x})
    import openvino as ov
    core = ov.Core()
    # float32 as ONNX Runtime: on CPUs with AMX/AVX512-BF16 OpenVINO's
    # default precision is bfloat16 (errors of 1e-2 and more).
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    compiled = core.compile_model(core.read_model(onnx_file), 'CPU', config)

    def run(x):
        result = compiled(x)
        return [result[out] for out in compiled.outputs]

    return run


def export_config_file(config: str,
                       out_dir: str,
                       shape: Sequence[int] = (224, 224),
                       backbone_only: bool = False) -> str:
    """Export ``config`` (random weights, dynamic batch) to ``out_dir/<config
    name>.onnx``; returns the path."""
    from .onnx_export import export_config
    os.makedirs(out_dir, exist_ok=True)
    name = osp.splitext(osp.basename(config.split('::')[-1]))[0]
    path = osp.join(out_dir, name + '.onnx')
    export_config(config, path, shape=shape, backbone_only=backbone_only)
    return path


def count_nodes(onnx_file: str) -> int:
    """Nodes of the file's main graph."""
    import onnx
    return len(onnx.load(onnx_file, load_external_data=False).graph.node)


def node_scope(node, depth: int) -> str:
    """The module scope of an exported node (``model/backbone/layer1/
    layer1.0/conv2``, cut to ``depth`` parts): from its name, or from its first
    output's name where the simplifier renamed it (``node_Gemm_12``);
    ``'(graph)'`` for nodes outside any module."""
    for name in (node.name, *node.output):
        parts = name.strip('/').split('/')
        if len(parts) > 1:
            return '/'.join(parts[:-1][:depth])
    return '(graph)'


def count_nodes_by_scope(onnx_file: str,
                         depth: int = 5) -> collections.Counter:
    """Nodes of the file's main graph per module scope (:func:`node_scope`),
    e.g. ``depth=5``: per layer of a ResNet (``model/backbone/layer3/
    layer3.1/conv2``); the op types of one scope by
    :func:`op_types_in_scope`."""
    import onnx
    graph = onnx.load(onnx_file, load_external_data=False).graph
    return collections.Counter(node_scope(n, depth) for n in graph.node)


def op_types_in_scope(onnx_file: str, scope: str) -> collections.Counter:
    """The op types of the nodes under ``scope`` (a prefix of
    :func:`node_scope`)."""
    import onnx
    graph = onnx.load(onnx_file, load_external_data=False).graph
    return collections.Counter(
        n.op_type for n in graph.node if node_scope(n, 99).startswith(scope))


def benchmark_onnx_files(files: Sequence[str],
                         names: Sequence[str],
                         runtime: str = 'onnxruntime',
                         batch_size: int = 8,
                         shape: Sequence[int] = (224, 224),
                         threads: Optional[int] = 2,
                         repeat: int = 10,
                         warmup: int = 2,
                         log: Optional[Callable[[str], None]] = print,
                         sessions: int = 1) -> List[BenchResult]:
    """Time ``files`` (inputs ``[batch_size, 3, *shape]``) in ``runtime``,
    alternately; see :func:`~mmdyn.analysis.benchmark.run_interleaved`.

    ``sessions``: open each file this many times and run the sessions in
    turn (round ``r`` runs session ``r % sessions`` of every file), each
    warmed ``warmup`` times first. One ONNX Runtime session of a file can
    run several per cent faster or slower than another of the same file
    (where its arena's buffers land in memory), so with one session each
    a ratio can be off by that much. Give a ``repeat`` that is a multiple
    of ``sessions`` so that each session runs as many timed rounds.

    Compare with :func:`~mmdyn.analysis.benchmark.paired_ratio`.
    """
    if sessions < 1:
        raise ValueError(f'sessions must be >= 1, got {sessions}')
    x = np.random.default_rng(0).standard_normal(
        (batch_size, 3, int(shape[0]), int(shape[1])), dtype=np.float32)
    opened = [[open_session(f, runtime, threads) for _ in range(sessions)]
              for f in files]
    if sessions > 1:
        for runs in opened:
            for run in runs:
                for _ in range(warmup):
                    run(x)
    # Each call runs the file's next session.
    steps = [(lambda turns=itertools.cycle(runs): next(turns)(x))
             for runs in opened]
    return run_interleaved(
        steps, [f'{n} ({runtime})' for n in names],
        'infer',
        batch_size,
        repeat,
        warmup,
        'cpu',
        log,
        measure_memory=False)


def ratio_table(files: Sequence[str],
                names: Sequence[str],
                batch_sizes: Sequence[int],
                shape: Sequence[int] = (224, 224),
                threads: Optional[int] = 2,
                repeat: int = 10,
                warmup: int = 2,
                sessions: int = 1,
                label: str = 'model') -> List[str]:
    """``files`` timed in ONNX Runtime by :func:`benchmark_onnx_files` at each
    of ``batch_sizes``: Markdown lines ``| batch | <label> | ONNX nodes | ONNX
    Runtime ms | / <first name> |``, ratios as paired medians to the first
    file's."""
    from .benchmark import paired_ratio
    lines = [
        f'| batch | {label} | ONNX nodes | ONNX Runtime ms | / {names[0]} |',
        '|---:|---|---:|---:|---:|'
    ]
    for batch in batch_sizes:
        results = benchmark_onnx_files(
            files,
            names,
            batch_size=batch,
            shape=shape,
            threads=threads,
            repeat=repeat,
            warmup=warmup,
            log=None,
            sessions=sessions)
        lines += [
            f'| {batch} | {name} | {count_nodes(path)} | '
            f'{result.median * 1e3:.1f} | '
            f'{paired_ratio(result, results[0]):.2f}x |'
            for name, path, result in zip(names, files, results)
        ]
    return lines
