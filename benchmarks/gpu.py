# Copyright (c) mmdyn contributors. All rights reserved.
"""GPU benchmarks of issue 23's targets, one JSON line per result row.

Run by ``tools/gpu_check.sh`` (which writes them into its Markdown report);
needs torch, torchvision and ``mmdyn.ops`` only (mmcv's CARAFE is compared
where ``mmcv.ops`` has CUDA kernels). Rows, each against its baseline in
the same run, fp32 and AMP fp16:

* ``ddf`` by the Triton kernels vs a depthwise 3x3 conv (the faster of
  NCHW and channels_last), forward and forward+backward: targets 1.3x / 2x;
* ``DDFUpsample`` (x2) vs CARAFE (``mmcv.ops.CARAFEPack``) and nearest
  interpolation: no target (reported);
* an R-50 + FPN training step (torchvision ResNet-50 and a plain FPN whose
  top-down x2 upsampling is nearest or ``DDFUpsample``; no detector heads:
  mmdet needs mmcv's compiled ops): target 1.05x;
* training step (SGD, batch 64, 224x224) and peak
  ``torch.cuda.max_memory_allocated`` of ODConv-1x, KW-1x, DyConv-4x and
  DDF ResNet-50 vs ResNet-50 (torchvision's resnet50 with the convs each
  paper replaces, see :func:`build_resnet50`): ODConv-1x 1.25x and KW-1x
  1.6x in time, both 1.15x in memory;
* eager vs ``torch.compile`` (DDF op, DDF-Up, ResNet-50 and ODConv-1x
  ResNet-50 steps when time is left): compiled <= eager.

Timing: CUDA events around each call after warm-up, the median of a few
calls (few, to fit the check's 8 minutes). ``--dry-run`` runs every row on
CPU with tiny shapes (``impl='taps'`` for DDF, no compile) to exercise the
pipeline; its numbers mean nothing.

Usage::

    python benchmarks/gpu.py --out rows.jsonl [--budget 240] [--dry-run]
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdyn.ops import (DDFConv2d, DDFUpsample, DyConv2d, ODConv2d,
                       WarehouseManager, ddf)

PRECISIONS = {'fp32': None, 'amp-fp16': torch.float16}


class Bench:
    """Shapes, device and the time budget of one run."""

    def __init__(self, dry_run: bool, budget_s: float, out):
        self.dry = dry_run
        self.device = torch.device('cpu' if dry_run else 'cuda')
        self.deadline = time.monotonic() + budget_s
        self.out = out
        self.iters = 1 if dry_run else 5
        self.warmup = 0 if dry_run else 3
        #: fp32 and AMP fp16 on a GPU, fp32 alone in a dry run.
        self.precisions = {'fp32': None} if dry_run else PRECISIONS

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, **row) -> None:
        """Write one row (a JSON line, flushed: a killed run keeps it)."""
        ratio, target = row.get('ratio'), row.get('target')
        if ratio is None or target is None:
            row['verdict'] = 'n/a'
        else:
            row['verdict'] = 'PASS' if ratio <= target else 'FAIL'
        self.out.write(json.dumps(row) + '\n')
        self.out.flush()
        print(json.dumps(row), flush=True)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` after warm-up."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device.type == 'cuda':
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak ``torch.cuda.max_memory_allocated`` (MB) over one call."""
        if self.device.type != 'cuda':
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def autocast(bench: Bench, dtype: Optional[torch.dtype]):
    if dtype is None or bench.dry:  # no fp16 autocast on CPU
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype=dtype)


def ratio(ms: float, base: float) -> float:
    return round(ms / base, 3)


