"""Which execution path a dynamic layer takes: the one dispatcher per layer.

Every layer of :mod:`mmdyn.ops` has a *reference* forward that follows its
paper (attentions, kernel aggregation, one convolution per sample) and runs
anywhere: on any device, with autograd, under tracing or export. The other
paths compute the same result faster for some shapes on CPU:

============== ============================================================
path           what it does
============== ============================================================
reference      the paper's forward: per-sample kernels, per-sample conv
winograd       3x3 stride-1 per-sample convs by Winograd F(2x2, 3x3), the
               transformed kernels built by a C loop (inference)
winograd_fused KernelWarehouse: the C cell product writes the transformed
               kernels directly (inference, whole-position cells)
chunked        per-sample kernels built a chunk of samples at a time into a
               reused workspace, then batch-1 convs (inference)
folded         ODConv: ``alpha_c``/``alpha_f`` folded into the per-sample
               kernel rather than applied to the feature maps
scaled_columns ODConv with one kernel: the static kernel times im2col
               columns scaled by ``alpha_s``/``alpha_c``
conv_then_mix  CondConv/DyConv: K static convs of the batch, outputs mixed
               by the routing weights
position_major KernelWarehouse: the conv straight from the mixtures,
               kernel position by kernel position (no kernel layout)
pointwise      KernelWarehouse 1x1: one batched matmul per batch
fused / taps   DDF: the fused C loops / the pure-PyTorch tap loop
============== ============================================================

With ``impl='auto'`` (the default) a layer's dispatcher (:func:`odconv_path`,
:func:`mixture_path`, :func:`kernel_warehouse_path`, :func:`ddf_path`) picks
the path; ``impl=<path>`` forces one (``ValueError`` when it cannot run on
that input), ``impl='reference'`` the paper's forward. After each forward a
layer's ``last_path`` attribute names the path it took.

Under graph capture (:func:`graph_capture`: ``torch.compile``,
``torch.export``, ``torch.fx``, TorchScript, ONNX export) only paths made
of PyTorch ops are taken; a forced path that is not one runs as the
reference there.

Every size threshold of these choices is in :data:`THRESHOLDS`, one small
table per method, set from measurements on CPU (see ``benchmarks/``).
Changing a value changes only speed, never results.
"""
import math
from typing import Optional, Tuple

import torch

#: The size thresholds of the dispatchers, per method. Read at every call:
#: changing an entry (e.g. in a test, to send a small layer down a path)
#: takes effect at once.
THRESHOLDS = {
    # Winograd F(2x2, 3x3) (winograd.py): the input/output transforms move
    # feature maps, so few channels or tiles do not pay for them.
    'winograd': dict(min_channels=128, min_tiles=36, min_batch=2),
    # Kernels built into a reused workspace (per_sample_conv.py): when one
    # sample's kernel has more than `kernel_to_maps` times the elements of
    # its input and output maps (ResNet stages 3-4).
    'chunked': dict(kernel_to_maps=2, min_batch=2),
    # ODConv: fold alpha_c/alpha_f into the kernel when the maps hold more
    # than `fold_maps_to_kernel` times its elements; one-kernel layers use
    # scaled columns when C_out >= `scaled_columns_out_per_pixel` * H'W'.
    'odconv': dict(fold_maps_to_kernel=2, scaled_columns_out_per_pixel=2),
    # CondConv/DyConv training on CPU: K static convs when
    # (K - 1) * H' * W' <= `conv_then_mix_max_work`.
    'mixture': dict(conv_then_mix_max_work=96),
    # KernelWarehouse: the position-major conv when one sample's kernel has
    # more than `position_major_kernel_to_maps` times the elements of its
    # maps (every 1x1 layer); the C cell product from
    # `c_loop_min_columns` cell elements on.
    'kernel_warehouse': dict(position_major_kernel_to_maps=1,
                             c_loop_min_columns=4096),
}

#: Path names a layer's ``impl`` may force, per dispatcher.
ODCONV_PATHS = ('reference', 'scaled_columns', 'winograd', 'folded',
                'chunked')
