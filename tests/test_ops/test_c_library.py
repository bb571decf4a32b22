"""Building, caching and the fallbacks of the C loops (CLibrary)."""
import ctypes
import os

import pytest

from mmdyn.ops.c_library import CLibrary


def _declare(lib):
    lib.answer.argtypes = []
    lib.answer.restype = ctypes.c_int


SOURCE = 'int answer(void) { return 42; }\n'


def test_builds_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    lib = CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB', 'none')
    loaded = lib.load()
    assert loaded is not None and loaded.answer() == 42
    assert os.path.exists(lib.path())
    assert lib.load() is loaded
    again = CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB', 'none')
    monkeypatch.setattr(again, '_build', lambda path: pytest.fail('rebuilt'))
    assert again.load().answer() == 42


def test_build_failure_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    lib = CLibrary('broken', 'this is not C', _declare, 'MMDYN_TEST_C_LIB',
                   'taking the PyTorch path')
    with pytest.warns(UserWarning, match='taking the PyTorch path'):
        assert lib.load() is None
    assert lib.load() is None  # not tried again


def test_switch_off_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('MMDYN_TEST_C_LIB', '0')
    lib = CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB', 'none')
    assert lib.load() is None
    assert not list(tmp_path.iterdir())
