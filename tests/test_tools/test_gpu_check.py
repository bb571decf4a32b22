# Copyright (c) mmdyn contributors. All rights reserved.
"""The one-call GPU check (``tools/gpu_check.sh`` -> ``tools/gpu_check.py``
-> ``benchmarks/gpu.py``): it parses and imports, stops with one clear line
without a GPU, parses pytest's JUnit results, and its dry run on CPU goes
through the whole pipeline to a report."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from script_loading import load_script

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(ROOT, 'tools', 'gpu_check.sh')


def test_shell_script_parses_and_is_executable():
    subprocess.run(['bash', '-n', SCRIPT], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_entry_points_import():
    check = load_script('tools/gpu_check.py')
    bench = load_script('benchmarks/gpu.py')
    assert callable(check.main) and callable(bench.main)
    assert [s[1] for s in check.TEST_STAGES] == [
        'tests/test_ops/test_cuda_ops.py', 'tests/test_ops/test_ddf_triton.py'
    ]
    for _, path, _, _ in check.TEST_STAGES:
        assert osp.exists(osp.join(ROOT, path))
    # The stages' limits leave the benchmarks time within 8 minutes.
    assert sum(s[2] for s in check.TEST_STAGES) <= 480 - 120


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks a CPU error')
def test_without_a_gpu_one_clear_line(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(['bash', SCRIPT,
                           str(tmp_path / 'out')],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ''
    assert done.stderr.splitlines() == [
        'gpu_check: no CUDA GPU visible (torch.cuda.is_available() is '
        'False); nothing was run'
    ]
    assert not (tmp_path / 'out').exists()  # nothing installed or written


def test_python_entry_point_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    check = load_script('tools/gpu_check.py')
    assert check.main([str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [check.NO_GPU]
    bench = load_script('benchmarks/gpu.py')
    assert bench.main(['--out', str(tmp_path / 'rows.jsonl')]) == 2
    assert not (tmp_path / 'rows.jsonl').exists()


def test_usage_without_an_output_folder():
    done = subprocess.run(['bash', SCRIPT], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith('usage:')


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2"
 tests="6">
<testcase classname="tests.test_ops.test_x" name="test_a" time="0.1"/>
<testcase classname="tests.test_ops.test_x" name="test_b" time="0.1"/>
<testcase classname="tests.test_ops.test_x" name="test_c[1]" time="0.1">
<failure message="AssertionError: 3 != 4&#10;more">trace</failure>
</testcase>
<testcase classname="tests.test_ops.test_x" name="test_d" time="0.1">
<error message="fixture 'gpu' not found">trace</error></testcase>
<testcase classname="tests.test_ops.test_x" name="test_e" time="0.0">
<skipped type="pytest.skip" message="needs a CUDA device">s</skipped>
</testcase>
<testcase classname="tests.test_ops.test_x" name="test_f" time="0.0">
<skipped type="pytest.skip" message="needs a CUDA device">s</skipped>
</testcase>
</testsuite></testsuites>
"""


def test_junit_results_and_report(tmp_path):
    check_mod = load_script('tools/gpu_check.py')
    path = tmp_path / 'r.xml'
    path.write_text(JUNIT)
    suite = check_mod.parse_junit(str(path))
    assert suite['counts'] == dict(passed=2, failed=1, errors=1, skipped=2)
    assert suite['failures'] == [
        ('tests.test_ops.test_x::test_c[1]', 'failed',
         'AssertionError: 3 != 4'),
        ('tests.test_ops.test_x::test_d', 'errors', "fixture 'gpu' not found"),
    ]
    assert suite['skips'] == [('needs a CUDA device', 2)]
    check = check_mod.Check(str(tmp_path), False, 480, 0)
    check.machine['GPU'] = 'NVIDIA H100 80GB HBM3, 132 SMs'
    check.suites['test_cuda_ops'] = suite
    check.rows = [
        dict(
            group='g',
            name='ddf forward',
            precision='fp32',
            ms=1.5,
            baseline='depthwise',
            baseline_ms=1.0,
            ratio=1.5,
            target=1.3,
            verdict='FAIL'),
        dict(
            group='g',
            name='kw1x peak memory',
            precision='amp-fp16',
            mb=900,
            baseline='resnet50',
            baseline_mb=1000,
            ratio=0.9,
            target=1.15,
            verdict='PASS'),
    ]
    check.stage('test_cuda_ops', 'FAILED (pytest exit 1)', 12.0)
    report = (tmp_path / 'gpu_report.md').read_text()
    assert 'Tests: 2 passed, 1 failed, 1 errors, 2 skipped.' in report
    assert 'Benchmark rows: 2 (1 PASS, 1 FAIL, 0 without' in report
    assert '| GPU | NVIDIA H100 80GB HBM3, 132 SMs |' in report
    assert '| test_cuda_ops | FAILED (pytest exit 1) | 12.0 |' in report
    assert ('| ddf forward | fp32 |  | 1.5 ms | depthwise: 1.0 ms | 1.5 | '
            '<= 1.3 | FAIL |  |') in report
    assert ('| kw1x peak memory | amp-fp16 |  | 900 MB | resnet50: 1000 MB '
            '| 0.9 | <= 1.15 | PASS |  |') in report
    assert '- FAILED `tests.test_ops.test_x::test_c[1]`' in report
    assert not check.ok()


