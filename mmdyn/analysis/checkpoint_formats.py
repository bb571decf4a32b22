# Copyright (c) mmdyn contributors. All rights reserved.
"""Read the checkpoints that the official training scripts write.

The official codes save in three shapes, all read here without running code
from the file (``torch.load(weights_only=True)``):

* ODConv ``main.py``: ``{'epoch', 'state_dict', 'acc', 'best_acc',
  'optimizer'}``, the model wrapped in DataParallel/DDP (``module.`` keys).
* KernelWarehouse ``main.py`` (the ConvNeXt code base): ``{'model',
  'optimizer', 'epoch', 'scaler', 'args'}`` and ``'model_ema'`` when trained
  with EMA; ``args`` is an ``argparse.Namespace``.
* DDF's timm ``train.py`` (timm's ``CheckpointSaver``): ``{'epoch', 'arch',
  'state_dict', 'optimizer', 'version', 'args'}`` plus ``'state_dict_ema'``,
  ``'amp'``/``'amp_scaler'`` and ``'metric'`` when present.

A plain state dict (``torch.save(model.state_dict())``, e.g. with the DyConv
code of kaijieshi7/Dynamic-convolution-Pytorch) and an mmengine checkpoint
load too. Pickled Python objects other than tensors and containers are
refused unless they are on :data:`SAFE_GLOBALS`, a short list of classes that
only hold data; anything else stops with :class:`CheckpointFormatError`
naming the global.

Before loading, the file's zip records are checked against their CRC-32
(:func:`mmdyn.engine.checkpoint.find_damaged_record`): a damaged download is
refused instead of converted. A checkpoint saved by mmdyn is also checked
against its content hash (:func:`mmdyn.engine.checkpoint.check_integrity`).
"""
import argparse
import contextlib
import os.path as osp
import pathlib
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from mmdyn.engine.checkpoint import (CheckpointLoadError, check_integrity,
                                     find_damaged_record)

# Classes the official scripts pickle beside the weights, harmless to
# rebuild: they hold data and run no code of the file.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]


def _numpy_scalar_globals() -> list:
    """Numpy scalars (e.g. a ``metric`` or ``best_acc`` saved as
    ``np.float64``): the scalar constructor and the dtype classes."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return []
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    # numpy 1.x (which wrote the official checkpoints) pickles the scalar
    # constructor as numpy.core.multiarray.scalar.
    globals_ = [scalar, (scalar, 'numpy.core.multiarray.scalar'), np.dtype]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        globals_ += [
            getattr(dtypes, name)
            for name in ('Float64DType', 'Float32DType', 'Int64DType',
                         'Int32DType', 'BoolDType') if hasattr(dtypes, name)
        ]
    return globals_


SAFE_GLOBALS += _numpy_scalar_globals()

# Where the weights are, by format: (weights key, EMA weights key).
WEIGHT_KEYS = (('state_dict', 'state_dict_ema'), ('model', 'model_ema'),
               ('module', None))
# Prefixes of wrapped models: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class CheckpointFormatError(ValueError):
    """A file that cannot be read as an official checkpoint."""


@dataclass
class OfficialCheckpoint:
    """The weights of an official checkpoint and what the file says of them.

    Attributes:
        state_dict (OrderedDict): Weights, without wrapper prefixes.
        source (str): Format found, e.g. ``"'model' of a training
            checkpoint (epoch 299, args)"``.
        arch (str, optional): Model name the file records (timm's ``arch``,
            or ``args.model``/``args.arch``).
        ema_available (bool): Whether the file also holds EMA weights.
        extra_keys (list[str]): Other top-level entries (optimizer, ...).
    """
    state_dict: 'OrderedDict[str, torch.Tensor]'
    source: str
    arch: Optional[str] = None
    ema_available: bool = False
    extra_keys: List[str] = field(default_factory=list)


@contextlib.contextmanager
def _allowing(safe_globals):
    """Allow ``safe_globals`` for weights-only loads inside the block.

    Unlike ``torch.serialization.safe_globals``, whose exit removes every
    entry it was given, only the entries that were not allowed before are
    removed again: the process-wide allow-list (e.g. what mmengine
    checkpoints need, set on ``import mmdyn.engine``) is left intact.
    """
    added = [
        g for g in safe_globals
        if g not in torch.serialization.get_safe_globals()
    ]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        kept = [
            g for g in torch.serialization.get_safe_globals() if g not in added
        ]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)


def _unknown_globals(path: str, error: Exception) -> List[str]:
    """Globals of ``path`` that are neither torch's nor ours."""
    try:
        with _allowing(SAFE_GLOBALS):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if found:
            return sorted(found)
    except Exception:  # legacy (non-zip) file: read the unpickler's message
        pass
    return re.findall(r'GLOBAL ([\w.]+)', str(error))[:1]


def _first_sentence(error: Exception) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.split('. ')[0]


