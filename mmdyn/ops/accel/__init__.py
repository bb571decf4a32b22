# Copyright (c) mmdyn contributors. All rights reserved.
"""Accelerated execution paths of the :mod:`mmdyn.ops` layers.

Nothing here defines what a layer computes: every path is checked against
the layer's ``forward_reference`` (pure PyTorch autograd) in the tests.

* :mod:`.paths`: the registry of paths per layer family (applicability,
  cost rule, what a forced path needs, the function that runs it) and
  DDF's chooser; :mod:`.thresholds`: every size threshold, one table.
* The paths: :mod:`.odconv_paths`, :mod:`.mixture_paths` (CondConv/DyConv),
  :mod:`.kw_paths` and :mod:`.kw_cells` (KernelWarehouse's C cell product,
  packed cells, mixture layouts), :mod:`.ddf_paths`, :mod:`.chunked`
  (kernels built into a reused workspace), :mod:`.kept_copies`
  (rearranged kernels kept for inference), :mod:`.winograd`,
  :mod:`.recompute` (training: the per-sample kernels rebuilt in the
  backward, not kept).
* The C loops: :mod:`~mmdyn.ops.accel.c_library` (building and loading them;
  sources in ``csrc/``), :mod:`.ddf_cpu`; :mod:`.custom_ops` makes them
  ``torch.library`` operators of the ``mmdyn`` namespace; the Triton DDF
  kernels in :mod:`.ddf_triton`.

The modules here receive the layer object; none imports a layer module.
``MMDYN_DISABLE_ACCEL=1`` (:mod:`mmdyn.ops.switches`) turns every C loop,
custom operator and Triton kernel off.
"""
