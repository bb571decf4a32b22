"""Fused CPU kernels for the DDF operator, built on first use.

PyTorch has no single CPU op for ``sum_t a_t * b_t * shift_t(x)``: written
with eager ops the DDF operator costs two full passes over the output per
filter tap, about 9x a depthwise 3x3 conv on a 2-core CPU (see
``benchmarks/ddf.md``). The three loops below (forward; backward for the
input and channel filter; backward for the spatial filter) do it in one pass
each, without any k*k-times larger buffer.

The C source has no PyTorch headers, so building it takes about a second with
the system C compiler; it is called through ``ctypes`` on the tensors' data
pointers. The shared object is cached under ``$MMDYN_CACHE_DIR`` (default
``~/.cache/mmdyn``), keyed by the source, compiler flags and CPU model.
Everything degrades gracefully: with no compiler, or with
``MMDYN_DDF_CPU_KERNEL=0``, :func:`load` returns None and
:func:`mmdyn.ops.ddf.ddf` uses its pure-PyTorch tap loop.
"""
import ctypes
import hashlib
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch

# One C body per dtype: the macro DDF_T is the element type, DDF_SUF the
# function-name suffix. F() is the combined filter value for one tap.
_KERNEL_BODY = r'''
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
                            orow[xo] += irow[xo * s + off] * F_ADD(cv, srow[xo]);
                    } else {
                        #pragma omp simd
                        for (long xo = lo; xo < hi; ++xo)
                            orow[xo] += irow[xo * s + off] * F_MUL(cv, srow[xo]);
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
                            gxrow[xo * s + off] += grow[xo] * F_ADD(cv, srow[xo]);
                    } else {
                        for (long xo = lo; xo < hi; ++xo)
                            gxrow[xo * s + off] += grow[xo] * F_MUL(cv, srow[xo]);
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
'''

_SOURCE = ('#define DDF_T float\n#define DDF_SUF _f32\n' + _KERNEL_BODY +
           '#undef DDF_T\n#undef DDF_SUF\n'
           '#define DDF_T double\n#define DDF_SUF _f64\n' + _KERNEL_BODY)
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-shared', '-fPIC', '-std=c99']
_SUFFIX = {torch.float32: '_f32', torch.float64: '_f64'}

_lock = threading.Lock()
_state = {'tried': False, 'lib': None}


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') or line.startswith('flags'):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(path: str) -> None:
    compiler = os.environ.get('CC') or shutil.which('gcc') or shutil.which(
        'cc')
    if compiler is None:
        raise RuntimeError('no C compiler found (set CC)')
    os.makedirs(osp.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=osp.dirname(path)) as tmp:
        src = osp.join(tmp, 'ddf_cpu.c')
        with open(src, 'w') as f:
            f.write(_SOURCE)
        out = osp.join(tmp, 'ddf_cpu.so')
        subprocess.run([compiler, *_FLAGS, src, '-o', out],
                       check=True,
                       capture_output=True,
                       timeout=120)
        # Atomic: parallel test workers may build the same file.
        os.replace(out, path)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for suffix in _SUFFIX.values():
        getattr(lib, 'ddf_forward' + suffix).argtypes = (
            [ptr] * 4 + [long_] * 9 + [int_] * 2)
        getattr(lib, 'ddf_backward_x_cf' + suffix).argtypes = (
            [ptr] * 6 + [long_] * 9 + [int_] * 4)
        getattr(lib, 'ddf_backward_sf' + suffix).argtypes = (
            [ptr] * 4 + [long_] * 9 + [int_] * 2)
        for name in ('ddf_forward', 'ddf_backward_x_cf', 'ddf_backward_sf'):
            getattr(lib, name + suffix).restype = None


def load() -> Optional[ctypes.CDLL]:
    """Return the compiled kernel library, building it once; None if not
    available (no compiler, build failure, or ``MMDYN_DDF_CPU_KERNEL=0``)."""
    if _state['tried']:
        return _state['lib']
    with _lock:
        if _state['tried']:
            return _state['lib']
        if os.environ.get('MMDYN_DDF_CPU_KERNEL', '1') == '0':
            _state['tried'] = True
            return None
        key = hashlib.sha1(
            (_SOURCE + ' '.join(_FLAGS) + _cpu_model()).encode()).hexdigest()
        cache = os.environ.get('MMDYN_CACHE_DIR') or osp.join(
            osp.expanduser('~'), '.cache', 'mmdyn')
        path = osp.join(cache, f'ddf_cpu_{key[:16]}.so')
        try:
            if not osp.exists(path):
                _build(path)
            lib = ctypes.CDLL(path)
            _declare(lib)
            _state['lib'] = lib
        except Exception as e:  # noqa: BLE001 - any failure means fallback
            warnings.warn(f'mmdyn: fused DDF CPU kernel unavailable ({e}); '
                          'using the slower PyTorch tap loop')
        _state['tried'] = True
        return _state['lib']


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel can run on these tensors (CPU, same float32
    or float64 dtype)."""
    dtype = tensors[0].dtype
    return (dtype in _SUFFIX
            and all(t.device.type == 'cpu' and t.dtype == dtype
                    for t in tensors))


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _threads(work: int) -> int:
    # Tiny problems are faster on one thread than waking the pool.
    return max(1, min(torch.get_num_threads(), work // 4096 + 1))


def forward(lib, x, cf, sf, out_hw, kernel_size, dilation, stride, add):
    """out = ddf(x, cf, sf) for contiguous CPU tensors of one dtype."""
    B, C, H, W = x.shape
    Ho, Wo = out_hw
    out = x.new_empty((B, C, Ho, Wo))
    getattr(lib, 'ddf_forward' + _SUFFIX[x.dtype])(
        _ptr(x), _ptr(cf), _ptr(sf), _ptr(out), B, C, H, W, Ho, Wo,
        kernel_size, dilation, stride, int(add),
        _threads(B * C * Ho * Wo))
    return out


def backward(lib, grad_out, x, cf, sf, kernel_size, dilation, stride, add,
             needs):
    """Gradients (x, cf, sf) of ddf; ``needs`` is a triple of bools, and an
    entry not needed is returned as None."""
    B, C, H, W = x.shape
    Ho, Wo = grad_out.shape[-2:]
    suffix = _SUFFIX[x.dtype]
    gx = torch.empty_like(x) if needs[0] else None
    gcf = torch.empty_like(cf) if needs[1] else None
    gsf = torch.empty_like(sf) if needs[2] else None
    work = _threads(B * C * Ho * Wo)
    if needs[0] or needs[1]:
        getattr(lib, 'ddf_backward_x_cf' + suffix)(
            _ptr(grad_out), _ptr(x), _ptr(cf), _ptr(sf), _ptr(gx), _ptr(gcf),
            B, C, H, W, Ho, Wo, kernel_size, dilation, stride, int(add),
            int(needs[0]), int(needs[1]), work)
    if needs[2]:
        getattr(lib, 'ddf_backward_sf' + suffix)(
            _ptr(grad_out), _ptr(x), _ptr(cf), _ptr(gsf), B, C, H, W, Ho, Wo,
            kernel_size, dilation, stride, int(add), work)
    return gx, gcf, gsf