MIXTURE_PATHS = ('reference', 'conv_then_mix', 'winograd', 'chunked')
KERNEL_WAREHOUSE_PATHS = ('reference', 'winograd_fused', 'winograd',
                          'position_major', 'chunked', 'pointwise')
#: Per-sample conv implementations (:func:`~mmdyn.ops.per_sample_conv.
#: per_sample_conv2d`); as a layer's ``impl`` they select the reference
#: forward with that implementation.
PER_SAMPLE_IMPLS = ('loop', 'grouped', 'unfold')


def layer_impls(paths: Tuple[str, ...]) -> Tuple[str, ...]:
    """Every ``impl`` value a layer with these paths accepts."""
    return ('auto', *paths, *PER_SAMPLE_IMPLS)


def check_impl(impl: str, paths: Tuple[str, ...]) -> str:
    """Raise ``ValueError`` naming ``impl`` unless it is one of
    :func:`layer_impls`."""
    choices = layer_impls(paths)
    if impl not in choices:
        raise ValueError(f'impl must be one of {choices}, got {impl!r}')
    return impl


def graph_capture() -> bool:
    """Whether the forward is being captured into a graph: traced or
    scripted by TorchScript, exported to ONNX, compiled or exported by
    ``torch.compile``/``torch.export`` (TorchDynamo), or traced by
    ``torch.fx.symbolic_trace``.

    The one predicate of every dispatch in :mod:`mmdyn.ops`: under it the
    layers take the paths made of plain PyTorch ops (or of the ``mmdyn::``
    custom ops): the ctypes calls of the C loops, raw data pointers and
    reused buffers have no place in a captured graph (under TorchDynamo a
    pointer may outlive the tensor it was taken from: wrong results, not
    an error).
    """
    onnx = getattr(torch.onnx, 'is_in_onnx_export', None)
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.jit.is_scripting() or (onnx is not None and onnx())
                or _fx_tracing())


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing (and not ``torch.export``):
    graphs that run in this process, where the ``mmdyn::`` custom
    operators of :mod:`~mmdyn.ops.custom_ops` may stand for the C loops."""
    exporting = getattr(torch.compiler, 'is_exporting', None)
    return torch.compiler.is_compiling() and not (exporting is not None
                                                  and exporting())


def _fx_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` is running."""
    trace = torch.fx._symbolic_trace
    is_tracing = getattr(trace, 'is_fx_symbolic_tracing', None) or getattr(
        trace, 'is_fx_tracing', None)
    return bool(is_tracing is not None and is_tracing())


def fx_leaf(module, *args):
    """Under ``torch.fx.symbolic_trace``: the graph node that calls
    ``module`` on ``args`` as a leaf (a ``call_module`` node, or a call of
    its ``forward`` when ``module`` is the traced root); None when no
    argument is an fx ``Proxy`` (no fx tracing: the caller runs its
    forward).

    The layers' forwards branch on shapes and check their inputs, which a
    ``Proxy`` cannot answer, so the layers enter fx graphs whole, as
    ``nn.Conv2d`` does; the graph runs them by their usual dispatch.
    """
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    if module is tracer.root:
        return tracer.create_proxy('call_function', module.forward, args, {})
    return tracer.create_proxy('call_module', tracer.path_of_module(module),
                               args, {})


def winograd_applies(x: torch.Tensor, conv) -> bool:
    """Whether the Winograd path can run ``conv`` on ``x``: CPU float32
    inference (no autograd, autocast or graph capture) of a 3x3, stride 1,
    dilation 1, ``groups=1`` layer, with the C loop available."""
    if x.device.type != 'cpu' or x.dtype != torch.float32 or \
            torch.is_grad_enabled() or graph_capture() or \
            torch.is_autocast_enabled('cpu'):
        return False
    if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or \
            tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return False
    from . import winograd  # the C loop's module (imports this one)
    return winograd.load() is not None


