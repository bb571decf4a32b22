"""Checkpoint loading that fails loudly.

Two gaps of mmengine 0.10's loader path, closed on ``import mmdyn.engine``:

* A corrupt or truncated file raised torch's bare ``PytorchStreamReader
  failed reading zip archive`` (no file name). :func:`load_from_local`
  replaces mmengine's local-file loader (``CheckpointLoader`` scheme ``''``,
  used by ``load_from``, ``resume`` and ``init_cfg=Pretrained``) and raises
  :class:`CheckpointLoadError` naming the file. It loads with
  ``weights_only=True`` (see :mod:`mmdyn.engine.compat` for the allow-list).
* A checkpoint whose tensors do not fit the model (e.g. a dynamic conv built
  with another ``kernel_num`` or warehouse size) was only *warned* about and
  the rest loaded, leaving the model half-initialised.
  :class:`CheckpointShapeCheckHook` (added by ``tools/train.py`` and
  ``tools/test.py``) runs at ``after_load_checkpoint``, before any tensor is
  copied, and raises listing the first mismatching keys. Deliberate head
  swaps when fine-tuning are allowed with ``ignore_keys`` patterns.
* A checkpoint of another method (e.g. KernelWarehouse weights given to an
  ODConv config) loaded its few matching keys and left the dynamic convs
  randomly initialised, with a warning in the log only. The same hook
  raises when a checkpoint leaves more than half of one dynamic layer
  family's tensors (ODConv, DyConv/CondConv, KernelWarehouse, DDF) without
  a value, naming the first missing keys. ``allow_partial_load=True`` (the
  config key of that name, or ``--allow-partial-load`` of the tools)
  allows it, with a warning.
* A checkpoint saved by mmdyn records a content hash
  (:mod:`mmdyn.engine.checkpoint_io`); :func:`load_from_local` refuses a
  file whose content no longer matches it.
* An empty ``last_checkpoint`` (``resume=True`` without a file) made
  mmengine look for a checkpoint named ``''``. :func:`find_resume_checkpoint`
  names the file and what to do.
"""
import os
import os.path as osp
import re
import zipfile

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

from .checkpoint_io import verify_content_hash

__all__ = [
    'CheckpointLoadError', 'load_from_local', 'find_shape_mismatches',
    'find_unloaded_dynamic_layers', 'CheckpointShapeCheckHook',
    'find_resume_checkpoint', 'patch_resume_lookup'
]

# Above this fraction of a family's tensors missing, a load is refused.
MAX_UNLOADED_FRACTION = 0.5


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


