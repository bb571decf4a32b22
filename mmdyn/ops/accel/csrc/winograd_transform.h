/* The Winograd F(2x2, 3x3) kernel transform G w G^T as macros (shared by
   winograd.c and kernel_warehouse.c). */
#ifndef MMDYN_WINOGRAD_TRANSFORM_H
#define MMDYN_WINOGRAD_TRANSFORM_H
/* o[(4u + v) * stride + n] = (G w G^T)[u][v] for the 3x3 kernel w0..w8
   (row-major); G's entries 0, 1 and 1/2 as adds. */
#define WINOGRAD_ROW(l, m, r, u)                                         \
    o_[(4 * (u) + 0) * s_ + n_] = (l);                                   \
    o_[(4 * (u) + 1) * s_ + n_] = 0.5f * ((l) + (m) + (r));              \
    o_[(4 * (u) + 2) * s_ + n_] = 0.5f * ((l) - (m) + (r));              \
    o_[(4 * (u) + 3) * s_ + n_] = (r);
#define WINOGRAD_STORE(o, stride, n, w0, w1, w2, w3, w4, w5, w6, w7, w8) \
    do {                                                                 \
        float *o_ = (o); const long s_ = (stride), n_ = (n);             \
        const float a0 = (w0), a1 = (w1), a2 = (w2), a3 = (w3);          \
        const float a4 = (w4), a5 = (w5), a6 = (w6), a7 = (w7);          \
        const float a8 = (w8);                                           \
        const float h0 = 0.5f * (a0 + a3 + a6), g0 = 0.5f * (a0 - a3 + a6); \
        const float h1 = 0.5f * (a1 + a4 + a7), g1 = 0.5f * (a1 - a4 + a7); \
        const float h2 = 0.5f * (a2 + a5 + a8), g2 = 0.5f * (a2 - a5 + a8); \
        WINOGRAD_ROW(a0, a1, a2, 0) WINOGRAD_ROW(h0, h1, h2, 1)          \
        WINOGRAD_ROW(g0, g1, g2, 2) WINOGRAD_ROW(a6, a7, a8, 3)          \
    } while (0)
#endif
