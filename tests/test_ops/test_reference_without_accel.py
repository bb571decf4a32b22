# Copyright (c) mmdyn contributors. All rights reserved.
"""Each layer's reference forward is the paper's math in plain PyTorch.

The reference forwards (``forward_reference``) run in two fresh
interpreters: one with every accelerator made unavailable
(``MMDYN_DISABLE_ACCEL=1``: no C library loads, no ``mmdyn::`` operator or
Triton kernel can run) and one as usual. While they run, every load of a C
library and every ``mmdyn::`` operator call is recorded (a monkeypatch of
the C-library loader, a ``TorchDispatchMode``), and every
``torch.autograd.Function`` of mmdyn (a hand-written backward): there
must be none, and
the two interpreters must produce bit-identical outputs and gradients. A
reference that used a C loop where one is available (KernelWarehouse's
cell product in float32 CPU inference) differs from the plain-PyTorch
run, or is caught calling the loader.

Then every accelerated path of every layer, with the C loops available, is
compared with that independent reference (KernelWarehouse inference
included, its mixtures made by the C cell product).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d, KWConv2d,
                       ODConv2d)
from mmdyn.ops.accel import ddf_cpu, kw_cells

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter: digests of each reference forward (output,
# and in training the gradients of the input and of every parameter), and
# what accelerated code was reached.
DIGEST_SCRIPT = r'''
import hashlib, json, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmdyn.ops as ops

torch.set_num_threads(1)
loads, custom_ops = [], []
# Every C library of mmdyn.ops is a CLibrary; record each load request.
for module in list(sys.modules.values()):
    cls = getattr(module, 'CLibrary', None)
    if getattr(module, '__name__', '').startswith('mmdyn.ops') and \
            isinstance(cls, type) and not hasattr(cls, '_recorded'):
        cls._recorded = True
        for name in ('load', 'require'):
            real = getattr(cls, name)

            def recording(self, _real=real, _name=name):
                loads.append(f'{self.name}.{_name}')
                return _real(self)

            setattr(cls, name, recording)


# Every torch.autograd.Function of mmdyn (a hand-written backward).
def _functions(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _functions(sub)


for function in set(_functions(torch.autograd.Function)):
    if function.__module__.startswith('mmdyn'):
        def recording_apply(*args, _real=function.apply, _cls=function,
                            **kwargs):
            custom_ops.append(f'autograd.Function {_cls.__qualname__}')
            return _real(*args, **kwargs)

        function.apply = recording_apply


class RecordMmdynOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == 'mmdyn':
            custom_ops.append(str(func))
        return func(*args, **(kwargs or {}))


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def make(name):
    torch.manual_seed(0)
    layer = {
        'dyconv': lambda: ops.DyConv2d(16, 24, 3, padding=1),
        'condconv': lambda: ops.CondConv2d(16, 24, 3, 2, 1),
        'odconv': lambda: ops.ODConv2d(16, 24, 3, padding=1),
        'odconv_k1': lambda: ops.ODConv2d(16, 24, 3, padding=1,
                                          kernel_num=1),
        # 64x64 cells: 4096 columns, where the C cell product serves
        # float32 CPU inference.
        'kwconv': lambda: ops.KWConv2d(64, 64, 3, padding=1),
        'kwconv_1x1': lambda: ops.KWConv2d(64, 64, 1),
        'kwlinear': lambda: ops.KWLinear(64, 64),
        'ddf': lambda: ops.DDFConv2d(16, 16, 3),
        'ddf_up': lambda: ops.DDFUpsample(16, 2),
    }[name]()
    with torch.no_grad():  # attentions away from their initial values
        for pname, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if name == 'kwlinear':
        return layer, torch.randn(3, 5, 64)
    channels = 64 if name.startswith('kw') else 16
    return layer, torch.randn(3, channels, 9, 8)


results = {}
for name in sys.argv[1].split(','):
    layer, x = make(name)
    with RecordMmdynOps():
        layer.eval()
        with torch.no_grad():
            inference = digest(layer.forward_reference(x))
        layer.train()
        x = x.clone().requires_grad_()
        out = layer.forward_reference(x)
        out.backward(torch.ones_like(out))
        grads = [x.grad] + [p.grad for p in layer.parameters()
                            if p.grad is not None]
        training = digest(out, *grads)
    results[name] = dict(inference=inference, training=training)
print(json.dumps(dict(results=results, loads=loads, custom_ops=custom_ops)))
'''

LAYERS = ('dyconv', 'condconv', 'odconv', 'odconv_k1', 'kwconv', 'kwconv_1x1',
          'kwlinear', 'ddf', 'ddf_up')


def _digests(disable: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('MMDYN_DISABLE_ACCEL', None)
    if disable:
        env['MMDYN_DISABLE_ACCEL'] = '1'
    proc = subprocess.run(
        [sys.executable, '-c', DIGEST_SCRIPT, ','.join(LAYERS)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def digests():
    return _digests(disable=True), _digests(disable=False)


def test_accelerators_can_be_disabled():
    """The switch the digest run relies on: no C library loads."""
    code = ('from mmdyn.ops.accel import ddf_cpu, kw_cells, winograd\n'
            'assert ddf_cpu.load() is None and kw_cells.load() is None\n'
            'assert winograd.load() is None and not ddf_cpu.available()\n')
    env = dict(os.environ, PYTHONPATH=ROOT, MMDYN_DISABLE_ACCEL='1')
    proc = subprocess.run([sys.executable, '-c', code],
                          env=env,
                          cwd=ROOT,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_reference_forwards_reach_no_accelerator(digests):
    for run in digests:
        assert run['loads'] == [], run['loads']
        assert run['custom_ops'] == [], run['custom_ops']


@pytest.mark.parametrize('name', LAYERS)
def test_reference_is_the_same_without_accelerators(digests, name):
    disabled, normal = digests
    assert disabled['results'][name] == normal['results'][name]


# --------------------------------------------------------------------------
# Every accelerated path against the independent reference
# --------------------------------------------------------------------------
def _perturbed(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.skipif(
    kw_cells.load() is None, reason='needs the C cell product (a C compiler)')
@pytest.mark.parametrize('impl', [
    'auto', 'reference', 'winograd_fused', 'winograd', 'position_major',
    'chunked'
])
def test_kw_inference_with_the_c_cell_product_matches_the_reference(
        impl, monkeypatch):
    """KernelWarehouse inference whose mixtures come from the C cell product
    (64x64 cells; its columns threshold set, as the CPU's default leaves it off
    on AVX-512) against the plain-PyTorch reference."""
    from mmdyn.ops.accel.thresholds import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['kernel_warehouse'], 'c_loop_min_columns',
                        4096)
    torch.manual_seed(0)
    layer = _perturbed(KWConv2d(64, 64, 3, padding=1, impl=impl)).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        want = layer.forward_reference(x)
        got = layer(x)
    if impl != 'auto':
        assert layer.last_path == impl
    if impl in ('auto', 'reference'):
        assert layer.last_mixture_product == 'c_loop'
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('make', [
    lambda: DyConv2d(16, 24, 3, padding=1),
    lambda: CondConv2d(16, 24, 3, 2, 1),
    lambda: ODConv2d(16, 24, 3, padding=1),
    lambda: ODConv2d(16, 24, 1, kernel_num=1),
    lambda: KWConv2d(64, 64, 1),
])
@pytest.mark.parametrize('training', [False, True])
def test_auto_path_matches_the_reference(make, training):
    layer = _perturbed(make()).train(training)
    x = torch.randn(2, layer.in_channels, 7, 6)
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(
            layer(x), layer.forward_reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not ddf_cpu.available(), reason='needs the DDF C loops (a C compiler)')
@pytest.mark.parametrize(
    'make', [lambda: DDFConv2d(8, 8, 3, stride=2), lambda: DDFUpsample(8, 2)])
def test_ddf_fused_matches_the_reference(make):
    layer = _perturbed(make())
    x = torch.randn(2, 8, 7, 6)
    got = layer(x)
    assert layer.last_path == 'fused'
    torch.testing.assert_close(
        got, layer.forward_reference(x), rtol=1e-5, atol=1e-5)
