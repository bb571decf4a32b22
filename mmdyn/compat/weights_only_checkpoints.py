# Copyright (c) mmdyn contributors. All rights reserved.
"""Weights-only loading of mmengine checkpoints.

torch 2.6 made ``torch.load`` default to ``weights_only=True``, and mmdyn's
loader always loads that way. mmengine's checkpoints hold more than
tensors: the ``message_hub`` state (``HistoryBuffer`` objects holding numpy
arrays, numpy scalars and dtypes) and, inside ``HistoryBuffer``, references
to its statistics methods pickled as ``getattr(HistoryBuffer, 'mean')``.
Without the fix ``resume``, ``load_from`` and the inferencers fail with
``UnpicklingError: Weights only load failed ... Unsupported global: GLOBAL
mmengine.logging.history_buffer.HistoryBuffer``.

Rather than turning ``weights_only`` off (which would run arbitrary pickled
code), :func:`apply` allow-lists the few globals these checkpoints need with
torch's public :func:`torch.serialization.add_safe_globals`.
``builtins.getattr`` is NOT allow-listed as such: its name is mapped to
:func:`restricted_getattr`, which only looks up HistoryBuffer's statistics
methods. Checkpoints written under numpy 1.x name numpy's internals
``numpy.core.*``; those names are mapped too. :func:`revert` removes exactly
what :func:`apply` added.

mmdyn's own loader (:func:`mmdyn.engine.checkpoint.load_checkpoint_file`)
does not depend on the fix: it allows the same globals for the duration of
each load (:func:`allowed_globals`).
"""
import contextlib
import io
import pickle

import numpy as np
import torch

PACKAGE = 'mmengine'
VERSIONS = '>=0.10.0,<0.11'
SUMMARY = ('mmengine checkpoints (HistoryBuffer, numpy scalars and dtypes) '
           'fail a weights-only torch.load (the default since torch 2.6): '
           'resume, load_from and the inferencers raise UnpicklingError')
UPSTREAM = ('open-mmlab/mmengine#1655 (issue), open-mmlab/mmengine#1650 '
            '(pull request, open)')

# The HistoryBuffer attributes a checkpoint may legitimately reference
# (``HistoryBuffer._set_default_statistics`` registers these).
HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def restricted_getattr(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling a checkpoint.

    Only ``getattr(HistoryBuffer, <statistics method>)`` is allowed: that is
    the one use mmengine's checkpoints make of it. Anything else is refused,
    so allow-listing this does not reopen ``weights_only``'s guarantees.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'weights_only load refused getattr({obj!r}, {name!r}): mmdyn only '
        'allows HistoryBuffer statistics methods')


def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray


def checkpoint_safe_globals():
    """The globals an mmengine checkpoint needs for a weights-only load.

    Returns:
        list: entries for :func:`torch.serialization.add_safe_globals`
        (objects, or ``(object, 'pickled.name')`` pairs where the name a
        checkpoint uses differs from the object's own).
    """
    from mmengine.logging import HistoryBuffer
    multiarray = _numpy_multiarray()
    safe = [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
        (restricted_getattr, 'builtins.getattr'),
        # numpy 1.x wrote these names; numpy 2 keeps them importable only
        # through a deprecation shim, so map them to the new objects.
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
    ]
    # A dtype pickles as ``numpy.dtype`` plus arguments, but its class (e.g.
    # ``numpy.dtypes.Float64DType``) appears when a dtype type is stored.
    dtypes = getattr(np, 'dtypes', None)
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            safe.append(obj)
    return safe


def _add(entries):
    """Add the ``entries`` torch does not allow yet; return them."""
    present = torch.serialization.get_safe_globals()
    added = [g for g in entries if g not in present]
    torch.serialization.add_safe_globals(added)
    return added


def _remove(entries):
    kept = [
        g for g in torch.serialization.get_safe_globals() if g not in entries
    ]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(kept)


@contextlib.contextmanager
def allowed_globals(extra=()):
    """Allow :func:`checkpoint_safe_globals` (and ``extra``) for the weights-
    only loads inside the block.

    Unlike ``torch.serialization.safe_globals``, whose exit removes every
    entry it was given, only the entries that were not allowed before are
    removed again: a process-wide allow-list (e.g. this fix, applied) is
    left intact.
    """
    added = _add(checkpoint_safe_globals() + list(extra))
    try:
        yield
    finally:
        _remove(added)


def _history_buffer_payload():
    from mmengine.logging import HistoryBuffer
    buffer = io.BytesIO()
    torch.save({'message_hub': HistoryBuffer([1.0], [1])}, buffer)
    buffer.seek(0)
    return buffer


def is_needed():
    """Whether a weights-only load of a HistoryBuffer fails here."""
    try:
        torch.load(_history_buffer_payload(), weights_only=True)
    except pickle.UnpicklingError:
        return True
    return False


_APPLIED = []


def apply():
    """Allow-list :func:`checkpoint_safe_globals` process-wide."""
    _APPLIED.extend(_add(checkpoint_safe_globals()))


def revert():
    """Remove what :func:`apply` added."""
    _remove(list(_APPLIED))
    _APPLIED.clear()
