# Copyright (c) mmdyn contributors. All rights reserved.
"""Measured path choice for ``impl='auto'`` layers, as
``torch.backends.cudnn.benchmark`` does for cuDNN.

The size thresholds of :data:`~mmdyn.ops.accel.thresholds.THRESHOLDS` were
set on one CPU; on another (a newer ISA, another thread count) a different
path may be faster. With tuning on, the first forward of a layer on a new
*key* times the candidate paths on its real input and keeps the fastest;
later forwards with the same key take the kept path without timing.

The key (:func:`tuning_key`): the family and layer type, the layer's
configuration (channels, kernel, stride, padding, dilation, groups, kernel
count or warehouse layout, bias), the shapes of the attentions it was given,
the input's shape, dtype and device, ``torch.get_num_threads()``, the grad
mode (and whether the input needs a gradient), training mode and CPU
autocast.

Candidates (:func:`candidates`), at most :data:`MAX_CANDIDATES`: the path
the threshold rule chooses (the prior, always timed, so tuning never keeps a
path slower than the rule's on the timed runs), then the other paths of the
family's table that can run here, in table order, except the reference
(it is timed only when the rule chooses it), ``export`` (a graph form) and,
without autograd, ``recompute`` (it differs only in the backward). With one
candidate nothing is timed. DDF (:func:`choose_ddf`, from
:func:`~mmdyn.ops.accel.paths.ddf_path` for ``DDFConv2d``): its fused C
loops against the tap loop on CPU (``DDFUpsample`` keeps the rule).

Timing (:func:`measure`): :data:`WARMUP` untimed runs, then the median of
:data:`REPEATS` timed ones (:func:`time.perf_counter`); a candidate whose
timed run takes more than :data:`GIVE_UP` times the best median so far is
not run again (the rule's path is timed first). Without autograd a
run is the path's forward. With autograd it is the forward and a backward
by :func:`torch.autograd.grad` on detached copies of the input and of the
attentions already computed: no ``.grad`` is written and the attention
branch (with its BatchNorm statistics) does not run again.

No tuning (the rule decides) under graph capture
(:func:`~mmdyn.ops.capture.graph_capture`: ``torch.compile``, export,
tracing), off the CPU (CUDA keeps the rule for now), for a forced ``impl``,
or while a path is being timed.

On/off: ``MMDYN_AUTOTUNE`` (:func:`mmdyn.ops.switches.autotune_enabled`,
default :data:`~mmdyn.ops.switches.AUTOTUNE_DEFAULT`), overridden by
:func:`enable`/:func:`disable` or the :func:`autotuning` context manager.
:func:`cache` returns the choices made; each new one is logged at DEBUG by
the ``mmdyn.ops.autotune`` logger. :func:`save`/:func:`load` keep them in a
JSON file next to the C loops' build cache, one file per CPU model,
instruction-set flags and torch version (``enable(persist=True)`` loads it
and saves after each new choice).

torch only.
"""
import ast
import contextlib
import hashlib
import json
import logging
import os
import os.path as osp
import statistics
import tempfile
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch

from .. import switches
from ..capture import graph_capture
from .c_library import cpu_model

__all__ = [
    'Choice', 'WARMUP', 'REPEATS', 'MAX_CANDIDATES', 'GIVE_UP', 'enabled',
    'enable', 'disable', 'autotuning', 'clear', 'reset', 'cache', 'applies',
    'tuning_key', 'candidates', 'one_run', 'measure', 'pick', 'choose',
    'choose_ddf', 'machine_key', 'cache_file', 'save', 'load'
]

logger = logging.getLogger('mmdyn.ops.autotune')

#: Untimed runs of each candidate before timing it.
WARMUP = 1
#: Timed runs of each candidate; the median is kept.
REPEATS = 3
#: The most paths timed for one key (the rule's choice included).
MAX_CANDIDATES = 4
#: A candidate's timing stops after a run slower than this many times the
#: best median so far (it is timed once, not :data:`REPEATS` times).
GIVE_UP = 2.0

