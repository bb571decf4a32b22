# Copyright (c) mmdyn contributors. All rights reserved.
"""One checkpoint loader, with the checks, for every load path.

:func:`load_checkpoint_file` reads a local checkpoint and refuses, naming
the file, what cannot be trusted:

* **Empty, truncated, not a checkpoint**: :class:`CheckpointLoadError`
  instead of torch's bare ``PytorchStreamReader failed reading zip
  archive``.
* **Damaged** (on disk or in transfer): torch's format is a zip archive
  whose records carry a CRC-32 of their bytes, which ``torch.load`` does not
  check (flipped bytes inside a tensor load without complaint). Every record
  is read and checked against its CRC-32 first; a mismatch is an error.
* **Edited after saving**: records intact, but the content no longer
  matches the SHA-256 that mmdyn recorded when it saved the file
  (:mod:`mmdyn.engine.checkpoint_io`): someone loaded, changed and re-saved
  it. That is a :class:`CheckpointEditedWarning` saying so, and the file
  loads as it is now.
* **Hash removed**: a file whose ``meta`` says it was written by mmdyn but
  has no content hash (e.g. the key renamed) is an error.
* Objects a weights-only unpickler refuses.

Where the loader is used: it is registered with mmengine's public
``CheckpointLoader.register_scheme`` under its own prefix :data:`SCHEME`
(``'mmdyn://'``), so ``load_from='mmdyn:///path/epoch_1.pth'``,
``init_cfg=dict(type='Pretrained', checkpoint='mmdyn://...')``, ``pretrained=``
/ ``weights=`` of the inferencers and mmengine's ``load_checkpoint`` all
reach it; mmengine's own loader for plain paths is left as it is.
``tools/train.py``, ``tools/test.py`` (``--resume`` and ``load_from``, via
:func:`checked_path`), ``vis_dynamic`` and the converters use it directly.

A checkpoint must also *fit* the model: :func:`check_fits` refuses tensors
of other shapes and a checkpoint that leaves more than half of one dynamic
layer family's tensors (ODConv, DyConv/CondConv, KernelWarehouse, DDF)
without a value (e.g. KernelWarehouse weights for an ODConv config), unless
``allow_partial_load``: ``True`` loads any such checkpoint with a warning;
:data:`STATIC_WEIGHTS` (``'static_weights'``, for layers plugged into a
stock backbone with stock ImageNet weights) only a checkpoint that holds
nothing but a static convolution's ``weight``/``bias`` where the model has
dynamic layers, and still refuses one of another layer type. It runs

* for ``load_from`` and ``resume`` in :class:`CheckpointShapeCheckHook`'s
  ``after_load_checkpoint``, before any tensor is copied;
* for ``init_cfg=dict(type='Pretrained')`` in the same hook's
  ``before_train`` (:func:`check_pretrained_weights`: mmengine's
  ``PretrainedInit`` gives no hook, so the check re-reads the pretrained
  file once weights are initialised and raises before the first
  iteration);
* for a model loaded outside a runner (inferencers, ``vis_dynamic``) in
  :func:`load_model_weights`, which replaces mmengine's ``load_checkpoint``
  there.

:func:`find_resume_checkpoint` resolves ``--resume`` without a path and
says what is wrong with an empty or dangling ``last_checkpoint``.
"""
import os
import os.path as osp
import re
import warnings
import zipfile
import zlib

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseModule, is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import load_state_dict
from mmengine.runner.checkpoint import CheckpointLoader

from mmdyn.compat.weights_only_checkpoints import allowed_globals
from mmdyn.ops.families import FAMILIES
from .checkpoint_io import HASH_KEY, WRITER, WRITER_KEY, verify_content_hash

__all__ = [
    'SCHEME', 'CheckpointLoadError', 'CheckpointEditedWarning', 'checked_path',
    'load_checkpoint_file', 'find_damaged_record', 'check_integrity',
    'find_shape_mismatches', 'find_unloaded_dynamic_layers', 'check_fits',
    'load_model_weights', 'check_pretrained_weights',
    'CheckpointShapeCheckHook', 'find_resume_checkpoint', 'STATIC_WEIGHTS',
    'find_foreign_dynamic_keys'
]

SCHEME = 'mmdyn://'
# Above this fraction of a family's tensors missing, a load is refused.
MAX_UNLOADED_FRACTION = 0.5
# allow_partial_load value: dynamic layers may start from their own
# initialisation where the checkpoint is of a static network.
STATIC_WEIGHTS = 'static_weights'
# What a static convolution holds; where the model has a dynamic layer, a
# checkpoint of a static network has these keys and no others.
STATIC_CONV_KEYS = ('weight', 'bias')
_CHUNK = 1 << 24


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


