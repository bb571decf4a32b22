# Copyright (c) mmdyn contributors. All rights reserved.
"""Lower bounds, from the vendor libraries' own operations, for a one-kernel
ODConv and a four-kernel DyConv 3x3 layer on CPU, and the per-call costs that
``torch.compile`` adds to a layer.

How fast can such a layer be, next to ``nn.Conv2d`` of the same shape, if
its multiply-adds run in oneDNN/MKL (on AVX-512 the project's C loops lose
to them on GEMM-like work)? Every way of writing the layer with the
libraries' calls is a *form*: a list of *pieces*, each one library call (or
one C pass over memory) that the form cannot do without. A piece is timed
alone, on operands prepared outside the timing, so a form's floor is the
sum of its pieces' medians: no glue, no Python between them, no
attention. The layer cannot run a
form faster than that form's floor, and the family's floor is the least
over its forms.

ODConv, one kernel (``y = alpha_f * conv(alpha_c * x, alpha_s * W)``;
``alpha_s`` one weight per sample and tap, so no static conv computes it):

- ``taps``: ``alpha_c * x`` written pixel-major (one pass over the input),
  one GEMM ``[B*H*W, C_in] x [C_in, k*k*C_out]`` (the conv's multiply-adds),
  then the weighted sum of the shifted taps with ``alpha_s * alpha_f`` (the
  C loop of the ``tap_gemm`` path: one read of the ``k*k`` times larger
  GEMM output).
- ``columns``: ``alpha_c * x`` (one pass), its im2col columns (``F.unfold``:
  a write ``k*k`` times the input), ``alpha_s`` on them (one read-write of
  the columns), one batched GEMM with the static kernel, ``alpha_f`` on the
  output (one pass).
- ``kernels``: the per-sample kernels ``W * alpha_c * alpha_s`` (one write
  of ``B`` kernels), one grouped conv of the batch (oneDNN, its weight
  reordered per call since it is new each call), ``alpha_f`` (one pass).

DyConv, ``K`` kernels (``y = conv(x, sum_k pi_k W_k)``):

- ``kernels``: the mixture, one GEMM ``[B, K] x [K, numel(W)]`` (one write
  of ``B`` kernels), one grouped conv of the batch.
- ``taps``: the input pixel-major (one pass), the mixture in the tap GEMM's
  layout (the same write), one batched GEMM ``[B, H*W, C_in] x [B, C_in,
  k*k*C_out]``, the tap sum (the C loop, unit scales).
- ``samples``: per sample, its mixed kernel and a batch-1 conv (the
  ``chunked`` path's calls), as one piece.
- ``static``: one conv with all ``K*C_out`` kernels (``K`` times the
  multiply-adds), then the routing-weighted sum of the ``K`` outputs.

Each form's pieces, run in order, give the layer's output
(``tests/test_tools/test_cpu_floors.py`` checks every form against a
per-sample ``F.conv2d`` loop of the layer's formula). Each piece, the layer
itself (``impl='auto'``) and ``nn.Conv2d`` are timed in blocks of calls in
a row (after one untimed call: the operands as warm as they can be, the
best state for each, so that the sums stand for the form's best case),
the blocks alternating over the rounds; medians.

``--cold`` adds the same layers, the static conv and each whole form (its
pieces in order, no glue) timed from cold caches: each call right after
``--sweep-mib`` MiB (default 64) were read elsewhere and then its input
written, the state in which a layer inside a model starts (its input just
written by the layer before, its kernels last touched one forward earlier).
64 MiB leaves nothing of the layer in the L1 and L2 caches; a sweep larger
than the last-level cache (``lscpu``) leaves nothing in any cache.

``--kw`` (with ``--cold``: twice, the second from cold caches) adds a
floor for KW-1x ResNet-50 (batch ``--batch``, 224x224,
inference): the static ResNet-50, timed, with the time of each of its convs
that KW-1x replaces (timed inside the model, by forward hooks) replaced by
that KW conv's kernel assembly (the ``attention @ cells`` GEMM at MKL's
speed, operands prepared) plus the faster per-sample conv of prepared
kernels (the grouped conv of the batch; for a stride-1 1x1 conv, also the
batched matmul of per-sample matrices). Everything else a KW layer does
(its attention, the glue) is left out.

``--compile`` adds the costs of a compiled call on this machine: an
opaque custom operator whose body is one ``[N, N] x [N, N]`` matmul, called
directly and from a ``torch.compile``'d function (the difference is what
compiling a single layer, as one ``mmdyn::layer_forward`` operator, adds
to it), and a tiny op right after a memory-heavy one (the state in which a
layer's Python-side work runs between convs).

Usage::

    python benchmarks/cpu_floors.py [--threads 2] [--rounds 21] \
        [--batch 8] [--channels 256] [--size 14] [--cold] [--sweep-mib 64] \
        [--kw] [--compile]
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

#: A piece: (name, the timed call).
Piece = Tuple[str, Callable[[], object]]

#: The goals the floors are compared with (time / the static reference).
GOALS = {'ODConv2d K=1': 1.3, 'DyConv2d K=4': 1.3, 'KW-1x ResNet-50': 1.6}

#: Calls in a row per timed block (:func:`_time`).
BLOCK = 5


def _check_geometry(layer) -> None:
    """The forms are written for 3x3-like stride-1 ungrouped convs with "same"
    padding and no bias."""
    k = layer.kernel_size[0]
    if tuple(layer.stride) != (1, 1) or tuple(layer.dilation) != (1, 1) or \
            layer.groups != 1 or layer.bias is not None or \
            tuple(layer.kernel_size) != (k, k) or \
            tuple(layer.padding) != (k // 2, k // 2) or k % 2 == 0:
        raise ValueError('the floors take a stride-1, dilation-1, ungrouped '
                         'odd square conv with "same" padding and no bias')


def _tap_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[..., C_out, C_in, k, k] -> [..., C_in, k*k*C_out], column ``t*C_out +
    o``."""
    lead = weight.shape[:-4]
    c_in = weight.shape[-3]
    order = tuple(range(len(lead))) + tuple(
        len(lead) + i for i in (1, 2, 3, 0))
    return weight.permute(order).reshape(*lead, c_in, -1).contiguous()