def uses_winograd(x: torch.Tensor, conv) -> bool:
    """Whether ``impl='auto'`` sends ``x`` through the Winograd path:
    :func:`winograd_applies` and, per :data:`THRESHOLDS` ``['winograd']``,
    a batch of ``min_batch`` or more, ``min_channels`` input and output
    channels and ``min_tiles`` 2x2 output tiles per sample.

    ``conv`` has ``nn.Conv2d``'s attributes and ``impl``."""
    limits = THRESHOLDS['winograd']
    if conv.impl != 'auto' or graph_capture() or \
            x.shape[0] < limits['min_batch']:
        return False
    if min(x.shape[1], conv.out_channels) < limits['min_channels']:
        return False
    h_out = x.shape[2] + 2 * conv.padding[0] - 2
    w_out = x.shape[3] + 2 * conv.padding[1] - 2
    tiles = ((h_out + 1) // 2) * ((w_out + 1) // 2)
    if tiles < limits['min_tiles']:
        return False
    return winograd_applies(x, conv)


def chunked_applies(x: torch.Tensor) -> bool:
    """Whether the chunked path can run: inference (its workspace is
    overwritten by the next call), no graph capture."""
    return not torch.is_grad_enabled() and not graph_capture()


def uses_chunked_kernels(x: torch.Tensor, kernel_numel: int,
                         out_channels: int, out_hw: Tuple[int, int],
                         impl: str = 'auto') -> bool:
    """Whether ``impl='auto'`` builds the per-sample kernels in chunks
    (:func:`~mmdyn.ops.per_sample_conv.chunked_per_sample_conv2d`): CPU
    inference of ``min_batch`` samples or more whose kernels have more than
    ``kernel_to_maps`` times the elements of one sample's input and output
    maps (:data:`THRESHOLDS` ``['chunked']``)."""
    limits = THRESHOLDS['chunked']
    if impl != 'auto' or x.device.type != 'cpu' or \
            not chunked_applies(x) or x.shape[0] < limits['min_batch']:
        return False
    c_in, h, w = x.shape[1:]
    features = c_in * h * w + out_channels * out_hw[0] * out_hw[1]
    return kernel_numel > limits['kernel_to_maps'] * features


def uses_c_cell_product(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether KernelWarehouse's C cell product
    (:func:`~mmdyn.ops.kernel_warehouse_cpu.small_rows_matmul`) serves
    ``a @ b``: float32 CPU inference (no autograd, autocast or graph
    capture), a 2-D ``b`` of at least ``c_loop_min_columns`` columns
    (:data:`THRESHOLDS` ``['kernel_warehouse']``), the loop available."""
    if a.device.type != 'cpu' or b.device.type != 'cpu' or \
            a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() or graph_capture() or \
            torch.is_autocast_enabled('cpu'):
        return False
    if b.dim() != 2 or a.shape[-1] != b.shape[0] or \
            b.shape[1] < THRESHOLDS['kernel_warehouse']['c_loop_min_columns']:
        return False
    from . import kernel_warehouse_cpu
    return kernel_warehouse_cpu.load() is not None


def _maps(layer, input_hw: Tuple[int, int]) -> int:
    """Elements of one sample's input and output maps."""
    h, w = int(input_hw[0]), int(input_hw[1])
    h_out, w_out = layer.output_hw(h, w)
    return layer.in_channels * h * w + layer.out_channels * h_out * w_out


def _forced(impl: str, name: str, applies: bool, why: str) -> str:
    """A forced path: ``impl`` when it can run; under :func:`graph_capture`
    the reference (a forced CPU loop cannot be captured, and a model built
    with it must still compile and export); otherwise ``ValueError``."""
    if not applies and graph_capture():
        return 'reference'
    if not applies:
        raise ValueError(f'impl={impl!r} cannot run here: {name} needs '
                         f'{why}')
    return impl


def odconv_folds(layer, input_hw: Tuple[int, int]) -> bool:
    """ODConv: whether ``alpha_c``/``alpha_f`` are cheaper folded into the
    per-sample kernel than applied to the feature maps (the kernel is the
    smaller tensor: early, high-resolution layers and depthwise convs)."""
    return THRESHOLDS['odconv']['fold_maps_to_kernel'] * \
        layer.weight[0].numel() < _maps(layer, input_hw)


def odconv_scaled_columns(layer, input_hw: Tuple[int, int]) -> bool:
    """ODConv with one kernel (``groups=1``, larger than 1x1): whether the
    scaled-columns GEMM pays, ``C_out >= scaled_columns_out_per_pixel *
    H_out * W_out`` (deep layers)."""
    if not _one_kernel(layer):
        return False
    h_out, w_out = layer.output_hw(*input_hw)
    return layer.out_channels >= THRESHOLDS['odconv'][
        'scaled_columns_out_per_pixel'] * h_out * w_out


def _one_kernel(layer) -> bool:
    return layer.kernel_num == 1 and layer.groups == 1 and \
        layer.attention.num_positions > 1


def mixture_conv_then_mix(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether ``K`` static convs beat the per-sample
    kernels: CPU with autograd, ``(K - 1) * H_out * W_out <=
    conv_then_mix_max_work``."""
    if x.device.type != 'cpu' or not torch.is_grad_enabled():
        return False
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    return (layer.kernel_num - 1) * h_out * w_out <= \
        THRESHOLDS['mixture']['conv_then_mix_max_work']


def _kw_position_major_applies(layer, x: torch.Tensor) -> bool:
    return layer.groups == 1 and x.device.type == 'cpu' and \
        not graph_capture()


def kw_position_major(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse: whether the position-major conv pays: CPU,
    ``groups=1``, every 1x1 layer, and larger kernels when one sample's
    kernel has more than ``position_major_kernel_to_maps`` times the
    elements of its maps (deep layers), where im2col costs less than
    building the kernel."""
    if not _kw_position_major_applies(layer, x):
        return False
    if layer._kw_layout[0] == 1:
        return True
    return math.prod(layer.weight_shape) > THRESHOLDS['kernel_warehouse'][
        'position_major_kernel_to_maps'] * _maps(layer, x.shape[-2:])


def odconv_path(layer, x: torch.Tensor, sample_dependent: bool) -> str:
    """The path of :class:`~mmdyn.ops.ODConv2d` for ``x``.

    ``sample_dependent``: whether the kernel depends on the sample (a
    spatial or kernel attention). ``'auto'`` takes, in order:
    ``reference`` for a 1x1 one-kernel layer (a plain conv),
    ``scaled_columns`` (one kernel, deep layer), ``winograd``, ``folded``
    (the kernel is the smaller tensor), ``chunked``, ``reference``.
    """
    impl = layer.impl
    if impl == 'auto':
        hw = x.shape[-2:]
        if layer.is_pointwise_1x:
            return 'reference'
        if odconv_scaled_columns(layer, hw):
            return 'scaled_columns'
        if uses_winograd(x, layer):
            return 'winograd'
        if odconv_folds(layer, hw):
            return 'folded'
        if sample_dependent and uses_chunked_kernels(
                x, layer.weight[0].numel(), layer.out_channels,
                layer.output_hw(*hw)):
            return 'chunked'
        return 'reference'
    if impl == 'scaled_columns':
        return _forced(impl, 'ODConv2d', _one_kernel(layer),
                       'kernel_num=1, groups=1 and a kernel larger than 1x1')
    if impl == 'winograd':
        return _forced(impl, 'ODConv2d', winograd_applies(x, layer),
                       'CPU float32 inference of a 3x3 stride-1 layer')
    if impl == 'chunked':
        return _forced(impl, 'ODConv2d',
                       sample_dependent and chunked_applies(x),
                       'inference and a sample-dependent kernel')
    if impl == 'folded':
        return impl
    check_impl(impl, ODCONV_PATHS)  # reference, or a per-sample conv
    return 'reference'


def mixture_path(layer, x: torch.Tensor) -> str:
    """The path of :class:`~mmdyn.ops.CondConv2d`/:class:`~mmdyn.ops.
    DyConv2d` for ``x``. ``'auto'`` takes, in order: ``conv_then_mix`` (CPU
    training on small maps), ``winograd``, ``chunked``, ``reference``."""
    impl = layer.impl
    if impl == 'auto':
        if mixture_conv_then_mix(layer, x):
            return 'conv_then_mix'
        if uses_winograd(x, layer):
            return 'winograd'
        if uses_chunked_kernels(x, layer.weight[0].numel(),
                                layer.out_channels,
                                layer.output_hw(*x.shape[-2:])):
            return 'chunked'
        return 'reference'
    name = type(layer).__name__
    if impl == 'winograd':
        return _forced(impl, name, winograd_applies(x, layer),
                       'CPU float32 inference of a 3x3 stride-1 layer')
    if impl == 'chunked':
        return _forced(impl, name, chunked_applies(x), 'inference')
    if impl == 'conv_then_mix':
        return impl
    check_impl(impl, MIXTURE_PATHS)  # reference, or a per-sample conv
    return 'reference'


def kernel_warehouse_path(layer, x: torch.Tensor,
                          attention: torch.Tensor) -> str:
    """The path of :class:`~mmdyn.ops.KWConv2d` for ``x``. ``'auto'``
    takes, in order: ``winograd_fused`` (the C cell product writes the
    transformed kernels: whole-position cells) or ``winograd``,
    ``position_major`` (CPU, ``groups=1``: 1x1 layers, and deeper layers
    whose kernel outweighs their maps), ``chunked``, ``pointwise`` (1x1
    without padding), ``reference``."""
    impl = layer.impl
    whole_positions = tuple(layer._kw_layout[1:3]) == (1, 1)
    fused = whole_positions and uses_c_cell_product(attention,
                                                    layer._cell_rows())
    pointwise = layer.kernel_size == (1, 1) and layer.padding == (0, 0) \
        and layer.groups == 1
    if impl == 'auto':
        if uses_winograd(x, layer):
            return 'winograd_fused' if fused else 'winograd'
        if kw_position_major(layer, x):
            return 'position_major'
        if uses_chunked_kernels(x, math.prod(layer.weight_shape),
                                layer.out_channels,
                                layer.output_hw(*x.shape[-2:])):
            return 'chunked'
        return 'pointwise' if pointwise else 'reference'
    if impl == 'winograd':
        return _forced(impl, 'KWConv2d', winograd_applies(x, layer),
                       'CPU float32 inference of a 3x3 stride-1 layer')
    if impl == 'winograd_fused':
        return _forced(
            impl, 'KWConv2d', fused and winograd_applies(x, layer),
            'CPU float32 inference of a 3x3 stride-1 layer with '
            'whole-position cells (cell_inplane_ratio and '
            'cell_outplane_ratio 1) and the C cell product')
    if impl == 'position_major':
        return _forced(impl, 'KWConv2d',
                       _kw_position_major_applies(layer, x),
                       'groups=1 on CPU, no graph capture')
    if impl == 'chunked':
        return _forced(impl, 'KWConv2d', chunked_applies(x), 'inference')
    if impl == 'pointwise':
        return _forced(impl, 'KWConv2d', pointwise,
                       'a 1x1 kernel, no padding and groups=1')
    check_impl(impl, KERNEL_WAREHOUSE_PATHS)  # or a per-sample conv
    return 'reference'


def ddf_path(impl: str, x: torch.Tensor,
             library_available: Optional[bool] = None) -> str:
    """The DDF operator's path: ``'auto'`` takes ``'fused'`` (C loops) for
    CPU tensors when the loops are built, else ``'taps'`` (also on other
    devices and in graph capture, for ``'fused'`` too, except under
    ``torch.compile``, where the loops run as the ``mmdyn::ddf`` custom
    operator); ``'taps'`` and ``'reference'`` as given. ``'triton'``
    (:mod:`~mmdyn.ops.accel.ddf_triton`) as given, and for ``'auto'`` on CUDA
    when Triton is installed (under ``torch.compile`` too, not in other
    graph capture)."""
    if impl in ('taps', 'reference', 'triton'):
        return impl
    if impl == 'auto' and x.device.type == 'cuda' and (
            not graph_capture() or compiling()):
        from .accel import ddf_triton
        if ddf_triton.TRITON_IMPORTED:
            return 'triton'
    if x.device.type != 'cpu' or (graph_capture() and not compiling()):
        return 'taps'
    if library_available is None:
        from . import ddf_cpu
        library_available = ddf_cpu.available()
    if library_available:
        return 'fused'
    if impl == 'fused':
        raise RuntimeError('impl="fused" needs the compiled DDF CPU kernel, '
                           'which could not be built')
    return 'taps'
