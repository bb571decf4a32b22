/* The DDF loops for one element type: DDF_T is the type, DDF_SUF the
   function-name suffix (included once per type by ddf.c). */
#define F_MUL(cf, sf) ((cf) * (sf))
#define F_ADD(cf, sf) ((cf) + (sf))
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

/* Valid output columns [*lo, *hi) for which x*s + off lies in [0, W). */
static inline void CAT(col_range, DDF_SUF)(long off, long s, long W, long Wo,
                                           long *lo, long *hi) {
    long l = off >= 0 ? 0 : (-off + s - 1) / s;
    long h = (W - 1 - off) >= 0 ? (W - 1 - off) / s + 1 : 0;
    if (h > Wo) h = Wo;
    if (l > h) l = h;
    *lo = l; *hi = h;
}

/* out[b,c,y,x] = sum_{i,j} x[b,c,y*s+(i-r)*d, x*s+(j-r)*d] * F(cf[b,c,i,j],
   sf[b,i*k+j,y,x]). All tensors contiguous NCHW. */
void CAT(ddf_forward, DDF_SUF)(const DDF_T *x, const DDF_T *cf,
                                const DDF_T *sf, DDF_T *out, long B, long C,
                                long H, long W, long Ho, long Wo, long k,
                                long d, long s, int add, int threads) {
    const long r = (k - 1) / 2, kk = k * k;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long bc = 0; bc < B * C; ++bc) {
        const long b = bc / C;
        const DDF_T *xp = x + bc * H * W;
        const DDF_T *cfp = cf + bc * kk;
        const DDF_T *sfp = sf + b * kk * Ho * Wo;
        DDF_T *op = out + bc * Ho * Wo;
        for (long y = 0; y < Ho; ++y) {
            DDF_T *orow = op + y * Wo;
            for (long xo = 0; xo < Wo; ++xo) orow[xo] = 0;
            for (long i = 0; i < k; ++i) {
                const long iy = y * s + (i - r) * d;
                if (iy < 0 || iy >= H) continue;
                const DDF_T *irow = xp + iy * W;
                for (long j = 0; j < k; ++j) {
                    const long off = (j - r) * d;
                    const DDF_T cv = cfp[i * k + j];
                    const DDF_T *srow = sfp + ((i * k + j) * Ho + y) * Wo;
                    long lo, hi;
                    CAT(col_range, DDF_SUF)(off, s, W, Wo, &lo, &hi);
                    if (add) {
                        #pragma omp simd
                        for (long xo = lo; xo < hi; ++xo)
                            orow[xo] +=
                                irow[xo * s + off] * F_ADD(cv, srow[xo]);
                    } else {
                        #pragma omp simd
                        for (long xo = lo; xo < hi; ++xo)
                            orow[xo] +=
                                irow[xo * s + off] * F_MUL(cv, srow[xo]);
                    }
                }
            }
        }
    }
}

/* Gradients w.r.t. x (gx, zeroed here) and the channel filter (gcf), one
   (b, c) plane per task so that nothing is shared between threads. */
void CAT(ddf_backward_x_cf, DDF_SUF)(const DDF_T *go, const DDF_T *x,
                                      const DDF_T *cf, const DDF_T *sf,
                                      DDF_T *gx, DDF_T *gcf, long B, long C,
                                      long H, long W, long Ho, long Wo,
                                      long k, long d, long s, int add,
                                      int need_x, int need_cf, int threads) {
    const long r = (k - 1) / 2, kk = k * k;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long bc = 0; bc < B * C; ++bc) {
        const long b = bc / C;
        const DDF_T *xp = x + bc * H * W;
        const DDF_T *cfp = cf + bc * kk;
        const DDF_T *sfp = sf + b * kk * Ho * Wo;
        const DDF_T *gop = go + bc * Ho * Wo;
        DDF_T *gxp = gx + bc * H * W;
        if (need_x)
            for (long q = 0; q < H * W; ++q) gxp[q] = 0;
        for (long t = 0; t < kk; ++t) {
            const long i = t / k, j = t % k, off = (j - r) * d;
            const DDF_T cv = cfp[t];
            long lo, hi;
            CAT(col_range, DDF_SUF)(off, s, W, Wo, &lo, &hi);
            DDF_T acc = 0;
            for (long y = 0; y < Ho; ++y) {
                const long iy = y * s + (i - r) * d;
                if (iy < 0 || iy >= H) continue;
                const DDF_T *grow = gop + y * Wo;
                const DDF_T *srow = sfp + (t * Ho + y) * Wo;
                const DDF_T *irow = xp + iy * W;
                DDF_T *gxrow = gxp + iy * W;
                if (need_x) {
                    if (add) {
                        for (long xo = lo; xo < hi; ++xo)
                            gxrow[xo * s + off] +=
                                grow[xo] * F_ADD(cv, srow[xo]);
                    } else {
                        for (long xo = lo; xo < hi; ++xo)
                            gxrow[xo * s + off] +=
                                grow[xo] * F_MUL(cv, srow[xo]);
                    }
                }
                if (need_cf) {
                    if (add) {
                        #pragma omp simd reduction(+:acc)
                        for (long xo = lo; xo < hi; ++xo)
                            acc += grow[xo] * irow[xo * s + off];
                    } else {
                        #pragma omp simd reduction(+:acc)
                        for (long xo = lo; xo < hi; ++xo)
                            acc += grow[xo] * srow[xo] * irow[xo * s + off];
                    }
                }
            }
            if (need_cf) gcf[bc * kk + t] = acc;
        }
    }
}

