# Copyright (c) mmdyn contributors. All rights reserved.
"""A save that is interrupted keeps the previous checkpoint and resume.

With ``max_keep_ckpts=1`` mmengine's ``CheckpointHook`` removed the old
checkpoint before writing the new one, in place: a kill during the write
left no complete checkpoint. :class:`~mmdyn.engine.hooks.AtomicCheckpointHook`
(chosen in the config: ``default_hooks.checkpoint.type``) writes to a
temporary file, renames it into place, then removes the old one. A full
disk says so in the first line of the error, naming the file.
"""
import errno
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.runner import load_checkpoint
from toy_runner import ToyNet, make_runner

from mmdyn.engine.checkpoint_io import atomic_write_bytes
from mmdyn.engine.hooks import AtomicCheckpointHook

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))


def _files(folder):
    return sorted(
        n for n in os.listdir(folder)
        if n.endswith(('.pth', '.tmp')) or n == 'last_checkpoint')


def _assert_resumable_from(work_dir, name):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read() == osp.join(work_dir, name)
    load_checkpoint(ToyNet(), osp.join(work_dir, name))  # complete, hashed
    resumed = make_runner(
        work_dir,
        'resumed',
        max_iters=4,
        ckpt_interval=2,
        max_keep_ckpts=1,
        resume=True)
    resumed.train()
    assert resumed.iter == 4
    assert _files(work_dir) == ['iter_4.pth', 'last_checkpoint']


def test_checkpoint_hook_is_atomic():
    runner = make_runner('/nonexistent', 'atomic_type', max_iters=1)
    hooks = [
        h for h in runner.hooks if type(h).__name__.endswith('CheckpointHook')
        and 'Shape' not in type(h).__name__
    ]
    assert len(hooks) == 1 and isinstance(hooks[0], AtomicCheckpointHook)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    work_dir = str(tmp_path)
    real_save = torch.save
    saves = []

    def save_failing_the_second_time(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and 'state_dict' in obj:
            saves.append(obj['meta']['iter'])
            if len(saves) == 2:
                raise OSError('No space left on device (simulated)')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_failing_the_second_time)
    runner = make_runner(
        work_dir, 'failing', max_iters=4, ckpt_interval=2, max_keep_ckpts=1)
    with pytest.raises(OSError, match='simulated'):
        runner.train()
    monkeypatch.setattr(torch, 'save', real_save)
    assert saves == [2, 4]
    assert _files(work_dir) == ['iter_2.pth', 'last_checkpoint']
    _assert_resumable_from(work_dir, 'iter_2.pth')


# Runs the toy training in a child process and SIGKILLs it halfway through
# writing the bytes of its second checkpoint (whichever file they go to).
_KILLED_CHILD = textwrap.dedent('''
    import io, os, signal, sys
    import builtins
    import torch
    torch.set_num_threads(1)
    from toy_runner import make_runner

    real_open = io.open
    checkpoint_writes = []

    class KillMidWrite:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            if len(data) > 4096:  # a checkpoint, not a log line
                checkpoint_writes.append(len(data))
                if len(checkpoint_writes) == 2:
                    self._f.write(bytes(data)[:len(data) // 2])
                    self._f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def kill_mid_write_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return KillMidWrite(f) if 'w' in mode and 'b' in mode else f

    builtins.open = io.open = kill_mid_write_open
    make_runner(sys.argv[1], 'killed', max_iters=4, ckpt_interval=2,
                max_keep_ckpts=1).train()
''')


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    work_dir = str(tmp_path / 'wd')
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [HERE, REPO, os.environ.get('PYTHONPATH', '')]),
        OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', _KILLED_CHILD, work_dir],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The half-written temporary file is there, the final name is not.
    names = _files(work_dir)
    assert 'iter_4.pth' not in names
    assert [n for n in names if n.endswith('.tmp')], names
    _assert_resumable_from(work_dir, 'iter_2.pth')


