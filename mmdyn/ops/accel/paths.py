# Copyright (c) mmdyn contributors. All rights reserved.
"""Which execution path a dynamic layer takes: one registry of paths per
layer family.

Every layer of :mod:`mmdyn.ops` has a *reference* forward that follows its
paper (attentions, kernel aggregation, one convolution per sample) and runs
anywhere: on any device, with autograd, under tracing or export. The other
paths compute the same result faster for some shapes on CPU:

============== ============================================================
path           what it does
============== ============================================================
reference      the paper's formulas, per-sample kernels and per-sample conv,
               as ``forward_reference``; inside ``forward`` the kernels
               may come from the accelerated products (KernelWarehouse's
               C cell product in float32 CPU inference, ODConv's mixture
               with a memory-lean backward), ``forward_reference`` itself
               is plain PyTorch autograd
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
tap_gemm       ODConv with one kernel: one 1x1 conv (oneDNN/MKL GEMM) to
               every tap's output channels, then the per-sample weighted
               shift-sum of the taps (a C loop and its backward)
taps           KernelWarehouse and CondConv/DyConv, stride 1, inference:
               the tap-major mixtures (KW's position-major ones, or mixed
               from a kept tap-major copy of the bank), read transposed,
               in one batched GEMM to every tap's output channels, then
               the C tap sum
pointwise_gemm 1x1 layers: ODConv with one kernel (the attentions folded
               into per-sample matrices) and CondConv/DyConv in inference
               (the mixed matrices), one batched matmul with the pixels
conv_then_mix  CondConv/DyConv: K static convs of the batch, outputs mixed
               by the routing weights
batch_grouped  CondConv/DyConv: the mixed kernels, then one conv with the
               batch folded into the groups (oneDNN)
position_major KernelWarehouse: the conv straight from the mixtures,
               kernel position by kernel position (no kernel layout)
pointwise      KernelWarehouse 1x1: one batched matmul per batch
mixture_gemm   KernelWarehouse CPU training: the conv from the mixtures
               with a GEMM backward, the mixtures rebuilt in it per layer
               (:mod:`~mmdyn.ops.accel.kw_train`)
recompute      training: the per-sample kernels rebuilt in the backward,
               not kept (:mod:`~mmdyn.ops.accel.recompute`)
fused / taps   DDF: the fused C loops / the pure-PyTorch tap loop (the DDF
               operator's ``taps``, not KernelWarehouse's)
triton         DDF on CUDA: the Triton kernels
export         under export (ONNX, ``torch.export``, TorchScript): forms
               whose graphs runtimes run fast, any batch size
               (:mod:`~mmdyn.ops.accel.export_forms`)
============== ============================================================

Each family's paths are one table of :data:`PATHS` (:class:`Path`: its
name, whether it can run on an input, whether it pays there, what it needs,
the function that runs it); adding a path is adding one entry. With
``impl='auto'`` (the default) :func:`choose_path` takes the first entry of
the table that pays and can run (the reference is last);
``impl=<path>`` forces one (``ValueError`` when it cannot run on that
input), ``impl='reference'`` the paper's forward. After each forward a
layer's ``last_path`` attribute names the path that ran. DDF's operator
has one chooser, :func:`ddf_path`, called once per call.

Under graph capture (:func:`graph_capture`: ``torch.export``,
``torch.fx``, TorchScript, ONNX export) only paths made of PyTorch ops are
taken; a forced path that is not one runs as the reference there. Under
``torch.compile`` (:func:`~mmdyn.ops.capture.compiling`) the CPU inference
paths built on the C loops are kept, each run as a ``mmdyn::`` custom
operator (:mod:`~mmdyn.ops.accel.custom_ops`).

Every size threshold of these choices is in :data:`THRESHOLDS`
(:mod:`~mmdyn.ops.accel.thresholds`), one small table per method, set from
measurements on CPU (see ``benchmarks/``). Changing a value changes only
speed, never results.

The path functions live next to the code they run
(:mod:`~mmdyn.ops.accel.odconv_paths`,
:mod:`~mmdyn.ops.accel.mixture_paths`, :mod:`~mmdyn.ops.accel.kw_paths`)
and receive the layer object; nothing here imports a layer module.
"""
import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..capture import captured_without_operators, compiling, graph_capture
from ..switches import accel_disabled
from . import (autotune, ddf_cpu, ddf_triton, export_forms, kw_paths, kw_train,
               mixture_paths, odconv_paths, recompute, tap_sum_cpu, winograd)