/* Gradient w.r.t. the spatial filter (gsf, zeroed here): a sum over
   channels, so the tasks are (b, output row) pairs instead. */
void CAT(ddf_backward_sf, DDF_SUF)(const DDF_T *go, const DDF_T *x,
                                    const DDF_T *cf, DDF_T *gsf, long B,
                                    long C, long H, long W, long Ho, long Wo,
                                    long k, long d, long s, int add,
                                    int threads) {
    const long r = (k - 1) / 2, kk = k * k;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long by = 0; by < B * Ho; ++by) {
        const long b = by / Ho, y = by % Ho;
        for (long t = 0; t < kk; ++t) {
            DDF_T *gsrow = gsf + ((b * kk + t) * Ho + y) * Wo;
            for (long xo = 0; xo < Wo; ++xo) gsrow[xo] = 0;
        }
        for (long c = 0; c < C; ++c) {
            const long bc = b * C + c;
            const DDF_T *grow = go + (bc * Ho + y) * Wo;
            for (long t = 0; t < kk; ++t) {
                const long i = t / k, j = t % k, off = (j - r) * d;
                const long iy = y * s + (i - r) * d;
                if (iy < 0 || iy >= H) continue;
                const DDF_T *irow = x + (bc * H + iy) * W;
                const DDF_T cv = add ? (DDF_T)1 : cf[bc * kk + t];
                DDF_T *gsrow = gsf + ((b * kk + t) * Ho + y) * Wo;
                long lo, hi;
                CAT(col_range, DDF_SUF)(off, s, W, Wo, &lo, &hi);
                #pragma omp simd
                for (long xo = lo; xo < hi; ++xo)
                    gsrow[xo] += grow[xo] * cv * irow[xo * s + off];
            }
        }
    }
}

/* ---- Stride 1: every tap is a constant offset in a zero-padded plane. ----
   A plane padded by R = r*d on each side (and one spare row, so that the
   garbage columns below never read outside it) is laid out with row length
   Wp = W + 2R. An output pixel p = y*Wp + x (x < W; the columns x >= W are
   computed and thrown away) reads tap (i, j) at p + i*d*Wp + j*d, so each
   tap is one long contiguous loop over the plane. The spatial filter comes
   in the same layout: sfe [B, k*k, H, Wp], zero in the columns >= W. */

static inline void CAT(pad_plane, DDF_SUF)(const DDF_T *src, DDF_T *dst,
                                           long H, long W, long Wp, long R) {
    for (long y = 0; y < H; ++y) {
        DDF_T *row = dst + (y + R) * Wp + R;
        const DDF_T *srow = src + y * W;
        for (long x = 0; x < W; ++x) row[x] = srow[x];
    }
}

/* One (b, c) plane: ob[q] = sum_t xb[q + off_t] * F(cv[t], se[t * L + q])
   for the padded plane xb. */
