# Copyright (c) mmdyn contributors. All rights reserved.
"""KernelWarehouse training on CPU: the conv straight from the mixtures, with
a backward made of GEMMs, the mixtures rebuilt in it or kept.

The mixtures ``attention @ cells`` come out of the product in the cells'
layout, ``[B, g_s, g_o, g_i, c_o, c_i]`` (kernel position, output block,
input block, then one ``c_o x c_i`` cell). The conv reads them there, one
batched GEMM per (position, output block, input block):
``out[b, o] += mixtures[b, s, o, i] @ columns[b, s, i]``, ``columns`` the
position-major im2col columns
(:func:`position_major_columns`; for a 1x1
layer the strided input itself). Cells spanning all input channels
(``g_i = 1``, KW-1x) stack into whole ``[C_out, c_i]`` blocks, one GEMM
per kernel position. No copy of the per-sample kernels is made in any
direction.

:class:`_MixtureConv` keeps only ``x`` and the attentions (and the
mixtures when ``recompute`` is False: ``B * numel(W)`` elements per
layer, which plain autograd keeps, more than ResNet-50's own activations
for KW-1x ResNet-50 at 224x224); its backward is

* the mixtures: kept, or rebuilt by the forward's product (the layer's
  ``mix_cells``, into the reused workspace);
* ``grad_x``: ``mixtures^T @ grad_out`` per block, summed back into the
  input (the transposed im2col: ``kh*kw`` strided adds);
* the mixtures' gradient ``grad_out @ columns^T`` per block, written in
  the cells' layout (the columns rebuilt from ``x``);
* ``grad_attention = grad_mixtures @ cells^T`` and ``grad_cells =
  attention^T @ grad_mixtures``: one GEMM each.

Float32/float64 CPU, ``groups=1``, no autocast, no graph capture, no
double backward (see :func:`can_run`). The decision to rebuild is per
layer (:func:`rebuilds_mixtures`). :func:`cells_layout_conv` is the same
conv for inference (the position-major path's 1x1 layers whose cells
span part of the input channels, when ``torch.matmul`` makes the
mixtures).

torch only.
"""
import torch
import torch.nn.functional as F

from ..capture import graph_capture
from .thresholds import THRESHOLDS

_NO_DOUBLE_BACKWARD = (
    "KernelWarehouse's training path 'mixture_gemm' has no double backward "
    "(create_graph=True); build the layer with impl='reference' for "
    'higher-order gradients')


def can_run(layer, x: torch.Tensor) -> bool:
    """``groups=1``, a float32/float64 CPU input in the warehouse's dtype, no
    autocast and no graph capture."""
    if layer.groups != 1 or x.device.type != 'cpu' or graph_capture():
        return False
    if x.dtype not in (torch.float32, torch.float64) or \
            torch.is_autocast_enabled('cpu'):
        return False
    return layer._cells().dtype == x.dtype and \
        layer._cells().device.type == 'cpu'


def rebuilds_mixtures(layer, x: torch.Tensor) -> bool:
    """Whether the backward rebuilds the mixtures instead of keeping them:
    when one more assembly (``n`` products per kernel element, ``n`` the
    warehouse's cells) is at most ``THRESHOLDS['recompute']
    ['kernel_warehouse']`` times the conv's ``H' W'`` products per kernel
    element. The rebuild costs ``n`` multiply-adds per kept element (the
    same for every layer of a warehouse), the conv ``H' W'``; with the CPU
    default of 1 every KW-1x ResNet-50 layer at 224x224 rebuilds but the
    stage-4 downsample (138 cells, 7x7 outputs)."""
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    limit = THRESHOLDS['recompute']['kernel_warehouse']
    return limit > 0 and layer.num_cells <= limit * h_out * w_out


def mixture_gemm(layer, x: torch.Tensor,
                 attention: torch.Tensor) -> torch.Tensor:
    """The path ``'mixture_gemm'``: :func:`mixture_conv`, the mixtures rebuilt
    in the backward per :func:`rebuilds_mixtures`."""
    return mixture_conv(layer, x, attention, rebuilds_mixtures(layer, x))