def load_checkpoint_file(path: str, trust: bool = False):
    """``torch.load`` on CPU, reading only data unless ``trust`` is set.

    Args:
        path (str): Checkpoint file.
        trust (bool): Load with ``weights_only=False`` (runs code the file
            names: only for files you trust). Default: False.

    Raises:
        CheckpointFormatError: the file is missing or unreadable, or pickles
            a global that is not on :data:`SAFE_GLOBALS` (the message names
            it and the two ways on).
    """
    if not osp.isfile(path):
        raise CheckpointFormatError(f'checkpoint {path!r} does not exist')
    records_intact = _check_records(path)
    if trust:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    else:
        ckpt = _load_weights_only(path)
    try:
        check_integrity(ckpt, repr(path), records_intact)
    except CheckpointLoadError as err:
        raise CheckpointFormatError(str(err)) from None
    return ckpt


def _check_records(path: str) -> bool:
    """Refuse a file whose zip records fail their CRC-32; return whether it has
    records (torch's legacy format has none)."""
    try:
        damaged, has_records = find_damaged_record(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointFormatError(
            f'cannot read {path!r} as a PyTorch checkpoint (truncated?): '
            f'{_first_sentence(err)}') from None
    if damaged is not None:
        raise CheckpointFormatError(
            f'{path!r} is damaged (on disk or in transfer): its record '
            f'{damaged} fails the CRC-32 check of the zip container; '
            'download it again')
    return has_records


def _load_weights_only(path: str):
    try:
        with _allowing(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        unknown = _unknown_globals(path, err)
        if not unknown:
            raise CheckpointFormatError(
                f'cannot read {path!r} as a PyTorch checkpoint: '
                f'{_first_sentence(err)}') from None
        raise CheckpointFormatError(
            f'{path!r} pickles the Python global(s) {", ".join(unknown)}, '
            'which a weights-only load does not run; if you trust the file, '
            'pass --trust-checkpoint (it runs code named in the file), or '
            "re-save only its weights: torch.save(ckpt['model' or "
            "'state_dict'], 'weights.pth')") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointFormatError(
            f'cannot read {path!r} as a PyTorch checkpoint (truncated or not '
            f'a torch.save file?): {_first_sentence(err)}') from None


def _strip_wrappers(state: dict) -> 'OrderedDict[str, torch.Tensor]':
    out = OrderedDict()
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _arch_of(ckpt: dict) -> Optional[str]:
    arch = ckpt.get('arch')
    args = ckpt.get('args')
    for name in ('model', 'arch'):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    return arch if isinstance(arch, str) else None


def _describe(ckpt: dict, weights_key: str) -> str:
    notes = []
    if isinstance(ckpt.get('epoch'), int):
        notes.append(f'epoch {ckpt["epoch"]}')
    if 'args' in ckpt:
        notes.append('args')
    if 'optimizer' in ckpt:
        notes.append('optimizer')
    kind = 'training checkpoint' if notes else 'checkpoint'
    return f'{weights_key!r} of a {kind}' + (f' ({", ".join(notes)})'
                                             if notes else '')


def _check_tensors(state: dict, where: str) -> None:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(
                f'{where} holds {key!r} = {type(value).__name__}, not a '
                'tensor: this is not a state dict')


def unwrap_checkpoint(ckpt,
                      weights: str = 'auto',
                      where: str = 'the checkpoint') -> OfficialCheckpoint:
    """Find the weights in a loaded checkpoint object.

    Args:
        ckpt: What ``torch.load`` returned.
        weights (str): ``'auto'`` (the model's weights, as the official
            evaluation scripts load them by default), ``'model'`` (the same,
            required) or ``'ema'`` (the EMA weights; an error if there are
            none). Default: ``'auto'``.
        where (str): Name of the file, for messages.

    Returns:
        OfficialCheckpoint
    """
    if weights not in ('auto', 'model', 'ema'):
        raise ValueError(
            f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    if not isinstance(ckpt, dict) or not ckpt:
        raise CheckpointFormatError(
            f'{where} holds a {type(ckpt).__name__}, not a state dict or a '
            'dict of checkpoint entries')
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if weights == 'ema':
            raise CheckpointFormatError(
                f'{where} is a plain state dict: it has no EMA weights')
        return OfficialCheckpoint(_strip_wrappers(ckpt), 'a plain state dict')
    for model_key, ema_key in WEIGHT_KEYS:
        if not isinstance(ckpt.get(model_key), dict):
            continue
        has_ema = ema_key is not None and isinstance(ckpt.get(ema_key), dict)
        key = model_key
        if weights == 'ema':
            if not has_ema:
                raise CheckpointFormatError(
                    f'{where} has no EMA weights (no {ema_key or "EMA"!r} '
                    f'entry beside {model_key!r}); drop --weights ema')
            key = ema_key
        _check_tensors(ckpt[key], f'{where}[{key!r}]')
        extra = [k for k in ckpt if k not in (model_key, ema_key)]
        return OfficialCheckpoint(
            _strip_wrappers(ckpt[key]), _describe(ckpt, key), _arch_of(ckpt),
            has_ema, extra)
    raise CheckpointFormatError(
        f'{where} has no weights entry: expected one of '
        f'{[k for k, _ in WEIGHT_KEYS]} or a plain state dict, found '
        f'{sorted(map(str, ckpt))[:8]}')


def read_official_checkpoint(path: str,
                             weights: str = 'auto',
                             trust: bool = False) -> OfficialCheckpoint:
    """:func:`load_checkpoint_file` then :func:`unwrap_checkpoint`."""
    return unwrap_checkpoint(
        load_checkpoint_file(path, trust), weights, where=repr(path))
