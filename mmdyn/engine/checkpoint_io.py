"""Checkpoint files that are complete or absent, and that prove it on load.

Two gaps of mmengine 0.10's ``save_checkpoint``, closed on
``import mmdyn.engine`` (:func:`patch_checkpoint_saving`):

* **Writes were not atomic.** mmengine serialised into memory, then wrote
  the bytes straight to ``epoch_N.pth``: a process killed mid-write left a
  truncated file under the final name. :func:`save_checkpoint` writes a
  temporary file in the same folder, flushes and fsyncs it, then renames it
  over the final name (an atomic step on POSIX and Windows), so the final
  name only ever holds a complete checkpoint. The folder is fsynced too, so
  the rename survives a power cut.
* **Nothing proved a file intact.** Flipped bytes inside a tensor's storage
  loaded without complaint. :func:`save_checkpoint` records a SHA-256 of the
  checkpoint's content (every tensor's bytes, dtype and shape, and every
  other value, under its key path) in ``meta['content_sha256']``;
  :func:`verify_content_hash` recomputes it, and mmdyn's checkpoint loader
  (:func:`mmdyn.engine.checkpoint.load_from_local`) refuses a file whose
  content no longer matches, naming it. Checkpoints without the field (from
  other tools) load as before.

Remote backends (``s3://``, ``petrel://``, ...) keep mmengine's own writer;
they get the content hash all the same.
"""
import hashlib
import io
import os
import os.path as osp
import sys
import tempfile

import numpy as np
import torch

__all__ = [
    'HASH_KEY', 'atomic_write_bytes', 'atomic_write_text', 'content_hash',
    'save_checkpoint', 'verify_content_hash', 'patch_checkpoint_saving'
]

HASH_KEY = 'content_sha256'

# Modules that bound mmengine's ``save_checkpoint`` by name at import time.
_SAVE_CHECKPOINT_USERS = ('mmengine.runner.checkpoint', 'mmengine.runner',
                          'mmengine.runner.runner',
                          'mmengine._strategy.deepspeed',
                          'mmengine._strategy.colossalai')
_ORIGINAL = {}


def _file_mode():
    """Permissions a plain ``open(path, 'wb')`` would give (0o666 less the
    umask): ``mkstemp`` creates files readable by their owner only."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _fsync_dir(folder):
    """Make a rename in ``folder`` durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data, path):
    """Write ``data`` to ``path`` so that ``path`` is never partial.

    The bytes go to a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path``. On any error the temporary file is
    removed and ``path`` keeps its previous content (or stays absent).

    Args:
        data (bytes | bytearray | memoryview): the file content.
        path (str): destination file.
    """
    path = osp.abspath(osp.expanduser(path))
    folder = osp.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp', dir=folder)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(text, path):
    """:func:`atomic_write_bytes` for a UTF-8 string."""
    atomic_write_bytes(text.encode('utf-8'), path)


def _tensor_bytes(tensor):
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    tensor = tensor.cpu().contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy())