class CheckpointEditedWarning(UserWarning):
    """A checkpoint's content changed after mmdyn saved it (its file is
    intact)."""


def checked_path(path):
    """``path`` in the form that mmengine loads with
    :func:`load_checkpoint_file` (``'mmdyn://' + path``).

    Args:
        path (str | None): a local path (or already in that form); remote
            URIs (``s3://``, ``https://``, ...) and None are returned as
            they are.
    """
    if not isinstance(path, str) or path.startswith(SCHEME):
        return path
    if '://' in path and not path.startswith('file://'):
        return path
    return SCHEME + path[len('file://'):] if path.startswith(
        'file://') else SCHEME + path


def _local_path(filename):
    for prefix in (SCHEME, 'file://'):
        if filename.startswith(prefix):
            filename = filename[len(prefix):]
    return osp.expanduser(filename)


def find_damaged_record(filename):
    """Check every record of a zip checkpoint against its CRC-32.

    Args:
        filename (str): a local checkpoint file.

    Returns:
        tuple[str | None, bool]: the first record whose bytes fail their
        CRC-32 (None if all pass), and whether the file has zip records at
        all (False for torch's legacy format, which has none).

    Raises:
        zipfile.BadZipFile: the zip directory itself is unreadable.
    """
    if not zipfile.is_zipfile(filename):
        return None, False
    with zipfile.ZipFile(filename) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size > 0:
                continue  # written without a CRC (torch's crc32 option off)
            try:
                with archive.open(info) as record:
                    while record.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError):
                return info.filename, True
    return None, True


