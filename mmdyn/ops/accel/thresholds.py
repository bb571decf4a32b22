# Copyright (c) mmdyn contributors. All rights reserved.
"""Every size threshold of the accelerated paths, in one table.

Set from measurements on CPU (see ``benchmarks/``). Read at every call:
changing an entry (e.g. in a test, to send a small layer down a path)
takes effect at once. A value changes only speed, never results.

Its own module (no imports) so that the accelerators and the path
registry (:mod:`mmdyn.ops.accel.paths`, which re-exports it) all read it
without importing each other.
"""

#: The size thresholds, per path family.
THRESHOLDS = {
    # Winograd F(2x2, 3x3) (winograd.py): the input/output transforms move
    # feature maps, so few channels or tiles do not pay for them.
    'winograd':
    dict(min_channels=128, min_tiles=36, min_batch=2),
    # Kernels built into a reused workspace (chunked.py): when one
    # sample's kernel has more than `kernel_to_maps` times the elements of
    # its input and output maps (ResNet stages 3-4).
    'chunked':
    dict(kernel_to_maps=2, min_batch=2),
    # The per-thread workspace the chunked and Winograd paths build kernels
    # into; a batch whose kernels do not fit is done in chunks.
    'workspace':
    dict(kernel_bytes=64 * 2**20),
    # ODConv: fold alpha_c/alpha_f into the kernel when the maps hold more
    # than `fold_maps_to_kernel` times its elements; one-kernel layers use
    # scaled columns when C_out >= `scaled_columns_out_per_pixel` * H'W'.
    # `scale_repeat`: the spatial attention is repeated up to this many
    # times along a kernel row before scaling it (rows of 9 elements are
    # slow to broadcast over on CPU).
    'odconv':
    dict(
        fold_maps_to_kernel=2, scaled_columns_out_per_pixel=2,
        scale_repeat=64),
    # CondConv/DyConv training on CPU: K static convs when
    # (K - 1) * H' * W' <= `conv_then_mix_max_work`.
    'mixture':
    dict(conv_then_mix_max_work=96),
    # KernelWarehouse: the position-major conv when one sample's kernel has
    # more than `position_major_kernel_to_maps` times the elements of its
    # maps (every 1x1 layer); the C cell product from
    # `c_loop_min_columns` cell elements on.
    'kernel_warehouse':
    dict(position_major_kernel_to_maps=1, c_loop_min_columns=4096),
    # The 'recompute' training path (recompute.py), per family: on CPU
    # only where one more kernel assembly (K, or the cell count, products
    # per kernel element) is at most this many times the conv's H'W'
    # products (0: never on CPU); always on accelerators. ODConv's
    # assembly is elementwise products (slow per element on CPU), KW's a
    # product over 47-138 cells; DyConv's K-term mixture is cheap.
    'recompute':
    dict(odconv=0.1, mixture=1.0, kernel_warehouse=0.01),
    # The C loops (c_library.py): one OpenMP thread per
    # `work_per_thread` elements of work (tiny problems are faster on one
    # thread than waking the pool).
    'c_loops':
    dict(work_per_thread=4096),
}