# --------------------------------------------------------------------------
# DDF operator vs depthwise 3x3
# --------------------------------------------------------------------------
def bench_ddf_op(bench: Bench) -> None:
    B, C, H = (1, 4, 8) if bench.dry else (32, 256, 56)
    impl = 'taps' if bench.dry else 'triton'
    dev = bench.device
    for prec, dtype in bench.precisions.items():
        dt = dtype or torch.float32
        x = torch.randn(B, C, H, H, device=dev, dtype=dt)
        cf = torch.randn(B, C, 3, 3, device=dev, dtype=dt)
        sf = torch.randn(B, 9, H, H, device=dev, dtype=dt)
        conv = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)
        conv = conv.to(dev, dt)
        leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
        conv_x = x.clone().requires_grad_()
        conv_cl = x.clone().to(memory_format=torch.channels_last)
        conv_cl.requires_grad_()
        conv_m_cl = nn.Conv2d(
            C, C, 3, padding=1, groups=C, bias=False).to(
                dev, dt, memory_format=torch.channels_last)

        def fwd():
            with torch.no_grad():
                ddf(x, cf, sf, 3, impl=impl)

        def fwd_bwd():
            ddf(*leaves, 3, impl=impl).sum().backward()

        def conv_fwd(m=conv, t=x):
            with torch.no_grad():
                m(t)

        def conv_fwd_bwd(m=conv, t=conv_x):
            m(t).sum().backward()

        shape = f'B={B} C={C} {H}x{H} k=3'
        # The rows' kernels (autotuned) against the pure-PyTorch taps.
        with torch.no_grad():
            got = ddf(x, cf, sf, 3, impl=impl).float()
            ref = ddf(x.float(), cf.float(), sf.float(), 3, impl='taps')
        error = ((got - ref).abs().max() / ref.abs().max()).item()
        check = f'max |{impl} - taps| / max |taps| = {error:.1e}'
        for what, run, base_runs, target in (
            ('forward', fwd,
             (conv_fwd, lambda: conv_fwd(conv_m_cl, conv_cl.detach())), 1.3),
            ('forward+backward', fwd_bwd,
             (conv_fwd_bwd, lambda: conv_fwd_bwd(conv_m_cl, conv_cl)), 2.0)):
            base = min(bench.time_ms(r) for r in base_runs)
            ms = bench.time_ms(run)
            bench.emit(
                group='ddf vs depthwise 3x3',
                name=f'ddf {what}',
                precision=prec,
                shape=shape,
                ms=round(ms, 3),
                baseline='depthwise 3x3 (best of NCHW, NHWC)',
                baseline_ms=round(base, 3),
                ratio=ratio(ms, base),
                target=target,
                note=check)


# --------------------------------------------------------------------------
# DDF-Up vs CARAFE vs nearest
# --------------------------------------------------------------------------
def carafe_or_reason(channels: int, device: torch.device):
    """(mmcv's CARAFEPack on ``device``, None) or (None, why not)."""
    if device.type != 'cuda':
        return None, 'CARAFE has no CPU kernel'
    try:
        from mmcv.ops import CARAFEPack
        module = CARAFEPack(channels, 2).to(device)
        module(torch.zeros(1, channels, 4, 4, device=device))
        return module, None
    except Exception as e:  # noqa: BLE001 (any failure: report it)
        return None, f'mmcv.ops CARAFE unavailable ({type(e).__name__}: ' \
            f'{str(e).splitlines()[0][:80] if str(e) else ""})'


def bench_ddf_up(bench: Bench) -> None:
    B, C, H = (1, 8, 8) if bench.dry else (8, 256, 64)
    dev = bench.device
    up = DDFUpsample(C, 2).to(dev)
    carafe, why = carafe_or_reason(C, dev)
    x = torch.randn(B, C, H, H, device=dev)
    shape = f'B={B} C={C} {H}x{H} -> {2 * H}x{2 * H}'
    for prec, dtype in bench.precisions.items():
        candidates = {
            'DDFUpsample': up,
            'nearest': lambda t: F.interpolate(t, scale_factor=2)
        }
        if carafe is not None:
            candidates['CARAFE'] = carafe
        for what in ('forward', 'forward+backward'):
            times = {}
            for name, m in candidates.items():
                xi = x.clone().requires_grad_(what != 'forward')

                def run(m=m, xi=xi):
                    with autocast(bench, dtype), torch.set_grad_enabled(
                            what != 'forward'):
                        out = m(xi)
                    if what != 'forward':
                        out.float().sum().backward()

                times[name] = bench.time_ms(run)
            for base in ('nearest', 'CARAFE'):
                if base not in times:
                    bench.emit(
                        group='DDF-Up vs CARAFE vs nearest',
                        name=f'DDFUpsample {what} vs {base}',
                        precision=prec,
                        shape=shape,
                        note=why)
                    continue
                bench.emit(
                    group='DDF-Up vs CARAFE vs nearest',
                    name=f'DDFUpsample {what} vs {base}',
                    precision=prec,
                    shape=shape,
                    ms=round(times['DDFUpsample'], 3),
                    baseline=base,
                    baseline_ms=round(times[base], 3),
                    ratio=ratio(times['DDFUpsample'], times[base]),
                    target=None)


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------
def _bottlenecks(model: nn.Module):
    """(stage, index in stage, block) of torchvision's ResNet-50."""
    for s in range(4):
        for i, block in enumerate(getattr(model, f'layer{s + 1}')):
            yield s, i, block