def load_from_local(filename, map_location=None):
    """Load a local checkpoint with a weights-only unpickler.

    Args:
        filename (str): path of the checkpoint.
        map_location (str | torch.device | callable, optional): as for
            :func:`torch.load`. Defaults to None.

    Returns:
        dict: the checkpoint.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        CheckpointLoadError: the file is empty, truncated, corrupt or holds
            objects a weights-only load refuses. The message names the file.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} can not be found.')
    if osp.getsize(filename) == 0:
        raise CheckpointLoadError(f'checkpoint {filename} is empty (0 bytes)')
    try:
        checkpoint = torch.load(filename, map_location=map_location,
                                weights_only=True)
    except torch.serialization.pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f'checkpoint {filename} holds objects that a weights-only load '
            f'refuses (or is corrupt): {err}') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as err:
        raise CheckpointLoadError(
            f'checkpoint {filename} is corrupt or truncated '
            f'({type(err).__name__}: {str(err).splitlines()[0]})') from err
    try:
        verify_content_hash(checkpoint, filename)
    except ValueError as err:
        raise CheckpointLoadError(str(err)) from None
    return checkpoint


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
    from mmdyn.ops import (CondConv2d, DDFConv2d, DDFUpsample, DyConv2d,
                           KWConv2d, KWLinear, ODConv2d, WarehouseManager)
    return (('ODConv', (ODConv2d, )), ('DyConv/CondConv',
                                       (DyConv2d, CondConv2d)),
            ('KernelWarehouse', (KWConv2d, KWLinear, WarehouseManager)),
            ('DDF', (DDFConv2d, DDFUpsample)))


def find_unloaded_dynamic_layers(model, state_dict,
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
    prefixes = []
    for name, module in model.named_modules():
        for family, types in _dynamic_families():
            if isinstance(module, types):
                prefixes.append((name + '.' if name else '', family))
    if not prefixes:
        return []
    # Longest prefix first: a key belongs to its innermost dynamic layer.
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
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


@HOOKS.register_module()
class CheckpointShapeCheckHook(Hook):
    """Refuse a checkpoint whose tensor shapes do not fit the model.

    Runs in ``after_load_checkpoint``, i.e. for ``load_from`` and for
    ``resume``, before mmengine copies any tensor.

    Args:
        ignore_keys (Sequence[str]): regular expressions of model keys whose
            mismatch is expected (e.g. ``[r'bbox_head\\.fc_cls']`` when
            fine-tuning on other classes). Defaults to ().
        max_listed (int): how many mismatching keys the error lists.
            Defaults to 5.
        allow_partial_load (bool): load a checkpoint that leaves more than
            half of a dynamic layer family's tensors without a value (e.g.
            a backbone-only checkpoint for a model with a DDF-Up neck),
            with a warning instead of an error. Defaults to False.
    """

    priority = 'VERY_HIGH'

    def __init__(self, ignore_keys=(), max_listed=5,
                 allow_partial_load=False):
        if isinstance(ignore_keys, str):
            raise ValueError('ignore_keys must be a sequence of patterns, '
                             f'got the string {ignore_keys!r}')
        if int(max_listed) < 1:
            raise ValueError(f'max_listed must be >= 1, got {max_listed}')
        self.ignore_keys = tuple(ignore_keys)
        self.max_listed = int(max_listed)
        self.allow_partial_load = bool(allow_partial_load)

    def after_load_checkpoint(self, runner, checkpoint):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        state_dict = checkpoint.get('state_dict', checkpoint)
        # mmengine strips DDP's 'module.' prefix when loading; so do we.
        state_dict = {re.sub(r'^module\.', '', k): v
                      for k, v in state_dict.items()}
        mismatches = find_shape_mismatches(model, state_dict,
                                           self.ignore_keys)
        if mismatches:
            listed = '\n'.join(
                f'  {key}: checkpoint {list(saved)} vs model {list(mine)}'
                for key, saved, mine in mismatches[:self.max_listed])
            more = len(mismatches) - self.max_listed
            tail = f'\n  ... and {more} more' if more > 0 else ''
            raise CheckpointLoadError(
                f'{len(mismatches)} checkpoint tensor(s) do not fit the '
                f'model (was it built with other layer settings, e.g. '
                f'kernel_num or warehouse sizes?):\n{listed}{tail}\n'
                'To fine-tune with deliberately different layers, set '
                'CheckpointShapeCheckHook(ignore_keys=[...]) in '
                'custom_hooks.')
        self._check_unloaded(runner, model, state_dict)

    def _check_unloaded(self, runner, model, state_dict):
        for family, missing, total in find_unloaded_dynamic_layers(
                model, state_dict):
            listed = ', '.join(missing[:self.max_listed])
            more = len(missing) - self.max_listed
            tail = f', ... and {more} more' if more > 0 else ''
            message = (
                f'the checkpoint has no value for {len(missing)} of the '
                f'{total} {family} tensors of the model (first: '
                f'{listed}{tail}): it was saved from another model or '
                'method, and these layers would stay randomly initialised.')
            if self.allow_partial_load:
                runner.logger.warning(message + ' Loading anyway '
                                      '(allow_partial_load=True).')
            else:
                raise CheckpointLoadError(
                    message + ' Use the matching config, or set '
                    'allow_partial_load=True in the config '
                    '(--allow-partial-load) to load it anyway.')


def find_resume_checkpoint(work_dir):
    """The checkpoint ``resume=True`` continues from: the path written in
    ``WORK_DIR/last_checkpoint`` (mmengine's ``find_latest_checkpoint``),
    checked.

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
        return _ORIGINAL['find_latest_checkpoint'](work_dir)
    with open(save_file) as f:
        last = f.read().strip()
    candidates = sorted(
        (p for p in (osp.join(work_dir, n) for n in os.listdir(work_dir))
         if p.endswith('.pth') and osp.isfile(p)), key=osp.getmtime)
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


_ORIGINAL = {}


def patch_resume_lookup():
    """Make mmengine's ``Runner`` use :func:`find_resume_checkpoint`."""
    import mmengine.runner
    from mmengine.runner import _flexible_runner, checkpoint, runner
    _ORIGINAL.setdefault('find_latest_checkpoint',
                         checkpoint.find_latest_checkpoint)
    for module in (runner, _flexible_runner, mmengine.runner):
        module.find_latest_checkpoint = find_resume_checkpoint


def register_local_loader():
    """Make :func:`load_from_local` mmengine's loader for local paths."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local,
                                     force=True)