def _tap_pieces(x: torch.Tensor, kernels: torch.Tensor, scale: torch.Tensor,
                k: int) -> List[Piece]:
    """One batched GEMM of ``x`` [B, C_in, H, W] (read pixel-major through a
    transposed view) with per-sample tap-layout kernels ``kernels`` [B, C_in,
    k*k*C_out], then the C tap sum scaled by ``scale`` [B, k*k, C_out]."""
    from mmdyn.ops.accel import tap_sum_cpu
    b, c_in, h, w = x.shape
    c_out = kernels.shape[-1] // (k * k)
    maps = x.new_empty(b, h * w, k * k * c_out)
    table = tap_sum_cpu.stride1_taps((k, k), (1, 1), (k // 2, k // 2), c_out,
                                     h, w)
    out = x.new_empty(b, c_out, h, w)
    lib = tap_sum_cpu.load()
    pixels = x.view(b, c_in, h * w).transpose(1, 2)
    return [
        ('batched GEMM to the taps',
         lambda: torch.bmm(pixels, kernels, out=maps)),
        ('tap sum (C)',
         lambda: tap_sum_cpu.tap_sum(lib, maps, table, scale, None, out)),
    ]


def odconv_forms(layer, x: torch.Tensor) -> Dict[str, List[Piece]]:
    """The forms of a one-kernel ODConv ``layer`` (see
    :func:`_check_geometry`) on ``x``, its attentions computed once, outside
    the pieces: form -> pieces, which run in order (:func:`run_form`)
    compute the layer's output, returned by the last piece as [B, C_out, H,
    W]."""
    from mmdyn.ops.accel import tap_sum_cpu
    _check_geometry(layer)
    if layer.kernel_num != 1:
        raise ValueError('the ODConv forms take a one-kernel layer')
    channel, filt, spatial, _ = (None if a is None else a.detach()
                                 for a in layer.attentions(x))
    b, c_in, h, w = x.shape
    weight = layer.weight[0].detach()
    c_out, _, k, _ = weight.shape
    pad = k // 2
    filt = x.new_ones(b, c_out) if filt is None else filt
    forms = {}

    # taps: alpha_c * x pixel-major, one GEMM, the scaled tap sum
    xs = x.new_empty(b, h, w, c_in)
    kernel = _tap_kernel(weight)
    maps = x.new_empty(b * h * w, k * k * c_out)
    table = tap_sum_cpu.stride1_taps((k, k), (1, 1), (pad, pad), c_out, h, w)
    scale = (spatial[:, :, None] * filt[:, None, :]).contiguous()
    out_taps = x.new_empty(b, c_out, h, w)
    lib = tap_sum_cpu.load()
    forms['taps'] = [
        ('scale input (pixel-major)', lambda: torch.mul(
            x, channel[:, :, None, None], out=xs.permute(0, 3, 1, 2))),
        ('GEMM to the taps',
         lambda: torch.mm(xs.view(-1, c_in), kernel, out=maps)),
        ('tap sum (C)',
         lambda: tap_sum_cpu.tap_sum(lib, maps, table, scale, None, out_taps)),
    ]

    # columns: im2col, alpha_c x alpha_s on the columns, one batched GEMM
    cols = {}
    column_scale = (channel[:, :, None] * spatial[:, None, :])[..., None]
    flat_kernel = weight.reshape(c_out, -1)
    out_cols = x.new_empty(b, c_out, h * w)
    forms['columns'] = [
        ('im2col',
         lambda: cols.__setitem__('cols', F.unfold(x, k, padding=pad))),
        ('input and tap scales',
         lambda: cols['cols'].view(b, c_in, k * k, -1).mul_(column_scale)),
        ('batched GEMM',
         lambda: torch.matmul(flat_kernel, cols['cols'], out=out_cols)),
        ('filter scale',
         lambda: out_cols.mul_(filt[:, :, None]).view(b, c_out, h, w)),
    ]

    # kernels: W * alpha_c * alpha_s per sample, one grouped conv
    kernels = x.new_empty(b, c_out, c_in, k * k)
    per_sample = (channel[:, None, :, None] * spatial[:, None, None, :])
    flat = weight.reshape(1, c_out, c_in, k * k)
    grouped = {}

    def grouped_conv():
        grouped['out'] = F.conv2d(
            x.view(1, b * c_in, h, w),
            kernels.view(b * c_out, c_in, k, k),
            padding=pad,
            groups=b)
        return grouped['out']

    forms['kernels'] = [
        ('per-sample kernels',
         lambda: torch.mul(flat, per_sample, out=kernels)),
        ('grouped conv', grouped_conv),
        ('filter scale', lambda: grouped['out'].view(b, c_out, h, w).mul_(
            filt[:, :, None, None])),
    ]
    return forms


def dyconv_forms(layer, x: torch.Tensor) -> Dict[str, List[Piece]]:
    """The forms of a CondConv/DyConv ``layer`` (see :func:`_check_geometry`)
    on ``x``, its routing weights computed once, outside the pieces, as
    :func:`odconv_forms` gives them."""
    _check_geometry(layer)
    pi = layer.routing_weights(x).detach()
    b, c_in, h, w = x.shape
    bank = layer.weight.detach()
    n_kernels, c_out, _, k, _ = bank.shape
    pad = k // 2
    forms = {}

    # kernels: the mixture, one grouped conv
    flat_bank = bank.reshape(n_kernels, -1)
    mixed = x.new_empty(b, flat_bank.shape[1])
    forms['kernels'] = [
        ('mixture (GEMM)', lambda: torch.mm(pi, flat_bank, out=mixed)),
        ('grouped conv', lambda: F.conv2d(
            x.view(1, b * c_in, h, w),
            mixed.view(b * c_out, c_in, k, k),
            padding=pad,
            groups=b).view(b, c_out, h, w)),
    ]

    # taps: the mixture in the tap layout, one batched GEMM, the tap sum
    tap_bank = _tap_kernel(bank).reshape(n_kernels, -1)
    tap_mixed = x.new_empty(b, c_in, k * k * c_out)
    forms['taps'] = [
        ('mixture (GEMM, tap layout)',
         lambda: torch.mm(pi, tap_bank, out=tap_mixed.view(b, -1))),
    ] + _tap_pieces(x, tap_mixed, x.new_ones(b, k * k, c_out), k)

    # samples: per sample, its mixture and a batch-1 conv
    one = x.new_empty(1, flat_bank.shape[1])
    out_samples = x.new_empty(b, c_out, h, w)

    def per_sample():
        for i in range(b):
            torch.mm(pi[i:i + 1], flat_bank, out=one)
            out_samples[i:i + 1] = F.conv2d(
                x[i:i + 1], one.view(c_out, c_in, k, k), padding=pad)
        return out_samples

    forms['samples'] = [('per sample: mixture and batch-1 conv', per_sample)]

    # static: K times the multiply-adds, then the weighted sum
    all_kernels = bank.reshape(n_kernels * c_out, c_in, k, k)
    convs = {}

    def static_conv():
        convs['out'] = F.conv2d(x, all_kernels, padding=pad)
        return convs['out']

    forms['static'] = [
        ('conv with all K kernels', static_conv),
        ('routing-weighted sum',
         lambda: torch.einsum('bk,bkchw->bchw', pi, convs['out'].view(
             b, n_kernels, c_out, h, w))),
    ]
    return forms


def run_form(pieces: List[Piece]) -> torch.Tensor:
    """Run a form's pieces in order; its output (what the last one returns, as
    [B, C_out, H, W])."""
    out = None
    for _, call in pieces:
        out = call()
    return out


def floors(piece_medians: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Each form's floor (the sum of its pieces' medians) and ``'floor'``, the
    least of them."""
    sums = {
        form: sum(pieces.values())
        for form, pieces in piece_medians.items()
    }
    sums['floor'] = min(sums.values())
    return sums


def _time(candidates: Dict[str, Callable[[], object]],
          rounds: int,
          block: int = 1,
          warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each candidate over ``rounds`` rounds, after
    ``warmup`` untimed rounds.

    ``block == 1``: the candidates alternate call
    by call. ``block > 1``: each is timed ``block`` times in a row after one
    untimed call (its operands as warm as they can be), the blocks
    alternating.
    """
    for _ in range(warmup):
        for call in candidates.values():
            call()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            if block > 1:
                call()
            for _ in range(block):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def build_layers(channels: int) -> Dict[str, torch.nn.Module]:
    """The two layers of :data:`GOALS`: 3x3, stride 1, no bias, eval."""
    from mmdyn.ops import DyConv2d, ODConv2d
    return {
        'ODConv2d K=1':
        ODConv2d(channels, channels, 3, padding=1, bias=False,
                 kernel_num=1).eval(),
        'DyConv2d K=4':
        DyConv2d(channels, channels, 3, padding=1, bias=False,
                 kernel_num=4).eval(),
    }


def _layer_setups(batch: int, channels: int, size: int):
    """Per layer of :func:`build_layers`: ``(name, layer, the input x, the
    layer's forms on x, the candidates 'nn.Conv2d' and 'layer' on x)``."""
    x = torch.randn(batch, channels, size, size)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    for name, layer in build_layers(channels).items():
        forms = (odconv_forms if name.startswith('ODConv') else dyconv_forms)(
            layer, x)
        yield name, layer, x, forms, {
            'nn.Conv2d': lambda: conv(x),
            'layer': lambda layer=layer: layer(x)
        }


def layer_table(batch: int, channels: int, size: int,
                rounds: int) -> List[str]:
    """Markdown rows: per layer, the static conv, the layer, each piece, each
    form's floor and the least; times in ms and as ratios to the conv."""
    lines = ['| layer | candidate | ms | / nn.Conv2d |', '|---|---|---:|---:|']
    with torch.no_grad():
        for name, layer, _, forms, candidates in _layer_setups(
                batch, channels, size):
            for form, pieces in forms.items():
                for piece, call in pieces:
                    candidates[f'{form}: {piece}'] = call
            med = _time(candidates, rounds, BLOCK)
            base = med['nn.Conv2d']
            per_form = {
                form: {
                    p: med[f'{form}: {p}']
                    for p, _ in pieces
                }
                for form, pieces in forms.items()
            }
            sums = floors(per_form)
            rows = [('nn.Conv2d', base),
                    (f'layer (path `{layer.last_path}`)', med['layer'])]
            rows += [(f'{form}: {p}', t) for form, pieces in per_form.items()
                     for p, t in pieces.items()]
            rows += [(f'**{form} floor**', sums[form]) for form in per_form]
            rows.append(('**least floor** (goal: '
                         f'{GOALS[name]:.1f}x)', sums['floor']))
            lines += [
                f'| {name} | {label} | {t * 1e3:.3f} | {t / base:.2f} |'
                for label, t in rows
            ]
    return lines


#: MiB read between two cold calls (:func:`cold_table`; ``--sweep-mib``).
SWEEP_MIB = 64


def _time_cold(candidates: Dict[str, Callable[[], object]],
               rounds: int,
               sweep: torch.Tensor,
               warm: Optional[Dict[str, Sequence[torch.Tensor]]] = None
               ) -> Dict[str, float]:
    """Median seconds of each candidate, each call right after ``sweep`` is
    read and then the tensors ``warm[candidate]`` are written (untimed: the
    operands the layer before would have just written), the candidates
    alternating; one untimed round first."""
    for call in candidates.values():
        call()
    warm = warm or {}
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            sweep.sum()
            for tensor in warm.get(name, ()):
                tensor.mul_(1.0)
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def cold_table(batch: int,
               channels: int,
               size: int,
               rounds: int,
               sweep_mib: int = SWEEP_MIB) -> List[str]:
    """Markdown rows: per layer, the static conv, the layer and each whole form
    (its pieces in order, no glue), each call after ``sweep_mib`` MiB of
    other data were read and then the input written, as a layer inside a
    model starts (its input just written by the layer before, its kernels
    last read one forward earlier)."""
    sweep = torch.zeros(sweep_mib << 18)
    lines = ['| layer | candidate | ms | / nn.Conv2d |', '|---|---|---:|---:|']
    with torch.no_grad():
        for name, layer, x, forms, candidates in _layer_setups(
                batch, channels, size):
            for form, pieces in forms.items():
                candidates[f'{form} form'] = (
                    lambda pieces=pieces: run_form(pieces))
            med = _time_cold(candidates, rounds, sweep,
                             {name: [x]
                              for name in candidates})
            base = med['nn.Conv2d']
            least = min(t for label, t in med.items()
                        if label.endswith('form'))
            rows = [(label if label != 'layer' else
                     f'layer (path `{layer.last_path}`)', t)
                    for label, t in med.items()]
            rows.append((f'**least form** (goal: {GOALS[name]:.1f}x)', least))
            lines += [
                f'| {name} | {label} | {t * 1e3:.3f} | {t / base:.2f} |'
                for label, t in rows
            ]
    return lines


def kw_layers(model, x: torch.Tensor) -> list:
    """``(name, layer, input shape, (rows, inner, columns))`` of every
    KernelWarehouse conv of ``model`` in one inference forward on ``x``: its
    input and its kernel assembly ``[rows, inner] x [inner, columns]`` (``B``
    times its mixtures, its warehouse's cells, a cell's elements), whichever
    path the layer takes."""
    from mmdyn.ops import KWConv2d
    inputs = {}
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, KWConv2d)]
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: inputs.__setitem__(id(mod), args[0].shape))
        for _, m in layers
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    records = []
    for name, layer in layers:
        cells = layer.warehouse_manager.weights[layer.warehouse_id]
        shape = inputs[id(layer)]
        records.append(
            (name, layer, shape, (shape[0] * layer.num_mixtures,
                                  cells.shape[0], cells[0].numel())))
    return records