from .kw_cells import uses_c_cell_product
from .thresholds import THRESHOLDS

__all__ = [
    'THRESHOLDS', 'Path', 'PATHS', 'choose_path', 'find_path', 'path_names',
    'ddf_path', 'DDF_PATHS', 'ODCONV_PATHS', 'MIXTURE_PATHS',
    'KERNEL_WAREHOUSE_PATHS', 'PER_SAMPLE_IMPLS', 'layer_impls', 'check_impl',
    'winograd_applies', 'uses_winograd', 'chunked_applies',
    'uses_chunked_kernels', 'uses_c_cell_product', 'odconv_folds',
    'odconv_scaled_columns', 'odconv_tap_gemm', 'odconv_pointwise_gemm',
    'pointwise_applies', 'mixture_pointwise_gemm', 'mixture_conv_then_mix',
    'mixture_batch_grouped', 'mixture_taps', 'mixture_taps_applies',
    'kw_position_major'
]

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


# --------------------------------------------------------------------------
# Applicability and cost of each path
# --------------------------------------------------------------------------
def winograd_applies(x: torch.Tensor, conv) -> bool:
    """Whether the Winograd path can run ``conv`` on ``x``: CPU float32
    inference (no autograd, autocast or graph capture other than
    ``torch.compile``, where the C loops run as ``mmdyn::`` operators) of a
    3x3, stride 1, dilation 1, ``groups=1`` layer, with the C loop
    available."""
    if x.device.type != 'cpu' or x.dtype != torch.float32 or \
            torch.is_grad_enabled() or captured_without_operators() or \
            torch.is_autocast_enabled('cpu'):
        return False
    if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or \
            tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return False
    return winograd.load() is not None


def uses_winograd(x: torch.Tensor, conv) -> bool:
    """Whether ``impl='auto'`` sends ``x`` through the Winograd path:
    :func:`winograd_applies` and, per :data:`THRESHOLDS` ``['winograd']``, a
    batch of ``min_batch`` or more, ``min_channels`` input and output channels
    and ``min_tiles`` 2x2 output tiles per sample.

    ``conv`` has ``nn.Conv2d``'s attributes and ``impl``.
    """
    limits = THRESHOLDS['winograd']
    if conv.impl != 'auto' or captured_without_operators() or \
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
    overwritten by the next call), no graph capture other than
    ``torch.compile`` (where it is one ``mmdyn::`` operator)."""
    return not torch.is_grad_enabled() and not captured_without_operators()


def uses_chunked_kernels(x: torch.Tensor,
                         kernel_numel: int,
                         out_channels: int,
                         out_hw: Tuple[int, int],
                         impl: str = 'auto') -> bool:
    """Whether ``impl='auto'`` builds the per-sample kernels in chunks
    (:func:`~mmdyn.ops.accel.chunked.chunked_per_sample_conv2d`): CPU inference
    of ``min_batch`` samples or more whose kernels have more than
    ``kernel_to_maps`` times the elements of one sample's input and output maps
    (:data:`THRESHOLDS` ``['chunked']``)."""
    limits = THRESHOLDS['chunked']
    if impl != 'auto' or x.device.type != 'cpu' or \
            not chunked_applies(x) or x.shape[0] < limits['min_batch']:
        return False
    c_in, h, w = x.shape[1:]
    features = c_in * h * w + out_channels * out_hw[0] * out_hw[1]
    return kernel_numel > limits['kernel_to_maps'] * features


def _maps(layer, input_hw: Tuple[int, int]) -> int:
    """Elements of one sample's input and output maps."""
    h, w = int(input_hw[0]), int(input_hw[1])
    h_out, w_out = layer.output_hw(h, w)
    return layer.in_channels * h * w + layer.out_channels * h_out * w_out


