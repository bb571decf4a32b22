# Copyright (c) mmdyn contributors. All rights reserved.
"""Triton kernels of the DDF operator and of DDF-Up's sub-pixel form.

:func:`ddf` computes the same result as :func:`mmdyn.ops.ddf.ddf` (see its
docstring for the formula) with four Triton kernels:

* forward: one program per (sample, channel) and block of output pixels;
  the k*k taps of the block are loaded as one [taps, pixels] tile, combined
  with the channel filter (``mul`` or ``add``) and summed over the taps;
* input gradient: one program per (sample, channel) and block of *input*
  pixels, gathering from the output pixels that read each of them (no
  atomics, any stride);
* channel-filter gradient: one program per (sample, channel) and chunk of
  output pixels;
* spatial-filter gradient: one program per (share of a head's channels,
  sample, head) and block of output pixels.

The two filter gradients are sums over pixels and over channels: where the
(sample, channel) or (sample, head) planes alone leave the GPU idle,
:func:`reduction_plan` splits those loops across programs, each storing a
float32 partial sum, which a second stage adds up in a fixed order
(deterministic, no atomics).

Launches: the tiles of a kernel are numbered linearly over grid dimensions
0 and 1 (:func:`launch_grid`, within CUDA's limits for any size), on the
input's device (``torch.cuda.device`` around every launch), with the
pixels per program and warps autotuned over a small set (see
:mod:`.ddf_triton_kernels`). The kernels load float16, bfloat16 and
float32 (:data:`DTYPES`, :func:`supports`); float64 is refused, never
rounded.

Every kernel reads its inputs through their strides (non-contiguous inputs
are not copied), loads float32/float16/bfloat16 values, accumulates in
float32 and stores in the tensor's own dtype. Nothing of the size k*k times
the output is ever made: the only allocations are the outputs, the partial
sums of the split reductions (at most :data:`MAX_SPLITS` times the spatial
filter) and, for DDF-Up, a float32 input-gradient accumulator.

DDF-Up (:func:`ddf_up`): the s*s phase DDFs of
:class:`~mmdyn.ops.ddf.DDFUpsample` are s*s launches of the same forward
kernel, each writing straight into its strided sub-pixel view
``out.view(B, C, H, s, W, s)[:, :, :, py, :, px]`` (no stack, no pixel
shuffle); the backward reads the same strided views of the output gradient.

The entry points are ``torch.library.triton_op`` operators
(``mmdyn::ddf_triton_forward``, ``mmdyn::ddf_triton_backward``,
``mmdyn::ddf_up_triton_forward``, ``mmdyn::ddf_up_triton_backward``) with
autograd registered, so that ``torch.compile`` graphs keep the kernels.

Triton is imported lazily: this module imports without it, and
:func:`check_available` raises a clear error where it is missing. With the
environment variable ``TRITON_INTERPRET=1`` (read when a kernel is first
needed) the kernels run in Triton's interpreter on CPU tensors, which is
how the tests run them without a GPU.
"""
import contextlib
import functools
import importlib.util
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import switches

#: Operator namespace of the ``torch.library`` registrations.
NAMESPACE = 'mmdyn'


@functools.lru_cache(maxsize=None)
def _import_triton():
    """(triton, triton.language) or None when Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET``,
    read at each call as Triton reads it)."""
    modules = _import_triton()
    return modules is not None and bool(modules[0].knobs.runtime.interpret)


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: Triton
    importable and a CUDA device, or any device in interpreter mode."""
    if _import_triton() is None:
        return False
    if interpreting():
        return True
    return device is not None and torch.device(device).type == 'cuda'


#: The dtypes the kernels load (float64 is not among them: the kernels
#: accumulate in float32, which would fail ``gradcheck``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(*tensors: Tensor) -> bool:
    """Whether ``impl='auto'`` may send these tensors to the kernels: CUDA
    tensors of a dtype in :data:`DTYPES`, Triton importable."""
    return TRITON_IMPORTED and all(
        t.device.type == 'cuda' and t.dtype in DTYPES for t in tensors)


def check_available(x: Tensor) -> None:
    """Raise ``RuntimeError`` saying what is missing for ``impl='triton'`` on
    ``x``."""
    if _import_triton() is None:
        raise RuntimeError(
            "impl='triton' needs the triton package (pip install triton), "
            'which could not be imported')
    if not available(x.device):
        raise RuntimeError(
            f"impl='triton' runs on CUDA tensors, got a {x.device.type} "
            'tensor (set TRITON_INTERPRET=1 before the first call to run '
            "the kernels in Triton's interpreter, or use impl='auto')")


def check_inputs(*tensors: Tensor) -> None:
    """:func:`check_available` and a ``TypeError`` for a dtype the kernels do
    not load (float64 above all: they accumulate in float32)."""
    check_available(tensors[0])
    for t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(
                f"impl='triton' takes float16, bfloat16 and float32 "
                f'tensors, got {t.dtype} (the kernels accumulate in '
                "float32; impl='auto' computes float64 exactly with the "
                "'taps' path)")


# --------------------------------------------------------------------------
# Kernels (built at first use, once per interpreter setting: the
# ``@triton.jit`` decorator reads TRITON_INTERPRET when it runs)
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The kernel module, run afresh for each interpreter setting; call with
    ``interpreting()``."""
    del interpret  # the cache key; the module's decorators read it
    spec = importlib.util.find_spec('mmdyn.ops.accel.ddf_triton_kernels')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(name: str, tuned: bool = True):
    """The kernel ``name`` (autotuned unless ``tuned`` is False) wrapped for
    ``torch.library``."""
    from torch.library import wrap_triton
    suffix = '_tuned' if tuned else '_kernel'
    return wrap_triton(getattr(_kernels(interpreting()), name + suffix))


