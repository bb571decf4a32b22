# Copyright (c) mmdyn contributors. All rights reserved.
"""mmdyn.engine.malloc: multi-MB blocks stay in the heap for reuse."""
import ctypes
import subprocess
import sys

import pytest

from mmdyn.engine.malloc import tune_malloc

# In a fresh interpreter: allocate and fill a 16 MiB tensor, then free it;
# print how much of it glibc served by mmap (mallinfo2().hblkhd growth) and
# how much freed memory the heap keeps afterwards (fordblks).
_PROBE = '''
import ctypes, sys
import torch
from mmdyn.engine.malloc import tune_malloc
assert tune_malloc(sys.argv[1] == '1') == (sys.argv[1] == '1')
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
        'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
before = mallinfo2().hblkhd
t = torch.empty(4 * 1024 * 1024)
t.fill_(1.0)
mapped = mallinfo2().hblkhd - before
del t
print(mapped, mallinfo2().fordblks)
'''
_MIB = 2**20


def _probe(tuned: bool):
    out = subprocess.run([sys.executable, '-c', _PROBE,
                          str(int(tuned))],
                         check=True,
                         capture_output=True,
                         text=True)
    return [int(v) for v in out.stdout.split()[-2:]]


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith('linux')


@pytest.mark.skipif(not _has_mallinfo2(), reason='needs glibc >= 2.33')
def test_tuned_malloc_keeps_multi_mb_blocks_in_the_heap():
    # glibc's default: a 16 MiB block in a fresh process is mmapped and
    # unmapped on free (its pages faulted in again next time).
    mapped, _ = _probe(False)
    assert mapped >= 16 * _MIB, mapped
    # Tuned: served from the heap, and still there after the free.
    mapped, free_in_heap = _probe(True)
    assert mapped == 0, mapped
    assert free_in_heap >= 16 * _MIB, free_in_heap


def test_disabled_by_argument_and_environment(monkeypatch):
    assert tune_malloc(False) is False
    monkeypatch.setenv('MMDYN_MALLOC_TUNING', '0')
    assert tune_malloc() is False