def _like(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size[0],
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None)


def build_resnet50(kind: str) -> nn.Module:
    """torchvision's ResNet-50 (v1.5: the stride on the 3x3) with the convs
    each paper replaces:

    * ``odconv1x``: every bottleneck conv (1x1, 3x3, 1x1) -> ODConv2d with
      kernel_num=1, reduction 1/16; stem, shortcuts and FC static;
    * ``kw1x``: KWConv2d from one WarehouseManager (cell_num_ratio 1,
      reduction 1/16, one warehouse per stage); the first block of stage S
      hands its conv1 and stride-2 shortcut to stage S-1 (stage -1: static,
      so layer1.0.conv1 and the stride-1 stage-0 shortcut stay static): 50
      KW layers;
    * ``dyconv4x``: every bottleneck conv and every shortcut conv ->
      DyConv2d with K=4, ratio 0.25 (hidden width floor(C_in/4)+1), no
      attention norm;
    * ``ddf``: the 3x3 conv2 of every bottleneck -> DDFConv2d (mul);
    * ``resnet50``: unchanged.
    """
    import torchvision
    model = torchvision.models.resnet50()
    if kind == 'resnet50':
        return model
    manager = WarehouseManager(reduction=1 / 16, cell_num_ratio=1) \
        if kind == 'kw1x' else None
    layer_index = 0
    for s, i, block in _bottlenecks(model):
        convs = {
            'conv1': block.conv1,
            'conv2': block.conv2,
            'conv3': block.conv3
        }
        if block.downsample is not None:
            convs['downsample'] = block.downsample[0]
        for name, conv in convs.items():
            new = _replacement(kind, name, conv, s, i, layer_index, manager)
            if new is None:
                continue
            if name == 'downsample':
                block.downsample[0] = new
            else:
                setattr(block, name, new)
        layer_index += 1
    if manager is not None:
        model.warehouse_manager = manager
        manager.finalize(model)
    return model


def _replacement(kind, name, conv, stage, index, layer_index, manager):
    args = _like(conv)
    if kind == 'odconv1x':
        if name == 'downsample':
            return None
        args.pop('bias')
        return ODConv2d(**args, bias=False, kernel_num=1, reduction=1 / 16)
    if kind == 'dyconv4x':
        return DyConv2d(**args, kernel_num=4, ratio=0.25)
    if kind == 'ddf':
        if name != 'conv2':
            return None
        return DDFConv2d(
            conv.in_channels, conv.out_channels, 3, stride=conv.stride[0])
    if kind == 'kw1x':
        handed = index == 0 and name in ('conv1', 'downsample')
        if name == 'downsample' and conv.stride[0] == 1:
            return None
        s = stage - 1 if handed else stage
        if s < 0:
            return None
        j = {'conv1': 0, 'conv2': 1, 'conv3': 2, 'downsample': 0}[name]
        lay = layer_index + 1 if name == 'downsample' else layer_index
        return manager.reserve(
            f'stage{s}_layer{lay}_conv{j}',
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            conv.padding[0],
            bias=False)
    raise ValueError(kind)


