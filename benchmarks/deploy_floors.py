# Copyright (c) mmdyn contributors. All rights reserved.
"""Lower bounds for an exported ODConv-1x or KW-1x ResNet-50 in ONNX Runtime.

What is the least time a ResNet-50 whose 48 bottleneck convs depend on the
sample can take in a runtime that runs standard ONNX operators one node at
a time? Three synthetic ResNet-50s (random weights; the stem, the
downsample convs and the head static, as in the real models; BatchNorm
folded into each conv's bias) answer it:

- ``static``: the plain network (a check: it must time as the exported
  mmpretrain ResNet-50).
- ``scales``: each bottleneck conv is ``conv(x * a) * f + bias``, ``a`` and
  ``f`` per-sample channel scales from a smaller attention than ODConv's
  (``a``: the input's mean and ``Sigmoid``; ``f``: two ``Gemm`` through
  ODConv's hidden width, ``C_in / 16`` and at least 16, and ``Sigmoid``).
  This is a one-kernel ODConv without its spatial (per-tap) attention: the
  least any export form that scales the maps (not the kernels) can do.
- ``columns``: ``scales`` with the spatial attention ``t`` (one per tap,
  from the same hidden layer) on the 3x3 convs, as the ODConv export takes
  it on deep layers: the im2col columns (the one-hot grouped ``Conv``) of
  ``x * a`` times ``t``, the static kernel as a 1x1 ``Conv`` over them.
- ``kernels``: each bottleneck conv is a per-sample kernel ``W * (a x t)``
  (one ``Mul`` writing the ``[B, C_out, C_in*k*k]`` kernels) times its
  input's columns (the map itself for a 1x1 conv, the im2col ``Conv`` for a
  3x3 one) by one batched ``MatMul``, then the bias: the least a form with
  per-sample kernels (a KernelWarehouse or CondConv mixture, an ODConv with
  the attentions in the kernel) can do, its mixture (and ODConv's ``f``)
  left out.
- ``mixed``: per layer the form the ODConv export takes: the kernels for an
  early 3x3 layer (``C_out <= H'*W'``), the columns elsewhere.

They run alternately with the exported ResNet-50, ODConv-1x and KW-1x in
one process, several sessions each (ratios: paired medians to the exported
ResNet-50)::

    python benchmarks/deploy_floors.py [--threads 2] [--repeat 12] \
        [--sessions 2] [--batch-sizes 8 1] [--per-layer]

``--per-layer`` also takes the faster form of each conv: from ONNX
Runtime's profiles of ``static``, ``scales``, ``columns`` and ``kernels``
(steady state), each bottleneck conv's nodes (its attention and ``Relu``;
the residual ``Add`` and the last ``Relu`` with the third conv) in the
faster of ``scales`` and ``kernels`` (without the spatial attention) or, for
a 3x3 conv, of ``columns`` and ``kernels`` (with it), every other node as
in ``static``, the layout conversions (``ReorderInput``/``ReorderOutput``)
left out: floors for any mix of the forms.
"""
import argparse
import collections
import os
import os.path as osp
import re
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import mmdyn.compat  # noqa: E402

FORMS = ('static', 'scales', 'kernels', 'mixed', 'columns')
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
CONFIGS = {
    'ResNet-50': 'mmpretrain::resnet/resnet50_8xb32_in1k.py',
    'ODConv-1x': 'configs/odconv/resnet50-odconv1x_8xb32_in1k.py',
    'KW-1x': 'configs/kernelwarehouse/resnet50-kw1x_8xb128-300e_in1k.py',
}


