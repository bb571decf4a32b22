# Copyright (c) mmdyn contributors. All rights reserved.
"""One-call GPU verification of mmdyn (run by ``tools/gpu_check.sh``).

On a machine with a CUDA GPU, within a wall-clock budget (8 minutes by
default, counted from ``GPU_CHECK_START`` when the shell script sets it):

1. records the machine (GPU, driver, torch, CUDA, cuDNN, Triton, Python,
   whether ``mmcv.ops`` has CUDA kernels);
2. runs ``tests/test_ops/test_cuda_ops.py`` and
   ``tests/test_ops/test_ddf_triton.py`` with the compiled Triton kernels
   (``TRITON_INTERPRET`` removed), each under its own time limit;
3. runs ``benchmarks/gpu.py`` in the time left;
4. writes ``gpu_report.md`` into OUTDIR, rewritten after every stage, so
   that a run cut short still leaves a report of what finished; logs and
   the raw benchmark rows go beside it.

Needs torch (with CUDA), pytest and ``mmdyn.ops`` (torchvision for the
network benchmarks); nothing of OpenMMLab. Without a GPU it prints one line
and exits with status 2. ``--dry-run`` runs the pipeline on CPU: the CUDA
tests (all skipped there), the benchmarks with tiny shapes, the report.

Exit status: 0 when every test stage ran and passed, 1 otherwise (a
benchmark missing its target is reported, not an error), 2 without a GPU.

Usage::

    python tools/gpu_check.py OUTDIR [--dry-run] [--budget 480]
"""
import argparse
import datetime
import importlib.util
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
REPORT = 'gpu_report.md'
#: (name, test file, most seconds, extra environment) of the test stages.
#: The Triton tests compile their kernels for some thirty sizes: with one
#: configuration each (``MMDYN_TRITON_AUTOTUNE=0``) rather than four, to fit
#: the time; the CUDA tests and the benchmarks run them autotuned.
TEST_STAGES = (
    ('test_cuda_ops', 'tests/test_ops/test_cuda_ops.py', 200, {}),
    ('test_ddf_triton', 'tests/test_ops/test_ddf_triton.py', 100,
     dict(MMDYN_TRITON_AUTOTUNE='0')),
)
NO_GPU = ('gpu_check: no CUDA GPU visible (torch.cuda.is_available() is '
          'False); nothing was run')


class Check:
    """What the check found so far, and the report it makes of it."""

    def __init__(self, out_dir: str, dry_run: bool, budget_s: float,
                 start: float):
        self.out_dir = out_dir
        self.dry_run = dry_run
        self.deadline = start + budget_s
        self.machine: Dict[str, str] = {}
        self.stages: List[dict] = []
        self.suites: Dict[str, dict] = {}
        self.rows: List[dict] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def path(self, name: str) -> str:
        return osp.join(self.out_dir, name)

    def stage(self, name: str, status: str, seconds: float) -> None:
        self.stages.append(
            dict(name=name, status=status, seconds=round(seconds, 1)))
        self.write()

    def ok(self) -> bool:
        return all(s['status'] in ('ok', 'not run: dry run')
                   for s in self.stages if s['name'] != 'install')

    def write(self) -> None:
        with open(self.path(REPORT), 'w') as f:
            f.write(render(self))


# --------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------
def _run_text(cmd: List[str], timeout: float = 60) -> str:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f'({type(e).__name__})'


def mmcv_ops_status() -> str:
    """Whether ``mmcv.ops`` imports with CUDA kernels (in a subprocess: a
    binary built for another torch can crash the interpreter)."""
    code = ('import torch, mmcv, mmcv.ops\n'
            'from mmcv.ops import CARAFEPack\n'
            'm = CARAFEPack(4, 2).cuda()\n'
            'm(torch.zeros(1, 4, 4, 4, device="cuda"))\n'
            'print("mmcv", mmcv.__version__, "with CUDA ops")\n')
    text = _run_text([sys.executable, '-c', code])
    last = text.splitlines()[-1] if text else 'no output'
    if 'with CUDA ops' in last:
        return last
    return f'not available ({last[:120]}): CARAFE rows are skipped'


