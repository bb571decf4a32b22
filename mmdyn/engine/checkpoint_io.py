# Copyright (c) mmdyn contributors. All rights reserved.
"""Checkpoint files that are complete or absent, and that record their content.

Nothing here changes mmengine: the pieces are used where a config or a
caller chooses them.

* **Atomic writes.** mmengine's ``save_checkpoint`` serialises into memory
  and hands the bytes to a file backend's ``put``. Its local backend writes
  them straight to ``epoch_N.pth``: a process killed mid-write leaves a
  truncated file under the final name. :class:`AtomicLocalBackend`,
  registered with mmengine's public :func:`~mmengine.fileio.register_backend`
  under the name :data:`ATOMIC_BACKEND`, writes a temporary file in the same
  folder, flushes and fsyncs it, then renames it over the final name (an
  atomic step on POSIX and Windows) and fsyncs the folder.
  :class:`~mmdyn.engine.hooks.AtomicCheckpointHook` passes it as the
  ``backend_args`` of its saves.
* **Content hash.** :func:`add_content_hash` records a SHA-256 of the
  checkpoint's content (every tensor's bytes, dtype and shape, and every
  other value, under its key path) in ``meta[HASH_KEY]`` and marks the file
  as written by mmdyn (``meta[WRITER_KEY]``); the checkpoint loader
  (:mod:`mmdyn.engine.checkpoint`) checks both.
* **A full disk is named.** A write that fails with ``ENOSPC`` raises an
  ``OSError`` whose message starts with ``No space left on device`` and
  names the file.

:func:`save_checkpoint` does all three for a checkpoint saved outside a
runner (e.g. by the weight converters).
"""
import errno
import hashlib
import io
import os
import os.path as osp
import tempfile

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend

__all__ = [
    'HASH_KEY', 'WRITER_KEY', 'WRITER', 'ATOMIC_BACKEND', 'AtomicLocalBackend',
    'atomic_write_bytes', 'atomic_write_text', 'content_hash',
    'add_content_hash', 'verify_content_hash', 'save_checkpoint'
]

HASH_KEY = 'content_sha256'
# ``meta[WRITER_KEY] == WRITER`` says the file was saved with a content
# hash: a missing hash is then an error, not a checkpoint of another tool.
WRITER_KEY = 'saved_by'
WRITER = 'mmdyn'
# The name configs give in ``backend_args=dict(backend=ATOMIC_BACKEND)``.
ATOMIC_BACKEND = 'mmdyn_atomic_local'


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


def _disk_full_error(err, path, size):
    """An ``OSError(ENOSPC)`` whose first line says so and names ``path``."""
    return OSError(
        errno.ENOSPC,
        f'No space left on device while writing {path} ({size} bytes); '
        'free space in that folder or save elsewhere (--work-dir). The '
        'previous file of that name, if any, is unchanged')


def atomic_write_bytes(data, path):
    """Write ``data`` to ``path`` so that ``path`` is never partial.

    The bytes go to a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path``. On any error the temporary file is
    removed and ``path`` keeps its previous content (or stays absent).

    Args:
        data (bytes | bytearray | memoryview): the file content.
        path (str): destination file.

    Raises:
        OSError: the write failed; with ``errno.ENOSPC`` (full disk) the
            message starts with ``No space left on device`` and names
            ``path``.
    """
    path = osp.abspath(osp.expanduser(str(path)))
    folder = osp.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        if err.errno == errno.ENOSPC:
            raise _disk_full_error(err, path, len(data)) from err
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write_text(text, path):
    """:func:`atomic_write_bytes` for a UTF-8 string."""
    atomic_write_bytes(text.encode('utf-8'), path)


class AtomicLocalBackend(LocalBackend):
    """Mmengine's local file backend whose ``put``/``put_text`` write
    atomically (:func:`atomic_write_bytes`).

    Reading, listing and removing
    are ``LocalBackend``'s.
    """

    def put(self, obj, filepath):
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj, filepath, encoding='utf-8'):
        atomic_write_bytes(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend)


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
    elif obj is None or isinstance(obj,
                                   (bool, int, float, complex, np.generic,
                                    torch.dtype, torch.device, torch.Size)):
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


def add_content_hash(checkpoint):
    """Mark ``checkpoint`` as written by mmdyn and record its content hash in
    ``checkpoint['meta']`` (created if absent), in place.

    Args:
        checkpoint (dict): the checkpoint about to be saved.
    """
    meta = checkpoint.get('meta')
    if meta is None:
        meta = checkpoint['meta'] = {}
    if not isinstance(meta, dict):
        return
    meta.pop(HASH_KEY, None)
    meta[WRITER_KEY] = WRITER
    meta[HASH_KEY] = content_hash(checkpoint)


def verify_content_hash(checkpoint, filename):
    """Check ``meta[HASH_KEY]`` against the loaded content.

    This compares content only; :func:`mmdyn.engine.checkpoint.
    load_checkpoint_file` also reads the file's CRC-32 records to tell a
    damaged file from an edited one.

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
            f'checkpoint {filename}: its content hash {actual[:16]}... '
            f'differs from the {str(expected)[:16]}... recorded when it was '
            'saved')
    return True


def save_checkpoint(checkpoint, filename):
    """Save a checkpoint dict to a local file, atomically, with a content hash
    (:func:`add_content_hash`).

    Args:
        checkpoint (dict): the checkpoint; its ``meta`` gets the hash.
        filename (str): destination path.
    """
    if isinstance(checkpoint, dict):
        add_content_hash(checkpoint)
    with io.BytesIO() as buffer:
        torch.save(checkpoint, buffer)
        view = buffer.getbuffer()
        try:
            atomic_write_bytes(view, filename)
        finally:
            view.release()  # else closing the buffer raises BufferError