static inline void CAT(plane_s1, DDF_SUF)(const DDF_T *restrict xb,
                                          const DDF_T *restrict cf,
                                          const DDF_T *restrict se,
                                          DDF_T *restrict ob, long L,
                                          long Wp, long k, long d, int add) {
    if (k == 3) {
        /* The common case, unrolled: the 9 taps accumulate in a register,
           one store per pixel instead of nine. (restrict and the local
           copy of the channel filter let the compiler keep it in registers
           and vectorise.) */
        DDF_T cv[9];
        for (int t = 0; t < 9; ++t) cv[t] = cf[t];
        const long o1 = d, o2 = 2 * d, o3 = d * Wp, o6 = 2 * d * Wp;
        const long offs[9] = {0, o1, o2, o3, o3 + o1, o3 + o2,
                              o6, o6 + o1, o6 + o2};
#define DDF_TAP(t, F) (xq[offs[t]] * F(cv[t], se[(t) * L + q]))
#define DDF_SUM9(F) (DDF_TAP(0, F) + DDF_TAP(1, F) + DDF_TAP(2, F) \
                     + DDF_TAP(3, F) + DDF_TAP(4, F) + DDF_TAP(5, F) \
                     + DDF_TAP(6, F) + DDF_TAP(7, F) + DDF_TAP(8, F))
        if (add) {
            #pragma omp simd
            for (long q = 0; q < L; ++q) {
                const DDF_T *xq = xb + q;
                ob[q] = DDF_SUM9(F_ADD);
            }
        } else {
            #pragma omp simd
            for (long q = 0; q < L; ++q) {
                const DDF_T *xq = xb + q;
                ob[q] = DDF_SUM9(F_MUL);
            }
        }
#undef DDF_TAP
#undef DDF_SUM9
        return;
    }
    for (long q = 0; q < L; ++q) ob[q] = 0;
    for (long t = 0; t < k * k; ++t) {
        const DDF_T c = cf[t];
        const DDF_T *restrict xs = xb + (t / k) * d * Wp + (t % k) * d;
        const DDF_T *restrict s = se + t * L;
        DDF_T *restrict o = ob;
        if (add) {
            #pragma omp simd
            for (long q = 0; q < L; ++q) o[q] += xs[q] * (c + s[q]);
        } else {
            #pragma omp simd
            for (long q = 0; q < L; ++q) o[q] += xs[q] * (c * s[q]);
        }
    }
}

/* n = scale^2 DDFs of the same input ("phases": cf [n, B, C, k*k], sfe
   [n, B, k*k, H, Wp]) whose outputs are interleaved into out
   [B, C, scale*H, scale*W]: phase p = py*scale + px fills the pixels
   (y*scale + py, x*scale + px). scale = 1 is the plain operator; scale > 1
   is DDF-Up, written row by row without a pixel-shuffle copy. */
int CAT(ddf_forward_s1, DDF_SUF)(const DDF_T *x, const DDF_T *cf,
                                  const DDF_T *sfe, DDF_T *out, long B,
                                  long C, long H, long W, long k, long d,
                                  long scale, int add, int threads) {
    const long R = (k - 1) / 2 * d, Wp = W + 2 * R, kk = k * k;
    const long L = H * Wp, P = (H + 2 * R + 1) * Wp, n = scale * scale;
    const long Ws = W * scale;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        DDF_T *xb = (DDF_T *)calloc(P, sizeof(DDF_T));
        DDF_T *ob = (DDF_T *)malloc(n * L * sizeof(DDF_T));
        if (!xb || !ob) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed)
        #pragma omp for schedule(static)
        for (long bc = 0; bc < B * C; ++bc) {
            const long b = bc / C;
            CAT(pad_plane, DDF_SUF)(x + bc * H * W, xb, H, W, Wp, R);
            for (long p = 0; p < n; ++p)
                CAT(plane_s1, DDF_SUF)(xb, cf + (p * B * C + bc) * kk,
                                       sfe + (p * B + b) * kk * L, ob + p * L,
                                       L, Wp, k, d, add);
            DDF_T *op = out + bc * n * H * W;
            if (scale == 1) {  /* contiguous rows: let it vectorise */
                for (long y = 0; y < H; ++y)
                    for (long xo = 0; xo < W; ++xo)
                        op[y * W + xo] = ob[y * Wp + xo];
                continue;
            }
            for (long y = 0; y < H; ++y)
                for (long py = 0; py < scale; ++py) {
                    DDF_T *orow = op + (y * scale + py) * Ws;
                    for (long px = 0; px < scale; ++px) {
                        const DDF_T *src = ob + (py * scale + px) * L + y * Wp;
                        for (long xo = 0; xo < W; ++xo)
                            orow[xo * scale + px] = src[xo];
                    }
                }
        }
        free(xb);
        free(ob);
    }
    return failed ? -1 : 0;
}

/* Gradients w.r.t. x (scattered back along each tap's offset into a padded
   plane) and the channel filter, one (b, c) plane per task. */
