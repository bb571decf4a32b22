# Copyright (c) mmdyn contributors. All rights reserved.
"""The Triton kernels of :mod:`mmdyn.ops.accel.ddf_triton` (imports triton).

Loaded by :func:`mmdyn.ops.accel.ddf_triton._kernels`, once per setting of
``TRITON_INTERPRET`` (``@triton.jit`` reads it when the module runs).
Tensors are [B, C, H, W] (x, input gradient), [B, C, k*k] (channel filter)
and [B, head*k*k, Ho, Wo] (spatial filter, output gradient), read through
the strides passed; values are accumulated in float32.

Launch grid: every kernel numbers its tiles (a plane and a block of pixels,
or a plane and a chunk) linearly and reads its tile number from grid
dimensions 0 and 1 (``tile = pid0 + pid1 * num_programs(0)``), so that the
grid of :func:`~mmdyn.ops.accel.ddf_triton.launch_grid` never exceeds
CUDA's limits; tiles past the last one do nothing.

Sizes and outer strides are not specialised by value
(``do_not_specialize``): a new input size does not compile the kernels
again. The innermost strides are (1 for contiguous tensors, which lets
Triton vectorise the loads).

``*_tuned`` are the same kernels under ``triton.autotune``: pixels per
program (``MULT`` times the host's ``BASE``) and ``num_warps`` over a small
set (:data:`CONFIGS`), cached per kernel size, stride, size class and
dtypes. Under the interpreter there is one configuration (no
benchmarking). The ``*_kernel`` functions themselves are launched with
``MULT=1`` where nothing is tuned: for a kernel that adds into its output
(``grad_input`` with ``ACCUMULATE``; benchmarking would add more than
once), and everywhere with ``MMDYN_TRITON_AUTOTUNE=0``
(:mod:`mmdyn.ops.switches`, read at every launch).
"""
import functools
import inspect

import triton
import triton.language as tl
import triton.testing

# ``tl.sum``, ``tl.zeros`` and ``tl.cdiv`` are themselves ``@triton.jit``
# functions, interpretable only when triton.language is first imported with
# TRITON_INTERPRET set: the kernels use ``tl.reduce``, ``tl.full`` and
# integer division.
_SUM_COMBINE = tl.standard._sum_combine

_INTERPRET = bool(triton.knobs.runtime.interpret)

#: Autotuned configurations: (MULT, num_warps). The interpreter runs the
#: larger tile (MULT 2; the untuned launches run MULT 1).
CONFIGS = ((2, 4), ) if _INTERPRET else ((1, 4), (2, 4), (1, 8), (2, 8))
#: The largest MULT of :data:`CONFIGS` (chunks are multiples of it).
MAX_MULT = max(m for m, _ in CONFIGS)
#: What the autotuner's cache is keyed on (besides the tensors' dtypes).
TUNING_KEY = ['K', 'STRIDE', 'SIZE_CLASS']

# Integer arguments not specialised by value (all but innermost strides).
_SIZES = ['C', 'H', 'W', 'Ho', 'Wo', 'CG', 'PLANES', 'SIZE_CLASS']


def _jit(*outer_strides, extra=()):
    return triton.jit(do_not_specialize=[*_SIZES, *outer_strides, *extra])


def _tuned(kernel):
    # Timing each configuration for 5 + 20 ms rather than Triton's
    # 25 + 100 ms: the configurations differ by far more than that resolves.
    quick = {}
    if 'do_bench' in inspect.signature(triton.autotune).parameters:
        quick['do_bench'] = functools.partial(
            triton.testing.do_bench, warmup=5, rep=20)
    return triton.autotune(
        configs=[triton.Config({'MULT': m}, num_warps=w) for m, w in CONFIGS],
        key=TUNING_KEY,
        **quick)(
            kernel)


@triton.jit
def _sum(v, AXIS: tl.constexpr):
    return tl.reduce(v, AXIS, _SUM_COMBINE)


@triton.jit
def _tile(TILES):
    """(linear tile number, whether it is a tile) of this program."""
    t = tl.program_id(0).to(tl.int64) + \
        tl.program_id(1).to(tl.int64) * tl.num_programs(0)
    return t, t < TILES