#: The layer attributes that, with the input, identify a tuning key.
_CONFIG_ATTRS = ('in_channels', 'out_channels', 'kernel_size', 'stride',
                 'padding', 'dilation', 'groups', 'kernel_num', 'padding_mode',
                 'weight_shape', '_kw_layout')
#: Paths never timed: graph forms, and the training-only path without
#: autograd.
_NEVER = ('export', )
_TRAINING_ONLY = ('recompute', )


class Choice(NamedTuple):
    """What tuning chose for one key.

    Attributes:
        path (str): The path kept.
        times (dict): Candidate path -> median seconds of one run (forward,
            or forward and backward with autograd); empty when only one
            path could run.
    """
    path: str
    times: Dict[str, float]


_cache: Dict[tuple, Choice] = {}
_lock = threading.Lock()
_state = threading.local()
_override: Optional[bool] = None
_persist = False


# --------------------------------------------------------------------------
# On/off
# --------------------------------------------------------------------------
def enabled() -> bool:
    """Whether tuning is on: :func:`enable`/:func:`disable` when called,
    else ``MMDYN_AUTOTUNE``."""
    if _override is not None:
        return _override
    return switches.autotune_enabled()


def enable(persist: bool = False) -> None:
    """Turn tuning on in this process (whatever ``MMDYN_AUTOTUNE`` says).

    Args:
        persist (bool): Also load the choices saved for this machine
            (:func:`load`) and save after each new one (:func:`save`).
    """
    global _override, _persist
    _override = True
    _persist = bool(persist)
    if _persist:
        load()


def disable() -> None:
    """Turn tuning off in this process (the threshold rule decides); the
    choices made stay in :func:`cache`."""
    global _override, _persist
    _override, _persist = False, False


@contextlib.contextmanager
def autotuning(on: bool = True):
    """Tuning on (or off) inside the ``with`` block, as it was after."""
    global _override
    before = _override
    _override = bool(on)
    try:
        yield
    finally:
        _override = before


def clear() -> None:
    """Forget every choice (the next forward of each key is timed again)."""
    with _lock:
        _cache.clear()


def cache() -> Dict[tuple, Choice]:
    """A copy of the choices made: :func:`tuning_key` -> :class:`Choice`."""
    with _lock:
        return dict(_cache)