def _launch(name: str, grid, *args, tuned: bool = True, **meta) -> None:
    """Launch kernel ``name`` autotuned, or untuned with ``MULT=1`` where
    ``tuned`` is False or ``MMDYN_TRITON_AUTOTUNE=0``."""
    if tuned and switches.switch_on(switches.TRITON_AUTOTUNE):
        _kernel(name)[grid](*args, **meta)
    else:
        _kernel(name, tuned=False)[grid](*args, MULT=1, **meta)


def _tiles(kernel_size: int) -> Tuple[int, int]:
    """(taps padded to a power of two, base pixels per program): a tile of
    about 2048 values (the autotuner may double the pixels)."""
    kkp = 1
    while kkp < kernel_size * kernel_size:
        kkp *= 2
    return kkp, max(32, 2048 // kkp)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: CUDA's limits of a launch grid's dimensions (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_grid(tiles: int) -> Tuple[int, int, int]:
    """A grid of at least ``tiles`` programs within :data:`MAX_GRID`; the
    kernels number their tile ``pid0 + pid1 * grid[0]`` and skip tiles past
    ``tiles``."""
    if tiles <= MAX_GRID[0]:
        return max(tiles, 1), 1, 1
    rows = _cdiv(tiles, MAX_GRID[0])
    if rows > MAX_GRID[1]:
        raise ValueError(f'{tiles} programs exceed a CUDA launch grid')
    return _cdiv(tiles, rows), rows, 1


def _pixel_grid(planes: int, pixels: int, base: int):
    """The grid, as a function of the launch's meta-parameters, of a kernel
    with one program per plane and block of ``base * MULT`` pixels."""
    return lambda meta: launch_grid(planes * _cdiv(pixels, base * meta['MULT'])
                                    )


def _size_class(pixels) -> int:
    """The autotuner's size key: sizes within a factor of two share the tuned
    configuration.

    0 for a symbolic size (``torch.compile`` with
    dynamic shapes, where Inductor tunes the kernels itself): reading its
    value would specialise the graph to it.
    """
    if isinstance(pixels, torch.SymInt):
        return 0
    return int(pixels).bit_length()


#: Programs the backward reductions aim to launch; None: four per
#: multiprocessor on CUDA, one elsewhere (the interpreter runs programs one
#: after another, so splitting only costs there).
TARGET_PROGRAMS: Optional[int] = None
#: Most splits of a head's channels in the spatial-filter gradient (each
#: split costs a float32 buffer the size of the spatial filter).
MAX_SPLITS = 8


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    if device.type != 'cuda':
        return 1
    index = torch.cuda.current_device() if device.index is None \
        else device.index
    return 4 * _multiprocessors(index)


class ReductionPlan(NamedTuple):
    """How the two filter-gradient kernels share out their sums."""
    #: Output pixels per program of the channel-filter gradient.
    chunk: int
    #: Chunks per (sample, channel) plane (1: no second stage).
    chunks: int
    #: Programs over which a head's channels are split in the
    #: spatial-filter gradient (1: no second stage).
    splits: int


def reduction_plan(B: int, C: int, Ho: int, Wo: int, kernel_size: int,
                   head: int, target_programs: int) -> ReductionPlan:
    """Split the pixel loop of the channel-filter gradient into chunks and the
    channel loop of the spatial-filter gradient into splits until each kernel
    has about ``target_programs`` programs.

    The partial sums are added in a fixed order by a second stage
    (deterministic, no atomics).
    """
    pixels = Ho * Wo
    base = _tiles(kernel_size)[1]
    step = base * _kernels(interpreting()).MAX_MULT
    chunks = max(1, min(_cdiv(target_programs, B * C), _cdiv(pixels, step)))
    chunk = _cdiv(_cdiv(pixels, chunks), step) * step
    chunks = _cdiv(pixels, chunk)
    planes = B * head * _cdiv(pixels, base)
    splits = max(1, min(C // head, MAX_SPLITS, _cdiv(target_programs, planes)))
    return ReductionPlan(chunk, chunks, splits)


def launch_grids(B: int,
                 C: int,
                 H: int,
                 W: int,
                 Ho: int,
                 Wo: int,
                 kernel_size: int,
                 head: int = 1,
                 target_programs: int = 1,
                 mult: int = 1) -> Dict[str, Tuple[int, int, int]]:
    """The launch grid of each kernel for these sizes and the tuning parameter
    ``mult`` (computed as the launches compute them; nothing runs)."""
    base = _tiles(kernel_size)[1]
    plan = reduction_plan(B, C, Ho, Wo, kernel_size, head, target_programs)
    meta = dict(MULT=mult)
    return dict(
        forward=_pixel_grid(B * C, Ho * Wo, base)(meta),
        grad_input=_pixel_grid(B * C, H * W, base)(meta),
        grad_channel_filter=launch_grid(B * C * plan.chunks),
        grad_spatial_filter=_pixel_grid(plan.splits * B * head, Ho * Wo,
                                        base)(meta))


def _on_device(t: Tensor):
    """A context making ``t``'s CUDA device the current one (Triton launches on
    the current device), or doing nothing for other tensors."""
    if t.device.type == 'cuda':
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _skip_launch(*tensors: Tensor) -> bool:
    """Whether to skip the kernels: fake tensors (shape propagation of
    the op) under the interpreter, which can only run on real data."""
    from torch._subclasses.fake_tensor import is_fake
    return interpreting() and any(is_fake(t) for t in tensors)


def _launch_forward(x, cf, sf, out, kernel_size, dilation, stride, add, head):
    """Out [B, C, Ho, Wo] (any strides) = ddf(x, cf [B, C, k*k], sf)."""
    B, C, H, W = x.shape
    Ho, Wo = out.shape[-2:]
    kkp, base = _tiles(kernel_size)
    with _on_device(x):
        _launch(
            'forward',
            _pixel_grid(B * C, Ho * Wo, base),
            x,
            cf,
            sf,
            out,
            C,
            H,
            W,
            Ho,
            Wo,
            C // head,
            B * C,
            _size_class(Ho * Wo),
            *x.stride(),
            *cf.stride(),
            *sf.stride(),
            *out.stride(),
            K=kernel_size,
            STRIDE=stride,
            DIL=dilation,
            ADD=add,
            KKP=kkp,
            BASE=base)


def _launch_backward(go,
                     x,
                     cf,
                     sf,
                     gx,
                     gcf,
                     gsf,
                     kernel_size,
                     dilation,
                     stride,
                     add,
                     head,
                     accumulate=False):
    """Fill the gradients that are not None: gx [B, C, H, W] (contiguous;
    added to when ``accumulate``), gcf [B, C, k*k], gsf [B, head*k*k, Ho,
    Wo] (both contiguous)."""
    B, C, H, W = x.shape
    Ho, Wo = go.shape[-2:]
    kkp, base = _tiles(kernel_size)
    conf = dict(
        K=kernel_size,
        STRIDE=stride,
        DIL=dilation,
        ADD=add,
        KKP=kkp,
        BASE=base)
    plan = reduction_plan(B, C, Ho, Wo, kernel_size, head,
                          _target_programs(x.device))
    with _on_device(x):
        if gx is not None:
            # Adding into gx must not be repeated by the autotuner.
            _launch(
                'grad_input',
                _pixel_grid(B * C, H * W, base),
                go,
                cf,
                sf,
                gx,
                C,
                H,
                W,
                Ho,
                Wo,
                C // head,
                B * C,
                _size_class(H * W),
                *go.stride(),
                *cf.stride(),
                *sf.stride(),
                tuned=not accumulate,
                ACCUMULATE=accumulate,
                **conf)
        if gcf is not None:
            dst = gcf if plan.chunks == 1 else gcf.new_empty(
                (B * C, plan.chunks, kernel_size**2), dtype=torch.float32)
            tiles = B * C * plan.chunks
            _launch('grad_channel_filter', lambda meta: launch_grid(tiles), go,
                    x, sf, dst, C, H, W, Ho, Wo, C // head, B * C,
                    _size_class(Ho * Wo), plan.chunk, plan.chunks,
                    *go.stride(), *x.stride(), *sf.stride(), **conf)
            if plan.chunks > 1:
                gcf.copy_(dst.sum(1).view(gcf.shape))
        if gsf is not None:
            dst = gsf if plan.splits == 1 else gsf.new_empty(
                (plan.splits, *gsf.shape), dtype=torch.float32)
            planes = plan.splits * B * head
            _launch('grad_spatial_filter', _pixel_grid(planes, Ho * Wo, base),
                    go, x, cf, dst, head, H, W, Ho, Wo, C // head, planes,
                    _size_class(Ho * Wo), plan.splits, *go.stride(),
                    *x.stride(), *cf.stride(), **conf)
            if plan.splits > 1:
                gsf.copy_(dst.sum(0))


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------
def _ddf_forward(x: Tensor, cf: Tensor, sf: Tensor, kernel_size: int,
                 dilation: int, stride: int, add: bool, head: int) -> Tensor:
    """``mmdyn::ddf_triton_forward``: x [B, C, H, W], cf [B, C, k*k],
    sf [B, head*k*k, Ho, Wo] -> [B, C, Ho, Wo] in the promoted dtype."""
    check_inputs(x, cf, sf)
    out = x.new_empty((*x.shape[:2], *sf.shape[-2:]),
                      dtype=_out_dtype(x, cf, sf))
    if out.numel() and not _skip_launch(x, cf, sf):
        _launch_forward(x, cf, sf, out, kernel_size, dilation, stride, add,
                        head)
    return out


def _ddf_backward(grad_out: Tensor, x: Tensor, cf: Tensor, sf: Tensor,
                  kernel_size: int, dilation: int, stride: int, add: bool,
                  head: int,
                  needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``mmdyn::ddf_triton_backward``: the gradients wrt (x, cf, sf) that
    ``needs`` asks for (an empty tensor for the others)."""
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) \
        if needs[0] else x.new_empty(0)
    gcf = torch.empty_like(cf, memory_format=torch.contiguous_format) \
        if needs[1] else cf.new_empty(0)
    gsf = torch.empty_like(sf, memory_format=torch.contiguous_format) \
        if needs[2] else sf.new_empty(0)
    if x.numel() and not _skip_launch(grad_out, x, cf, sf):
        _launch_backward(grad_out, x, cf, sf, gx if needs[0] else None,
                         gcf if needs[1] else None, gsf if needs[2] else None,
                         kernel_size, dilation, stride, add, head)
    return gx, gcf, gsf


def _ddf_up_forward(x: Tensor, cf: Tensor, sf: Tensor, kernel_size: int,
                    dilation: int, add: bool, head: int, scale: int) -> Tensor:
    """``mmdyn::ddf_up_triton_forward``: x [B, C, H, W], cf [s*s, B, C,
    k*k], sf [s*s, B, head*k*k, H, W] -> [B, C, s*H, s*W], phase p = py*s +
    px filling the output pixels (y*s + py, x*s + px)."""
    check_inputs(x, cf, sf)
    B, C, H, W = x.shape
    out = x.new_empty((B, C, H * scale, W * scale),
                      dtype=_out_dtype(x, cf, sf))
    if out.numel() and not _skip_launch(x, cf, sf):
        phases = out.view(B, C, H, scale, W, scale)
        for p in range(scale * scale):
            _launch_forward(x, cf[p], sf[p], phases[:, :, :, p // scale, :,
                                                    p % scale], kernel_size,
                            dilation, 1, add, head)
    return out


def _ddf_up_backward(grad_out: Tensor, x: Tensor, cf: Tensor, sf: Tensor,
                     kernel_size: int, dilation: int, add: bool, head: int,
                     scale: int,
                     needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``mmdyn::ddf_up_triton_backward``: the gradients of
    :func:`_ddf_up_forward` wrt (x, cf, sf) that ``needs`` asks for; the
    input gradient is summed over the phases in a float32 buffer."""
    B, C, H, W = x.shape
    gx = x.new_zeros(x.shape, dtype=torch.float32) if needs[0] else None
    gcf = torch.empty_like(cf, memory_format=torch.contiguous_format) \
        if needs[1] else cf.new_empty(0)
    gsf = torch.empty_like(sf, memory_format=torch.contiguous_format) \
        if needs[2] else sf.new_empty(0)
    if x.numel() and not _skip_launch(grad_out, x, cf, sf):
        phases = grad_out.view(B, C, H, scale, W, scale)
        for p in range(scale * scale):
            _launch_backward(
                phases[:, :, :, p // scale, :, p % scale],
                x,
                cf[p],
                sf[p],
                gx,
                gcf[p] if needs[1] else None,
                gsf[p] if needs[2] else None,
                kernel_size,
                dilation,
                1,
                add,
                head,
                accumulate=True)
    gx = gx.to(x.dtype) if needs[0] else x.new_empty(0)
    return gx, gcf, gsf


def _grad_or_none(grad: Tensor, needed: bool) -> Optional[Tensor]:
    return grad if needed else None


def _setup_context(ctx, inputs, output):
    ctx.conf = inputs[3:]
    ctx.save_for_backward(*inputs[:3])


def _ddf_autograd(ctx, grad_out):
    x, cf, sf = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.mmdyn.ddf_triton_backward(grad_out, x, cf, sf, *ctx.conf,
                                                needs)
    return (*map(_grad_or_none, grads, needs), *[None] * len(ctx.conf))


def _ddf_up_autograd(ctx, grad_out):
    x, cf, sf = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.mmdyn.ddf_up_triton_backward(grad_out, x, cf, sf,
                                                   *ctx.conf, needs)
    return (*map(_grad_or_none, grads, needs), *[None] * len(ctx.conf))


def _keep_opaque_when_interpreting(op) -> None:
    """Under the interpreter the kernels cannot be traced into a graph (they
    need real data): there the compiled graph keeps the operator itself instead
    of its decomposition into kernel launches.

    (``wrap_triton``
    hands interpreted kernels back unwrapped, which then see functional
    tensors that the interpreter cannot read: the decomposition runs on
    CUDA only, see ``tests/test_ops/test_cuda_ops.py``.)
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    decompose = op._torch_dispatch_fns[FunctionalTensorMode]

    def functional(mode, func, types, args, kwargs):
        if interpreting():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional)


def _register_operators() -> None:
    """Register the four operators and the autograd of the two forwards."""
    from torch.library import triton_op
    ops = [
        triton_op(f'{NAMESPACE}::{name}', fn, mutates_args=())
        for name, fn in (('ddf_triton_forward', _ddf_forward),
                         ('ddf_triton_backward', _ddf_backward),
                         ('ddf_up_triton_forward', _ddf_up_forward),
                         ('ddf_up_triton_backward', _ddf_up_backward))
    ]
    for op in ops:
        _keep_opaque_when_interpreting(op)
    ops[0].register_autograd(_ddf_autograd, setup_context=_setup_context)
    ops[2].register_autograd(_ddf_up_autograd, setup_context=_setup_context)


#: Whether triton could be imported (the operators are registered then).
TRITON_IMPORTED = _import_triton() is not None
if TRITON_IMPORTED:
    _register_operators()


def ddf(x: Tensor, cf: Tensor, sf: Tensor, kernel_size: int, dilation: int,
        stride: int, add: bool, head: int) -> Tensor:
    """DDF by the Triton kernels, differentiable.

    Args are those of :func:`mmdyn.ops.ddf.ddf` after its checks: ``cf`` as
    [B, C, k*k] (any strides), ``sf`` [B, head*k*k, Ho, Wo], ``add`` for
    ``combine='add'``. Returns [B, C, Ho, Wo] in the promoted dtype.
    """
    if not torch.compiler.is_compiling():  # else when the op is traced
        check_inputs(x, cf, sf)
    return torch.ops.mmdyn.ddf_triton_forward(x, cf, sf, kernel_size, dilation,
                                              stride, add, head)


def ddf_up(x: Tensor, cf: Tensor, sf: Tensor, kernel_size: int, dilation: int,
           add: bool, head: int, scale: int) -> Tensor:
    """DDF-Up's s*s stride-1 phase DDFs into one [B, C, s*H, s*W] output.

    ``cf`` [s*s, B, C, k*k] and ``sf`` [s*s, B, head*k*k, H, W] hold the
    filters of phase p = py*s + px, whose DDF fills the output pixels
    (y*s + py, x*s + px). Differentiable.
    """
    if not torch.compiler.is_compiling():  # else when the op is traced
        check_inputs(x, cf, sf)
    return torch.ops.mmdyn.ddf_up_triton_forward(x, cf, sf, kernel_size,
                                                 dilation, add, head, scale)