@triton.jit
def _tap_grid(t, oy, ox, K: tl.constexpr, STRIDE: tl.constexpr,
              DIL: tl.constexpr):
    """Input rows/columns [taps, pixels] the taps t read for outputs (oy,
    ox)."""
    R = (K - 1) // 2
    iy = oy[None, :] * STRIDE + (t[:, None] // K - R) * DIL
    ix = ox[None, :] * STRIDE + (t[:, None] % K - R) * DIL
    return iy, ix


@_jit('sxb', 'sxc', 'sxh', 'scb', 'scc', 'ssb', 'ssc', 'ssh', 'sob', 'soc',
      'soh')
def forward_kernel(x_ptr, cf_ptr, sf_ptr, out_ptr, C, H, W, Ho, Wo, CG, PLANES,
                   SIZE_CLASS, sxb, sxc, sxh, sxw, scb, scc, sct, ssb, ssc,
                   ssh, ssw, sob, soc, soh, sow, K: tl.constexpr,
                   STRIDE: tl.constexpr, DIL: tl.constexpr, ADD: tl.constexpr,
                   KKP: tl.constexpr, BASE: tl.constexpr, MULT: tl.constexpr):
    """Program: one (sample, channel) plane, BASE*MULT output pixels."""
    BLOCK: tl.constexpr = BASE * MULT
    nb = (Ho * Wo + BLOCK - 1) // BLOCK
    tile, valid = _tile(PLANES * nb)
    plane = tile // nb
    b = plane // C
    c = plane % C
    h = c // CG
    p = (tile % nb) * BLOCK + tl.arange(0, BLOCK)
    pm = (p < Ho * Wo) & valid
    oy = p // Wo
    ox = p % Wo
    t = tl.arange(0, KKP)
    tm = t < K * K
    iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
    m2 = tm[:, None] & pm[None, :]
    inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    xv = tl.load(
        x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw, mask=inside,
        other=0.).to(tl.float32)
    sv = tl.load(
        sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc + oy[None, :] * ssh +
        ox[None, :] * ssw,
        mask=m2,
        other=0.).to(tl.float32)
    cv = tl.load(
        cf_ptr + b * scb + c * scc + t * sct, mask=tm & valid,
        other=0.).to(tl.float32)
    if ADD:
        filt = cv[:, None] + sv
    else:
        filt = cv[:, None] * sv
    acc = _sum(xv * filt, 0)
    tl.store(
        out_ptr + b * sob + c * soc + oy * soh + ox * sow,
        acc.to(out_ptr.dtype.element_ty),
        mask=pm)


@_jit('sgb', 'sgc', 'sgh', 'scb', 'scc', 'ssb', 'ssc', 'ssh')
def grad_input_kernel(go_ptr, cf_ptr, sf_ptr, gx_ptr, C, H, W, Ho, Wo, CG,
                      PLANES, SIZE_CLASS, sgb, sgc, sgh, sgw, scb, scc, sct,
                      ssb, ssc, ssh, ssw, K: tl.constexpr,
                      STRIDE: tl.constexpr, DIL: tl.constexpr,
                      ADD: tl.constexpr, ACCUMULATE: tl.constexpr,
                      KKP: tl.constexpr, BASE: tl.constexpr,
                      MULT: tl.constexpr):
    """Program: one (sample, channel) plane, BASE*MULT *input* pixels,
    gathering from the output pixels that read them (no atomics)."""
    BLOCK: tl.constexpr = BASE * MULT
    nb = (H * W + BLOCK - 1) // BLOCK
    tile, valid = _tile(PLANES * nb)
    plane = tile // nb
    b = plane // C
    c = plane % C
    h = c // CG
    q = (tile % nb) * BLOCK + tl.arange(0, BLOCK)
    qm = (q < H * W) & valid
    iy = q // W
    ix = q % W
    t = tl.arange(0, KKP)
    tm = t < K * K
    R = (K - 1) // 2
    # Output pixel of tap t that reads input (iy, ix), if any.
    ny = iy[None, :] - (t[:, None] // K - R) * DIL
    nx = ix[None, :] - (t[:, None] % K - R) * DIL
    oy = ny // STRIDE
    ox = nx // STRIDE
    hit = tm[:, None] & qm[None, :] & (ny >= 0) & (nx >= 0) & \
        (ny % STRIDE == 0) & (nx % STRIDE == 0) & (oy < Ho) & (ox < Wo)
    gv = tl.load(
        go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw, mask=hit,
        other=0.).to(tl.float32)
    sv = tl.load(
        sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc + oy * ssh +
        ox * ssw,
        mask=hit,
        other=0.).to(tl.float32)
    cv = tl.load(
        cf_ptr + b * scb + c * scc + t * sct, mask=tm & valid,
        other=0.).to(tl.float32)
    if ADD:
        filt = cv[:, None] + sv
    else:
        filt = cv[:, None] * sv
    acc = _sum(gv * filt, 0)
    dst = gx_ptr + plane * H * W + q
    if ACCUMULATE:
        acc += tl.load(dst, mask=qm, other=0.).to(tl.float32)
    tl.store(dst, acc.to(gx_ptr.dtype.element_ty), mask=qm)


@_jit(
    'sgb',
    'sgc',
    'sgh',
    'sxb',
    'sxc',
    'sxh',
    'ssb',
    'ssc',
    'ssh',
    extra=['CHUNK', 'NCHUNK'])
def grad_channel_filter_kernel(go_ptr, x_ptr, sf_ptr, dst_ptr, C, H, W, Ho, Wo,
                               CG, PLANES, SIZE_CLASS, CHUNK, NCHUNK, sgb, sgc,
                               sgh, sgw, sxb, sxc, sxh, sxw, ssb, ssc, ssh,
                               ssw, K: tl.constexpr, STRIDE: tl.constexpr,
                               DIL: tl.constexpr, ADD: tl.constexpr,
                               KKP: tl.constexpr, BASE: tl.constexpr,
                               MULT: tl.constexpr):
    """Program: one (sample, channel) plane and one chunk of CHUNK output
    pixels; stores the chunk's sum [k*k] at dst[plane, chunk] (a
    [B*C, NCHUNK, k*k] buffer summed by the host, or the gradient itself
    when NCHUNK is 1)."""
    BLOCK: tl.constexpr = BASE * MULT
    tile, valid = _tile(PLANES * NCHUNK)
    plane = tile // NCHUNK
    b = plane // C
    c = plane % C
    h = c // CG
    start = (tile % NCHUNK) * CHUNK
    end = tl.where(valid, tl.minimum(start + CHUNK, Ho * Wo), start)
    t = tl.arange(0, KKP)
    tm = t < K * K
    acc = tl.full((KKP, BLOCK), 0., tl.float32)
    for first in range(start, end, BLOCK):
        p = first + tl.arange(0, BLOCK)
        pm = p < end
        oy = p // Wo
        ox = p % Wo
        iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
        m2 = tm[:, None] & pm[None, :]
        inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(
            x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw,
            mask=inside,
            other=0.).to(tl.float32)
        gv = tl.load(
            go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw,
            mask=pm,
            other=0.).to(tl.float32)
        prod = xv * gv[None, :]
        if not ADD:
            prod *= tl.load(
                sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc +
                oy[None, :] * ssh + ox[None, :] * ssw,
                mask=m2,
                other=0.).to(tl.float32)
        acc += prod
    tl.store(
        dst_ptr + tile * K * K + t,
        _sum(acc, 1).to(dst_ptr.dtype.element_ty),
        mask=tm & valid)


@_jit(
    'sgb',
    'sgc',
    'sgh',
    'sxb',
    'sxc',
    'sxh',
    'scb',
    'scc',
    extra=['HEAD', 'NSPLIT'])
def grad_spatial_filter_kernel(go_ptr, x_ptr, cf_ptr, dst_ptr, HEAD, H, W, Ho,
                               Wo, CG, PLANES, SIZE_CLASS, NSPLIT, sgb, sgc,
                               sgh, sgw, sxb, sxc, sxh, sxw, scb, scc, sct,
                               K: tl.constexpr, STRIDE: tl.constexpr,
                               DIL: tl.constexpr, ADD: tl.constexpr,
                               KKP: tl.constexpr, BASE: tl.constexpr,
                               MULT: tl.constexpr):
    """Program: one (split, sample, head) plane -- PLANES is NSPLIT*B*HEAD,
    split outermost -- and BASE*MULT output pixels, summing over the split's
    share of the head's channels; stores [k*k, pixels] into dst [NSPLIT, B,
    HEAD*k*k, Ho, Wo] (summed over the splits by the host, or the gradient
    itself when NSPLIT is 1)."""
    BLOCK: tl.constexpr = BASE * MULT
    nb = (Ho * Wo + BLOCK - 1) // BLOCK
    tile, valid = _tile(PLANES * nb)
    plane = tile // nb
    bh = plane % (PLANES // NSPLIT)  # b * HEAD + h
    split = plane // (PLANES // NSPLIT)
    b = bh // HEAD
    h = bh % HEAD
    per = (CG + NSPLIT - 1) // NSPLIT
    first = h * CG + split * per
    last = tl.where(valid, h * CG + tl.minimum(CG, split * per + per), first)
    p = (tile % nb) * BLOCK + tl.arange(0, BLOCK)
    pm = (p < Ho * Wo) & valid
    oy = p // Wo
    ox = p % Wo
    t = tl.arange(0, KKP)
    tm = t < K * K
    iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
    m2 = tm[:, None] & pm[None, :]
    inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    acc = tl.full((KKP, BLOCK), 0., tl.float32)
    for c in range(first, last):
        xv = tl.load(
            x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw,
            mask=inside,
            other=0.).to(tl.float32)
        gv = tl.load(
            go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw,
            mask=pm,
            other=0.).to(tl.float32)
        prod = xv * gv[None, :]
        if not ADD:
            prod *= tl.load(
                cf_ptr + b * scb + c * scc + t * sct, mask=tm,
                other=0.).to(tl.float32)[:, None]
        acc += prod
    tl.store(
        dst_ptr + (plane * K * K + t[:, None]) * Ho * Wo + p[None, :],
        acc.to(dst_ptr.dtype.element_ty),
        mask=m2)


forward_tuned = _tuned(forward_kernel)
grad_input_tuned = _tuned(grad_input_kernel)
grad_channel_filter_tuned = _tuned(grad_channel_filter_kernel)
grad_spatial_filter_tuned = _tuned(grad_spatial_filter_kernel)