# --------------------------------------------------------------------------
# Keys and candidates
# --------------------------------------------------------------------------
def _plain(value):
    """``value`` as nested tuples of ints, floats, strings, bools and None
    (what :func:`repr` and :func:`ast.literal_eval` round-trip)."""
    if isinstance(value, (list, tuple, torch.Size)):
        return tuple(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def applies(layer, x: torch.Tensor) -> bool:
    """Whether :func:`choose` times paths for ``layer`` on ``x``: tuning on,
    ``impl='auto'``, a CPU input, no graph capture, not already timing a
    path."""
    return (enabled() and getattr(layer, 'impl', 'auto') == 'auto'
            and isinstance(x, torch.Tensor) and x.device.type == 'cpu'
            and not graph_capture() and not getattr(_state, 'busy', False))


def _input_key(x: torch.Tensor) -> tuple:
    """The input's part of a key: shape, dtype, device, intra-op threads, grad
    mode and whether ``x`` needs a gradient."""
    return (tuple(x.shape), str(x.dtype), str(x.device),
            torch.get_num_threads(), torch.is_grad_enabled(),
            bool(x.requires_grad))


def tuning_key(family: str, layer, x: torch.Tensor, context: tuple) -> tuple:
    """The key a choice is kept under (see the module docstring)."""
    config = tuple((name, _plain(getattr(layer, name)))
                   for name in _CONFIG_ATTRS if hasattr(layer, name))
    shapes = tuple(
        tuple(c.shape) if isinstance(c, torch.Tensor) else _plain(c)
        for c in context)
    return (family, type(layer).__name__, config, getattr(layer, 'bias', None)
            is not None, shapes, *_input_key(x),
            bool(getattr(layer, 'training',
                         False)), torch.is_autocast_enabled('cpu'))


def candidates(table: Sequence, rule, layer, x: torch.Tensor,
               context: tuple) -> list:
    """The paths timed for ``layer`` on ``x``: ``rule`` (the threshold rule's
    choice), then the other paths of ``table`` that can run, in table order,
    but not the reference, ``export``, or ``recompute`` without autograd; at
    most :data:`MAX_CANDIDATES`."""
    chosen = [rule]
    skip = set(_NEVER) | {'reference'}
    if not torch.is_grad_enabled():
        skip |= set(_TRAINING_ONLY)
    for path in table:
        if len(chosen) >= MAX_CANDIDATES:
            break
        if path.name in skip or path.name == rule.name:
            continue
        if path.can_run(layer, x, context):
            chosen.append(path)
    return chosen


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def _leaves(out: torch.Tensor) -> list:
    """The leaf tensors (parameters, inputs) ``out``'s graph needs gradients
    for."""
    found, seen = [], set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, 'variable', None)
        if variable is not None:  # an AccumulateGrad node
            found.append(variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _detached(tensors: tuple) -> tuple:
    """Copies of ``tensors`` cut from their graphs, each requiring a gradient
    as the original did (other values as they are)."""
    copies = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.detach().requires_grad_(t.requires_grad)
        copies.append(t)
    return tuple(copies)


def one_run(forward: Callable, inputs: tuple) -> Callable[[], None]:
    """A function that runs ``forward(*inputs)`` once as a layer's forward
    does: without autograd the forward only; with autograd the forward on
    detached copies of ``inputs`` and a backward by
    :func:`torch.autograd.grad` into fresh gradients (no ``.grad`` is
    written)."""
    if not torch.is_grad_enabled():
        return lambda: forward(*inputs)
    inputs = _detached(inputs)
    leaves = []

    def run():
        out = forward(*inputs)
        if out.grad_fn is None:
            return
        if not leaves:
            leaves.extend(_leaves(out))
        torch.autograd.grad(
            out, leaves, torch.ones_like(out), allow_unused=True)

    return run


#: The clock :func:`measure` reads.
clock = time.perf_counter


def measure(name: str, run: Callable[[], None],
            limit: float = float('inf')) -> float:
    """Median seconds of one ``run()`` of the path ``name``: :data:`WARMUP`
    untimed runs, then :data:`REPEATS` timed ones, stopping early once a run
    takes more than ``limit`` seconds (it cannot win); ``inf`` when it
    raises."""
    times = []
    try:
        for _ in range(WARMUP):
            run()
        for _ in range(REPEATS):
            start = clock()
            run()
            times.append(clock() - start)
            if times[-1] > limit:
                break
    except Exception as err:  # a candidate that fails is not chosen
        logger.debug('autotune: path %r failed while timed: %s: %s', name,
                     type(err).__name__, err)
        return float('inf')
    return statistics.median(times)


def _kept(key: tuple) -> Optional[Choice]:
    with _lock:
        return _cache.get(key)


def pick(key: tuple,
         rule: str,
         runs: Dict[str, Callable[[], None]],
         label: str = '') -> str:
    """The path kept for ``key``: the one kept before, else the fastest of
    ``runs`` (path name -> :func:`one_run`, ``rule``, the threshold rule's
    choice, among them), timed now by :func:`measure` and kept (ties: the
    first).

    ``label`` describes the layer in the log line.
    """
    kept = _kept(key)
    if kept is not None and kept.path in runs:
        return kept.path
    times = {}
    if len(runs) > 1:
        _state.busy = True
        try:
            for name, run in runs.items():
                best = min(times.values(), default=float('inf'))
                times[name] = measure(name, run, GIVE_UP * best)
        finally:
            _state.busy = False
    best = min(runs, key=lambda name: times.get(name, 0.0))
    with _lock:
        _cache[key] = Choice(best, times)
    logger.debug(
        'autotune %s, %s: chose %s (%s; rule: %s)', label,
        'autograd' if torch.is_grad_enabled() else 'no autograd', best,
        ', '.join(f'{n} {t * 1e3:.3f} ms'
                  for n, t in times.items()) or 'only path', rule)
    if _persist:
        save()
    return best


def choose(family: str, table: Sequence, rule, layer, x: torch.Tensor,
           context: tuple):
    """The path of ``table`` that ``layer`` runs on ``x`` (``context``: its
    attentions): by :func:`pick` among :func:`candidates`.

    ``rule`` is the
    threshold rule's choice.
    """
    key = tuning_key(family, layer, x, context)
    kept = _kept(key)
    if kept is not None:
        path = next((p for p in table if p.name == kept.path), None)
        if path is not None and path.can_run(layer, x, context):
            return path
    tried = candidates(table, rule, layer, x, context)
    runs = {
        p.name: one_run(lambda *a, p=p: p.run(layer, *a), (x, *context))
        for p in tried
    } if len(tried) > 1 else {
        rule.name: None
    }
    label = f'{family} ' + ', '.join(f'{n}={v}' for n, v in key[2]) + \
        f', input {tuple(x.shape)}'
    name = pick(key, rule.name, runs, label)
    return next(p for p in tried if p.name == name)


def choose_ddf(rule: str, x: torch.Tensor, operands: tuple, settings: tuple,
               run: Callable) -> str:
    """DDF's operator on CPU: ``'fused'`` or ``'taps'``, whichever is faster
    for this input (``rule``: the rule's choice, ``operands``: the filters,
    ``settings``: the operator's other arguments, part of the key; ``run(path,
    x, *operands)`` runs it)."""
    key = ('ddf', 'ddf', (('settings', _plain(settings)), ), False,
           tuple(tuple(t.shape) for t in operands), *_input_key(x), False,
           torch.is_autocast_enabled('cpu'))
    kept = _kept(key)
    if kept is not None and kept.path in ('fused', 'taps'):
        return kept.path
    runs = {
        name: one_run(lambda *a, name=name: run(name, *a), (x, *operands))
        for name in dict.fromkeys((rule, 'fused', 'taps'))
    }
    return pick(key, rule, runs,
                f'ddf {_plain(settings)}, input {tuple(x.shape)}')


# --------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------
def machine_key() -> str:
    """What a saved choice is valid for: this CPU's model and instruction
    set flags (:func:`~mmdyn.ops.accel.c_library.cpu_model`) and torch's
    version, hashed."""
    text = cpu_model() + '\ntorch ' + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(directory: Optional[str] = None) -> str:
    """The JSON file of this machine's choices, in ``directory`` (default:

    the C loops' build cache, :func:`mmdyn.ops.switches.cache_dir`).
    """
    return osp.join(directory or switches.cache_dir(),
                    f'autotune_{machine_key()}.json')


def save(path: Optional[str] = None) -> str:
    """Write :func:`cache` to ``path`` (default :func:`cache_file`), atomically
    (a temporary file renamed over it); returns the path."""
    path = path or cache_file()
    entries = {
        repr(key): dict(path=choice.path, times=choice.times)
        for key, choice in cache().items()
    }
    data = dict(
        machine=machine_key(), torch=torch.__version__, choices=entries)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix='.autotune_', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load(path: Optional[str] = None) -> int:
    """Add the choices saved in ``path`` (default :func:`cache_file`) to the
    cache; returns how many.

    A missing or unreadable file, or one saved on another machine or torch,
    adds none.
    """
    path = path or cache_file()
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get('machine') != machine_key():
            return 0
        loaded = {
            ast.literal_eval(key):
            Choice(entry['path'], {
                n: float(t)
                for n, t in entry.get('times', {}).items()
            })
            for key, entry in data['choices'].items()
        }
    except (OSError, ValueError, KeyError, TypeError, SyntaxError,
            AttributeError) as err:
        logger.debug('autotune: no choices loaded from %s: %s', path, err)
        return 0
    with _lock:
        _cache.update(loaded)
    return len(loaded)


def reset() -> None:
    """Back to ``MMDYN_AUTOTUNE`` deciding (no :func:`enable`/ :func:`disable`
    override), persistence off, every choice forgotten."""
    global _override, _persist
    _override, _persist = None, False
    clear()
