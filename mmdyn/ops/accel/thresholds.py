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
    # `tap_gemm_min_in_channels`: stride-1 one-kernel layers with at least
    # this many input channels and `tap_gemm_min_batch` samples (and not
    # deep enough for the scaled columns) run as one 1x1 GEMM to the kh*kw
    # taps' output channels then the weighted shift-sum, in inference and
    # training. Measured on AVX-512 (2026-12-06, one thread, a loaded
    # machine: indications; benchmarks/vendor_paths.py), 256 ch 14x14 b8,
    # time / nn.Conv2d: eval 1.6-1.7x (winograd 2.0x, reference 1.7-1.9x),
    # train 1.5-1.7x (scaled_columns 1.9-2.3x, recompute 3.1-3.5x); at 128
    # ch writing the kh*kw times larger GEMM output costs more than the
    # conv (eval 1.6-2.8x vs reference 1.4-1.5x); stride 2 (four residue
    # GEMMs) and batch 1 lose to the other paths.
    # In inference with the C tap sum (tap_sum_cpu.py) the tap GEMM takes
    # those layers ahead of the scaled columns; its samples go through a
    # reused buffer of at most `tap_gemm_chunk_bytes`. Measured on AVX-512
    # (2026-12-06, 2 threads, quiet, time / nn.Conv2d, tap_gemm vs
    # scaled_columns): 256 ch 14x14 b1 1.62 / 1.55 (61 repeats), b2-4 1.39
    # / 1.46, b8 1.24 / 1.40, b32 1.37 / 1.60; 512 ch 7x7 b1 1.38 / 1.28,
    # b2-4 a tie, b8 1.09 / 1.19, b32 1.32 / 1.46; stride 2 a tie (not
    # taken); 128 ch 28x28 b8 1.34 (winograd 1.12). Buffer size: 64 ch
    # 56x56 best at 4 MiB, 256-512 ch at 16-64.
    # `scaled_columns_out_per_pixel_inference`: the scaled columns in
    # inference (one GEMM of the whole batch), AVX-512 2026-12-06, b8: 1.3x
    # nn.Conv2d at 256 ch 14x14 (tap_gemm 1.45x) and 512 ch 7x7; 1.6x at
    # 128 ch 28x28 (reference 1.4-1.5x).
    # `pointwise_gemm_*`: 1x1 one-kernel layers with C_in >= 128 and at
    # least one output pixel per output channel (ResNet-50 stages 1-2) run
    # as one batched matmul of per-sample matrices. Measured 2026-12-06
    # (one thread, an indication; b8, time / nn.Conv2d, reference ->
    # pointwise_gemm): AVX-512 eval 256->64 56x56 1.70 -> 1.07, 512->128
    # 28x28 1.33 -> 1.12; train 1.3-1.7 -> 1.0-1.14; AVX2 (capped) eval
    # 1.12-1.45 -> 1.03-1.12. At 14x14 and 7x7 it loses (1.3-6x).
    dict(
        pointwise_gemm_min_in_channels=128,
        pointwise_gemm_min_pixels_per_out_channel=1,
        fold_maps_to_kernel=2,
        scaled_columns_out_per_pixel=2,
        scaled_columns_out_per_pixel_inference=1,
        scale_repeat=64,
        tap_gemm_min_in_channels=192,
        tap_gemm_min_batch=2,
        tap_gemm_chunk_bytes=16 * 2**20),
    # CondConv/DyConv training on CPU: K static convs when
    # (K - 1) * H' * W' <= `conv_then_mix_max_work`. Inference: the mixed
    # kernels and one batch-as-groups conv (oneDNN) from `grouped_min_batch`
    # samples while a kernel has at most `grouped_max_kernel_to_maps` times
    # the elements of one sample's maps. Measured on AVX-512 (2026-12-06,
    # one thread, a loaded machine: indications), DyConv K=4 b8 / nn.Conv2d:
    # 256 ch 14x14 grouped 1.6x, winograd 2.0x, chunked 1.6x; 128 ch 28x28
    # both 1.2x; 512 ch 7x7 (ratio 47) chunked 3.0x, grouped 7.6x.
    # `pointwise_gemm_min_pixels`: 1x1 layers in inference with this many
    # pixels or more run as the mixed matrices and one batched matmul
    # (DyConv K=4, b8, AVX-512, 2026-12-06, one thread, an indication;
    # time / nn.Conv2d, batch_grouped -> batched matmul: 56x56 1.49-2.14 ->
    # 1.06-1.50, 28x28 1.34-1.57 -> 0.99-1.16, 14x14 1.42-1.59 ->
    # 1.16-1.22; 7x7 chunked 2.0-2.3 against 3.2-3.4).
    # `taps_min_in_channels`: stride-1 layers larger than 1x1 with this many
    # input channels (`..._one_sample` for a batch of one) run in inference
    # as the tap-major mixtures, one batched GEMM to the taps and the C tap
    # sum (AVX-512, 2026-12-07, quiet, 2 threads, DyConv K=4, time /
    # nn.Conv2d, the path before -> 'taps', alternating: 512 ch 7x7 b8
    # chunked 3.2-3.4 -> 2.4-2.5, b1 reference 2.1 -> 1.9-2.0; 256 ch 14x14
    # b8 batch_grouped 1.55 -> 1.45; 128 ch 28x28 b8 1.1-1.2 -> 1.3-1.6, so
    # not there). Inside DyConv-4x ResNet-50 (forward hooks), batch 1: the
    # stage-3 layers 1.92-2.03 -> 2.01-2.67 ms (so not at one sample), stage
    # 4 5.3-6.9 -> 3.8-4.4 ms; batch 8: stage 3 10.5-12.9 -> 9.8-12.3 ms,
    # stage 4 21-22 -> 16-18 ms.
    'mixture':
    dict(
        pointwise_gemm_min_pixels=196,
        conv_then_mix_max_work=96,
        grouped_min_batch=2,
        grouped_max_kernel_to_maps=8,
        taps_min_in_channels=256,
        taps_min_in_channels_one_sample=512),
    # KernelWarehouse: the position-major conv when one sample's kernel has
    # more than `position_major_kernel_to_maps` times the elements of its
    # maps (every 1x1 layer); the C cell product from
    # `c_loop_min_columns` cell elements on (None: the CPU's default,
    # kw_cells.C_LOOP_MIN_COLUMNS: 4096 on AVX2, never on AVX-512, where
    # MKL's GEMM runs these products faster, measured 2026-12-06).
    # Inference (measured dispatch of KW-1x ResNet-50, batch 8, 224x224,
    # AVX-512, 2026-12-06, ms per layer, rule -> fastest): the 3x3 layers
    # of stage 4 (where Winograd does not pay) run 2.4x faster on
    # 'mixture_gemm' than position-major (63 -> 24, 62 -> 26; the 1x1
    # layers there: even within the spread); 1x1 layers with
    # `pointwise_min_pixels` output pixels or more run faster as one
    # batched matmul (56x56: 4.5 -> 2.6, 28x28: 7.0 -> 5.3).
    # `taps_min_in_channels`: stride-1 layers larger than 1x1 with this many
    # input channels run in inference as one batched GEMM to the taps and
    # the C tap sum (kw_paths.taps). Measured on AVX-512 (2026-12-07,
    # quiet, 2 threads, KW-1x ResNet-50, each 3x3 layer timed inside the
    # model, former path -> taps): batch 8, 256 ch 14x14 (winograd)
    # 15.8-16.6 -> 14.7-15.8 ms, 512 ch 7x7 (mixture_gemm) 29.1-30.2 ->
    # 22.9-24.4 ms, the model 667 -> 653 ms; batch 1 (mixture_gemm) 3.4-5.2
    # -> 3.1-4.6 and 5.2-6.2 -> 4.1-5.4 ms, the model 156 -> 152 ms. Timed
    # alone at batch 8 it loses at 128 ch 28x28 (winograd 6.6-7.0 against
    # 8.1-8.9 ms) and 64 ch 56x56 (7.5-8.3 against 15.6-16.9 ms).
    'kernel_warehouse':
    dict(
        position_major_kernel_to_maps=1,
        c_loop_min_columns=None,
        pointwise_min_pixels=784,
        taps_min_in_channels=256),
    # The 'recompute' training path (recompute.py), per family: on CPU
    # only where one more kernel assembly (K, or the cell count, products
    # per kernel element) is at most this many times the conv's H'W'
    # products (0: never on CPU); always on accelerators. ODConv's
    # assembly is elementwise products (slow per element on CPU), KW's a
    # product over 47-138 cells; DyConv's K-term mixture is cheap. KW's
    # threshold also decides, per layer, whether its CPU training path
    # 'mixture_gemm' (kw_train.py) rebuilds the mixtures in the backward
    # (1: every KW-1x ResNet-50 layer at 224 but the stage-4 downsample,
    # 1.11x ResNet-50's saved activations instead of 2.27x).
    'recompute':
    dict(odconv=0.1, mixture=1.0, kernel_warehouse=1.0),
    # DDF's export form (ddf_export_forms.py): a one-head `mul` DDF is
    # done in channel chunks whose im2col columns hold at most
    # `chunk_bytes` per sample, at most `max_chunks` chunks (each chunk
    # costs four ONNX nodes). DDF-mul ResNet-50 in ONNX Runtime 1.32 (batch
    # 8, 224x224, 2 threads, AVX-512, 2026-12-07, against the exported
    # ResNet-50, two sessions each; chunks in stages 1-3): no chunks 1.15x
    # (350 nodes); chunks of 1 MiB, at most 4 (4, 4, 2): 1.03x (497
    # nodes); at most 8 (8, 4, 2): 1.00-1.01x (545 nodes, over 4x
    # ResNet-50's 126); 8, 4, 1: 1.02x (503 nodes).
    'ddf_export':
    dict(chunk_bytes=2**20, max_chunks=4),
    # The C loops (c_library.py): one OpenMP thread per
    # `work_per_thread` elements of work (tiny problems are faster on one
    # thread than waking the pool).
    'c_loops':
    dict(work_per_thread=4096),
}
