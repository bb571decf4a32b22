# Copyright (c) mmdyn contributors. All rights reserved.
"""Measured dispatch (``MMDYN_AUTOTUNE``) on the demo trainings: what the
tuning costs against the time it saves.

For each demo config: a few real batches of its training data (``--batches``,
so detectors see their varying padded shapes), then passes over them, each a
training step per batch and an inference forward per batch:

1. tuning off (the threshold rule),
2. tuning on from an empty cache (every new key timed: the tuning cost),
3. tuning on with the cache kept (the tuned speed),
4. off and 5. on (kept) again, interleaved against load drift.

Reported per config: seconds per pass (off: mean of 1 and 4; on: mean of 3
and 5), the tuning cost (pass 2 minus the tuned pass), the keys tuned, the
time saved per iteration, the iterations the tuning needs to pay back, and
whether it pays within the config's whole demo training (its epochs times
its iterations per epoch, counting the keys of these batches only: a
training that meets more input shapes tunes more). The lead sets
``mmdyn.ops.switches.AUTOTUNE_DEFAULT`` from this table: on only if tuning
pays on every demo training.

Run it on a quiet machine (timings on a loaded one mean little)::

    python benchmarks/autotune.py                       # every demo config
    python benchmarks/autotune.py --configs resnet18-kw1x_demo_cls --batches 4
"""
import argparse
import itertools
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = ('resnet18-odconv1x_demo_cls', 'resnet18-kw1x_demo_cls',
           'resnet18-dyconv4x_demo_cls', 'faster-rcnn_r18-odconv1x_fpn_demo',
           'faster-rcnn_r18-kw1x_fpn_demo', 'faster-rcnn_r18_fpn-ddfup_demo')


def build(config: str, work_dir: str, batches: int):
    """The config's model, optimizer wrapper, ``batches`` training batches and
    its iterations per demo training."""
    from mmdyn.engine.launch import build_runner, load_config
    cfg = load_config(
        osp.join(ROOT, 'configs', 'demo', config + '.py'),
        cfg_options={
            'train_dataloader.num_workers': 0,
            'train_dataloader.persistent_workers': False,
        },
        work_dir=work_dir)
    cfg.log_level = 'WARNING'
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg',
                'test_dataloader', 'test_evaluator', 'test_cfg'):
        cfg.pop(key, None)
    runner = build_runner(cfg)
    loader = runner.build_dataloader(cfg.train_dataloader)
    data = list(itertools.islice(iter(loader), batches))
    optim_wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    epochs = cfg.train_cfg.get('max_epochs', 1)
    total_iters = cfg.train_cfg.get('max_iters') or epochs * len(loader)
    return runner.model, optim_wrapper, data, total_iters


def one_pass(model, optim_wrapper, data) -> tuple:
    """Seconds of a training step per batch, and of an inference forward per
    batch."""
    model.train()
    start = time.perf_counter()
    for batch in data:
        model.train_step(batch, optim_wrapper)
    train_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data:
            model.val_step(batch)
    return train_s, time.perf_counter() - start


def measure(config: str, batches: int) -> dict:
    from mmdyn.ops.accel import autotune
    with tempfile.TemporaryDirectory() as work_dir:
        model, optim_wrapper, data, total_iters = build(
            config, work_dir, batches)
        autotune.reset()
        autotune.disable()
        one_pass(model, optim_wrapper, data)  # warm-up: C loops, allocator
        passes = {'off': [], 'first': [], 'on': []}
        for round_ in range(2):
            autotune.disable()
            passes['off'].append(one_pass(model, optim_wrapper, data))
            autotune.enable()
            if round_ == 0:
                autotune.clear()
                passes['first'].append(one_pass(model, optim_wrapper, data))
            passes['on'].append(one_pass(model, optim_wrapper, data))
        keys = autotune.cache()
        autotune.reset()
    off = [statistics.mean(p[i] for p in passes['off']) for i in (0, 1)]
    on = [statistics.mean(p[i] for p in passes['on']) for i in (0, 1)]
    first = passes['first'][0]
    cost = sum(first) - sum(on)
    saved_per_iter = (sum(off) - sum(on)) / len(data)
    if cost <= 0:
        payback = 0.0
    else:
        payback = cost / saved_per_iter if saved_per_iter > 0 else float('inf')
    # The rule's path is the first timed: keys where another one won.
    changed = sum(1 for c in keys.values()
                  if c.times and c.path != next(iter(c.times)))
    return dict(
        config=config,
        off=off,
        on=on,
        cost=cost,
        keys=len(keys),
        changed=changed,
        saved_per_iter=saved_per_iter,
        payback=payback,
        total_iters=total_iters,
        pays=saved_per_iter * total_iters > cost)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS))
    parser.add_argument(
        '--batches',
        type=int,
        default=6,
        help='training batches per pass (default 6)')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import mmdyn.compat
    mmdyn.compat.apply()
    from mmdyn.analysis.machine import header_lines
    if args.threads:
        torch.set_num_threads(args.threads)
    print('\n'.join(header_lines(torch.get_num_threads())))
    print(f'\n{args.batches} batches per pass; train = training steps, '
          'infer = val_step forwards; s per pass\n')
    print('| config | off train / infer | on train / infer | tuning cost s '
          '| keys (rule overruled) | saved s / iter | pays back after iters '
          '| demo training iters | pays |')
    print('|---|---|---|---:|---|---:|---:|---:|---|')
    rows = []
    for config in args.configs:
        r = measure(config, args.batches)
        rows.append(r)
        print(
            f"| {config} | {r['off'][0]:.2f} / {r['off'][1]:.2f} | "
            f"{r['on'][0]:.2f} / {r['on'][1]:.2f} | {r['cost']:.2f} | "
            f"{r['keys']} ({r['changed']}) | {r['saved_per_iter']:.3f} | "
            f"{r['payback']:.0f} | {r['total_iters']} | "
            f"{'yes' if r['pays'] else 'no'} |",
            flush=True)
    verdict = all(r['pays'] for r in rows)
    print(f'\nTuning pays on every demo training: {verdict} -> '
          f'AUTOTUNE_DEFAULT = {verdict} (mmdyn/ops/switches.py)')


if __name__ == '__main__':
    main()
