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
"""
import os.path as osp
import re
import zipfile

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'CheckpointLoadError', 'load_from_local', 'find_shape_mismatches',
    'CheckpointShapeCheckHook'
]


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
        return torch.load(filename, map_location=map_location,
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
    """

    priority = 'VERY_HIGH'

    def __init__(self, ignore_keys=(), max_listed=5):
        if isinstance(ignore_keys, str):
            raise ValueError('ignore_keys must be a sequence of patterns, '
                             f'got the string {ignore_keys!r}')
        if int(max_listed) < 1:
            raise ValueError(f'max_listed must be >= 1, got {max_listed}')
        self.ignore_keys = tuple(ignore_keys)
        self.max_listed = int(max_listed)

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


def register_local_loader():
    """Make :func:`load_from_local` mmengine's loader for local paths."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local,
                                     force=True)