def check_integrity(checkpoint, filename, records_intact):
    """Tell an intact, an edited and a damaged checkpoint apart.

    Args:
        checkpoint (dict): the loaded checkpoint.
        filename (str): its file, named in messages.
        records_intact (bool): whether the file's zip records passed their
            CRC-32 check (False for a file without records).

    Raises:
        CheckpointLoadError: the file says it was written by mmdyn but has
            no content hash, or (without zip records to tell) its content
            differs from the recorded hash.

    Warns:
        CheckpointEditedWarning: records intact, content changed.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return
    if HASH_KEY not in meta:
        if meta.get(WRITER_KEY) == WRITER:
            raise CheckpointLoadError(
                f"checkpoint {filename} says it was saved by mmdyn "
                f"(meta['{WRITER_KEY}']) but records no content hash "
                f"(meta['{HASH_KEY}'] was removed or renamed), so its "
                'content cannot be verified; if you trust it, re-save it '
                'with mmdyn.engine.checkpoint_io.save_checkpoint')
        return
    try:
        verify_content_hash(checkpoint, filename)
    except ValueError as err:
        if not records_intact:
            raise CheckpointLoadError(
                f'checkpoint {filename} is corrupt: {err} (damaged on disk '
                'or in transfer, or edited: the file has no zip records to '
                'tell which); use another copy or an earlier checkpoint'
            ) from None
        message = (
            f'checkpoint {filename} was edited after it was saved: its zip '
            'records are intact (not damaged) but its content differs from '
            'the hash recorded when mmdyn saved it; loading it as it is now')
        warnings.warn(message, CheckpointEditedWarning, stacklevel=3)
        print_log(message, logger='current', level=30)


def load_checkpoint_file(filename, map_location=None):
    """Load a local checkpoint with the checks of this module.

    Args:
        filename (str): path of the checkpoint (``mmdyn://`` and ``file://``
            prefixes are dropped).
        map_location (str | torch.device | callable, optional): as for
            :func:`torch.load`. Defaults to None.

    Returns:
        dict: the checkpoint.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        CheckpointLoadError: the file is empty, truncated, damaged, holds
            objects a weights-only load refuses, or has lost its content
            hash. The message names the file.
    """
    filename = _local_path(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} can not be found.')
    if osp.getsize(filename) == 0:
        raise CheckpointLoadError(f'checkpoint {filename} is empty (0 bytes)')
    try:
        damaged, has_records = find_damaged_record(filename)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise CheckpointLoadError(
            f'checkpoint {filename} is corrupt or truncated: its zip '
            f'directory cannot be read ({err})') from err
    if damaged is not None:
        raise CheckpointLoadError(
            f'checkpoint {filename} is damaged (on disk or in transfer): its '
            f'record {damaged} fails the CRC-32 check of the file\'s zip '
            'container; use another copy or an earlier checkpoint')
    try:
        with allowed_globals():
            checkpoint = torch.load(
                filename, map_location=map_location, weights_only=True)
    except torch.serialization.pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f'checkpoint {filename} holds objects that a weights-only load '
            f'refuses (or is corrupt): {err}') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as err:
        raise CheckpointLoadError(
            f'checkpoint {filename} is corrupt or truncated '
            f'({type(err).__name__}: {str(err).splitlines()[0]})') from err
    check_integrity(checkpoint, filename, records_intact=has_records)
    return checkpoint


CheckpointLoader.register_scheme(prefixes=SCHEME, loader=load_checkpoint_file)


def find_shape_mismatches(model, state_dict, ignore_keys=()):
    """List the checkpoint tensors whose shapes differ from the model's.

    Args:
        model (torch.nn.Module): the model to load into.
        state_dict (dict): checkpoint tensors by name.
        ignore_keys (Sequence[str]): regular expressions; keys matching any
            are not reported. Defaults to ().

    Returns:
        list[tuple[str, tuple, tuple]]: ``(key, checkpoint shape, model
        shape)`` in model order.
    """
    patterns = [re.compile(p) for p in ignore_keys]
    model_state = model.state_dict()
    mismatches = []
    for key, value in model_state.items():
        if key not in state_dict or any(p.search(key) for p in patterns):
            continue
        saved = state_dict[key]
        if not hasattr(saved, 'shape') or not hasattr(value, 'shape'):
            continue
        if tuple(saved.shape) != tuple(value.shape):
            mismatches.append((key, tuple(saved.shape), tuple(value.shape)))
    return mismatches


def _dynamic_families():
    """(name, classes holding its tensors) of every layer family of
    :data:`mmdyn.ops.families.FAMILIES`."""
    return tuple((family.name, family.tensor_owners) for family in FAMILIES)


def _dynamic_layer_prefixes(model):
    """``(key prefix, family)`` of every dynamic layer of ``model``, longest
    prefix first (a key belongs to its innermost dynamic layer)."""
    prefixes = []
    for name, module in model.named_modules():
        for family, types in _dynamic_families():
            if isinstance(module, types):
                prefixes.append((name + '.' if name else '', family))
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    return prefixes


def find_foreign_dynamic_keys(model, state_dict):
    """Checkpoint keys inside the model's dynamic layers that the model does
    not have, other than a static convolution's ``weight``/``bias``: tensors of
    another layer type (e.g. KernelWarehouse attention where the model has an
    ODConv layer).

    Returns:
        list[str]: the keys, in checkpoint order.
    """
    prefixes = _dynamic_layer_prefixes(model)
    model_keys = set(model.state_dict())
    foreign = []
    for key in state_dict:
        if key in model_keys:
            continue
        for prefix, _ in prefixes:
            if key.startswith(prefix):
                if key[len(prefix):] not in STATIC_CONV_KEYS:
                    foreign.append(key)
                break
    return foreign


def find_unloaded_dynamic_layers(model,
                                 state_dict,
                                 max_fraction=MAX_UNLOADED_FRACTION):
    """Dynamic layer families that a checkpoint leaves mostly unset.

    Args:
        model (torch.nn.Module): the model to load into.
        state_dict (dict): checkpoint tensors by name.
        max_fraction (float): a family is reported when more than this
            fraction of its tensors (parameters and persistent buffers of
            its layers) has no key in ``state_dict``. Defaults to 0.5.

    Returns:
        list[tuple[str, list[str], int]]: ``(family, missing keys in model
        order, number of the family's tensors)``.
    """
    prefixes = _dynamic_layer_prefixes(model)
    if not prefixes:
        return []
    owned = {}
    for key in model.state_dict():
        for prefix, family in prefixes:
            if key.startswith(prefix):
                owned.setdefault(family, []).append(key)
                break
    report = []
    for family, keys in owned.items():
        missing = [k for k in keys if k not in state_dict]
        if len(missing) > max_fraction * len(keys):
            report.append((family, missing, len(keys)))
    return report


def _listed(keys, max_listed, sep):
    more = len(keys) - max_listed
    return sep.join(
        keys[:max_listed]) + (f'{sep}... and {more} more' if more > 0 else '')


def check_fits(model,
               state_dict,
               ignore_keys=(),
               allow_partial_load=False,
               max_listed=5,
               source='the checkpoint'):
    """Refuse a state dict that does not fit ``model``.

    Args:
        model (torch.nn.Module): the model to load into.
        state_dict (dict): tensors by model key (wrapper prefixes removed).
        ignore_keys (Sequence[str]): patterns of keys whose shape mismatch
            is expected. Defaults to ().
        allow_partial_load (bool | str): warn instead of raising when a
            dynamic layer family stays mostly without a value: ``True``
            always; :data:`STATIC_WEIGHTS` only when the state dict holds
            no tensors of another layer type inside the dynamic layers
            (:func:`find_foreign_dynamic_keys`). Defaults to False.
        max_listed (int): how many keys a message lists. Defaults to 5.
        source (str): what the state dict is, for messages.

    Raises:
        CheckpointLoadError: shapes differ, or (without
            ``allow_partial_load``) a dynamic layer family would stay mostly
            at its random initialisation.
    """
    mismatches = find_shape_mismatches(model, state_dict, ignore_keys)
    if mismatches:
        lines = [
            f'  {key}: checkpoint {list(saved)} vs model {list(mine)}'
            for key, saved, mine in mismatches
        ]
        raise CheckpointLoadError(
            f'{len(mismatches)} tensor(s) of {source} do not fit the model '
            '(was it built with other layer settings, e.g. kernel_num or '
            f'warehouse sizes?):\n{_listed(lines, max_listed, chr(10))}\n'
            'To fine-tune with deliberately different layers, set '
            'CheckpointShapeCheckHook(ignore_keys=[...]) in custom_hooks.')
    unloaded = find_unloaded_dynamic_layers(model, state_dict)
    foreign = find_foreign_dynamic_keys(model, state_dict) if (
        unloaded and allow_partial_load == STATIC_WEIGHTS) else []
    for family, missing, total in unloaded:
        message = (
            f'{source} has no value for {len(missing)} of the {total} '
            f'{family} tensors of the model (first: '
            f'{_listed(missing, max_listed, ", ")}): it was saved from '
            'another model or method, and these layers would stay randomly '
            'initialised.')
        if foreign:
            raise CheckpointLoadError(
                message + ' It holds tensors of another layer type there '
                f'(first: {_listed(foreign, max_listed, ", ")}), which '
                f"allow_partial_load='{STATIC_WEIGHTS}' does not accept. "
                'Use the matching config, or set allow_partial_load=True '
                '(--allow-partial-load) to load it anyway.')
        if not allow_partial_load:
            raise CheckpointLoadError(
                message + ' Use the matching config, or set '
                'allow_partial_load=True in the config '
                '(--allow-partial-load) to load it anyway.')
        print_log(
            message + ' Loading anyway (allow_partial_load='
            f'{allow_partial_load!r}).',
            logger='current',
            level=30)


def _state_dict_of(checkpoint):
    state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(
        checkpoint, dict) else checkpoint
    # mmengine strips DDP's 'module.' prefix when loading; so do we.
    return {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}


def load_model_weights(model,
                       filename,
                       allow_partial_load=False,
                       map_location='cpu'):
    """Load a checkpoint file into ``model`` after all the checks.

    Use it instead of mmengine's ``load_checkpoint`` where no runner runs
    (``vis_dynamic``, a model of ``init_detector`` or of an inferencer built
    without weights).

    Args:
        model (torch.nn.Module): the model.
        filename (str): the checkpoint file.
        allow_partial_load (bool): see :func:`check_fits`.
        map_location (str | torch.device): as for :func:`torch.load`.

    Returns:
        dict: the checkpoint.
    """
    checkpoint = load_checkpoint_file(filename, map_location)
    state_dict = _state_dict_of(checkpoint)
    check_fits(
        model,
        state_dict,
        allow_partial_load=allow_partial_load,
        source=f'checkpoint {_local_path(filename)}')
    load_state_dict(model, state_dict, strict=False, logger='current')
    return checkpoint


def _pretrained_cfgs(module):
    init_cfg = getattr(module, 'init_cfg', None)
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    for cfg in cfgs:
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and \
                isinstance(cfg.get('checkpoint'), str):
            yield cfg


def check_pretrained_weights(model, allow_partial_load=False):
    """Apply :func:`check_fits` to every ``init_cfg=dict(type='Pretrained')``
    of ``model``'s modules, by re-reading each checkpoint (local files through
    :func:`load_checkpoint_file`, others through mmengine's
    ``CheckpointLoader``).

    A pretrained checkpoint is often partial by design (a backbone for a
    detector), and ``PretrainedInit`` skips tensors of another shape: here
    those count as missing, so the check refuses only a checkpoint that
    leaves more than half of a dynamic layer family without a value (e.g.
    KernelWarehouse weights for ODConv layers, or static ImageNet weights
    for layers plugged into a stock backbone: such a config says
    ``allow_partial_load = True``).

    Args:
        model (torch.nn.Module): a model whose weights were initialised.
        allow_partial_load (bool): see :func:`check_fits`.
    """
    for name, module in model.named_modules():
        if not isinstance(module, BaseModule):
            continue
        for cfg in _pretrained_cfgs(module):
            path = checked_path(cfg['checkpoint'])
            checkpoint = CheckpointLoader.load_checkpoint(
                path, map_location='cpu', logger='silent')
            state_dict = _state_dict_of(checkpoint)
            prefix = cfg.get('prefix')
            if prefix:
                prefix = prefix if prefix.endswith('.') else prefix + '.'
                state_dict = {
                    k[len(prefix):]: v
                    for k, v in state_dict.items() if k.startswith(prefix)
                }
            # mmengine's PretrainedInit skips tensors of another shape (and
            # logs them): here they count as missing, like absent ones.
            mismatched = {
                key
                for key, _, _ in find_shape_mismatches(module, state_dict)
            }
            state_dict = {
                k: v
                for k, v in state_dict.items() if k not in mismatched
            }
            where = f" of {name or 'the model'}" if name else ''
            check_fits(
                module,
                state_dict,
                allow_partial_load=allow_partial_load,
                source=f"init_cfg Pretrained{where} "
                f"({cfg['checkpoint']})")


@HOOKS.register_module()
class CheckpointShapeCheckHook(Hook):
    """Refuse a checkpoint that does not fit the model (:func:`check_fits`).

    Runs in ``after_load_checkpoint`` (``load_from`` and ``resume``),
    before mmengine copies any tensor, and in ``before_train`` for the
    model's ``init_cfg=dict(type='Pretrained')`` weights when no checkpoint
    was loaded over them.

    Args:
        ignore_keys (Sequence[str]): regular expressions of model keys whose
            mismatch is expected (e.g. ``[r'bbox_head\\.fc_cls']`` when
            fine-tuning on other classes). Defaults to ().
        max_listed (int): how many mismatching keys the error lists.
            Defaults to 5.
        allow_partial_load (bool | str): load a checkpoint that leaves
            more than half of a dynamic layer family's tensors without a
            value (e.g. a backbone-only checkpoint for a model with a DDF-Up
            neck), with a warning instead of an error; ``'static_weights'``
            only a checkpoint of a static network (see :func:`check_fits`).
            Defaults to False.
    """

    priority = 'VERY_HIGH'

    def __init__(self, ignore_keys=(), max_listed=5, allow_partial_load=False):
        if isinstance(ignore_keys, str):
            raise ValueError('ignore_keys must be a sequence of patterns, '
                             f'got the string {ignore_keys!r}')
        if int(max_listed) < 1:
            raise ValueError(f'max_listed must be >= 1, got {max_listed}')
        self.ignore_keys = tuple(ignore_keys)
        self.max_listed = int(max_listed)
        self.allow_partial_load = allow_partial_load if \
            allow_partial_load == STATIC_WEIGHTS else bool(allow_partial_load)
        self._loaded_checkpoint = False

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(
            runner.model) else runner.model

    def after_load_checkpoint(self, runner, checkpoint):
        self._loaded_checkpoint = True
        check_fits(
            self._model(runner), _state_dict_of(checkpoint), self.ignore_keys,
            self.allow_partial_load, self.max_listed)

    def before_train(self, runner):
        if not self._loaded_checkpoint:
            check_pretrained_weights(
                self._model(runner), self.allow_partial_load)


def find_resume_checkpoint(work_dir):
    """The checkpoint ``--resume`` without a path continues from: the one named
    in ``WORK_DIR/last_checkpoint``, checked.

    Args:
        work_dir (str): the run's work dir.

    Returns:
        str | None: the checkpoint path, or None without ``last_checkpoint``
        (a fresh run).

    Raises:
        CheckpointLoadError: ``last_checkpoint`` is empty.
        FileNotFoundError: it names a local file that does not exist.
    """
    save_file = osp.join(work_dir, 'last_checkpoint')
    if not osp.exists(save_file):
        return None
    with open(save_file) as f:
        last = f.read().strip()
    candidates = sorted(
        (p for p in (osp.join(work_dir, n) for n in os.listdir(work_dir))
         if p.endswith('.pth') and osp.isfile(p)),
        key=osp.getmtime)
    hint = (f' (the newest checkpoint there is {candidates[-1]})'
            if candidates else '')
    if not last:
        raise CheckpointLoadError(
            f'{save_file} is empty (left by an interrupted save?): resume '
            f'from a file with --resume PATH{hint}, or delete {save_file} '
            'to start from scratch')
    if '://' not in last and not osp.isfile(last):
        raise FileNotFoundError(
            f'{save_file} names {last}, which does not exist: resume from '
            f'a file with --resume PATH{hint}, or delete {save_file} to '
            'start from scratch')
    return last