def odconv_folds(layer, input_hw: Tuple[int, int]) -> bool:
    """ODConv: whether ``alpha_c``/``alpha_f`` are cheaper folded into the
    per-sample kernel than applied to the feature maps (the kernel is the
    smaller tensor: early, high-resolution layers and depthwise convs)."""
    return THRESHOLDS['odconv']['fold_maps_to_kernel'] * \
        layer.weight[0].numel() < _maps(layer, input_hw)


def _one_kernel(layer) -> bool:
    return layer.kernel_num == 1 and layer.groups == 1 and \
        layer.attention.num_positions > 1


def odconv_scaled_columns(layer, input_hw: Tuple[int, int]) -> bool:
    """ODConv with one kernel (``groups=1``, larger than 1x1): whether the.

    scaled-columns GEMM pays, ``C_out >= scaled_columns_out_per_pixel *
    H_out * W_out`` (deep layers; in inference
    ``scaled_columns_out_per_pixel_inference``, where the columns of the
    whole batch make one GEMM).
    """
    if not _one_kernel(layer):
        return False
    h_out, w_out = layer.output_hw(*input_hw)
    key = 'scaled_columns_out_per_pixel'
    if not torch.is_grad_enabled():
        key += '_inference'
    return layer.out_channels >= THRESHOLDS['odconv'][key] * h_out * w_out


def odconv_pointwise_applies(layer, x: torch.Tensor) -> bool:
    """ODConv: whether ``pointwise_gemm`` can run: one kernel and
    :func:`pointwise_applies`."""
    return layer.is_pointwise_1x and pointwise_applies(layer, x)


def odconv_pointwise_gemm(layer, x: torch.Tensor) -> bool:
    """ODConv 1x1 with one kernel: whether the batched matmul of per-sample
    matrices pays: CPU, ``C_in >= pointwise_gemm_min_in_channels`` and
    ``H*W >= pointwise_gemm_min_pixels_per_out_channel * C_out`` (the
    high-resolution layers, where the two passes over the maps cost most
    and each matrix is reused over many pixels) (:data:`THRESHOLDS`
    ``['odconv']``)."""
    limits = THRESHOLDS['odconv']
    return x.device.type == 'cpu' and \
        layer.in_channels >= limits['pointwise_gemm_min_in_channels'] and \
        x.shape[-2] * x.shape[-1] >= \
        limits['pointwise_gemm_min_pixels_per_out_channel'] * \
        layer.out_channels


def odconv_tap_gemm(layer, x: torch.Tensor) -> bool:
    """ODConv with one kernel (``groups=1``, larger than 1x1): whether one
    1x1 GEMM to every tap's output channels then the weighted shift-sum
    pays: CPU, stride 1, ``C_in >= tap_gemm_min_in_channels`` (each element
    of the ``kh*kw`` times larger GEMM output then carries enough
    multiply-adds) and a batch of ``tap_gemm_min_batch`` or more (one
    sample: the scaled columns, or the reference's plain conv)
    (:data:`THRESHOLDS` ``['odconv']``). In inference with the C tap sum
    (:mod:`~mmdyn.ops.accel.tap_sum_cpu`; float32/float64, no autocast) it
    comes ahead of the scaled columns (measured on AVX-512, 2026-12-06,
    batch 1-32, ResNet-50 stages 3-4); otherwise (training, or the sum in
    PyTorch ops) the deepest layers take the scaled columns
    (:func:`odconv_scaled_columns`; in training 1.35x ``nn.Conv2d`` at 512
    ch 7x7 against the tap GEMM's 1.83x, batch 8).
    """
    limits = THRESHOLDS['odconv']
    if not _one_kernel(layer) or x.device.type != 'cpu' or \
            tuple(layer.stride) != (1, 1) or \
            layer.in_channels < limits['tap_gemm_min_in_channels'] or \
            x.shape[0] < limits['tap_gemm_min_batch']:
        return False
    if not torch.is_grad_enabled() and \
            tap_sum_cpu.library_for(x) is not None:
        return True
    return not odconv_scaled_columns(layer, x.shape[-2:])