class FloorConv(nn.Module):
    """A bottleneck conv (BatchNorm folded into its bias) in one of
    :data:`FORMS`; the output size ``out_hw`` picks the form of ``mixed``."""

    def __init__(self, c_in, c_out, kernel, stride, form, out_hw):
        super().__init__()
        if form == 'mixed':
            form = 'kernels' if kernel > 1 and c_out <= out_hw else 'columns'
        self.form, self.kernel, self.stride = form, kernel, stride
        self.weight = nn.Parameter(
            torch.randn(c_out, c_in, kernel, kernel) / (c_in * kernel**2)**.5)
        self.bias = nn.Parameter(torch.randn(c_out) * .1)
        hidden = max(c_in // 16, 16)  # ODConv's attention width
        self.to_hidden = nn.Linear(c_in, hidden)
        self.to_filter = nn.Linear(hidden, c_out)
        self.to_taps = nn.Linear(hidden, kernel * kernel)
        if kernel > 1:
            onehot = torch.eye(kernel * kernel).view(kernel * kernel, 1,
                                                     kernel, kernel)
            self.register_buffer('onehot', onehot.repeat(c_in, 1, 1, 1))

    def attention(self, x, per_channel=False):
        """``a`` [B, C_in] (input channels), ``f`` [B, C_out] (filters), ``t``
        [B, k*k] (taps; None for a 1x1 conv), or with ``per_channel`` ``t``
        repeated for every input channel, [B, C_in*k*k] (from one ``Gemm``
        whose rows repeat, as ODConv's export does)."""
        a = torch.sigmoid(x.mean((2, 3)))
        hidden = self.to_hidden(a)
        taps = None
        if self.kernel > 1 and per_channel:
            c = int(x.shape[1])
            taps = torch.sigmoid(
                F.linear(hidden, self.to_taps.weight.repeat(c, 1),
                         self.to_taps.bias.repeat(c)))
        elif self.kernel > 1:
            taps = torch.sigmoid(self.to_taps(hidden))
        return a, torch.sigmoid(self.to_filter(hidden)), taps

    def forward(self, x):
        # Shapes as Python ints, so that the export has no shape nodes.
        pad = self.kernel // 2
        if self.form == 'static':
            return F.conv2d(x, self.weight, self.bias, self.stride, pad)
        c, c_out = int(x.shape[1]), int(self.weight.shape[0])
        a, f, t = self.attention(x, per_channel=self.form == 'columns')
        if self.form == 'scales' or (self.form == 'columns'
                                     and self.kernel == 1):
            y = F.conv2d(x * a[:, :, None, None], self.weight, None,
                         self.stride, pad)
            return y * f[:, :, None, None] + self.bias[:, None, None]
        if self.form == 'columns':
            # the im2col columns of x * a times t (channel-major: channel c,
            # tap j at c * k*k + j), the static kernel as a 1x1 conv
            cols = F.conv2d(
                x * a[:, :, None, None],
                self.onehot,
                None,
                self.stride,
                pad,
                groups=c)
            cols = cols * t[:, :, None, None]
            y = F.conv2d(cols, self.weight.reshape(c_out, -1, 1, 1))
            return y * f[:, :, None, None] + self.bias[:, None, None]
        # kernels: [B, C_out, C_in*k*k] @ [B, C_in*k*k, H'W']
        if self.kernel == 1:
            scale = a[:, None, :]
            x = x[:, :, ::self.stride, ::self.stride]
        else:
            scale = (a[:, :, None] *
                     t[:, None, :]).reshape(-1, 1, c * self.kernel**2)
            x = F.conv2d(x, self.onehot, None, self.stride, pad, groups=c)
        kernels = self.weight.reshape(1, c_out, -1) * scale
        depth, h, w = (int(d) for d in x.shape[1:])
        y = torch.matmul(kernels, x.reshape(-1, depth, h * w))
        return y.reshape(-1, c_out, h, w) + self.bias[:, None, None]


class FloorBottleneck(nn.Module):

    def __init__(self, c_in, width, stride, form, hw):
        super().__init__()
        out_hw = (hw // stride)**2
        self.conv1 = FloorConv(c_in, width, 1, 1, form, hw * hw)
        self.conv2 = FloorConv(width, width, 3, stride, form, out_hw)
        self.conv3 = FloorConv(width, width * 4, 1, 1, form, out_hw)
        self.downsample = None
        if stride != 1 or c_in != width * 4:
            self.downsample = FloorConv(c_in, width * 4, 1, stride, 'static',
                                        out_hw)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y))
        y = self.conv3(y)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


class FloorResNet50(nn.Module):
    """ResNet-50 (224x224 input) with its bottleneck convs in ``form``."""

    def __init__(self, form):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f'form must be one of {FORMS}, got {form!r}')
        self.stem = nn.Conv2d(3, 64, 7, 2, 3)
        blocks, c_in, hw = [], 64, 56
        for width, depth, stride in STAGES:
            for i in range(depth):
                blocks.append(
                    FloorBottleneck(c_in, width, stride if i == 0 else 1, form,
                                    hw))
                c_in, hw = width * 4, hw // (stride if i == 0 else 1)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        return self.fc(self.blocks(x).mean((2, 3)))


def profile_node_times(onnx_file: str,
                       batch: int,
                       threads: int,
                       runs: int = 12,
                       warmup: int = 3) -> dict:
    """ONNX Runtime's per-node kernel times (ms per run, steady state) of
    ``onnx_file`` at ``batch``: {(node name, op type): ms}."""
    import json

    import numpy as np
    import onnxruntime as ort

    from mmdyn.analysis.runtime_benchmark import onnxruntime_session_options
    options = onnxruntime_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = osp.join(
        tempfile.mkdtemp(prefix='mmdyn_floor_profile_'), 'profile')
    session = ort.InferenceSession(
        onnx_file, options, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224),
                                                 dtype=np.float32)
    for _ in range(warmup + runs):
        session.run(None, {'input': x})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    starts = [
        e['ts'] for e in events
        if e.get('cat') == 'Session' and e['name'] == 'model_run'
    ]
    times = collections.Counter()
    for e in events:
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time') \
                and e['ts'] >= starts[-runs]:
            key = e['name'][:-len('_kernel_time')]
            times[(key, e['args']['op_name'])] += e['dur'] / runs / 1e3
    return times