def mixture_conv(layer, x: torch.Tensor, attention: torch.Tensor,
                 recompute: bool) -> torch.Tensor:
    """The layer's output (bias included) from its attentions ``[B, m, n]``;
    the mixtures are rebuilt in the backward when ``recompute``."""
    out = _MixtureConv.apply(x, attention.to(x.dtype), layer._cell_rows(),
                             layer, bool(recompute))
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def cells_layout_conv(layer, x: torch.Tensor,
                      attention: torch.Tensor) -> torch.Tensor:
    """Inference: the layer's output (bias included) from the mixtures in
    the cells' layout, written by the product into the reused workspace
    (:func:`_conv`)."""
    h_out, w_out = layer.output_hw(*x.shape[-2:])
    out = _conv(
        _blocks(layer, layer.mix_cells(attention.to(x.dtype), True)),
        _operand(layer, x, h_out, w_out))
    out = out.view(x.shape[0], layer.out_channels, h_out, w_out)
    if layer.bias is not None:
        out += layer.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def _block_layout(layer):
    """The blocks the GEMMs see, (g_s, g_o, g_i, c_o, c_i): the cells' own,
    except that cells spanning all input channels (g_i = 1) stack into whole
    output columns (g_o = 1, c_o = C_out: the same memory order), one GEMM per
    kernel position instead of g_o."""
    g_s, g_o, g_i, c_o, c_i = layer._kw_layout
    return (g_s, 1, 1, g_o * c_o, c_i) if g_i == 1 else (g_s, g_o, g_i, c_o,
                                                         c_i)


def _blocks(layer, mixtures: torch.Tensor) -> torch.Tensor:
    """``mixtures`` (cells' layout) viewed in :func:`_block_layout`."""
    return mixtures.view(mixtures.shape[0], *_block_layout(layer))


def position_major_columns(x: torch.Tensor, conv, h_out: int,
                           w_out: int) -> torch.Tensor:
    """im2col with the kernel positions outermost: [B, kh*kw * C_in,
    H' W'] (``F.unfold`` puts the channels outermost); ``conv`` gives the
    kernel size, padding, stride and dilation."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    x = F.pad(x, (pw, pw, ph, ph))
    views = [
        x[:, :, i * dh:i * dh + sh * (h_out - 1) + 1:sh,
          j * dw:j * dw + sw * (w_out - 1) + 1:sw] for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(views, 1).view(x.shape[0], -1, h_out * w_out)


def _strided_input(layer, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 layer's input as the conv reads it: padded, then strided."""
    (ph, pw), (sh, sw) = layer.padding, layer.stride
    if (ph, pw) != (0, 0):
        x = F.pad(x, (pw, pw, ph, ph))
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    return x


def _operand(layer, x: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
    """The conv's right operand, the (position-major) im2col columns ``[B, g_s,
    g_i, c_i, H' W']``: for 1x1 layers the strided input."""
    g_s, _, g_i, _, c_i = layer._kw_layout
    if g_s == 1:
        columns = _strided_input(layer, x).reshape(x.shape[0], x.shape[1], -1)
    else:
        columns = position_major_columns(x, layer, h_out, w_out)
    return columns.view(x.shape[0], g_s, g_i, c_i, -1)


def _input_gradient(layer, x: torch.Tensor,
                    grad_operand: torch.Tensor) -> torch.Tensor:
    """The gradient of ``x`` from that of the conv's right operand: the
    transposed im2col (for 1x1 layers, the strided, padded input)."""
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    batch, c_in, height, width = x.shape
    h_out, w_out = layer.output_hw(height, width)
    if (kh, kw, ph, pw, sh, sw) == (1, 1, 0, 0, 1, 1):
        return grad_operand.view(x.shape)
    grad = grad_operand.view(batch, kh * kw, c_in, h_out, w_out)
    padded = x.new_zeros(batch, c_in, height + 2 * ph, width + 2 * pw)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i * dh:i * dh + sh * (h_out - 1) + 1:sh,
                   j * dw:j * dw + sw * (w_out - 1) + 1:sw] += \
                grad[:, i * kw + j]
    return padded[:, :, ph:ph + height, pw:pw + width]