int CAT(ddf_backward_x_cf_s1, DDF_SUF)(const DDF_T *go, const DDF_T *x,
                                        const DDF_T *cf, const DDF_T *sfe,
                                        DDF_T *gx, DDF_T *gcf, long B,
                                        long C, long H, long W, long k,
                                        long d, int add, int need_x,
                                        int need_cf, int threads) {
    const long R = (k - 1) / 2 * d, Wp = W + 2 * R, kk = k * k;
    const long L = H * Wp, P = (H + 2 * R + 1) * Wp;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        DDF_T *xb = (DDF_T *)calloc(P, sizeof(DDF_T));
        DDF_T *gxb = (DDF_T *)malloc(P * sizeof(DDF_T));
        DDF_T *gob = (DDF_T *)calloc(L, sizeof(DDF_T));
        if (!xb || !gxb || !gob) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed)
        #pragma omp for schedule(static)
        for (long bc = 0; bc < B * C; ++bc) {
            const long b = bc / C;
            CAT(pad_plane, DDF_SUF)(x + bc * H * W, xb, H, W, Wp, R);
            for (long y = 0; y < H; ++y)  /* columns >= W stay zero */
                for (long xo = 0; xo < W; ++xo)
                    gob[y * Wp + xo] = go[bc * H * W + y * W + xo];
            for (long q = 0; q < P; ++q) gxb[q] = 0;
            for (long t = 0; t < kk; ++t) {
                const long off = (t / k) * d * Wp + (t % k) * d;
                const DDF_T cv = cf[bc * kk + t];
                const DDF_T *restrict xs = xb + off;
                DDF_T *restrict gs = gxb + off;
                const DDF_T *restrict se = sfe + (b * kk + t) * L;
                const DDF_T *restrict g = gob;
                DDF_T acc = 0;
                if (add) {
                    #pragma omp simd reduction(+:acc)
                    for (long q = 0; q < L; ++q) {
                        gs[q] += g[q] * (cv + se[q]);
                        acc += g[q] * xs[q];
                    }
                } else {
                    #pragma omp simd reduction(+:acc)
                    for (long q = 0; q < L; ++q) {
                        gs[q] += g[q] * (cv * se[q]);
                        acc += g[q] * se[q] * xs[q];
                    }
                }
                if (need_cf) gcf[bc * kk + t] = acc;
            }
            if (need_x) {
                DDF_T *gp = gx + bc * H * W;
                for (long y = 0; y < H; ++y)
                    for (long xo = 0; xo < W; ++xo)
                        gp[y * W + xo] = gxb[(y + R) * Wp + xo + R];
            }
        }
        free(xb);
        free(gxb);
        free(gob);
    }
    return failed ? -1 : 0;
}

/* Gradient w.r.t. the spatial filter, in the padded layout (gsfe
   [B, k*k, H, Wp], written here): a sum over channels, so the tasks are
   (sample, block of the plane). xp [B, C, H+2R+1, Wp] is x padded, goe
   [B, C, H, Wp] the output gradient with zero columns >= W. */
void CAT(ddf_backward_sf_s1, DDF_SUF)(const DDF_T *goe, const DDF_T *xp,
                                       const DDF_T *cf, DDF_T *gsfe, long B,
                                       long C, long H, long W, long k,
                                       long d, int add, long blocks,
                                       int threads) {
    const long R = (k - 1) / 2 * d, Wp = W + 2 * R, kk = k * k;
    const long L = H * Wp, P = (H + 2 * R + 1) * Wp;
    const long step = (L + blocks - 1) / blocks;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long task = 0; task < B * blocks; ++task) {
        const long b = task / blocks, q0 = (task % blocks) * step;
        const long q1 = q0 + step < L ? q0 + step : L;
        for (long t = 0; t < kk; ++t)
            for (long q = q0; q < q1; ++q) gsfe[(b * kk + t) * L + q] = 0;
        for (long c = 0; c < C; ++c) {
            const long bc = b * C + c;
            const DDF_T *restrict g = goe + bc * L;
            for (long t = 0; t < kk; ++t) {
                const long off = (t / k) * d * Wp + (t % k) * d;
                const DDF_T cv = add ? (DDF_T)1 : cf[bc * kk + t];
                const DDF_T *restrict xs = xp + bc * P + off;
                DDF_T *restrict gs = gsfe + (b * kk + t) * L;
                #pragma omp simd
                for (long q = q0; q < q1; ++q) gs[q] += g[q] * cv * xs[q];
            }
        }
    }
}
