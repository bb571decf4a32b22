# Copyright (c) mmdyn contributors. All rights reserved.
"""The measured path choice (:mod:`mmdyn.ops.accel.autotune`): results equal
the paper forward whatever path is kept, the fastest measured path is kept once
per key, and forced paths, graph capture and the switch are honoured."""
import copy
import json
import logging

import pytest
import torch

from mmdyn.ops import (CondConv2d, DDFConv2d, DyConv2d, KWConv2d, ODConv2d,
                       switches)
from mmdyn.ops.accel import autotune, ddf_cpu, winograd
from mmdyn.ops.capture import graph_capture

LAYERS = {
    'odconv_k4': (lambda: ODConv2d(16, 24, 3, padding=1), (3, 16, 6, 5)),
    'odconv_k1':
    (lambda: ODConv2d(16, 24, 3, padding=1, kernel_num=1), (3, 16, 6, 5)),
    'dyconv': (lambda: DyConv2d(16, 24, 3, padding=1), (3, 16, 6, 5)),
    'condconv_stride2': (lambda: CondConv2d(16, 24, 3, 2, 1), (3, 16, 7, 6)),
    'kwconv': (lambda: KWConv2d(16, 24, 3, padding=1), (3, 16, 6, 5)),
    'kwconv_1x1': (lambda: KWConv2d(16, 24, 1), (3, 16, 6, 5)),
    'ddf': (lambda: DDFConv2d(16, 16, 3, padding=1), (3, 16, 6, 5)),
}


@pytest.fixture
def tuning():
    """Tuning on, an empty cache; back to the environment's switch after."""
    autotune.reset()
    autotune.enable()
    yield
    autotune.reset()


@pytest.fixture
def timings(monkeypatch):
    """Replace the timer: ``timings.fake`` maps path -> seconds (others
    1.0); every call of :func:`autotune.measure` is recorded in
    ``timings.calls``. The candidate still runs (as the real timer does)."""

    class Timings:
        fake = {}
        calls = []

    def measure(name, run, limit=float('inf')):
        Timings.calls.append(name)
        run()
        return Timings.fake.get(name, 1.0)

    monkeypatch.setattr(autotune, 'measure', measure)
    return Timings


def _layer(name, train=False):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = factory()
    with torch.no_grad():  # non-trivial attentions and kernels
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layer.train(train)
    x = torch.randn(shape)
    return layer, x


def _grads(out, layer, x):
    params = [p for p in layer.parameters() if p.requires_grad]
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    return torch.autograd.grad((out * weight).sum(), [x, *params])


@pytest.mark.parametrize('name', list(LAYERS))
def test_tuned_inference_equals_the_reference(name, tuning):
    layer, x = _layer(name)
    with torch.no_grad():
        expected = layer.forward_reference(x)
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    kept = autotune.cache()
    assert len(kept) == 1
    assert next(iter(kept.values())).path == layer.last_path