def conv_of_node(name: str, op_type: str) -> str:
    """The bottleneck conv ``'<block> conv1|conv2|conv3'`` a node of a
    :class:`FloorResNet50` export belongs to (a conv's ``Relu``, fused or not,
    with it; the residual ``Add`` and the block's last ``Relu`` with
    ``conv3``), ``'reorder'`` for a layout conversion, ``'other'`` for the
    rest."""
    if op_type in ('ReorderInput', 'ReorderOutput'):
        return 'reorder'
    # ONNX Runtime names a fused node 'fused <first node>'
    match = re.match(r'(?:fused )?/blocks/blocks\.(\d+)/(.*)', name)
    if match is None or match.group(2).startswith('downsample'):
        return 'other'
    block, rest = match.groups()
    if rest.startswith('conv1/') or re.match(r'Relu(_output|$)', rest):
        return f'{int(block):02d} conv1'
    if rest.startswith('conv2/') or re.match(r'Relu_1(_output|$)', rest):
        return f'{int(block):02d} conv2'
    return f'{int(block):02d} conv3'


def per_layer_floor(files: dict, batch: int, threads: int) -> tuple:
    """(the static model's ms, the floor without the spatial attention, the
    floor with it, the most ms a dynamic form spends outside the convs beyond
    the static model's), from profiles: every bottleneck conv in the faster of
    its forms, the rest as in ``files['static']``, layout conversions left out
    (of the static model too).

    Without the spatial attention a conv's forms are ``scales`` and
    ``kernels``; with it a 3x3 conv's are ``columns`` and ``kernels``. The
    last value shows what the attribution by node name missed (nodes the
    simplifier renamed land outside the convs): it is left out of the
    floors.
    """
    per_form = {}
    for form in ('static', 'scales', 'kernels', 'columns'):
        grouped = collections.Counter()
        for (name, op_type), ms in profile_node_times(files[form], batch,
                                                      threads).items():
            grouped[conv_of_node(name, op_type)] += ms
        per_form[form] = grouped
    convs = set(per_form['static']) - {'other', 'reorder'}
    for form, grouped in per_form.items():
        if set(grouped) - {'other', 'reorder'} != convs:
            raise RuntimeError(f'the profile of {form} names other convs '
                               'than the static model\'s')
    static = sum(per_form['static'].values()) - per_form['static']['reorder']
    floors = []
    for spatial in (False, True):
        total = per_form['static']['other']
        for conv in convs:
            maps = 'columns' if spatial and conv.endswith('conv2') else \
                'scales'
            total += min(per_form[maps][conv], per_form['kernels'][conv])
        floors.append(total)
    missed = max(grouped['other'] - per_form['static']['other']
                 for grouped in per_form.values())
    return (static, *floors, missed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=12)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--sessions', type=int, default=2)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 1])
    parser.add_argument(
        '--forms', nargs='+', default=list(FORMS), choices=FORMS)
    parser.add_argument(
        '--per-layer',
        action='store_true',
        help='also the floor with the faster form of each conv, from '
        "ONNX Runtime's profiles")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    mmdyn.compat.apply()
    from mmdyn.analysis.machine import header_lines
    from mmdyn.analysis.onnx_export import export_config, export_onnx
    from mmdyn.analysis.runtime_benchmark import ratio_table
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix='mmdyn_deploy_floors_')
    names, files = [], []
    for name, config in CONFIGS.items():
        names.append(name)
        files.append(osp.join(work, f'{len(files)}.onnx'))
        export_config(config, files[-1], shape=(224, 224))
    for form in args.forms:
        names.append(f'floor: {form}')
        files.append(osp.join(work, f'{len(files)}.onnx'))
        export_onnx(FloorResNet50(form).eval(), files[-1], (224, 224))
    print('\n'.join(header_lines(args.threads)))
    print('\n'.join(
        ratio_table(files, names, args.batch_sizes, (224, 224), args.threads,
                    args.repeat, args.warmup, args.sessions)))
    if args.per_layer:
        floors = {
            form: path
            for name, path in zip(names, files)
            for form in FORMS if name == f'floor: {form}'
        }
        missing = {'static', 'scales', 'kernels', 'columns'} - set(floors)
        if missing:
            raise ValueError(f'--per-layer needs the forms {sorted(missing)}')
        print('\n| batch | static (profiled ms) | faster form per conv, no '
              'reorders (ms) | / static | with the spatial attention (ms) '
              '| / static | unattributed (ms) |\n'
              '|---:|---:|---:|---:|---:|---:|---:|')
        for batch in args.batch_sizes:
            static, plain, spatial, missed = per_layer_floor(
                floors, batch, args.threads)
            print(f'| {batch} | {static:.1f} | {plain:.1f} | '
                  f'{plain / static:.2f}x | {spatial:.1f} | '
                  f'{spatial / static:.2f}x | {missed:.1f} |')


if __name__ == '__main__':
    main()