def test_atomic_write_keeps_old_content_on_error(tmp_path, monkeypatch):
    path = str(tmp_path / 'file.bin')
    atomic_write_bytes(b'old', path)
    # An ordinary open() gives 0o666 less the umask; so must the rename.
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

    def failing_fsync(fd):
        raise OSError('I/O error (simulated)')

    monkeypatch.setattr(os, 'fsync', failing_fsync)
    with pytest.raises(OSError, match='simulated'):
        atomic_write_bytes(b'new content', path)
    with open(path, 'rb') as f:
        assert f.read() == b'old'
    assert os.listdir(str(tmp_path)) == ['file.bin']


def test_failed_best_save_keeps_previous_best(tmp_path, monkeypatch):
    from toy_runner import ToyAccuracy
    scores = iter([0.5, 0.75])
    monkeypatch.setattr(ToyAccuracy, 'compute_metrics',
                        lambda self, results: dict(acc=next(scores)))
    real_save = torch.save
    saves = []

    def save_failing_the_third_time(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and 'state_dict' in obj:
            saves.append(obj['meta']['iter'])
            if len(saves) == 3:
                raise OSError('No space left on device (simulated)')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_failing_the_third_time)
    # Saves: best at iteration 2, iter_4.pth, then the new best at 4 fails.
    runner = make_runner(
        str(tmp_path),
        'best',
        max_iters=4,
        ckpt_interval=4,
        max_keep_ckpts=1,
        val_interval=2,
        save_best='acc')
    with pytest.raises(OSError, match='simulated'):
        runner.train()
    monkeypatch.setattr(torch, 'save', real_save)
    assert _files(str(tmp_path)) == [
        'best_acc_iter_2.pth', 'iter_4.pth', 'last_checkpoint'
    ]
    load_checkpoint(ToyNet(), str(tmp_path / 'best_acc_iter_2.pth'))


class _FullDiskFile:
    """A file whose checkpoint-sized writes fail, from the ``fail_at``-th on,
    as on a full disk (``writes`` counts them across files)."""

    def __init__(self, f, writes, fail_at):
        self._f, self._writes, self._fail_at = f, writes, fail_at

    def write(self, data):
        if len(data) > 4096:  # a checkpoint, not a log line
            self._writes.append(len(data))
            if len(self._writes) >= self._fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _fill_disk_at(monkeypatch, save_number):
    real_fdopen = os.fdopen
    writes = []

    def fdopen(fd, mode='r', *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return _FullDiskFile(f, writes, save_number) if 'w' in mode else f

    monkeypatch.setattr(os, 'fdopen', fdopen)


def test_full_disk_says_so_in_the_first_line(tmp_path, monkeypatch):
    work_dir = str(tmp_path)
    # The first save (iter_2.pth) works; the second (iter_4.pth) finds the
    # disk full.
    _fill_disk_at(monkeypatch, 2)
    runner = make_runner(
        work_dir, 'full_disk', max_iters=4, ckpt_interval=2, max_keep_ckpts=1)
    with pytest.raises(OSError) as info:
        runner.train()
    monkeypatch.undo()
    first_line = str(info.value).splitlines()[0]
    assert info.value.errno == errno.ENOSPC
    assert first_line.startswith('[Errno 28] No space left on device while '
                                 f'writing {osp.join(work_dir, "iter_4.pth")}')
    assert _files(work_dir) == ['iter_2.pth', 'last_checkpoint']
    _assert_resumable_from(work_dir, 'iter_2.pth')


def test_full_disk_in_save_checkpoint_names_the_file(tmp_path, monkeypatch):
    from mmdyn.engine.checkpoint_io import save_checkpoint
    path = str(tmp_path / 'model.pth')
    _fill_disk_at(monkeypatch, 1)
    with pytest.raises(
            OSError,
            match=r'^\[Errno 28\] No space left on device while '
            f'writing {re.escape(path)}'):
        save_checkpoint(dict(state_dict=ToyNet().state_dict()), path)
    monkeypatch.undo()
    assert os.listdir(str(tmp_path)) == []
