# Copyright (c) mmdyn contributors. All rights reserved.
"""Whole-model benchmark on tiny configs (no timed assertions)."""
import os.path as osp

import torch
from script_loading import load_script as load_tool  # noqa: E402

from mmdyn.analysis.benchmark import (BenchResult, ModelStep, RSSPeakSampler,
                                      benchmark_configs, format_results,
                                      paired_ratio)
from mmdyn.analysis.models import build_model, make_batch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

TINY = """
custom_imports = dict(imports=['mmdyn.models', 'mmdyn.engine'],
                      allow_failed_imports=False)
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=10, mean=[0., 0., 0.],
                           std=[255., 255., 255.]),
    backbone=dict(type='{backbone}', depth=18, stem_channels=8,
                  base_channels=8{extra}),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
"""


def write_configs(tmp_path):
    static = tmp_path / 'tiny_static.py'
    static.write_text(TINY.format(backbone='ResNet', extra=''))
    dynamic = tmp_path / 'tiny_odconv.py'
    dynamic.write_text(
        TINY.format(
            backbone='DynamicResNet',
            extra=", dyconv_cfg=dict(type='ODConv2d', kernel_num=2)"))
    return str(static), str(dynamic)


def test_train_step_updates_parameters(tmp_path):
    _, dynamic = write_configs(tmp_path)
    model = build_model(dynamic)
    batch = make_batch(model, 2, (32, 32), training=True)
    step = ModelStep(
        model,
        batch,
        'train',
        'cpu',
        optim_cfg=dict(optimizer=dict(type='SGD', lr=0.1)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step()
    changed = [
        k for k, v in model.named_parameters()
        if not torch.equal(before[k], v)
    ]
    # the optimiser stepped through the dynamic layers too
    assert any('conv1.weight' in k and 'layer1' in k for k in changed)
    assert any('attention' in k for k in changed)
    assert all(p.grad is None for p in model.parameters())


def test_interleaved_compare_train(tmp_path):
    static, dynamic = write_configs(tmp_path)
    logs = []
    results = benchmark_configs([static, dynamic],
                                mode='train',
                                batch_size=2,
                                shape=(32, 32),
                                repeat=2,
                                warmup=1,
                                log=logs.append)
    assert [r.name for r in results] == ['tiny_static', 'tiny_odconv']
    for r in results:
        assert r.mode == 'train' and len(r.times) == 2
        assert all(t > 0 for t in r.times)
        assert r.images_per_s == 2 / r.median
        assert r.peak_mem_bytes >= 0 and r.param_bytes > 0
    assert any('timed round 3/3' in line for line in logs)
    table = format_results(results)
    assert 'tiny_odconv' in table and '1.00x' in table


def test_paired_ratio_and_sampler():
    base = BenchResult('a', 'infer', 1, times=[1.0, 2.0, 4.0])
    other = BenchResult('b', 'infer', 1, times=[2.0, 2.0, 12.0])
    assert paired_ratio(other, base) == 2.0  # median of 2, 1, 3
    with RSSPeakSampler() as sampler:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert sampler.peak_growth >= 48 * 2**20


def test_cli(tmp_path, capsys, monkeypatch):
    from mmdyn.engine import malloc

    # in-process: leave this process's malloc settings alone
    monkeypatch.setattr(malloc, 'tune_malloc', lambda: False)
    static, dynamic = write_configs(tmp_path)
    load_tool('tools/analysis_tools/benchmark.py').main([
        static, '--compare', dynamic, '--batch-size', '2', '--shape', '32',
        '32', '--repeat', '2', '--warmup', '0', '--no-memory', '--profile'
    ])
    out = capsys.readouterr().out
    assert '| tiny_odconv | infer | 2 |' in out
    assert '; ISA ' in out  # the machine header names the CPU's ISA
    assert 'top operators of one infer iteration of tiny_odconv' in out