@pytest.mark.parametrize('name', list(LAYERS))
def test_tuned_training_equals_the_reference(name, tuning):
    """Forward and gradients equal the reference; timing the candidates writes
    no ``.grad`` and updates the attention BatchNorm statistics once, as an
    untuned forward does."""
    layer, x = _layer(name, train=True)
    untuned = copy.deepcopy(layer)
    x.requires_grad_()
    out = layer(x)
    assert all(p.grad is None for p in layer.parameters())
    with autotune.autotuning(False):
        untuned(x)
    for (key, tuned_buf), (_, plain_buf) in zip(layer.named_buffers(),
                                                untuned.named_buffers()):
        torch.testing.assert_close(tuned_buf, plain_buf, msg=key)
    reference = copy.deepcopy(untuned)
    expected = reference.forward_reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(
            _grads(out, layer, x), _grads(expected, reference, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(autotune.cache()) == 1


@pytest.mark.parametrize('name', ['odconv_k1', 'dyconv', 'kwconv', 'ddf'])
def test_a_key_is_timed_once(name, tuning, timings):
    layer, x = _layer(name)
    with torch.no_grad():
        layer(x)
        first = list(timings.calls)
        layer(x)
        layer(x)
    assert len(first) >= 2  # several candidates were timed
    assert timings.calls == first  # not again
    assert len(autotune.cache()) == 1
    with torch.no_grad():  # another shape is another key
        layer(torch.randn(2, *x.shape[1:]))
    assert len(autotune.cache()) == 2
    assert len(timings.calls) > len(first)


@pytest.mark.parametrize('name,train', [('odconv_k1', False),
                                        ('odconv_k4', False),
                                        ('odconv_k4', True), ('dyconv', False),
                                        ('kwconv', False), ('kwconv', True),
                                        ('ddf', False)])
def test_the_fastest_measured_path_is_kept(name, train, tuning, timings):
    """Each timed path, when the timer says it is the fastest, is the one that
    runs (a tuner that ignored the timings would keep one path)."""
    layer, x = _layer(name, train)
    with torch.set_grad_enabled(train):
        layer(x)
    tried = list(timings.calls)
    assert len(tried) >= 2
    for fastest in tried:
        autotune.clear()
        timings.fake = {fastest: 1e-6}
        with torch.set_grad_enabled(train):
            out = layer(x)
            assert layer.last_path == fastest
            expected = layer.forward_reference(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        assert autotune.cache()[next(iter(autotune.cache()))].path == fastest


@pytest.mark.parametrize('durations,chosen', [({
    'rule': 1.0,
    'other': 5.0
}, 'rule'), ({
    'rule': 1.0,
    'other': 0.5
}, 'other'), ({
    'rule': 1.0,
    'other': 1.0
}, 'rule')])
def test_pick_reads_the_clock(monkeypatch, durations, chosen):
    """A fake clock that each path's run advances by its duration: the shortest
    is kept (ties: the rule), its median recorded; a path slower than GIVE_UP
    times the best so far runs once after its warm-up."""
    now = [0.0]
    ran = {name: 0 for name in durations}

    def runner(name):

        def run():
            ran[name] += 1
            now[0] += durations[name]

        return run

    monkeypatch.setattr(autotune, 'clock', lambda: now[0])
    autotune.clear()
    try:
        key = ('test', 'clock', tuple(sorted(durations.items())))
        runs = {name: runner(name) for name in ('rule', 'other')}
        assert autotune.pick(key, 'rule', runs) == chosen
        choice = autotune.cache()[key]
    finally:
        autotune.clear()
    assert choice.path == chosen
    assert choice.times == durations
    full = autotune.WARMUP + autotune.REPEATS
    assert ran['rule'] == full
    slow = durations['other'] > autotune.GIVE_UP * durations['rule']
    assert ran['other'] == (autotune.WARMUP + 1 if slow else full)


def test_candidates_start_with_the_rule_and_skip_the_reference(
        tuning, timings):
    """ODConv with one kernel in inference: the rule's path first, at most
    MAX_CANDIDATES, never the reference, export or recompute."""
    layer, x = _layer('odconv_k1')
    with torch.no_grad():
        layer(x)
        with autotune.autotuning(False):
            layer(x)
            rule = layer.last_path
    assert timings.calls[0] == rule
    assert 2 <= len(timings.calls) <= autotune.MAX_CANDIDATES
    assert not {'reference', 'export', 'recompute'} & set(timings.calls)


def test_failing_candidate_is_not_kept(tuning, monkeypatch):
    layer, x = _layer('odconv_k4')
    assert winograd.load() is not None
    monkeypatch.setattr(autotune, 'REPEATS', 1)

    def broken(*args):
        raise RuntimeError('broken path')

    from mmdyn.ops.accel import paths
    table = tuple(
        p._replace(run=broken) if p.name == 'winograd' else p
        for p in paths.PATHS['odconv'])
    monkeypatch.setitem(paths.PATHS, 'odconv', table)
    with torch.no_grad():
        layer(x)
    choice = next(iter(autotune.cache().values()))
    assert choice.times['winograd'] == float('inf')
    assert choice.path != 'winograd'


def test_forced_impl_is_not_tuned(tuning, timings):
    layer = ODConv2d(16, 24, 3, padding=1, impl='folded')
    x = torch.randn(3, 16, 6, 5)
    with torch.no_grad():
        layer(x)
    assert layer.last_path == 'folded'
    ddf = DDFConv2d(16, 16, 3, padding=1, impl='taps')
    ddf(x)
    assert ddf.last_path == 'taps'
    assert timings.calls == [] and autotune.cache() == {}


def test_graph_capture_is_not_tuned(tuning, timings):
    """Tracing (TorchScript, torch.fx) times nothing; under torch.compile
    nothing is timed while the graph is captured (a compiled graph may run the
    layer's eager forward at run time, as a custom operator, and tune
    there)."""
    layer, x = _layer('odconv_k4')
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.fx.symbolic_trace(torch.nn.Sequential(layer))
        assert timings.calls == [] and autotune.cache() == {}
        torch.testing.assert_close(
            traced(x), layer.forward_reference(x), rtol=1e-4, atol=1e-5)

    captured = []
    timed = autotune.measure

    def measure(name, run, limit=float('inf')):
        captured.append(graph_capture())
        return timed(name, run, limit)

    autotune.measure = measure
    with torch.no_grad():
        out = torch.compile(layer, backend='eager')(x)
    torch.testing.assert_close(
        out, layer.forward_reference(x), rtol=1e-4, atol=1e-5)
    assert not any(captured)


def test_off_means_the_rule(monkeypatch, timings):
    autotune.reset()
    monkeypatch.setenv(switches.AUTOTUNE, '0')
    layer, x = _layer('odconv_k4')
    with torch.no_grad():
        layer(x)
    assert timings.calls == [] and autotune.cache() == {}


@pytest.mark.parametrize('value,on', [(None, switches.AUTOTUNE_DEFAULT),
                                      ('', switches.AUTOTUNE_DEFAULT),
                                      ('1', True), ('on', True), ('0', False),
                                      ('off', False), (' False ', False)])
def test_switch_parsing(monkeypatch, value, on):
    autotune.reset()
    if value is None:
        monkeypatch.delenv(switches.AUTOTUNE, raising=False)
    else:
        monkeypatch.setenv(switches.AUTOTUNE, value)
    assert switches.autotune_enabled() is on
    assert autotune.enabled() is on
    autotune.enable()  # the Python API overrides the variable
    assert autotune.enabled()
    autotune.disable()
    assert not autotune.enabled()
    with autotune.autotuning():
        assert autotune.enabled()
    assert not autotune.enabled()
    autotune.reset()
    assert autotune.enabled() is on


def test_default_is_one_constant(monkeypatch):
    autotune.reset()
    monkeypatch.delenv(switches.AUTOTUNE, raising=False)
    monkeypatch.setattr(switches, 'AUTOTUNE_DEFAULT', True)
    assert autotune.enabled()
    monkeypatch.setattr(switches, 'AUTOTUNE_DEFAULT', False)
    assert not autotune.enabled()


def test_choices_persist(tmp_path, tuning, timings, monkeypatch):
    layer, x = _layer('odconv_k4')
    with torch.no_grad():
        layer(x)
    kept = autotune.cache()
    path = autotune.save(str(tmp_path / 'choices.json'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['choices.json']
    autotune.clear()
    assert autotune.load(path) == 1
    assert autotune.cache() == kept
    calls = len(timings.calls)
    with torch.no_grad():
        layer(x)
    assert len(timings.calls) == calls  # the loaded choice, not re-timed
    assert layer.last_path == next(iter(kept.values())).path

    # A file saved on another machine or torch adds nothing.
    with open(path) as f:
        data = json.load(f)
    data['machine'] = 'another'
    with open(path, 'w') as f:
        json.dump(data, f)
    autotune.clear()
    assert autotune.load(path) == 0
    assert autotune.load(str(tmp_path / 'missing.json')) == 0


def test_persist_saves_next_to_the_build_cache(tmp_path, timings, monkeypatch):
    monkeypatch.setenv(switches.CACHE_DIR, str(tmp_path))
    autotune.reset()
    autotune.enable(persist=True)
    try:
        layer, x = _layer('dyconv')
        with torch.no_grad():
            layer(x)
        assert autotune.cache_file() == str(
            tmp_path / f'autotune_{autotune.machine_key()}.json')
        autotune.clear()
        autotune.enable(persist=True)  # loads the file
        assert len(autotune.cache()) == 1
    finally:
        autotune.reset()


def test_one_debug_line_per_key(tuning, caplog):
    layer, x = _layer('kwconv')
    with caplog.at_level(logging.DEBUG, logger='mmdyn.ops.autotune'):
        with torch.no_grad():
            layer(x)
            layer(x)
    lines = [r for r in caplog.records if r.name == 'mmdyn.ops.autotune']
    assert len(lines) == 1
    assert f'chose {layer.last_path}' in lines[0].getMessage()


def test_ddf_loops_are_built():
    """The DDF cases above compare the fused loops with the tap loop."""
    assert ddf_cpu.available()