def mixture_conv_then_mix(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether ``K`` static convs beat the per-sample
    kernels: CPU with autograd, ``(K - 1) * H_out * W_out <=
    conv_then_mix_max_work``."""
    if x.device.type != 'cpu' or not torch.is_grad_enabled():
        return False
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    return (layer.kernel_num - 1) * h_out * w_out <= \
        THRESHOLDS['mixture']['conv_then_mix_max_work']


def pointwise_applies(layer, x: torch.Tensor) -> bool:
    """Whether a 1x1 layer is a matrix product over the pixels: a 1x1
    kernel, stride 1, no padding, ``groups=1``."""
    return tuple(layer.kernel_size) == (1, 1) and layer.groups == 1 and \
        tuple(layer.stride) == (1, 1) and tuple(layer.padding) == (0, 0)


def mixture_pointwise_gemm(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv 1x1: whether the mixed matrices and one batched
    matmul pay: CPU inference with at least ``pointwise_gemm_min_pixels``
    pixels (:data:`THRESHOLDS` ``['mixture']``)."""
    return x.device.type == 'cpu' and not torch.is_grad_enabled() and \
        x.shape[-2] * x.shape[-1] >= \
        THRESHOLDS['mixture']['pointwise_gemm_min_pixels']


def mixture_batch_grouped(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether the mixed kernels and one batch-as-groups conv
    (oneDNN) pay: CPU inference of ``grouped_min_batch`` samples or more whose
    kernel has at most ``grouped_max_kernel_to_maps`` times the elements of one
    sample's input and output maps (:data:`THRESHOLDS` ``['mixture']``; deeper
    layers build their kernels in chunks).

    Measured on AVX-512, 2026-12-06, where it beats the Winograd C loop.
    """
    limits = THRESHOLDS['mixture']
    if x.device.type != 'cpu' or torch.is_grad_enabled() or \
            x.shape[0] < limits['grouped_min_batch']:
        return False
    kernel, maps = layer.weight[0].numel(), _maps(layer, x.shape[-2:])
    return kernel <= limits['grouped_max_kernel_to_maps'] * maps


def _stride1_taps_applies(layer, x: torch.Tensor, dtype: torch.dtype) -> bool:
    # The C tap sum after one batched GEMM, in inference (see
    # tap_sum_cpu.stride1_tap_conv).
    return not torch.is_grad_enabled() and x.dtype == dtype and \
        tuple(layer.stride) == (1, 1) and layer.groups == 1 and \
        tuple(layer.kernel_size) != (1, 1) and \
        tap_sum_cpu.library_for(x) is not None


def mixture_taps_applies(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether ``'taps'`` can run: inference (no autograd, no
    graph capture, no CPU autocast) on a float32/float64 CPU input of the
    bank's dtype, stride 1, ``groups=1``, a kernel larger than 1x1, and the C
    tap sum built (:mod:`~mmdyn.ops.accel.tap_sum_cpu`)."""
    return _stride1_taps_applies(layer, x, layer.weight.dtype)


def mixture_taps(layer, x: torch.Tensor) -> bool:
    """CondConv/DyConv: whether ``'taps'`` pays where it can run: ``C_in >=
    taps_min_in_channels``, for one sample ``C_in >=
    taps_min_in_channels_one_sample`` (:data:`THRESHOLDS` ``['mixture']``;
    ResNet-50 stages 3-4, stage 4 only for one sample; measured on AVX-512,
    2026-12-07)."""
    limits = THRESHOLDS['mixture']
    key = 'taps_min_in_channels' if x.shape[0] > 1 else \
        'taps_min_in_channels_one_sample'
    return layer.in_channels >= limits[key]


def _kw_position_major_applies(layer, x: torch.Tensor) -> bool:
    # Under torch.compile in inference only (its training form keeps the
    # im2col columns for the backward).
    return layer.groups == 1 and x.device.type == 'cpu' and (
        not graph_capture() or (compiling() and not torch.is_grad_enabled()))


def _kw_position_major_pays(layer, x: torch.Tensor) -> bool:
    if not _kw_position_major_applies(layer, x):
        return False
    if layer._kw_layout[0] == 1:
        return True
    return math.prod(layer.weight_shape) > THRESHOLDS['kernel_warehouse'][
        'position_major_kernel_to_maps'] * _maps(layer, x.shape[-2:])


def kw_position_major(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse: whether the position-major conv pays: CPU,
    ``groups=1``, every 1x1 layer, and larger kernels when one sample's
    kernel has more than ``position_major_kernel_to_maps`` times the
    elements of its maps (deep layers), where im2col costs less than
    building the kernel. In inference not for the 1x1 layers with at
    least ``pointwise_min_pixels`` output pixels (:data:`THRESHOLDS`
    ``['kernel_warehouse']``), which run faster as one batched matmul
    (``'pointwise'``)."""
    if not _kw_position_major_pays(layer, x):
        return False
    if torch.is_grad_enabled() or not _kw_pointwise(layer):
        return True
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    return h_out * w_out < THRESHOLDS['kernel_warehouse'][
        'pointwise_min_pixels']


def kw_mixture_gemm(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse on CPU: whether the conv as batched GEMMs from the
    mixtures (:mod:`~mmdyn.ops.accel.kw_train`) pays. Training: wherever the
    position-major conv would (its GEMM backward keeps no per-sample
    kernel). Inference: the larger-than-1x1 layers where the position-major
    conv would and Winograd does not (:func:`uses_winograd`): the deep 3x3
    layers (measured on AVX-512, 2026-12-06; :data:`THRESHOLDS`
    ``['kernel_warehouse']``)."""
    if graph_capture() or not _kw_position_major_pays(layer, x):
        return False
    if torch.is_grad_enabled():
        return True
    return layer._kw_layout[0] > 1 and not uses_winograd(x, layer)


def kw_taps_applies(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse: whether ``'taps'`` can run: inference (no autograd,
    no graph capture, no CPU autocast) on a float32/float64 CPU input of the
    warehouse's dtype, stride 1, ``groups=1``, a kernel larger than 1x1, and
    the C tap sum built (:mod:`~mmdyn.ops.accel.tap_sum_cpu`)."""
    return _stride1_taps_applies(layer, x, layer._cells().dtype)


def kw_taps(layer, x: torch.Tensor) -> bool:
    """KernelWarehouse: whether ``'taps'`` pays where it can run:
    ``C_in >= taps_min_in_channels`` (:data:`THRESHOLDS`
    ``['kernel_warehouse']``; ResNet-50 stages 3-4, where the batched GEMM
    carries enough multiply-adds per element of the tap maps, measured on
    AVX-512 at batch 1 and 8)."""
    return layer.in_channels >= THRESHOLDS['kernel_warehouse'][
        'taps_min_in_channels']


def _kw_fused(layer, attention: torch.Tensor) -> bool:
    """KernelWarehouse: whole-position cells and the C cell product (the
    product can write Winograd-transformed kernels)."""
    return tuple(layer._kw_layout[1:3]) == (1, 1) and uses_c_cell_product(
        attention, layer._cell_rows())


def _kw_pointwise(layer) -> bool:
    return layer.kernel_size == (1, 1) and layer.padding == (0, 0) and \
        layer.groups == 1


def _sample_dependent(attentions) -> bool:
    """ODConv: whether the kernel depends on the sample (a spatial or a
    kernel attention)."""
    return attentions[2] is not None or attentions[3] is not None


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------
class Path(NamedTuple):
    """One execution path of a layer family.

    Every callable takes ``(layer, x, context)``, ``context`` the tuple of
    the layer's attentions for ``x`` (what ``run`` receives after ``x``).

    Attributes:
        name (str): The ``impl`` value that forces it, and ``last_path``.
        can_run (callable): Whether it can run here (device, dtype,
            autograd, shape, library); a forced path that cannot raises
            ``ValueError`` with :attr:`needs` (under graph capture the
            reference runs instead).
        pays (callable | None): Whether ``impl='auto'`` takes it here (the
            cost rule, from :data:`THRESHOLDS`); None: only when forced.
        needs (str): What :attr:`can_run` requires, for the error message.
        run (callable): ``run(layer, x, *context)`` -> the output.
    """
    name: str
    can_run: Callable
    pays: Optional[Callable]
    needs: str
    run: Callable


def _always(layer, x, context) -> bool:
    return True


_WINOGRAD_NEEDS = 'CPU float32 inference of a 3x3 stride-1 layer'


def _export(run: Callable) -> Path:
    # Plain PyTorch ops: runs anywhere when forced; 'auto' takes it under
    # export only.
    return Path('export', _always,
                lambda layer, x, a: export_forms.exporting(), '', run)


def _reference(run: Callable) -> Path:
    return Path('reference', _always, _always, '', run)


#: The paths of each layer family, in the order ``impl='auto'`` tries them
#: (the reference last).
PATHS = {
    'odconv': (
        _export(export_forms.odconv),
        Path('tap_gemm', lambda layer, x, a: _one_kernel(layer),
             lambda layer, x, a: odconv_tap_gemm(layer, x),
             'kernel_num=1, groups=1 and a kernel larger than 1x1',
             odconv_paths.tap_gemm),
        Path('scaled_columns', lambda layer, x, a: _one_kernel(layer),
             lambda layer, x, a: odconv_scaled_columns(layer, x.shape[-2:]),
             'kernel_num=1, groups=1 and a kernel larger than 1x1',
             odconv_paths.scaled_columns),
        Path('pointwise_gemm',
             lambda layer, x, a: odconv_pointwise_applies(layer, x),
             lambda layer, x, a: odconv_pointwise_gemm(layer, x),
             'kernel_num=1, a 1x1 kernel, stride 1, padding 0, groups=1',
             odconv_paths.pointwise_gemm),
        Path('recompute', recompute.can_run, recompute.odconv_pays,
             'no graph capture', recompute.odconv_recompute),
        Path('winograd', lambda layer, x, a: winograd_applies(x, layer),
             lambda layer, x, a: uses_winograd(x, layer), _WINOGRAD_NEEDS,
             odconv_paths.winograd),
        Path(
            'folded', _always,
            lambda layer, x, a: not layer.is_pointwise_1x and odconv_folds(
                layer, x.shape[-2:]), '', odconv_paths.folded),
        Path(
            'chunked',
            lambda layer, x, a: _sample_dependent(a) and chunked_applies(x),
            lambda layer, x, a: uses_chunked_kernels(
                x, layer.weight[0].numel(), layer.out_channels,
                layer.output_hw(*x.shape[-2:])),
            'inference and a sample-dependent kernel', odconv_paths.chunked),
        _reference(odconv_paths.reference),
    ),
    'mixture': (
        _export(export_forms.mixture),
        Path('conv_then_mix', _always,
             lambda layer, x, a: mixture_conv_then_mix(layer, x), '',
             mixture_paths.conv_then_mix),
        Path('recompute', recompute.can_run, recompute.mixture_pays,
             'no graph capture', recompute.mixture_recompute),
        Path('pointwise_gemm', lambda layer, x, a: pointwise_applies(layer, x),
             lambda layer, x, a: mixture_pointwise_gemm(layer, x),
             'a 1x1 kernel, stride 1, padding 0, groups=1',
             mixture_paths.pointwise_gemm),
        Path(
            'taps', lambda layer, x, a: mixture_taps_applies(layer, x),
            lambda layer, x, a: mixture_taps(layer, x),
            'inference on a float32/float64 CPU input, stride 1, groups=1, '
            'a kernel larger than 1x1 and the C tap sum', mixture_paths.taps),
        Path('batch_grouped', _always,
             lambda layer, x, a: mixture_batch_grouped(layer, x), '',
             mixture_paths.batch_grouped),
        Path('winograd', lambda layer, x, a: winograd_applies(x, layer),
             lambda layer, x, a: uses_winograd(x, layer), _WINOGRAD_NEEDS,
             mixture_paths.winograd),
        Path(
            'chunked', lambda layer, x, a: chunked_applies(x),
            lambda layer, x, a: uses_chunked_kernels(
                x, layer.weight[0].numel(), layer.out_channels,
                layer.output_hw(*x.shape[-2:])), 'inference',
            mixture_paths.chunked),
        _reference(mixture_paths.reference),
    ),
    'kernel_warehouse': (
        _export(export_forms.kernel_warehouse),
        Path(
            'taps', lambda layer, x, a: kw_taps_applies(layer, x),
            lambda layer, x, a: kw_taps(layer, x),
            'inference on a float32/float64 CPU input, stride 1, groups=1, '
            'a kernel larger than 1x1 and the C tap sum', kw_paths.taps),
        Path(
            'mixture_gemm', lambda layer, x, a: kw_train.can_run(layer, x),
            lambda layer, x, a: kw_mixture_gemm(layer, x),
            'groups=1, a float32/float64 CPU input, no autocast, no graph '
            'capture', kw_train.mixture_gemm),
        Path('recompute', recompute.can_run, recompute.kernel_warehouse_pays,
             'no graph capture', recompute.kernel_warehouse_recompute),
        Path(
            'winograd_fused', lambda layer, x, a: _kw_fused(layer, a[
                0]) and winograd_applies(x, layer),
            lambda layer, x, a: uses_winograd(x, layer) and _kw_fused(
                layer, a[0]), _WINOGRAD_NEEDS + ' with whole-position cells '
            '(cell_inplane_ratio and cell_outplane_ratio 1) and the C cell '
            'product', kw_paths.winograd_fused),
        Path('winograd', lambda layer, x, a: winograd_applies(x, layer),
             lambda layer, x, a: uses_winograd(x, layer), _WINOGRAD_NEEDS,
             kw_paths.winograd),
        Path('position_major',
             lambda layer, x, a: _kw_position_major_applies(layer, x),
             lambda layer, x, a: kw_position_major(layer, x),
             'groups=1 on CPU, no graph capture', kw_paths.position_major),
        Path(
            'chunked', lambda layer, x, a: chunked_applies(x),
            lambda layer, x, a: uses_chunked_kernels(
                x, math.prod(layer.weight_shape), layer.out_channels,
                layer.output_hw(*x.shape[-2:])), 'inference',
            kw_paths.chunked),
        Path('pointwise', lambda layer, x, a: _kw_pointwise(layer),
             lambda layer, x, a: _kw_pointwise(layer),
             'a 1x1 kernel, no padding and groups=1', kw_paths.pointwise),
        _reference(kw_paths.reference),
    ),
}


def path_names(family: str) -> Tuple[str, ...]:
    """The path names of ``family``, the reference first."""
    return ('reference',
            *(path.name for path in PATHS[family] if path.name != 'reference'))


ODCONV_PATHS = path_names('odconv')
MIXTURE_PATHS = path_names('mixture')
KERNEL_WAREHOUSE_PATHS = path_names('kernel_warehouse')


def find_path(family: str, name: str) -> Path:
    """The entry ``name`` of ``family``'s table."""
    for path in PATHS[family]:
        if path.name == name:
            return path
    raise ValueError(f'{family} has no path {name!r}; one of '
                     f'{path_names(family)}')


def _rule_path(table, layer, x: torch.Tensor, context: tuple) -> Path:
    """The first path of ``table`` that pays and can run (the reference
    last)."""
    for path in table:
        if path.pays is not None and path.pays(layer, x, context) and \
                path.can_run(layer, x, context):
            return path
    return table[-1]


def choose_path(family: str, layer, x: torch.Tensor, context: tuple) -> Path:
    """The path ``layer`` (``impl`` set) of ``family`` runs on ``x``.

    ``'auto'``: the first entry of :data:`PATHS` ``[family]`` that pays
    and can run (the threshold rule); with tuning on
    (:mod:`~mmdyn.ops.accel.autotune`, CPU, no graph capture) the fastest
    path measured for this key, the rule's choice among those timed. A
    forced path: itself when it can run; under
    :func:`~mmdyn.ops.capture.graph_capture` the reference (a forced CPU
    loop cannot be captured, and a model built with it must still compile
    and export); otherwise ``ValueError``. ``'reference'`` and the
    per-sample conv names: the reference.
    """
    impl = layer.impl
    table = PATHS[family]
    if impl == 'auto':
        rule = _rule_path(table, layer, x, context)
        if autotune.applies(layer, x):
            return autotune.choose(family, table, rule, layer, x, context)
        return rule
    if impl == 'reference' or impl in PER_SAMPLE_IMPLS:
        return table[-1]
    path = find_path(family, impl)
    if path.can_run(layer, x, context):
        return path
    if graph_capture():
        return table[-1]
    raise ValueError(f'impl={impl!r} cannot run here: {type(layer).__name__}'
                     f' needs {path.needs}')


# --------------------------------------------------------------------------
# DDF: the operator's paths
# --------------------------------------------------------------------------
#: The paths of the DDF operator (:func:`~mmdyn.ops.ddf.ddf`).
DDF_PATHS = ('reference', 'fused', 'taps', 'triton')


def _triton_supports(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x``.

    See :func:`~mmdyn.ops.accel.ddf_triton.supports`; never with
    ``MMDYN_DISABLE_ACCEL``.
    """
    return not accel_disabled() and ddf_triton.supports(x)


def ddf_path(impl: str,
             x: torch.Tensor,
             operands: Optional[tuple] = None,
             settings: tuple = (),
             run: Optional[Callable] = None) -> str:
    """The DDF operator's path, decided once per call: ``'auto'`` takes
    ``'triton'`` (:mod:`~mmdyn.ops.accel.ddf_triton`) on CUDA when it
    supports ``x`` (under ``torch.compile`` too, not in other graph
    capture), ``'fused'`` (C loops) for CPU tensors when the loops are
    built, else ``'taps'`` (also on other devices and in graph capture, for
    ``'fused'`` too, except under ``torch.compile``, where the loops run as
    the ``mmdyn::ddf`` custom operator); ``'taps'``, ``'reference'`` and
    ``'triton'`` as given.

    With tuning on (:mod:`~mmdyn.ops.accel.autotune`) and ``run`` given,
    ``'auto'`` on CPU takes the faster of ``'fused'`` and ``'taps'``
    measured on ``x`` and ``operands`` (the filters; ``settings``: the
    operator's other arguments; ``run(path, x, *operands)`` runs it)."""
    if impl in ('taps', 'reference', 'triton'):
        return impl
    if impl == 'auto' and x.device.type == 'cuda' and (
            not graph_capture() or compiling()) and _triton_supports(x):
        return 'triton'
    if x.device.type != 'cpu' or (graph_capture() and not compiling()):
        return 'taps'
    if ddf_cpu.available():
        if impl == 'auto' and run is not None and autotune.applies(None, x):
            return autotune.choose_ddf('fused', x, operands, settings, run)
        return 'fused'
    if impl == 'fused':
        raise RuntimeError('impl="fused" needs the compiled DDF CPU kernel, '
                           'which could not be built')
    return 'taps'
