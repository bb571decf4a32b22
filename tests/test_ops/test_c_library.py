# Copyright (c) mmdyn contributors. All rights reserved.
"""Building, caching and the fallbacks of the C loops (CLibrary)."""
import ctypes
import os

import pytest

from mmdyn.ops.accel.c_library import CLibrary


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


# --------------------------------------------------------------------------
# The shipped sources, the build flags and the guarded cache
# --------------------------------------------------------------------------
import os.path as osp  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from mmdyn.ops.accel import c_library  # noqa: E402
from mmdyn.ops.accel.c_library import CSourceFile  # noqa
from mmdyn.ops.accel.c_library import (CSRC_DIR, compiler_flags, cpu_model,
                                       read_source)

C_FILES = ('ddf.c', 'winograd.c', 'kernel_warehouse.c')
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.mark.parametrize('name', C_FILES)
def test_sources_build_warning_free(name, tmp_path):
    """Each shipped C file compiles with -Wall -Wextra -Werror."""
    compiler = os.environ.get('CC') or shutil.which('gcc') or \
        shutil.which('cc')
    if compiler is None:
        pytest.skip('no C compiler')
    subprocess.run([
        compiler, *c_library.FLAGS, '-Wall', '-Wextra', '-Werror', '-I',
        CSRC_DIR,
        osp.join(CSRC_DIR, name), '-o',
        str(tmp_path / 'lib.so')
    ],
                   check=True,
                   capture_output=True,
                   text=True)


def test_sources_are_package_data():
    """setup.py ships csrc/*.c and *.h (editable and wheel installs), and
    MANIFEST.in puts them in the sdist."""
    with open(osp.join(ROOT, 'setup.py')) as f:
        setup_py = f.read()
    # The csrc/ folder sits below mmdyn/ops/ (in its accel/ package).
    assert osp.relpath(CSRC_DIR, osp.join(ROOT, 'mmdyn',
                                          'ops')).endswith('csrc')
    assert "'ops/**/csrc/*'" in setup_py
    with open(osp.join(ROOT, 'MANIFEST.in')) as f:
        assert 'recursive-include mmdyn/ops *.c *.h' in f.read()
    for name in C_FILES:
        assert '#include "' not in read_source(name)  # headers inlined


def test_x86_flags_only_on_x86():
    assert '-march=native' in compiler_flags('x86_64')
    for machine in ('aarch64', 'ppc64le', 'riscv64'):
        flags = compiler_flags(machine)
        assert not any(f.startswith(('-march', '-mprefer')) for f in flags)
        assert '-fopenmp' in flags and '-O3' in flags


def test_cache_key_distinguishes_cpus_without_model_name():
    """ARM's /proc/cpuinfo has no 'model name' or 'flags'."""
    a = 'processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n'
    b = 'processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n'
    assert cpu_model(a) != cpu_model(b)
    assert cpu_model(a) == cpu_model(
        a.replace('processor\t: 0', 'processor\t: 7'))


def test_compiler_messages_in_the_warning(tmp_path, monkeypatch):
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    lib = CLibrary('broken', 'int f(void) { return undeclared_name; }\n',
                   _declare, 'MMDYN_TEST_C_LIB', 'the PyTorch path')
    with pytest.warns(UserWarning, match='undeclared_name'):
        assert lib.load() is None


def test_unsafe_cache_is_not_loaded(tmp_path, monkeypatch):
    """A library in a cache directory others can write is not loaded."""
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB', 'none').load()
    os.chmod(tmp_path, 0o777)
    again = CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB',
                     'the PyTorch path')
    with pytest.warns(UserWarning, match='writable by other users'):
        assert again.load() is None
    os.chmod(tmp_path, 0o700)
    path = again.path()
    os.chmod(path, 0o666)
    third = CLibrary('answer', SOURCE, _declare, 'MMDYN_TEST_C_LIB', 'x')
    with pytest.warns(UserWarning, match='writable by other users'):
        assert third.load() is None


TRUNCATED = r'''
import os, sys
from mmdyn.ops.accel.c_library import CLibrary
lib = CLibrary('answer', {source!r}, lambda l: None, 'MMDYN_TEST_C_LIB', 'x')
path = lib.path()
with open(path, 'r+b') as f:
    f.truncate(4096)
loaded = CLibrary('answer', {source!r}, lambda l: None, 'MMDYN_TEST_C_LIB',
                  'x').load()
print('LOADED', loaded is not None, os.path.getsize(path) != 4096)
'''


def test_truncated_library_is_rebuilt(tmp_path, monkeypatch):
    """A cached library cut to 4 KiB (a full disk, a killed copy) used to crash
    the next process with SIGBUS; now it is rebuilt."""
    env = dict(os.environ, MMDYN_CACHE_DIR=str(tmp_path))
    source = 'int answer(void) { return 42; }\n' + \
        'static const char pad[65536] = {1};\n' + \
        'const char *padding(void) { return pad; }\n'
    # Built (not loaded: this process must not map the file it cuts).
    lib = CLibrary('answer', source, _declare, 'MMDYN_TEST_C_LIB', 'none')
    monkeypatch.setenv('MMDYN_CACHE_DIR', str(tmp_path))
    lib._build(lib.path())
    result = subprocess.run(
        [sys.executable, '-c',
         TRUNCATED.format(source=source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'LOADED True True' in result.stdout


def test_csource_file_reads_package_data():
    lib = CLibrary('ddf_cpu_probe', CSourceFile('ddf.c'), _declare, 'X', 'y')
    assert 'ddf_forward_s1' in lib.source and 'DDF_T double' in lib.source


def test_march_from_its_switch(monkeypatch):
    from mmdyn.ops import switches
    monkeypatch.delenv(switches.C_MARCH, raising=False)
    assert '-march=native' in compiler_flags('x86_64')
    monkeypatch.setenv(switches.C_MARCH, 'haswell')
    flags = compiler_flags('x86_64')
    assert '-march=haswell' in flags and '-march=native' not in flags
    assert not any(f.startswith('-march') for f in compiler_flags('aarch64'))
    monkeypatch.setenv(switches.C_MARCH, 'native; rm -rf ~')
    with pytest.raises(ValueError, match='MMDYN_C_MARCH'):
        compiler_flags('x86_64')


def test_march_is_part_of_the_cache_key(tmp_path, monkeypatch):
    from mmdyn.ops import switches
    monkeypatch.setenv(switches.CACHE_DIR, str(tmp_path))
    lib = c_library.CLibrary('probe', 'int f(void) { return 1; }',
                             lambda lib: None, switches.WINOGRAD, 'none')
    monkeypatch.delenv(switches.C_MARCH, raising=False)
    native = lib.path()
    monkeypatch.setenv(switches.C_MARCH, 'haswell')
    assert lib.path() != native