def test_counts_from_a_log_cut_short(tmp_path):
    check_mod = load_script('tools/gpu_check.py')
    log = tmp_path / 'x.log'
    log.write_text(
        '============ test session starts ============\n'
        'tests/test_ops/test_x.py::test_a PASSED            [ 10%]\n'
        'tests/test_ops/test_x.py::test_b[1] FAILED         [ 20%]\n'
        'tests/test_ops/test_x.py::test_c SKIPPED (needs a CUDA device) '
        '[ 30%]\n'
        'tests/test_ops/test_x.py::test_d ERROR             [ 40%]\n'
        'tests/test_ops/test_x.py::test_e \n')
    suite = check_mod.parse_log(str(log))
    assert suite['counts'] == dict(passed=1, failed=1, skipped=1, errors=1)
    assert [f[0] for f in suite['failures']] == [
        'tests/test_ops/test_x.py::test_b[1]',
        'tests/test_ops/test_x.py::test_d'
    ]


def test_rows_carry_their_verdicts(tmp_path):
    bench = load_script('benchmarks/gpu.py')
    with open(tmp_path / 'rows.jsonl', 'w') as out:
        b = bench.Bench(True, 10, out)
        b.emit(name='a', ratio=1.2, target=1.25)
        b.emit(name='b', ratio=1.3, target=1.25)
        b.emit(name='c', ratio=1.3, target=None)
        b.emit(name='d', note='not run')
    rows = [
        json.loads(x)
        for x in (tmp_path / 'rows.jsonl').read_text().splitlines()
    ]
    assert [r['verdict'] for r in rows] == ['PASS', 'FAIL', 'n/a', 'n/a']


def test_benchmarked_networks_follow_the_replacement_rules():
    # Layer counts and parameter totals of each paper's ResNet-50.
    from mmdyn.ops import DDFConv2d, DyConv2d, KWConv2d, ODConv2d
    bench = load_script('benchmarks/gpu.py')
    expected = {
        # 16 bottlenecks x 3 convs; the shortcuts stay static.
        'odconv1x': (ODConv2d, 48),
        # 16 x 3 + the four shortcut convs.
        'dyconv4x': (DyConv2d, 52),
        # layer1.0.conv1 and the stride-1 stage-0 shortcut stay static.
        'kw1x': (KWConv2d, 50),
        'ddf': (DDFConv2d, 16),
    }
    for kind, (cls, count) in expected.items():
        model = bench.build_resnet50(kind)
        assert sum(isinstance(m, cls) for m in model.modules()) == count
    # DyConv ResNet-50 (K=4) has the unofficial code's 100,895,176.
    assert sum(
        p.numel()
        for p in bench.build_resnet50('dyconv4x').parameters()) == 100895176


@pytest.mark.slow
def test_dry_run_writes_a_whole_report(tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    done = subprocess.run(['bash', SCRIPT,
                           str(out), '--dry-run'],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)
    report = (out / 'gpu_report.md').read_text()
    assert done.returncode == 0, done.stdout + done.stderr + report
    assert report.startswith('# mmdyn GPU check')
    assert '**Dry run on CPU**' in report
    assert '| test_cuda_ops | ok |' in report
    assert '| test_ddf_triton | not run: dry run |' in report
    assert '| benchmarks | ok |' in report
    for group in ('ddf vs depthwise 3x3', 'DDF-Up vs CARAFE vs nearest',
                  'R-50 FPN training step', 'ResNet-50 training step',
                  'eager vs torch.compile'):
        assert f'### {group}' in report, group
    rows = [
        json.loads(x)
        for x in (out / 'bench_rows.jsonl').read_text().splitlines()
    ]
    assert not [r for r in rows if str(r.get('note', '')).startswith('error')]
    names = {r['name'] for r in rows}
    for kind in ('odconv1x', 'kw1x', 'dyconv4x', 'ddf'):
        assert f'{kind} step time' in names
        assert f'{kind} peak memory' in names
    assert {r['verdict'] for r in rows} <= {'PASS', 'FAIL', 'n/a'}
    assert sorted(os.listdir(out)) == [
        'bench.log', 'bench_rows.jsonl', 'gpu_report.md', 'test_cuda_ops.log'
    ]