def _feed(digest, obj):
    """Add ``obj`` to ``digest`` in a form that survives save + load."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == 'meta':
            raise ValueError('cannot hash a checkpoint with meta tensors')
        digest.update(f'T{obj.dtype}{tuple(obj.shape)}'.encode())
        digest.update(_tensor_bytes(obj))
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        digest.update(f'A{obj.dtype.str}{obj.shape}'.encode())
        digest.update(memoryview(np.ascontiguousarray(obj)).cast('B'))
    elif isinstance(obj, dict):
        digest.update(f'D{len(obj)}'.encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple, np.ndarray)):
        digest.update(f'{type(obj).__name__[0]}{len(obj)}'.encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, str):
        data = obj.encode('utf-8', 'surrogatepass')
        digest.update(f'S{len(data)}:'.encode() + data)
    elif isinstance(obj, (bytes, bytearray)):
        digest.update(f'B{len(obj)}:'.encode() + bytes(obj))
    elif obj is None or isinstance(obj, (bool, int, float, complex,
                                         np.generic, torch.dtype,
                                         torch.device, torch.Size)):
        digest.update(f'P{obj!r};'.encode())
    elif callable(obj):
        # Functions and classes (e.g. HistoryBuffer's statistics methods).
        name = getattr(obj, '__qualname__', type(obj).__qualname__)
        digest.update(f'F{getattr(obj, "__module__", "")}.{name};'.encode())
    elif hasattr(obj, '__dict__'):
        digest.update(f'O{type(obj).__qualname__}'.encode())
        _feed(digest, vars(obj))
    else:
        digest.update(f'X{type(obj).__qualname__};'.encode())


def content_hash(checkpoint):
    """SHA-256 of a checkpoint's content, ``meta[HASH_KEY]`` excluded.

    Independent of file layout and of dict order: equal for the checkpoint
    that was saved and the one :func:`torch.load` returns.

    Args:
        checkpoint (dict): the checkpoint.

    Returns:
        str: hex digest.
    """
    meta = checkpoint.get('meta')
    if isinstance(meta, dict) and HASH_KEY in meta:
        meta = {k: v for k, v in meta.items() if k != HASH_KEY}
        checkpoint = dict(checkpoint, meta=meta)
    digest = hashlib.sha256()
    _feed(digest, checkpoint)
    return digest.hexdigest()


def verify_content_hash(checkpoint, filename):
    """Check ``meta[HASH_KEY]`` against the loaded content.

    Args:
        checkpoint (dict): a loaded checkpoint.
        filename (str): its file, named in the error.

    Returns:
        bool: True if verified, False if the checkpoint records no hash.

    Raises:
        ValueError: the content differs from what was saved.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or HASH_KEY not in meta:
        return False
    expected = meta[HASH_KEY]
    actual = content_hash(checkpoint)
    if actual != expected:
        raise ValueError(
            f'checkpoint {filename} is corrupt: its content hash '
            f'{actual[:16]}... differs from the {expected[:16]}... recorded '
            'when it was saved (damaged on disk or in transfer); use another '
            'copy or an earlier checkpoint')
    return True


def _is_local(filename):
    return '://' not in filename or filename.startswith('file://')


def save_checkpoint(checkpoint, filename, file_client_args=None,
                    backend_args=None):
    """mmengine's ``save_checkpoint``, atomic for local files, with a
    content hash in ``checkpoint['meta']``.

    Args:
        checkpoint (dict): the checkpoint; its ``meta`` dict gets
            ``HASH_KEY`` (created if absent).
        filename (str): destination path or URI.
        file_client_args (dict, optional): as for mmengine (deprecated).
        backend_args (dict, optional): as for mmengine.
    """
    if isinstance(checkpoint, dict):
        meta = checkpoint.get('meta')
        if meta is None:
            meta = checkpoint['meta'] = {}
        if isinstance(meta, dict):
            meta.pop(HASH_KEY, None)
            meta[HASH_KEY] = content_hash(checkpoint)
    if not _is_local(filename) or file_client_args is not None or (
            backend_args and backend_args.get('backend') not in (None,
                                                                 'local')):
        return _ORIGINAL['save_checkpoint'](
            checkpoint, filename, file_client_args=file_client_args,
            backend_args=backend_args)
    if filename.startswith('file://'):
        filename = filename[len('file://'):]
    with io.BytesIO() as buffer:
        torch.save(checkpoint, buffer)
        atomic_write_bytes(buffer.getbuffer(), filename)


def patch_checkpoint_saving():
    """Make :func:`save_checkpoint` the one mmengine calls (idempotent)."""
    import mmengine.runner  # noqa: F401  (binds save_checkpoint by name)
    from mmengine.runner import checkpoint as mm_checkpoint
    if 'save_checkpoint' not in _ORIGINAL:
        _ORIGINAL['save_checkpoint'] = mm_checkpoint.save_checkpoint
    # Modules imported later bind the patched attribute of mmengine's module.
    for name in _SAVE_CHECKPOINT_USERS:
        module = sys.modules.get(name)
        if getattr(module, 'save_checkpoint', None) is _ORIGINAL[
                'save_checkpoint']:
            module.save_checkpoint = save_checkpoint
