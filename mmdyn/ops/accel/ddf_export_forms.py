# Copyright (c) mmdyn contributors. All rights reserved.
"""Export forms of DDF (see :mod:`mmdyn.ops.accel.export_forms`).

* :func:`ddf_conv`, :func:`ddf_upsample`: :class:`~mmdyn.ops.ddf.DDFConv2d`
  and DDF-Up with their filter norms' centring folded into the branches'
  convs: a linear op's output centred over the ``k*k`` outputs of each
  filter is the op with centred weights and bias (:func:`centred_taps`), so
  no ``ReduceMean``/``Sub``; each norm is ``ReduceL2``, ``Clip``, ``Div``
  (:func:`unit_ddf_filters`), and with ``mul`` one ``Mul`` carries both
  branches' scales (for one-phase ``mul``: none, the scales are in the
  im2col weights). Then :func:`ddf_apply`: :func:`im2col` of the input
  (the conv padding where it gives the output size: no ``Pad``), the
  spatial filter multiplied in, the channel filter as a batched ``MatMul``
  over the taps, on large maps in channel chunks (:func:`column_chunks`);
  DDF-Up's ``s*s`` phases as one set of these nodes, interleaved by one
  ``Transpose``. The simplifier turns each norm into one
  ``LpNormalization`` (:func:`mmdyn.analysis.onnx_export.
  lp_normalize_divisions`). A branch that does not end in a conv
  and a ``FilterNorm`` keeps its norm's nodes (:func:`ddf_filters`).
* :func:`ddf`: the operator alone (its filters given);
  :func:`normalize_filters`: a ``FilterNorm`` alone;
  :func:`interleave_phases`: DDF-Up's phases computed apart.

torch only.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .export_forms import Pair, im2col
from .thresholds import THRESHOLDS


def normalize_filters(x: torch.Tensor,
                      groups: int,
                      kk: int,
                      scale=1.0) -> torch.Tensor:
    """DDF's filter normalisation in few nodes, times ``scale``.

    As :func:`mmdyn.ops.ddf.normalize_filters`: each of the ``groups``
    filters of ``kk`` values along dim 1 of ``x`` [B, groups*kk, H, W]
    centred and divided by its unbiased std (+1e-10); then times ``scale``
    (a number or a [groups*kk] vector: :class:`~mmdyn.ops.ddf.FilterNorm`'s
    gain or learnable std). Nodes: ``ReduceMean``, ``Sub``, ``ReduceL2``,
    ``Clip``, ``Mul``, ``Div`` (and a ``Reshape`` each way for several
    groups, constant shapes with a -1 batch), as ``c * sqrt(kk-1) /
    max(||c||, eps * sqrt(kk-1))``. The reference's max-abs rescaling (an
    overflow guard for huge filters) is left out: the value is the same.
    """
    shape = [int(v) for v in x.shape[1:]]
    if groups > 1:
        x = x.reshape(-1, groups, kk, *shape[1:])
    axis = 2 if groups > 1 else 1
    centred = x - x.mean(axis, keepdim=True)
    norm = torch.linalg.vector_norm(centred, 2, axis, keepdim=True)
    root = math.sqrt(kk - 1)
    if isinstance(scale, torch.Tensor):  # one value per filter element
        filters = (groups, kk) if groups > 1 else (kk, )
        scale = scale.to(x.dtype).reshape(1, *filters,
                                          *[1] * (x.dim() - 1 - len(filters)))
    # max(., eps), not + eps: onnxscript's optimizer drops the Add of a
    # constant this small, and a zero filter would give 0/0. Both equal
    # 0 for a zero filter and agree to 1e-10 / ||c|| elsewhere.
    out = centred * (scale * root) / norm.clamp_min(1e-10 * root)
    return out.reshape(-1, *shape) if groups > 1 else out


def _ddf_columns(x: torch.Tensor,
                 kernel_size: int,
                 dilation: int,
                 stride: int,
                 out_hw: Pair,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DDF's im2col columns [B, C*k*k, Ho, Wo], padded as the reference
    pads it: the conv padding ``r = (k-1)/2*d`` where that conv's output has
    the size ``out_hw`` (ceil(H / s)), else zeros on the far side only as far
    as the last output row/column reads, and the conv output cropped.
    ``scale`` [C*k*k]: as :func:`im2col`'s."""
    H, W = int(x.shape[2]), int(x.shape[3])
    Ho, Wo = int(out_hw[0]), int(out_hw[1])
    k = kernel_size
    r = (k - 1) // 2 * dilation
    if ((H - 1) // stride + 1, (W - 1) // stride + 1) == (Ho, Wo):
        padding = (r, r)  # no Pad node
    else:
        bottom = max(0, (Ho - 1) * stride + r - (H - 1))
        right = max(0, (Wo - 1) * stride + r - (W - 1))
        x = F.pad(x, (r, right, r, bottom))
        padding = (0, 0)
    cols = im2col(x, (k, k), (stride, stride), padding, (dilation, dilation),
                  scale)
    if tuple(cols.shape[2:]) != (Ho, Wo):
        cols = cols[:, :, :Ho, :Wo]
    return cols


def _ddf_lead(phases: int, head: int):
    """The dims in front of a DDF head's channels: ``phases`` (DDF-Up's sub-
    pixel phases) and ``head``, each left out where it is 1."""
    return [n for n in (phases, head) if n > 1]


def column_chunks(x: torch.Tensor, kernel_size: int, out_hw: Pair, add: bool,
                  head: int, phases: int) -> int:
    """Into how many channel chunks :func:`ddf_apply` splits a one-head, one-
    phase ``mul`` DDF: the fewest (a power of two, at most
    ``THRESHOLDS['ddf_export']['max_chunks']``, dividing the channels) whose
    columns hold at most ``chunk_bytes`` per sample; 1 for the others."""
    limits = THRESHOLDS['ddf_export']
    channels = int(x.shape[1])
    per_sample = channels * kernel_size**2 * int(out_hw[0]) * int(
        out_hw[1]) * x.element_size()
    chunks = 1
    if add or head != 1 or phases != 1:
        return chunks
    while per_sample > chunks * limits['chunk_bytes'] and \
            2 * chunks <= limits['max_chunks'] and \
            channels % (2 * chunks) == 0:
        chunks *= 2
    return chunks


def ddf_apply(x: torch.Tensor,
              cf: torch.Tensor,
              sf: torch.Tensor,
              kernel_size: int,
              dilation: int,
              stride: int,
              add: bool,
              out_hw: Pair,
              head: int = 1,
              phases: int = 1,
              tap_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDF of ``x`` [B, C, H, W] with ``phases`` pairs of filters, in the
    layouts of :func:`ddf_filter_layout`: ``cf`` [B, (n), (head), C/head, 1,
    k*k], ``sf`` [B, (n), (head), 1, k*k, Ho*Wo] (dims of size 1 left out).

    The im2col columns [B, (1), (head), C/head, k*k, Ho*Wo] (one ``Conv``
    shared by the phases), times ``tap_scale`` [C*k*k] (folded into the
    ``Conv``'s weights; ``mul`` only: a scale of the channel filters);
    ``mul``: the columns times the spatial filter, then the channel filter
    as a batched ``MatMul`` over the taps; ``add``: the ``MatMul`` of the
    channel filter with the columns plus the columns times the spatial
    filter summed over the taps. Returns [B, C, Ho, Wo], or for several
    phases (``s*s``) their interleaving [B, C, s*Ho, s*Wo] (phase ``py*s +
    px`` at pixel (y*s + py, x*s + px)).

    Large maps are done in channel chunks (:func:`column_chunks`): one
    ``Split`` of the input and of the channel filters, the four nodes of the
    columns' product per chunk, one ``Concat``. A runtime computes one node
    at a time over the whole tensor, so the ``k*k`` times larger columns
    travel through memory three times (written, multiplied, read by the
    ``MatMul``); chunks small enough to stay in the cache make these passes
    faster. The chunk rule was chosen by timing whole models
    (``benchmarks/deploy.md`` has the measurements).
    """
    C = int(x.shape[1])
    Ho, Wo = int(out_hw[0]), int(out_hw[1])
    kk = kernel_size * kernel_size
    if tap_scale is not None and add:
        raise ValueError('tap_scale scales the channel filters: mul only')
    chunks = column_chunks(x, kernel_size, (Ho, Wo), add, head, phases)
    if chunks > 1:
        width = C // chunks
        scales = [None] * chunks if tap_scale is None else \
            torch.split(tap_scale, width * kk)
        sf = sf.to(x.dtype)
        outs = []
        for part, filters, scale in zip(
                torch.split(x, width, 1), torch.split(cf, width, 1), scales):
            cols = _ddf_columns(part, kernel_size, dilation, stride, (Ho, Wo),
                                scale).reshape(-1, width, kk, Ho * Wo)
            outs.append(torch.matmul(filters.to(cols.dtype), cols * sf))
        return torch.cat(outs, 1).reshape(-1, C, Ho, Wo)
    cols = _ddf_columns(x, kernel_size, dilation, stride, (Ho, Wo), tap_scale)
    lead = ([1] if phases > 1 else []) + ([head] if head > 1 else [])
    cols = cols.reshape(-1, *lead, C // head, kk, Ho * Wo)
    if add:
        out = torch.matmul(cf.to(cols.dtype), cols) + \
            (cols * sf.to(cols.dtype)).sum(-2, keepdim=True)
    else:
        out = torch.matmul(cf.to(cols.dtype), cols * sf.to(cols.dtype))
    if phases == 1:
        return out.reshape(-1, C, Ho, Wo)
    s = int(round(math.sqrt(phases)))
    out = out.reshape(-1, s, s, C, Ho, Wo).permute(0, 3, 4, 1, 5, 2)
    return out.reshape(-1, C, s * Ho, s * Wo)


def ddf(x: torch.Tensor, cf: torch.Tensor, sf: torch.Tensor, kernel_size: int,
        dilation: int, stride: int, add: bool, out_hw: Pair) -> torch.Tensor:
    """DDF (one head; ``cf`` [B, C, k*k], ``sf`` [B, k*k, Ho, Wo], the
    operator's filters): :func:`ddf_apply` on them."""
    C, kk = int(x.shape[1]), kernel_size * kernel_size
    hw = int(out_hw[0]) * int(out_hw[1])
    return ddf_apply(x, cf.reshape(-1, C, 1, kk), sf.reshape(-1, 1, kk, hw),
                     kernel_size, dilation, stride, add, out_hw)


# --------------------------------------------------------------------------
# DDF layers: the filter branches' centring folded into their convs
# --------------------------------------------------------------------------
def _is_filter_norm(module: nn.Module) -> bool:
    # mmdyn.ops.ddf.FilterNorm (not imported: ddf imports this module).
    return type(module).__name__ == 'FilterNorm' and \
        hasattr(module, 'gain') and hasattr(module, 'std')


def _centred_conv(branch: nn.Sequential) -> Optional[nn.Conv2d]:
    """The conv right before the ``FilterNorm`` that ends ``branch`` where the
    norm's centring folds into it: a zero-padded ``nn.Conv2d`` with one output
    per filter value; else None."""
    if not isinstance(branch, nn.Sequential) or len(branch) < 2:
        return None
    conv, norm = branch[-2], branch[-1]
    if not (_is_filter_norm(norm) and isinstance(conv, nn.Conv2d)
            and conv.padding_mode == 'zeros'
            and conv.out_channels == norm.channels * norm.kernel_size**2):
        return None
    return conv


def centred_taps(weight: torch.Tensor, kk: int) -> torch.Tensor:
    """``weight`` [filters*kk, ...] (a conv's weight or bias, one output per
    filter value) minus its mean over the ``kk`` outputs of each filter: the
    conv then outputs its filters centred (a linear op's output minus the mean
    of ``kk`` of its outputs is the op with centred rows)."""
    rows = weight.reshape(-1, kk, *weight.shape[1:])
    return (rows - rows.mean(1, keepdim=True)).reshape(weight.shape)


def _norm_scale(norm: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """A ``FilterNorm``'s scale times ``sqrt(kk - 1)`` (the unbiased std), as
    one value per filter value [channels*kk]."""
    kk = norm.kernel_size**2
    if norm.std is None:
        scale = like.new_full((norm.channels * kk, ), float(norm.gain))
    else:
        scale = norm.std.to(like.dtype)
    return scale * math.sqrt(kk - 1)


def ddf_filters(branches, inputs, kind: str):
    """The raw filters of DDF filter branches (one per phase) and their scale:
    ``(c [B, n*filters*kk, h, w], scale [n*filters*kk] | None)``.

    Where every branch ends in a conv and a ``FilterNorm``
    (:func:`_centred_conv`), ``c`` is the branches' output before the norm,
    centred by the conv's centred weights and bias (:func:`centred_taps`;
    no ``ReduceMean``/``Sub``), for :func:`unit_ddf_filters` to divide by
    the norm; the convs of the branches that read the same input are one
    ``Conv`` (``kind`` ``'channel'``: the pooled branches' two convs as one
    ``Conv`` and one grouped ``Conv``). Otherwise the branches' outputs (the
    filters, normalised) and None.
    """
    convs = [_centred_conv(b) for b in branches]
    if any(conv is None for conv in convs):
        out = [b(v) for b, v in zip(branches, inputs)]
        return (out[0] if len(out) == 1 else torch.cat(out, 1)), None
    like = inputs[0]
    kk = branches[0][-1].kernel_size**2
    scale = torch.cat([_norm_scale(b[-1], like) for b in branches])
    pre = [list(b)[:-2] for b in branches]
    if kind == 'channel' and len(branches) > 1 and all(
            _is_pooled_mlp(p) for p in pre):
        return _pooled_branches(branches, like, kk), scale
    if all(not p for p in pre) and all(v is like for v in inputs) and \
            len({(c.stride, c.padding, c.dilation, c.groups)
                 for c in convs}) == 1:
        # One conv for the branches that read the same input.
        pre_outputs = [like]
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([_bias(c) for c in convs])
        convs = [_with(convs[0], weight, bias)]
    else:
        pre_outputs = []
        for modules, v in zip(pre, inputs):
            for m in modules:
                v = m(v)
            pre_outputs.append(v)
        convs = [_with(c, c.weight, _bias(c)) for c in convs]
    out = [
        F.conv2d(v,
                 centred_taps(w, kk).to(v.dtype),
                 centred_taps(b, kk).to(v.dtype), *settings)
        for v, (w, b, settings) in zip(pre_outputs, convs)
    ]
    return (out[0] if len(out) == 1 else torch.cat(out, 1)), scale


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is not None:
        return conv.bias
    return conv.weight.new_zeros(conv.out_channels)


def _with(conv: nn.Conv2d, weight, bias):
    return weight, bias, (conv.stride, conv.padding, conv.dilation,
                          conv.groups)


def _is_pooled_mlp(modules) -> bool:
    """Global average pool, 1x1 conv, ReLU (the layers before a DDF channel
    branch's last conv)."""
    return len(modules) == 3 and isinstance(
        modules[0], nn.AdaptiveAvgPool2d) and modules[0].output_size in (
            1, (1, 1)) and isinstance(modules[1], nn.Conv2d) and \
        modules[1].kernel_size == (1, 1) and modules[1].groups == 1 and \
        isinstance(modules[2], nn.ReLU)


def _pooled_branches(branches, x: torch.Tensor, kk: int) -> torch.Tensor:
    """DDF-Up's channel branches on one input: the pooled map, the hidden convs
    of every branch as one ``Conv``, ``ReLU``, the output convs as one grouped
    ``Conv`` (centred weights): [B, n*C*kk, 1, 1]."""
    n = len(branches)
    hidden = F.conv2d(
        F.adaptive_avg_pool2d(x, 1),
        torch.cat([b[1].weight for b in branches]).to(x.dtype),
        torch.cat([_bias(b[1]) for b in branches]).to(x.dtype))
    hidden = F.relu(hidden)
    weight = torch.cat([centred_taps(b[3].weight, kk) for b in branches])
    bias = torch.cat([centred_taps(_bias(b[3]), kk) for b in branches])
    return F.conv2d(hidden, weight.to(x.dtype), bias.to(x.dtype), groups=n)


def ddf_filter_layout(c: torch.Tensor, kernel_size: int, head: int,
                      phases: int, channel: bool) -> torch.Tensor:
    """Raw DDF filters [B, n*filters*kk, h, w] (:func:`ddf_filters`) in
    :func:`ddf_apply`'s layout (one ``Reshape``): channel filters [B, (n),
    (head), C/head, 1, k*k], spatial filters [B, (n), (head), 1, k*k,
    Ho*Wo]."""
    kk = kernel_size * kernel_size
    lead = _ddf_lead(phases, head)
    if channel:
        groups = int(c.shape[1]) // (phases * head * kk)
        return c.reshape(-1, *lead, groups, 1, kk)
    return c.reshape(-1, *lead, 1, kk, int(c.shape[2]) * int(c.shape[3]))


def unit_ddf_filters(c: torch.Tensor, kernel_size: int,
                     channel: bool) -> torch.Tensor:
    """Centred filters in :func:`ddf_filter_layout` divided by their norm over
    the taps (``ReduceL2``, ``Clip``, ``Div``): times ``sqrt(kk - 1)``, ``c``
    over its unbiased std + 1e-10 (to 1e-10 / std), and 0 for a zero filter
    (``max(||c||, 1e-10 * sqrt(kk-1))``, not ``+ eps``: onnxscript's
    optimizer drops the ``Add`` of so small a constant)."""
    root = math.sqrt(kernel_size * kernel_size - 1)
    norm = torch.linalg.vector_norm(c, 2, -1 if channel else -2, keepdim=True)
    return c / norm.clamp_min(1e-10 * root)


def ddf_conv(layer, x: torch.Tensor) -> torch.Tensor:
    """:class:`~mmdyn.ops.ddf.DDFConv2d` without its bias: the two filter
    branches with their centring folded (:func:`ddf_filters`), divided by their
    norms (:func:`unit_ddf_filters`; with ``mul`` the spatial filter's gain
    folded into the channel filter's scale, both in the im2col weights for a
    kernel larger than 1x1, else one ``Mul``), then :func:`ddf_apply`."""
    k, d, s = layer.kernel_size[0], layer.dilation[0], layer.stride[0]
    spatial = ddf_filters([layer.spatial_branch], [x], 'spatial')
    return _ddf_layer(x, [layer.channel_branch], spatial, k, d, s,
                      layer.combine == 'add', layer.head)


def ddf_upsample(layer,
                 x: torch.Tensor,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:class:`~mmdyn.ops.ddf.DDFUpsample` (``guidance`` as its forward takes
    it, checked): the ``s*s`` phases' filters as one set of nodes (one pooled
    branch; one spatial ``Conv`` where the branches read one input, or for a
    high-resolution guidance :func:`_phase_stacked_filters`), one im2col
    ``Conv`` and one ``MatMul`` for every phase together, the phases
    interleaved by one ``Transpose``."""
    branches = list(layer.spatial_branch)
    spatial = None
    if guidance is not None and \
            tuple(guidance.shape[-2:]) != tuple(x.shape[-2:]):
        spatial = _phase_stacked_filters(branches, guidance,
                                         layer.scale_factor, x)
    if spatial is None:
        spatial = ddf_filters(branches, layer._phase_guidance(x, guidance),
                              'spatial')
    return _ddf_layer(x, list(layer.channel_branch), spatial,
                      layer.kernel_size, layer.dilation, 1,
                      layer.combine == 'add', layer.head)


def _phase_stacked_filters(branches, guidance: torch.Tensor, s: int,
                           x: torch.Tensor):
    """Guided DDF-Up, a guidance of about ``s`` times the size of ``x``
    (branch ``p = py*s + px`` reads ``guidance[..., py::s, px::s]``), each
    branch a depthwise conv, a 1x1 conv and its norm: the phases stacked
    along the channels (space-to-depth: ``Reshape``, ``Transpose``,
    ``Reshape``), the depthwise convs as one grouped ``Conv`` and the 1x1
    convs (centred: :func:`centred_taps`) as one ``Conv`` with ``groups=s*s``,
    rather than a ``Slice`` per phase and axis, two convs per phase and a
    ``Concat``. As :func:`ddf_filters`: ``(c [B, s*s*head*kk, H, W], scale)``;
    None where the branches are not of that form."""
    convs = [_centred_conv(b) for b in branches]
    if any(c is None for c in convs) or any(len(b) != 3 for b in branches):
        return None
    dws = [b[0] for b in branches]
    channels = int(guidance.shape[1])
    if not all(
            isinstance(dw, nn.Conv2d) and dw.padding_mode == 'zeros'
            and dw.groups == dw.in_channels == dw.out_channels == channels
            for dw in dws):
        return None
    if len({(dw.kernel_size, dw.stride, dw.padding, dw.dilation)
            for dw in dws}) != 1 or len({(c.kernel_size, c.stride, c.padding,
                                          c.dilation, c.groups)
                                         for c in convs}) != 1 or \
            convs[0].groups != 1:
        return None
    n = len(branches)
    H, W = int(x.shape[2]), int(x.shape[3])
    Hg, Wg = int(guidance.shape[2]), int(guidance.shape[3])
    if (Hg, Wg) != (s * H, s * W):  # as the layer: edge-padded
        guidance = F.pad(
            guidance, (0, s * W - Wg, 0, s * H - Hg), mode='replicate')
    g = guidance.reshape(-1, channels, H, s, W, s).permute(0, 3, 5, 1, 2, 4)
    g = g.reshape(-1, n * channels, H, W)
    dw = dws[0]
    g = F.conv2d(g,
                 torch.cat([d.weight for d in dws]).to(g.dtype),
                 torch.cat([_bias(d) for d in dws]).to(g.dtype), dw.stride,
                 dw.padding, dw.dilation, n * channels)
    kk = branches[0][-1].kernel_size**2
    conv = convs[0]
    weight = torch.cat([centred_taps(c.weight, kk) for c in convs])
    bias = torch.cat([centred_taps(_bias(c), kk) for c in convs])
    out = F.conv2d(g, weight.to(g.dtype), bias.to(g.dtype), conv.stride,
                   conv.padding, conv.dilation, n)
    return out, torch.cat([_norm_scale(b[-1], x) for b in branches])


def _ddf_layer(x, channel_branches, spatial, k, dilation, stride, add, head):
    """DDF of ``x`` with the channel filters of ``channel_branches`` (one per
    phase) and the spatial filters ``spatial`` from :func:`ddf_filters`."""
    n = len(channel_branches)
    kk = k * k
    lead = _ddf_lead(n, head)
    cf, cf_scale = ddf_filters(channel_branches, [x] * n, 'channel')
    sf, sf_scale = spatial
    out_hw = (int(sf.shape[2]), int(sf.shape[3]))
    cf = ddf_filter_layout(cf, k, head, n, True)
    sf = ddf_filter_layout(sf, k, head, n, False)
    if cf_scale is not None:
        cf = unit_ddf_filters(cf, k, True)
        cf_scale = cf_scale.reshape(*lead, -1, 1, kk)
    if sf_scale is not None:
        sf = unit_ddf_filters(sf, k, False)
        if add:
            sf = sf * sf_scale.reshape(*lead, 1, kk, 1).to(sf.dtype)
        else:  # one Mul: the spatial scale onto the channel filters
            sf_scale = sf_scale.reshape(*lead, 1, 1, kk)
            cf_scale = sf_scale if cf_scale is None else cf_scale * sf_scale
    tap_scale = None
    if cf_scale is not None and not add and n == 1 and k > 1:
        # Into the im2col weights (no Mul), in the columns' (channel, tap)
        # order; a scale of the spatial filters alone is one per head.
        channels = int(x.shape[1])
        tap_scale = torch.broadcast_to(cf_scale, (*lead, channels // head, 1,
                                                  kk)).reshape(-1)
    elif cf_scale is not None:
        cf = cf * cf_scale.to(cf.dtype)
    return ddf_apply(x, cf, sf, k, dilation, stride, add, out_hw, head, n,
                     tap_scale)


def interleave_phases(phases, scale: int) -> torch.Tensor:
    """DDF-Up's ``scale**2`` phase outputs [B, C, H, W] (phase ``py*s + px``)
    as the [B, C, s*H, s*W] map whose pixel (y*s + py, x*s + px) is phase (py,
    px)'s (y, x): one ``Transpose`` (index assignments export as ``ScatterND``
    chains)."""
    C, H, W = (int(v) for v in phases[0].shape[1:])
    out = torch.stack(phases, 2).reshape(-1, C, scale, scale, H, W)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(-1, C, scale * H, scale * W)