def describe_machine(check: Check) -> None:
    import torch
    m = check.machine
    m['date (UTC)'] = datetime.datetime.now(
        datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')
    m['host'] = platform.node()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        m['GPU'] = (f'{props.name}, {props.multi_processor_count} SMs, '
                    f'{props.total_memory / 2**30:.1f} GiB '
                    f'(sm_{props.major}{props.minor}); '
                    f'{torch.cuda.device_count()} visible')
        m['driver'] = _run_text([
            'nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'
        ])
    else:
        m['GPU'] = 'none (dry run on CPU)'
    m['torch'] = torch.__version__
    m['CUDA (torch)'] = str(torch.version.cuda)
    m['cuDNN'] = str(torch.backends.cudnn.version())
    try:
        import triton
        m['triton'] = triton.__version__
    except ImportError:
        m['triton'] = 'not installed'
    m['python'] = platform.python_version()
    try:
        from mmdyn import __version__
        m['mmdyn'] = __version__
    except ImportError as e:
        m['mmdyn'] = f'not importable ({e})'
    m['pytest'] = 'importable' if importlib.util.find_spec('pytest') \
        else 'NOT importable: the tests cannot run'
    m['torchvision'] = 'importable' if importlib.util.find_spec(
        'torchvision') else 'not importable: network benchmarks fail'
    m['mmcv.ops'] = mmcv_ops_status() if not check.dry_run else \
        'not checked (dry run)'


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------
def parse_junit(path: str) -> dict:
    """Counts, failures (name, first line) and skip reasons of a pytest JUnit
    XML file."""
    root = ET.parse(path).getroot()
    cases = root.iter('testcase')
    counts = Counter()
    failures, skips = [], Counter()
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name')}"
        outcome = 'passed'
        for child in case:
            if child.tag in ('failure', 'error'):
                outcome = 'failed' if child.tag == 'failure' else 'errors'
                message = (child.get('message') or child.text or '')
                failures.append(
                    (name, outcome, message.strip().splitlines()[0][:200]
                     if message.strip() else ''))
            elif child.tag == 'skipped':
                outcome = 'skipped'
                skips[(child.get('message') or '').strip()[:160]] += 1
        counts[outcome] += 1
    return dict(
        counts=dict(counts),
        failures=failures,
        skips=sorted(skips.items(), key=lambda kv: -kv[1]))


_OUTCOMES = {
    'PASSED': 'passed',
    'FAILED': 'failed',
    'ERROR': 'errors',
    'SKIPPED': 'skipped',
    'XFAIL': 'skipped',
    'XPASS': 'passed'
}


def parse_log(path: str) -> dict:
    """What a ``pytest -v`` log says of the tests that finished (for a run
    stopped at its time limit, which writes no JUnit file)."""
    counts, failures = Counter(), []
    with open(path, errors='replace') as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and '::' in parts[0] and \
                    parts[1] in _OUTCOMES:
                outcome = _OUTCOMES[parts[1]]
                counts[outcome] += 1
                if outcome in ('failed', 'errors'):
                    failures.append((parts[0], outcome, ''))
    return dict(counts=dict(counts), failures=failures, skips=[])


def run_tests(check: Check, name: str, test_file: str, limit_s: float,
              extra_env: Dict[str, str]) -> None:
    if importlib.util.find_spec('pytest') is None:
        check.stage(name, 'not run: pytest is not importable', 0)
        return
    limit = min(limit_s, check.left() - 30)
    if limit < 20:
        check.stage(name, 'not run: time budget spent', 0)
        return
    junit = osp.join(check.out_dir, f'.{name}.xml')
    env = dict(os.environ, PYTHONUNBUFFERED='1', **extra_env)
    env.pop('TRITON_INTERPRET', None)  # the compiled kernels
    # --noconftest: the suite's conftest applies the OpenMMLab fixes,
    # which the GPU machine need not have.
    cmd = [
        sys.executable, '-m', 'pytest', test_file, '-v', '-rfEs', '-p',
        'no:cacheprovider', '--noconftest', f'--junitxml={junit}'
    ]
    t0 = time.time()
    with open(check.path(f'{name}.log'), 'w') as log:
        try:
            done = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=limit)
            status = None
        except subprocess.TimeoutExpired:
            status = f'timed out after {limit:.0f} s'
    seconds = time.time() - t0
    if status is None and osp.exists(junit):
        suite = parse_junit(junit)
        os.remove(junit)
        check.suites[name] = suite
        bad = suite['counts'].get('failed', 0) + suite['counts'].get(
            'errors', 0)
        status = 'ok' if done.returncode in (0, 5) and not bad else \
            f'FAILED (pytest exit {done.returncode})'
    elif status is None:
        status = f'FAILED (pytest exit {done.returncode}, no results)'
    else:  # timed out: what finished, from the log
        check.suites[name] = parse_log(check.path(f'{name}.log'))
        status += ' (counts of the tests that finished)'
    check.stage(name, status, seconds)


# --------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------
def run_benchmarks(check: Check) -> None:
    budget = check.left() - 15
    if budget < 20:
        check.stage('benchmarks', 'not run: time budget spent', 0)
        return
    rows_path = check.path('bench_rows.jsonl')
    if osp.exists(rows_path):
        os.remove(rows_path)
    cmd = [
        sys.executable,
        osp.join(ROOT, 'benchmarks', 'gpu.py'), '--out', rows_path, '--budget',
        str(int(budget - 15))
    ]
    if check.dry_run:
        cmd.append('--dry-run')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('TRITON_INTERPRET', None)
    t0 = time.time()
    with open(check.path('bench.log'), 'w') as log:
        try:
            done = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=budget)
            status = 'ok' if done.returncode == 0 else \
                f'FAILED (exit {done.returncode}, see bench.log)'
        except subprocess.TimeoutExpired:
            status = f'timed out after {budget:.0f} s (rows so far kept)'
    if osp.exists(rows_path):
        with open(rows_path) as f:
            check.rows = [json.loads(line) for line in f if line.strip()]
    check.stage('benchmarks', status, time.time() - t0)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return ''
    return str(value).replace('|', '\\|').replace('\n', ' ')


