"""The Triton kernels of :mod:`mmdyn.ops.accel.ddf_triton` (imports triton).

Loaded by :func:`mmdyn.ops.ddf_triton._kernels`, once per setting of
``TRITON_INTERPRET`` (``@triton.jit`` reads it when the module runs).
Tensors are [B, C, H, W] (x, input gradient), [B, C, k*k] (channel filter)
and [B, head*k*k, Ho, Wo] (spatial filter, output gradient), read through
the strides passed; values are accumulated in float32.
"""
import triton
import triton.language as tl

# ``tl.sum`` and ``tl.zeros`` are themselves ``@triton.jit`` functions,
# interpretable only when triton.language is first imported with
# TRITON_INTERPRET set: the kernels use ``tl.reduce`` and ``tl.full``.
_SUM_COMBINE = tl.standard._sum_combine


@triton.jit
def _sum(v, AXIS: tl.constexpr):
    return tl.reduce(v, AXIS, _SUM_COMBINE)


@triton.jit
def _tap_grid(t, oy, ox, K: tl.constexpr, STRIDE: tl.constexpr,
              DIL: tl.constexpr):
    """Input rows/columns [taps, pixels] the taps t read for outputs
    (oy, ox)."""
    R = (K - 1) // 2
    iy = oy[None, :] * STRIDE + (t[:, None] // K - R) * DIL
    ix = ox[None, :] * STRIDE + (t[:, None] % K - R) * DIL
    return iy, ix

@triton.jit
def forward_kernel(x_ptr, cf_ptr, sf_ptr, out_ptr, C, H, W, Ho, Wo, CG,
                   sxb, sxc, sxh, sxw, scb, scc, sct, ssb, ssc, ssh, ssw,
                   sob, soc, soh, sow, K: tl.constexpr,
                   STRIDE: tl.constexpr, DIL: tl.constexpr,
                   ADD: tl.constexpr, KKP: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    h = c // CG
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pm = p < Ho * Wo
    oy = p // Wo
    ox = p % Wo
    t = tl.arange(0, KKP)
    tm = t < K * K
    iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
    m2 = tm[:, None] & pm[None, :]
    inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    xv = tl.load(x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw,
                 mask=inside, other=0.).to(tl.float32)
    sv = tl.load(sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc +
                 oy[None, :] * ssh + ox[None, :] * ssw, mask=m2,
                 other=0.).to(tl.float32)
    cv = tl.load(cf_ptr + b * scb + c * scc + t * sct, mask=tm,
                 other=0.).to(tl.float32)
    if ADD:
        filt = cv[:, None] + sv
    else:
        filt = cv[:, None] * sv
    acc = _sum(xv * filt, 0)
    tl.store(out_ptr + b * sob + c * soc + oy * soh + ox * sow,
             acc.to(out_ptr.dtype.element_ty), mask=pm)

@triton.jit
def grad_input_kernel(go_ptr, cf_ptr, sf_ptr, gx_ptr, C, H, W, Ho, Wo,
                      CG, sgb, sgc, sgh, sgw, scb, scc, sct, ssb, ssc,
                      ssh, ssw, K: tl.constexpr, STRIDE: tl.constexpr,
                      DIL: tl.constexpr, ADD: tl.constexpr,
                      ACCUMULATE: tl.constexpr, KKP: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    h = c // CG
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    qm = q < H * W
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
    gv = tl.load(go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw,
                 mask=hit, other=0.).to(tl.float32)
    sv = tl.load(sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc +
                 oy * ssh + ox * ssw, mask=hit, other=0.).to(tl.float32)
    cv = tl.load(cf_ptr + b * scb + c * scc + t * sct, mask=tm,
                 other=0.).to(tl.float32)
    if ADD:
        filt = cv[:, None] + sv
    else:
        filt = cv[:, None] * sv
    acc = _sum(gv * filt, 0)
    dst = gx_ptr + pid * H * W + q
    if ACCUMULATE:
        acc += tl.load(dst, mask=qm, other=0.).to(tl.float32)
    tl.store(dst, acc.to(gx_ptr.dtype.element_ty), mask=qm)

@triton.jit
def grad_channel_filter_kernel(go_ptr, x_ptr, sf_ptr, gcf_ptr, C, H, W,
                               Ho, Wo, CG, sgb, sgc, sgh, sgw, sxb, sxc,
                               sxh, sxw, ssb, ssc, ssh, ssw,
                               K: tl.constexpr, STRIDE: tl.constexpr,
                               DIL: tl.constexpr, ADD: tl.constexpr,
                               KKP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    h = c // CG
    t = tl.arange(0, KKP)
    tm = t < K * K
    acc = tl.full((KKP, BLOCK), 0., tl.float32)
    for start in range(0, Ho * Wo, BLOCK):
        p = start + tl.arange(0, BLOCK)
        pm = p < Ho * Wo
        oy = p // Wo
        ox = p % Wo
        iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
        m2 = tm[:, None] & pm[None, :]
        inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw,
                     mask=inside, other=0.).to(tl.float32)
        gv = tl.load(go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw,
                     mask=pm, other=0.).to(tl.float32)
        prod = xv * gv[None, :]
        if not ADD:
            prod *= tl.load(
                sf_ptr + b * ssb + (h * K * K + t[:, None]) * ssc +
                oy[None, :] * ssh + ox[None, :] * ssw, mask=m2,
                other=0.).to(tl.float32)
        acc += prod
    tl.store(gcf_ptr + pid * K * K + t,
             _sum(acc, 1).to(gcf_ptr.dtype.element_ty), mask=tm)

@triton.jit
def grad_spatial_filter_kernel(go_ptr, x_ptr, cf_ptr, gsf_ptr, HEAD, H,
                               W, Ho, Wo, CG, sgb, sgc, sgh, sgw, sxb,
                               sxc, sxh, sxw, scb, scc, sct,
                               K: tl.constexpr, STRIDE: tl.constexpr,
                               DIL: tl.constexpr, ADD: tl.constexpr,
                               KKP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * HEAD + h
    b = pid // HEAD
    h = pid % HEAD
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pm = p < Ho * Wo
    oy = p // Wo
    ox = p % Wo
    t = tl.arange(0, KKP)
    tm = t < K * K
    iy, ix = _tap_grid(t, oy, ox, K, STRIDE, DIL)
    m2 = tm[:, None] & pm[None, :]
    inside = m2 & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    acc = tl.full((KKP, BLOCK), 0., tl.float32)
    for i in range(0, CG):
        c = h * CG + i
        xv = tl.load(x_ptr + b * sxb + c * sxc + iy * sxh + ix * sxw,
                     mask=inside, other=0.).to(tl.float32)
        gv = tl.load(go_ptr + b * sgb + c * sgc + oy * sgh + ox * sgw,
                     mask=pm, other=0.).to(tl.float32)
        prod = xv * gv[None, :]
        if not ADD:
            prod *= tl.load(cf_ptr + b * scb + c * scc + t * sct,
                            mask=tm, other=0.).to(tl.float32)[:, None]
        acc += prod
    tl.store(gsf_ptr + (pid * K * K + t[:, None]) * Ho * Wo + p[None, :],
             acc.to(gsf_ptr.dtype.element_ty), mask=m2)
