# Copyright (c) mmdyn contributors. All rights reserved.
"""A C compiler that hangs is killed with the processes it started."""
import os
import signal
import stat
import time
import warnings

import pytest

from mmdyn.ops.accel import c_library
from mmdyn.ops.accel.c_library import CLibrary

# A compiler driver that starts a child (as gcc starts cc1) and hangs.
FAKE_COMPILER = '''#!/bin/sh
sleep 60 &
echo $! > "{pid_file}"
sleep 60
'''


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its parent to
    reap it counts as gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='needs /proc')
def test_hanging_compiler_is_killed_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / 'child.pid'
    compiler = tmp_path / 'fake-cc'
    compiler.write_text(FAKE_COMPILER.format(pid_file=pid_file))
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv('CC', str(compiler))
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(c_library, 'COMPILE_TIMEOUT', 3)
    lib = CLibrary('hangs', 'int f(void) { return 1; }\n', lambda lib: None,
                   'MMDYN_TEST_C_LIB', 'the PyTorch path')
    started = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert lib.load() is None
        assert time.monotonic() - started < 30
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the compiler's child outlived it"
    finally:
        if pid_file.exists() and _running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    messages = [str(w.message) for w in caught]
    assert any('did not finish within 3 s' in m for m in messages), messages