def _measure(row: dict, prefix: str = '') -> str:
    ms, mb = row.get(prefix + 'ms'), row.get(prefix + 'mb')
    if ms is not None:
        return f'{ms} ms'
    if mb is not None:
        return f'{mb} MB'
    return ''


def render(check: Check) -> str:
    lines = ['# mmdyn GPU check', '']
    if check.dry_run:
        lines += [
            '**Dry run on CPU**: the pipeline only; no number below '
            'says anything about a GPU.', ''
        ]
    totals = Counter()
    for suite in check.suites.values():
        totals.update(suite['counts'])
    verdicts = Counter(r.get('verdict', 'n/a') for r in check.rows)
    lines += [
        f"Tests: {totals.get('passed', 0)} passed, "
        f"{totals.get('failed', 0)} failed, {totals.get('errors', 0)} "
        f"errors, {totals.get('skipped', 0)} skipped. Benchmark rows: "
        f'{len(check.rows)} ({verdicts.get("PASS", 0)} PASS, '
        f'{verdicts.get("FAIL", 0)} FAIL, {verdicts.get("n/a", 0)} without '
        'a target or not run).', '', '## Machine', '', '| | |', '| --- | --- |'
    ]
    lines += [f'| {k} | {_cell(v)} |' for k, v in check.machine.items()]
    lines += [
        '', '## Stages', '', '| stage | status | seconds |',
        '| --- | --- | ---: |'
    ]
    lines += [
        f"| {s['name']} | {_cell(s['status'])} | {s['seconds']} |"
        for s in check.stages
    ]
    lines += ['', '## Tests', '']
    if not check.suites:
        lines.append('No test results (see Stages).')
    for name, suite in check.suites.items():
        c = suite['counts']
        lines += [
            f'### {name}', '',
            f"{c.get('passed', 0)} passed, {c.get('failed', 0)} "
            f"failed, {c.get('errors', 0)} errors, "
            f"{c.get('skipped', 0)} skipped.", ''
        ]
        for test, outcome, message in suite['failures']:
            lines.append(f'- {outcome.upper()} `{test}`: {_cell(message)}')
        for reason, n in suite['skips']:
            lines.append(f'- skipped ({n}): {_cell(reason)}')
        lines.append('')
    lines += ['## Benchmarks', '']
    if not check.rows:
        lines.append('No benchmark rows (see Stages).')
    groups: Dict[str, List[dict]] = {}
    for row in check.rows:
        groups.setdefault(row.get('group', ''), []).append(row)
    for group, rows in groups.items():
        lines += [
            f'### {group}', '',
            '| row | precision | shape | this | baseline | ratio | '
            'target | verdict | note |',
            '| --- | --- | --- | ---: | ---: | ---: | ---: | --- | '
            '--- |'
        ]
        for r in rows:
            base = _measure(r, 'baseline_')
            if r.get('baseline'):
                base = f"{r['baseline']}: {base}"
            target = r.get('target')
            lines.append('| ' + ' | '.join(
                _cell(v)
                for v in (r.get('name'), r.get('precision'), r.get('shape'),
                          _measure(r), base, r.get('ratio'),
                          None if target is None else f'<= {target}',
                          r.get('verdict'), r.get('note'))) + ' |')
        lines.append('')
    lines += [
        '## How the benchmarked networks are built', '',
        _constructions(), ''
    ]
    return '\n'.join(lines)


def _constructions() -> str:
    """The network constructions, from benchmarks/gpu.py's docstrings."""
    spec = importlib.util.spec_from_file_location(
        'gpu_benchmarks', osp.join(ROOT, 'benchmarks', 'gpu.py'))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 (the report still gets written)
        return f'(benchmarks/gpu.py did not import: {e})'
    import inspect
    return '\n\n'.join(
        inspect.cleandoc(obj.__doc__)
        for obj in (module.build_resnet50, module.PlainFPN))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='folder of the report and logs')
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='run the pipeline on CPU with tiny shapes')
    parser.add_argument(
        '--budget',
        type=float,
        default=480,
        help='seconds for the whole check (default 480)')
    args = parser.parse_args(argv)
    if not args.dry_run and not cuda_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    start = float(os.environ.get('GPU_CHECK_START', time.time()))
    os.makedirs(args.out_dir, exist_ok=True)
    check = Check(args.out_dir, args.dry_run, args.budget, start)
    if osp.exists(check.path('install.log')):
        with open(check.path('install.log')) as f:
            tail = f.read().strip().splitlines()[-1:] or ['ok']
        check.stages.append(
            dict(name='install', status=tail[0][:160], seconds=0))
    describe_machine(check)
    check.write()
    for name, test_file, limit, extra_env in TEST_STAGES:
        if args.dry_run and name != 'test_cuda_ops':
            check.stage(name, 'not run: dry run', 0)
            continue
        run_tests(check, name, test_file, limit, extra_env)
    run_benchmarks(check)
    print(f'gpu_check: report in {check.path(REPORT)}')
    return 0 if check.ok() else 1


if __name__ == '__main__':
    sys.exit(main())