class PlainFPN(nn.Module):
    """FPN on ResNet-50's C2-C5 (256 channels), whose top-down x2 upsampling is
    nearest or a DDFUpsample per level."""

    def __init__(self, ddf_up: bool):
        super().__init__()
        ins = (256, 512, 1024, 2048)
        self.lateral = nn.ModuleList(nn.Conv2d(c, 256, 1) for c in ins)
        self.output = nn.ModuleList(
            nn.Conv2d(256, 256, 3, padding=1) for _ in ins)
        self.up = nn.ModuleList(
            DDFUpsample(256, 2) if ddf_up else nn.Upsample(scale_factor=2)
            for _ in ins[1:])

    def forward(self, feats):
        lat = [m(f) for m, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + self.up[i - 1](lat[i])
        return [m(t) for m, t in zip(self.output, lat)]


class BackboneFPN(nn.Module):

    def __init__(self, ddf_up: bool):
        super().__init__()
        self.body = build_resnet50('resnet50')
        self.neck = PlainFPN(ddf_up)

    def forward(self, x):
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        feats = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            feats.append(x)
        return self.neck(feats)


def _train_step(bench: Bench,
                model: nn.Module,
                x: torch.Tensor,
                dtype: Optional[torch.dtype],
                step_model=None):
    """A step function: forward (under AMP if asked), a squared-output
    loss, backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(
        'cuda', enabled=dtype is not None and not bench.dry)
    run_model = step_model or model

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(bench, dtype):
            out = run_model(x)
            outs = out if isinstance(out, list) else [out]
            loss = sum(o.float().square().mean() for o in outs)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def bench_fpn(bench: Bench) -> None:
    B, hw = (2, (64, 64)) if bench.dry else (2, (800, 1216))
    for prec, dtype in bench.precisions.items():
        times = {}
        for ddf_up in (False, True):
            torch.manual_seed(0)
            model = BackboneFPN(ddf_up).to(bench.device).train()
            x = torch.randn(B, 3, *hw, device=bench.device)
            times[ddf_up] = bench.time_ms(_train_step(bench, model, x, dtype))
            del model
        bench.emit(
            group='R-50 FPN training step',
            name='R-50 + DDF-Up FPN vs R-50 + FPN',
            precision=prec,
            shape=f'B={B} {hw[0]}x{hw[1]}',
            ms=round(times[True], 3),
            baseline='R-50 + FPN (nearest)',
            baseline_ms=round(times[False], 3),
            ratio=ratio(times[True], times[False]),
            target=1.05,
            note='backbone + neck only (no detector heads)')


#: Step-time and memory targets over ResNet-50 (None: reported only).
RESNET_TARGETS = {
    'odconv1x': (1.25, 1.15),
    'kw1x': (1.6, 1.15),
    'dyconv4x': (None, None),
    'ddf': (None, None),
}


def bench_resnets(bench: Bench) -> None:
    B, hw = (2, 16) if bench.dry else (64, 224)
    for prec, dtype in bench.precisions.items():
        results = {}
        for kind in ('resnet50', *RESNET_TARGETS):
            if bench.left() < 20:
                bench.emit(
                    group='ResNet-50 training step',
                    name=f'{kind} step',
                    precision=prec,
                    note='not run: time budget spent')
                continue
            torch.manual_seed(0)
            model = build_resnet50(kind).to(bench.device).train()
            x = torch.randn(B, 3, hw, hw, device=bench.device)
            step = _train_step(bench, model, x, dtype)
            ms = bench.time_ms(step)
            results[kind] = (ms, bench.peak_mb(step))
            del model, step
            if bench.device.type == 'cuda':
                torch.cuda.empty_cache()
        if 'resnet50' not in results:
            continue
        base_ms, base_mb = results['resnet50']
        for kind, (time_target, mem_target) in RESNET_TARGETS.items():
            if kind not in results:
                continue
            ms, mb = results[kind]
            shape = f'B={B} {hw}x{hw}'
            bench.emit(
                group='ResNet-50 training step',
                name=f'{kind} step time',
                precision=prec,
                shape=shape,
                ms=round(ms, 3),
                baseline='resnet50',
                baseline_ms=round(base_ms, 3),
                ratio=ratio(ms, base_ms),
                target=time_target)
            bench.emit(
                group='ResNet-50 training step',
                name=f'{kind} peak memory',
                precision=prec,
                shape=shape,
                mb=None if mb is None else round(mb),
                baseline_mb=None if base_mb is None else round(base_mb),
                ratio=None if mb is None else round(mb / base_mb, 3),
                target=mem_target,
                note=None if mb is not None else 'no CUDA memory')


# --------------------------------------------------------------------------
# Eager vs torch.compile
# --------------------------------------------------------------------------
def bench_compile(bench: Bench) -> None:
    if bench.dry:
        bench.emit(
            group='eager vs torch.compile',
            name='compiled steps',
            note='not run: dry run')
        return
    dev = bench.device
    B, C, H = 32, 256, 56
    x = torch.randn(B, C, H, H, device=dev)
    cf = torch.randn(B, C, 3, 3, device=dev)
    sf = torch.randn(B, 9, H, H, device=dev)
    leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]

    def ddf_loss(x, cf, sf):
        return ddf(x, cf, sf, 3, impl='triton').square().mean()

    up = DDFUpsample(256, 2).to(dev)
    ux = torch.randn(8, 256, 64, 64, device=dev, requires_grad=True)
    cases: Dict[str, tuple] = {
        'ddf op forward+backward':
        (ddf_loss, lambda f: f(*leaves).backward(), f'B={B} C={C} {H}x{H}'),
        'DDFUpsample forward+backward':
        (up, lambda f: f(ux).square().mean().backward(), 'B=8 C=256 64x64'),
    }
    for name, (fn, run, shape) in cases.items():
        if bench.left() < 60:
            bench.emit(
                group='eager vs torch.compile',
                name=name,
                precision='fp32',
                note='not run: time budget spent')
            continue
        eager = bench.time_ms(lambda: run(fn))
        compiled_fn = torch.compile(fn)
        compiled = bench.time_ms(lambda: run(compiled_fn))
        bench.emit(
            group='eager vs torch.compile',
            name=f'{name} compiled',
            precision='fp32',
            shape=shape,
            ms=round(compiled, 3),
            baseline='eager',
            baseline_ms=round(eager, 3),
            ratio=ratio(compiled, eager),
            target=1.0)
    for kind in ('resnet50', 'odconv1x'):
        name = f'{kind} training step compiled'
        if bench.left() < 150:
            bench.emit(
                group='eager vs torch.compile',
                name=name,
                precision='amp-fp16',
                note='not run: time budget spent')
            continue
        torch.manual_seed(0)
        model = build_resnet50(kind).to(dev).train()
        xb = torch.randn(64, 3, 224, 224, device=dev)
        eager = bench.time_ms(_train_step(bench, model, xb, torch.float16))
        step = _train_step(
            bench, model, xb, torch.float16, step_model=torch.compile(model))
        compiled = bench.time_ms(step)
        bench.emit(
            group='eager vs torch.compile',
            name=name,
            precision='amp-fp16',
            shape='B=64 224x224',
            ms=round(compiled, 3),
            baseline='eager',
            baseline_ms=round(eager, 3),
            ratio=ratio(compiled, eager),
            target=1.0)
        del model


BENCHMARKS = (bench_ddf_op, bench_ddf_up, bench_fpn, bench_resnets,
              bench_compile)


def run(dry_run: bool, budget_s: float, out) -> None:
    bench = Bench(dry_run, budget_s, out)
    for fn in BENCHMARKS:
        if bench.left() <= 0:
            bench.emit(
                group=fn.__name__,
                name=fn.__name__,
                note='not run: time budget spent')
            continue
        try:
            fn(bench)
        except Exception as e:  # noqa: BLE001 (a row says what failed)
            bench.emit(
                group=fn.__name__,
                name=fn.__name__,
                note=f'error: {type(e).__name__}: {e}'[:300])
        if bench.device.type == 'cuda':
            torch.cuda.empty_cache()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--out', required=True, help='JSON-lines file of the result rows')
    parser.add_argument(
        '--budget',
        type=float,
        default=240,
        help='seconds for all benchmarks (default 240)')
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='tiny shapes on CPU (exercises the pipeline)')
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            'benchmarks/gpu.py: no CUDA GPU (use --dry-run on CPU)',
            file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.backends.cudnn.benchmark = True
    with open(args.out, 'a') as out:
        run(args.dry_run, args.budget, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