def in_model_times(model, names, x: torch.Tensor,
                   rounds: int) -> Dict[str, float]:
    """Median seconds of the submodules ``names`` of ``model`` inside its
    inference forward on ``x`` (forward hooks around each; one untimed forward
    first)."""
    modules = dict(model.named_modules())
    times = {name: [] for name in names}
    starts = {}
    hooks = []
    for name in names:
        module = modules[name]
        hooks.append(
            module.register_forward_pre_hook(
                lambda mod, args, name=name: starts.__setitem__(
                    name, time.perf_counter())))
        hooks.append(
            module.register_forward_hook(
                lambda mod, args, out, name=name: times[name].append(
                    time.perf_counter() - starts[name])))
    try:
        with torch.no_grad():
            model(x)
            for name in names:
                times[name].clear()
            for _ in range(rounds):
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: statistics.median(v) for name, v in times.items()}


def per_sample_conv_forms(layer,
                          x: torch.Tensor,
                          kernels: torch.Tensor,
                          operands: Optional[Dict[str, torch.Tensor]] = None
                          ) -> Dict[str, List[Piece]]:
    """The forms of the per-sample conv ``conv(x[b], kernels[b])`` with a conv
    ``layer``'s geometry (``kernels`` [B, C_out, C_in/groups, kh, kw],
    prepared; for the tap form also kept in its tap layout, as an assembly
    could write it): the grouped conv of the batch; for a 1x1 ungrouped conv
    the batched matmul (after subsampling a strided input); for a stride-1
    3x3-like ungrouped conv with "same" padding the batched GEMM to the taps
    and the tap sum.

    Each form's last piece returns [B, C_out, H', W']. ``operands``, if
    given, receives the kernel tensor each form reads (``kernels`` or its
    tap-layout copy).
    """
    b, c_in, h, w = x.shape
    c_out, groups = layer.out_channels, layer.groups
    kh, kw_ = layer.kernel_size
    flat = kernels.reshape(b * c_out, c_in // groups, kh, kw_)

    def grouped():
        out = F.conv2d(
            x.reshape(1, b * c_in, h, w), flat, None, layer.stride,
            layer.padding, layer.dilation, b * groups)
        return out.view(b, c_out, *out.shape[-2:])

    forms = {'grouped conv': [('grouped conv', grouped)]}
    read = {'grouped conv': kernels, 'batched matmul': kernels}
    stride = tuple(layer.stride)
    if (kh, kw_) == (1, 1) and groups == 1 and \
            tuple(layer.padding) == (0, 0):
        matrices = kernels.reshape(b, c_out, c_in)
        h_out, w_out = -(-h // stride[0]), -(-w // stride[1])
        out = x.new_empty(b, c_out, h_out * w_out)
        pieces = []
        source = x
        if stride != (1, 1):
            sub = x.new_empty(b, c_in, h_out, w_out)
            pieces.append(
                ('subsample',
                 lambda: sub.copy_(x[:, :, ::stride[0], ::stride[1]])))
            source = sub
        pieces.append(('batched matmul', lambda: torch.bmm(
            matrices, source.view(b, c_in, h_out * w_out), out=out).view(
                b, c_out, h_out, w_out)))
        forms['batched matmul'] = pieces
    elif kh == kw_ and kh % 2 == 1 and stride == (1, 1) and groups == 1 \
            and tuple(layer.dilation) == (1, 1) and \
            tuple(layer.padding) == (kh // 2, kh // 2):
        taps = read['taps'] = _tap_kernel(kernels)
        forms['taps'] = _tap_pieces(x, taps, x.new_ones(b, kh * kh, c_out), kh)
    if operands is not None:
        operands.update({form: read[form] for form in forms})
    return forms


class KWLayerTimes(NamedTuple):
    """Seconds of one KW conv's parts for :func:`kw_floor`."""
    static_conv: float  # ResNet-50's conv in its place, inside the model
    assembly: float  # its kernel assembly GEMM
    per_sample: Dict[str, float]  # each per-sample conv form's floor

    @property
    def fastest_per_sample(self) -> float:
        return min(self.per_sample.values())


def kw_floor(layer_times: List[KWLayerTimes], static_total: float) -> float:
    """The KW-1x model floor: ``static_total`` with each layer's static conv
    replaced by its assembly plus its fastest per-sample conv form."""
    return static_total + sum(t.assembly + t.fastest_per_sample - t.static_conv
                              for t in layer_times)


def _resnet50_backbones() -> dict:
    """:data:`BACKBONES` of ``resnet50_backbones.py``, next to this file."""
    here = osp.dirname(osp.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from resnet50_backbones import BACKBONES
    return BACKBONES


def kw_layer_times(layer,
                   shape,
                   assembly: Tuple[int, int, int],
                   static_conv: float,
                   rounds: int,
                   sweep=None) -> KWLayerTimes:
    """One KW conv's :class:`KWLayerTimes`: its assembly GEMM ``[rows, inner] x
    [inner, columns]`` and its per-sample conv forms (input ``shape``) on
    prepared random operands; ``static_conv``: ResNet-50's conv in its place.

    Without ``sweep``, piece by piece in warm blocks (:func:`_time`); with
    it, the assembly and each whole form from cold caches (:func:`_time_cold`,
    ``rounds * BLOCK`` calls), each form after its input and the kernels it
    reads were written, as the assembly would have just written them.
    """
    rows, inner, cols = assembly
    attention = torch.randn(rows, inner)
    cells = torch.randn(inner, cols)
    mixtures = torch.empty(rows, cols)
    kernels = torch.randn(shape[0], layer.out_channels,
                          layer.in_channels // layer.groups,
                          *layer.kernel_size)
    x = torch.randn(shape)
    operands = {}
    forms = per_sample_conv_forms(layer, x, kernels, operands)
    candidates = {'assembly': lambda: torch.mm(attention, cells, out=mixtures)}
    if sweep is not None:
        for form, pieces in forms.items():
            candidates[form] = lambda pieces=pieces: run_form(pieces)
        # Each form reads kernels the assembly has just written.
        med = _time_cold(candidates, rounds * BLOCK, sweep,
                         {form: [x, operands[form]]
                          for form in forms})
        per_sample = {form: med[form] for form in forms}
    else:
        for form, pieces in forms.items():
            for piece, call in pieces:
                candidates[f'{form}: {piece}'] = call
        med = _time(candidates, rounds, BLOCK)
        per_sample = {
            form: sum(med[f'{form}: {p}'] for p, _ in pieces)
            for form, pieces in forms.items()
        }
    return KWLayerTimes(static_conv, med['assembly'], per_sample)


def kw_table(batch: int,
             rounds: int,
             cold: bool = False,
             sweep_mib: int = SWEEP_MIB) -> List[str]:
    """Markdown rows: KW-1x ResNet-50 and its floor against ResNet-50.

    ``cold``: each assembly and each whole per-sample conv form timed after
    ``sweep_mib`` MiB of other data were read (:func:`_time_cold`, ``rounds *
    BLOCK`` calls; the forms' input and kernels then written) instead of
    piece by piece in warm blocks.
    """
    backbones = _resnet50_backbones()
    torch.manual_seed(0)
    kw_model, static = backbones['kw1x'][1](), backbones['r50'][1]()
    kw_model.eval()  # mmpretrain's ResNet.train() returns None
    static.eval()
    x = torch.randn(batch, 3, 224, 224)
    layers = kw_layers(kw_model, x)
    # ResNet-50 has the same module names: its convs where KW-1x has KW ones.
    static_convs = in_model_times(static, [n for n, _, _, _ in layers], x,
                                  rounds)
    sweep = torch.zeros(sweep_mib << 18) if cold else None
    with torch.no_grad():
        layer_times = [
            kw_layer_times(layer, shape, assembly, static_convs[name], rounds,
                           sweep) for name, layer, shape, assembly in layers
        ]
        models = _time(
            {
                'ResNet-50': lambda: static(x),
                'KW-1x ResNet-50': lambda: kw_model(x)
            },
            rounds,
            warmup=1)
    base = models['ResNet-50']
    floor = kw_floor(layer_times, base)
    parts = {
        'its convs where KW-1x has KW convs (in the model)':
        sum(t.static_conv for t in layer_times),
        'kernel assemblies':
        sum(t.assembly for t in layer_times),
        'per-sample convs (fastest form each)':
        sum(t.fastest_per_sample for t in layer_times),
    }
    lines = ['| model / part | ms | / ResNet-50 |', '|---|---:|---:|']
    lines += [
        f'| {k} | {v * 1e3:.1f} | {v / base:.2f} |' for k, v in {
            **models,
            **parts
        }.items()
    ]
    goal = GOALS['KW-1x ResNet-50']
    lines.append(f'| **KW-1x floor** (goal: {goal:.1f}x), {len(layer_times)}'
                 f' KW convs | {floor * 1e3:.1f} | {floor / base:.2f} |')
    return lines


def compile_table(rounds: int, size: int = 512) -> List[str]:
    """Markdown rows: what a compiled call adds around an opaque operator
    whose body is one matmul, and a tiny op's time after a memory-heavy
    one."""
    a = torch.randn(size, size)
    x = torch.randn(4)

    @torch.library.custom_op('mmdyn_floors::matmul_body', mutates_args=())
    def body_op(t: torch.Tensor) -> torch.Tensor:
        torch.mm(a, a)
        return t.clone()

    @body_op.register_fake
    def _(t):
        return torch.empty_like(t)

    @torch.library.custom_op('mmdyn_floors::empty_body', mutates_args=())
    def empty_op(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @empty_op.register_fake
    def _(t):
        return torch.empty_like(t)

    compiled_body = torch.compile(lambda t: body_op(t))
    compiled_empty = torch.compile(lambda t: empty_op(t))
    small = torch.randn(8, 16)
    big, big_copy = torch.randn(2**22), torch.empty(2**22)
    with torch.no_grad():
        compiled_body(x)
        compiled_empty(x)
        med = _time(
            {
                'matmul': lambda: torch.mm(a, a),
                'operator(matmul)': lambda: body_op(x),
                'compiled operator(matmul)': lambda: compiled_body(x),
                'operator(nothing)': lambda: empty_op(x),
                'compiled operator(nothing)': lambda: compiled_empty(x),
            }, rounds * 10)
        after = {}
        for label, before in (('relu [8, 16]', lambda: None),
                              ('relu [8, 16] after a 16 MiB copy',
                               lambda: big_copy.copy_(big))):
            times = []
            for _ in range(rounds * 10):
                before()
                start = time.perf_counter()
                torch.relu(small)
                times.append(time.perf_counter() - start)
            after[label] = statistics.median(times)
    lines = ['| call | us |', '|---|---:|']
    lines += [f'| {k} | {v * 1e6:.1f} |' for k, v in med.items()]
    lines += [f'| {k} | {v * 1e6:.1f} |' for k, v in after.items()]
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=256)
    parser.add_argument('--size', type=int, default=14)
    parser.add_argument(
        '--cold',
        action='store_true',
        help='also each whole form timed from cold caches')
    parser.add_argument(
        '--sweep-mib',
        type=int,
        default=SWEEP_MIB,
        help='MiB read before each cold call (more than the last-level '
        'cache to leave nothing of the layer in any cache)')
    parser.add_argument(
        '--kw', action='store_true', help='also the KW-1x ResNet-50 floor')
    parser.add_argument(
        '--compile',
        action='store_true',
        help='also the per-call costs of torch.compile')
    return parser.parse_args()


def main():
    args = parse_args()
    from mmdyn.analysis.machine import header_lines
    from mmdyn.engine.malloc import tune_malloc
    from mmdyn.ops.accel import tap_sum_cpu
    if tap_sum_cpu.load() is None:
        raise SystemExit('the floors need the C tap sum (a C compiler, '
                         'MMDYN_TAP_SUM_CPU_KERNEL not 0)')
    tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print('\n'.join(header_lines(args.threads)))
    print(f'\nbatch {args.batch}, {args.channels} channels, '
          f'{args.size}x{args.size}, 3x3 stride 1, eval, float32; medians '
          f'of {args.rounds} rounds of blocks of {BLOCK} calls\n')
    print('\n'.join(
        layer_table(args.batch, args.channels, args.size, args.rounds)))
    if args.cold:
        print(f'\nThe same, each call after {args.sweep_mib} MiB read '
              'elsewhere, then its input written; whole forms; medians of '
              f'{args.rounds * BLOCK} calls, the candidates alternating\n')
        print('\n'.join(
            cold_table(args.batch, args.channels, args.size,
                       args.rounds * BLOCK, args.sweep_mib)))
    if args.kw:
        kw_rounds = max(3, args.rounds // 3)
        print(f'\nKW-1x ResNet-50, batch {args.batch}, 224x224, inference; '
              f'{kw_rounds} rounds\n')
        print('\n'.join(kw_table(args.batch, kw_rounds)))
        if args.cold:
            print(f'\nThe same, each assembly and whole per-sample conv form '
                  f'after {args.sweep_mib} MiB read elsewhere, then its '
                  'input and kernels written; medians of '
                  f'{kw_rounds * BLOCK} calls\n')
            print('\n'.join(
                kw_table(args.batch, kw_rounds, True, args.sweep_mib)))
    if args.compile:
        print(f'\ntorch.compile per call; medians of {args.rounds * 10} '
              'calls, the candidates alternating\n')
        print('\n'.join(compile_table(args.rounds)))


if __name__ == '__main__':
    main()
