# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse kernel assembly: ``torch.matmul`` against the C loop.

Builds KW-1x ResNet-50 (``configs/kernelwarehouse/``), records the shape of
every ``attention @ cells`` product of one batch-8 forward, then times each
distinct shape with ``torch.matmul`` (MKL) and with
:func:`mmdyn.ops.accel.kw_cells.small_rows_matmul`, cutting the cells
into column strips on every call or reading them pre-cut
(:func:`~mmdyn.ops.accel.kw_cells.pack_columns`, what the inference
path does through ``WarehouseManager.packed_cells``), all writing into a
reused output, interleaved, median of ``--repeat``. Prints one row per
shape and the per-forward totals. Its totals set the CPU default of
``THRESHOLDS['kernel_warehouse']['c_loop_min_columns']``
(:data:`mmdyn.ops.accel.kw_cells.C_LOOP_MIN_COLUMNS`): the C loop on
AVX2, MKL on AVX-512 (2026-12-06, Xeon VM, 1 and 2 threads: the pre-cut
C loop 0.84x MKL's speed per forward).

Usage::

    python benchmarks/kw_assembly.py [--batch-size 8] [--repeat 9]
"""
import argparse
import os.path as osp
import statistics
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(
    ROOT, 'configs/kernelwarehouse/'
    'resnet50-kw1x_8xb128-300e_in1k.py')


def assembly_shapes(batch_size: int) -> dict:
    """{(rows, inner, columns): calls} of one forward of KW-1x ResNet-50."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    import mmdyn.models  # noqa: F401 (registers the backbones)
    from mmdyn.ops import kernel_warehouse as kw
    shapes = {}
    real = kw._KWLayerMixin.mix_cells

    def recording(self, attention, *args, **kwargs):
        cells = self.warehouse_manager.weights[self.warehouse_id]
        key = (attention.shape[0] * attention.shape[1], attention.shape[2],
               cells[0].numel())
        shapes[key] = shapes.get(key, 0) + 1
        return real(self, attention, *args, **kwargs)

    model = MODELS.build(Config.fromfile(CONFIG).model).eval()
    kw._KWLayerMixin.mix_cells = recording
    try:
        with torch.no_grad():
            model(torch.randn(batch_size, 3, 224, 224), mode='tensor')
    finally:
        kw._KWLayerMixin.mix_cells = real
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeat', type=int, default=9)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from mmdyn.engine.malloc import tune_malloc
    from mmdyn.ops.accel.kw_cells import load, pack_columns, small_rows_matmul
    tune_malloc()
    if load() is None:
        sys.exit('the C loop is unavailable (no compiler, or '
                 'MMDYN_KW_CPU_KERNEL=0)')
    shapes = assembly_shapes(args.batch_size)
    from mmdyn.analysis.machine import header_lines
    print('\n'.join(header_lines(torch.get_num_threads())) + '\n')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'batch {args.batch_size}, median of {args.repeat}')
    print('| rows x inner x columns | calls | matmul ms | C loop ms | '
          'C loop, pre-cut ms | pre-cut GMAC/s | speed-up |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    totals = [0.0, 0.0, 0.0]
    for (rows, inner, cols), calls in sorted(
            shapes.items(), key=lambda kv: -kv[0][2]):
        a, b = torch.randn(rows, inner), torch.randn(inner, cols)
        packed = pack_columns(b)
        out = torch.empty(rows, cols)
        candidates = (
            lambda: torch.matmul(a, b, out=out),
            lambda: small_rows_matmul(a, b, out=out),
            lambda: small_rows_matmul(a, b, out=out, packed_b=packed))
        times = [[] for _ in candidates]
        for i in range(args.repeat + 2):
            for j, step in enumerate(candidates):
                start = time.perf_counter()
                step()
                if i >= 2:
                    times[j].append(time.perf_counter() - start)
        medians = [statistics.median(t) * 1e3 for t in times]
        for j, median in enumerate(medians):
            totals[j] += median * calls
        mkl, loop, precut = medians
        print(f'| {rows} x {inner} x {cols} | {calls} | {mkl:.1f} | '
              f'{loop:.1f} | {precut:.1f} | '
              f'{rows * inner * cols / precut / 1e6:.1f} | '
              f'{mkl / precut:.2f}x |')
    print(f'| per forward | | {totals[0]:.0f} | {totals[1]:.0f} | '
          f'{totals[2]:.0f} | | {totals[0] / totals[2]:.2f}x |')


if __name__ == '__main__':
    main()