def _conv(mixtures: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``out[b, o] = sum_{s, i} mixtures[b, s, o, i] @ columns[b, s, i]``:

    mixtures in the cells' layout [B, g_s, g_o, g_i, c_o, c_i], one
    (batch-strided) ``bmm`` per cell position, no copy of the mixtures;
    [B, C_out, H' W'].
    """
    _, g_s, g_o, g_i = mixtures.shape[:4]
    outs = []
    for o in range(g_o):
        acc = None
        for s in range(g_s):
            for i in range(g_i):
                a, b = mixtures[:, s, o, i], columns[:, s, i]
                acc = torch.bmm(a, b) if acc is None else \
                    torch.baddbmm(acc, a, b)
        outs.append(acc)
    return outs[0] if g_o == 1 else torch.cat(outs, 1)


def _operand_gradient(mixtures: torch.Tensor,
                      grad: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`_conv`'s ``columns`` from that of its output
    ``grad`` [B, g_o, c_o, H' W']: [B, g_s, g_i, c_i, H' W']."""
    batch, g_s, g_o, g_i, _, c_i = mixtures.shape
    out = grad.new_empty(batch, g_s, g_i, c_i, grad.shape[-1])
    for s in range(g_s):
        for i in range(g_i):
            parts = [mixtures[:, s, o, i].transpose(1, 2) for o in range(g_o)]
            if g_o == 1:
                torch.bmm(parts[0], grad[:, 0], out=out[:, s, i])
                continue
            acc = torch.bmm(parts[0], grad[:, 0])
            for o in range(1, g_o):
                acc = torch.baddbmm(acc, parts[o], grad[:, o])
            out[:, s, i] = acc
    return out


def _mixture_gradient(columns: torch.Tensor, grad: torch.Tensor,
                      kw_layout) -> torch.Tensor:
    """The gradient of :func:`_conv`'s ``mixtures``, in the cells' layout:

    [B, g_s, g_o, g_i, c_o, c_i].
    """
    g_s, g_o, g_i, c_o, c_i = kw_layout
    out = grad.new_empty(grad.shape[0], *kw_layout)
    for s in range(g_s):
        for i in range(g_i):
            column = columns[:, s, i].transpose(1, 2)
            for o in range(g_o):
                torch.bmm(grad[:, o], column, out=out[:, s, o, i])
    return out


class _MixtureConv(torch.autograd.Function):
    """See :func:`mixture_conv`.

    Inputs: ``x, attention, cells (the
    layer's [n, cell] rows), layer, recompute``.
    """

    @staticmethod
    def forward(ctx, x, attention, cells, layer, recompute):
        batch = x.shape[0]
        h_out, w_out = layer.output_hw(*x.shape[-2:])
        mixtures = layer.mix_cells(attention, recompute)
        out = _conv(_blocks(layer, mixtures), _operand(layer, x, h_out, w_out))
        ctx.layer = layer
        ctx.save_for_backward(x, attention, cells,
                              None if recompute else mixtures)
        return out.view(batch, layer.out_channels, h_out, w_out)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        x, attention, cells, mixtures = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_att, need_cells = ctx.needs_input_grad[:3]
        batch = x.shape[0]
        layout = _block_layout(layer)
        g_s, g_o, g_i, c_o, c_i = layout
        h_out, w_out = layer.output_hw(*x.shape[-2:])
        grad = grad_out.reshape(batch, g_o, c_o, h_out * w_out)
        grad_x = grad_att = grad_cells = None
        if need_x:
            if mixtures is None:
                mixtures = layer.mix_cells(attention, True)
            grad_x = _input_gradient(
                layer, x,
                _operand_gradient(_blocks(layer, mixtures),
                                  grad).view(batch, g_s * layer.in_channels,
                                             -1))
        del mixtures
        if need_att or need_cells:
            rows = _mixture_gradient(
                _operand(layer, x, h_out, w_out), grad,
                layout).view(attention.shape[0] * attention.shape[1], -1)
            if need_att:
                grad_att = torch.mm(rows, cells.t()).view_as(attention)
            if need_cells:
                grad_cells = torch.mm(
                    attention.reshape(-1, attention.shape[-1]).t(), rows)
        return grad_x, grad_att, grad_cells, None, None
