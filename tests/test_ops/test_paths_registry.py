# Copyright (c) mmdyn contributors. All rights reserved.
"""The path registry and the switches: a path is one table entry,
``last_path`` is the path that ran, DDF decides its path once per call,
and every ``MMDYN_*`` switch is read in one module."""
import ast
import importlib
import os
import os.path as osp
import re

import pytest
import torch

from mmdyn.ops import DDFConv2d, DDFUpsample, DyConv2d, ddf, switches
from mmdyn.ops.accel import ddf_paths, paths
from mmdyn.ops.accel.paths import PATHS, Path

# mmdyn.ops.ddf is also the name of the operator function.
ddf_module = importlib.import_module('mmdyn.ops.ddf')
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _probe(calls):

    def run(layer, x, pi):
        calls.append(x.shape[0])
        return layer.reference_from_routing(x, pi)

    return Path('probe', lambda layer, x, context: True,
                lambda layer, x, context: True, '', run)


def test_a_new_path_is_one_table_entry(monkeypatch):
    calls = []
    monkeypatch.setitem(PATHS, 'mixture', (_probe(calls), *PATHS['mixture']))
    torch.manual_seed(0)
    auto = DyConv2d(8, 8, 3, padding=1)
    forced = DyConv2d(8, 8, 3, padding=1, impl='probe')
    forced.load_state_dict(auto.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(auto(x), auto.forward_reference(x))
    assert auto.last_path == 'probe'
    forced(x)
    assert forced.last_path == 'probe' and calls == [2, 2]
    with pytest.raises(ValueError, match='impl must be one of'):
        DyConv2d(8, 8, 3, impl='probe2')


def test_a_forced_path_that_cannot_run_names_what_it_needs(monkeypatch):
    cannot = Path('probe', lambda layer, x, context: False, None,
                  'a probe that never runs', lambda *args: None)
    monkeypatch.setitem(PATHS, 'mixture', (cannot, *PATHS['mixture']))
    layer = DyConv2d(8, 8, 3, impl='probe')
    with pytest.raises(
            ValueError,
            match="impl='probe' cannot run here: "
            'DyConv2d needs a probe that never runs'):
        layer(torch.randn(2, 8, 5, 5))
    # 'auto' never takes a path without a cost rule (pays=None).
    layer.impl = 'auto'
    layer(torch.randn(2, 8, 5, 5))
    assert layer.last_path != 'probe'


def _count_ddf_decisions(monkeypatch):
    decisions, ran = [], []
    real_path, real_run = ddf_module.ddf_path, ddf_paths.run

    def counting_path(impl, x, *tuning_args):
        decisions.append(real_path(impl, x, *tuning_args))
        return decisions[-1]

    def recording_run(path, *args, **kwargs):
        ran.append(path)
        return real_run(path, *args, **kwargs)

    monkeypatch.setattr(ddf_module, 'ddf_path', counting_path)
    monkeypatch.setattr(ddf_paths, 'run', recording_run)
    return decisions, ran


@pytest.mark.parametrize('impl', ['auto', 'taps'])
def test_ddf_decides_its_path_once_per_call(monkeypatch, impl):
    decisions, ran = _count_ddf_decisions(monkeypatch)
    x = torch.randn(2, 8, 6, 7)
    layer = DDFConv2d(8, 8, 3, impl=impl)
    layer(x)
    assert len(decisions) == 1 and ran == decisions
    assert layer.last_path == decisions[0]
    decisions.clear()
    ran.clear()
    cf, sf = layer.filters(x)
    ddf(x, cf, sf, 3, impl=impl)
    assert len(decisions) == 1 and ran == decisions
    decisions.clear()
    ran.clear()
    up = DDFUpsample(8, 2, head=2, impl=impl)
    up(x)
    assert len(decisions) == 1 and set(ran) == set(decisions)
    assert up.last_path == decisions[0]


def _python_files(*folders):
    for folder in folders:
        for directory, _, files in os.walk(osp.join(ROOT, folder)):
            for name in files:
                if name.endswith('.py'):
                    yield osp.join(directory, name)


def test_every_switch_is_named_in_one_module():
    """A string that is a switch name (``MMDYN_...``) appears in mmdyn's code
    only in :mod:`mmdyn.ops.switches`, and each is in its table; the one
    exception is :data:`mmdyn.analysis.machine.ISA_CAPS` (a module that must
    not import torch, as importing the switches would), whose names must be
    switches."""
    from mmdyn.analysis import machine
    capped = {
        name
        for cap in machine.ISA_CAPS.values()
        for name in cap if name.startswith('MMDYN_')
    }
    assert capped and capped <= set(switches.SWITCHES)
    outside = []
    for path in _python_files('mmdyn'):
        if path in (switches.__file__, machine.__file__):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(
                    node.value, str) and re.fullmatch(r'MMDYN_[A-Z0-9_]+',
                                                      node.value):
                outside.append(f'{osp.relpath(path, ROOT)}: {node.value}')
    assert outside == []
    with open(switches.__file__) as f:
        named = set(re.findall(r"'(MMDYN_[A-Z0-9_]+)'", f.read()))
    assert named == set(switches.SWITCHES)


@pytest.mark.parametrize('value,on', [(None, True), ('', True), ('1', True),
                                      ('0', False), ('off', False),
                                      (' False ', False), ('no', False)])
def test_switch_values(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(switches.WINOGRAD, raising=False)
    else:
        monkeypatch.setenv(switches.WINOGRAD, value)
    monkeypatch.delenv(switches.DISABLE_ACCEL, raising=False)
    assert switches.accel_enabled(switches.WINOGRAD) is on
    monkeypatch.setenv(switches.DISABLE_ACCEL, '1')
    assert switches.accel_enabled(switches.WINOGRAD) is False
    with pytest.raises(ValueError, match='unknown accelerator switch'):
        switches.accel_enabled('MMDYN_NOTHING')


def test_disabled_accelerators_leave_the_plain_paths(monkeypatch):
    monkeypatch.setenv(switches.DISABLE_ACCEL, '1')
    x = torch.randn(2, 8, 6, 6)
    assert paths.ddf_path('auto', x) == 'taps'
    layer = DyConv2d(128, 128, 3, padding=1).eval()
    with torch.no_grad():
        layer(torch.randn(2, 128, 12, 12))
    assert layer.last_path != 'winograd'
