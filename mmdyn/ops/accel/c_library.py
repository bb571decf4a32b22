# Copyright (c) mmdyn contributors. All rights reserved.
"""Small C kernels compiled on first use and called through ``ctypes``.

Some CPU loops have no single PyTorch op (DDF's filter-tap sum, the
Winograd transform of per-sample kernels). Their C sources (``csrc/`` next
to this file, shipped as package data) include no PyTorch headers, so a
build takes about a second with the system C compiler. A :class:`CLibrary`
compiles its source once into ``$MMDYN_CACHE_DIR`` (default
``~/.cache/mmdyn``), keyed by the source, the compiler flags and the CPU,
and loads it. Everything degrades gracefully: with no compiler, a failed
build (the warning carries the compiler's messages), or its environment
switch set to ``0``, :meth:`CLibrary.load` returns None (once warned) and
the caller takes its pure-PyTorch path.

The cache is guarded: a library is loaded only from a directory and a file
owned by this user (or root) that no other user can write (a shared,
world-writable cache could otherwise run someone else's code), and only
when its SHA-256 matches the one recorded at build time next to it (a
truncated or corrupt file, from a full disk or a killed copy, would crash
the process on load); a mismatch is rebuilt once, then falls back.
"""
import ctypes
import hashlib
import os
import os.path as osp
import platform
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import warnings
from typing import Callable, Optional

import torch

from .. import switches
from .thresholds import THRESHOLDS

#: Directory of the C sources (package data).
CSRC_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')

PORTABLE_FLAGS = ('-O3', '-fopenmp', '-shared', '-fPIC', '-std=c99')
# -mprefer-vector-width=256: gcc's tuning for some AVX2 CPUs (e.g. AMD Zen 1)
# vectorises with 128-bit registers; 256-bit ones make DDF's fused forward
# markedly faster there (benchmarks/ddf.md). x86 only. -march is
# $MMDYN_C_MARCH's (default native: switches.c_march).
X86_FLAGS = ('-march=native', '-mprefer-vector-width=256')


def is_x86(machine: Optional[str] = None) -> bool:
    machine = (machine or platform.machine()).lower()
    return machine in ('x86_64', 'amd64', 'i386', 'i686', 'x86')


def compiler_flags(machine: Optional[str] = None) -> tuple:
    """The build flags: the x86 tuning flags only on x86 (``-march`` from
    ``$MMDYN_C_MARCH``, default ``native``), the portable ones elsewhere."""
    if is_x86(machine):
        x86 = (f'-march={switches.c_march()}', ) + X86_FLAGS[1:]
        return PORTABLE_FLAGS[:1] + x86 + PORTABLE_FLAGS[1:]
    return PORTABLE_FLAGS


#: The build flags when mmdyn was imported (each build reads
#: :func:`compiler_flags` again).
FLAGS = compiler_flags()

#: /proc/cpuinfo keys that identify the CPU model and its instruction sets
#: (x86, ARM, RISC-V, POWER, s390).
_CPU_KEYS = ('model name', 'flags', 'vendor_id', 'cpu family', 'model',
             'stepping', 'Features', 'CPU implementer', 'CPU architecture',
             'CPU variant', 'CPU part', 'CPU revision', 'isa', 'uarch', 'cpu',
             'features', 'vendor_id', 'machine')

_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.MULTILINE)


def read_source(name: str) -> str:
    """The text of the C file ``name`` of :data:`CSRC_DIR` with its local
    ``#include "..."`` files written in (one self-contained translation
    unit: the build needs no include path, and the cache key covers the
    headers)."""
    path = osp.join(CSRC_DIR, name)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(
            f'mmdyn: C source {path} missing ({e}); reinstall mmdyn (the '
            'csrc/ files are package data)') from e
    return _LOCAL_INCLUDE.sub(lambda m: read_source(m.group(1)), text)


class CSourceFile(str):
    """The name of a C file of :data:`CSRC_DIR` (a :class:`CLibrary` source
    read when first needed)."""


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """What identifies this CPU for a build with ``-march=native``: the
    identifying lines of ``/proc/cpuinfo`` (model, instruction-set flags or
    features, on any architecture), the machine type and processor; a library
    is never reused on a CPU that lacks some of its instructions."""
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ''
    found = {}
    for line in cpuinfo.splitlines():
        key = line.split(':', 1)[0].strip()
        if key in _CPU_KEYS and key not in found:
            found[key] = line.strip()
    return '\n'.join(
        [platform.machine(),
         platform.processor(), *sorted(found.values())])


def cache_dir() -> str:
    """Where the libraries are built (``$MMDYN_CACHE_DIR``, see
    :func:`mmdyn.ops.switches.cache_dir`)."""
    return switches.cache_dir()


def ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    """A tensor's data pointer for ctypes (NULL for None).

    The caller must
    hold a reference to ``t`` until the C call returns.
    """
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def check_float32_cpu(what: str, *tensors: Optional[torch.Tensor]) -> None:
    """The C loops read and write raw float32 host memory: raise
    ValueError for any other tensor (None entries are skipped)."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32
                              or t.device.type != 'cpu'):
            raise ValueError(f'{what} takes float32 CPU tensors, got '
                             f'{t.dtype} on {t.device}')


def num_threads(work: int) -> int:
    """OpenMP threads for ``work`` elements: tiny problems are faster on one
    thread than waking the pool."""
    per_thread = THRESHOLDS['c_loops']['work_per_thread']
    return max(1, min(torch.get_num_threads(), work // per_thread + 1))


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def unsafe_reason(path: str) -> Optional[str]:
    """Why ``path`` (a cached library) or its directory must not be loaded:

    owned by another user, or writable by other users (group or world); None
    when safe (or on a system without POSIX ownership).
    """
    if not hasattr(os, 'getuid'):
        return None
    for target in (osp.dirname(path), path):
        st = os.stat(target)
        if not _owner_ok(st):
            return f'{target} is owned by another user (uid {st.st_uid})'
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f'{target} is writable by other users (mode '
                    f'{stat.S_IMODE(st.st_mode):o}); use a private '
                    'MMDYN_CACHE_DIR or chmod go-w it')
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


#: Seconds a compiler run may take before it is killed.
COMPILE_TIMEOUT = 120


def run_compiler(command: list, timeout: float) -> tuple:
    """Run ``command``; return (exit status, its stderr).

    The compiler starts in a process group of its own, and on timeout the
    whole group is killed: a compiler driver's children (``cc1``, ``as``,
    ``ld``, or whatever a ``CC`` wrapper spawns) do not outlive it.

    Raises:
        RuntimeError: when it runs longer than ``timeout`` seconds.
    """
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has already exited
            pass
        proc.communicate()
        raise RuntimeError(f'{command[0]} did not finish within {timeout} s;'
                           ' it was killed with its child processes') from None
    return proc.returncode, stderr or ''


class CLibrary:
    """A C source built once per machine and loaded on first use.

    Args:
        name (str): File stem of the shared object.
        source (str | CSourceFile): The C source text, or a file of
            :data:`CSRC_DIR` (read when first keyed or built).
        declare (callable): Sets ``argtypes``/``restype`` on the loaded
            ``ctypes.CDLL``.
        switch (str): Environment variable; ``0`` disables the library.
        fallback (str): What the caller does without it (for the warning).
    """

    def __init__(self, name: str, source: str, declare: Callable[[ctypes.CDLL],
                                                                 None],
                 switch: str, fallback: str):
        self.name = name
        self._source = source
        self.declare = declare
        self.switch = switch
        self.fallback = fallback
        self._lock = threading.Lock()
        self._tried = False
        self._lib = None

    @property
    def source(self) -> str:
        """The C source text."""
        if isinstance(self._source, CSourceFile):
            return read_source(self._source)
        return self._source

    def path(self) -> str:
        key = hashlib.sha1((self.source + ' '.join(compiler_flags()) +
                            cpu_model()).encode()).hexdigest()
        return osp.join(cache_dir(), f'{self.name}_{key[:16]}.so')

    def _build(self, path: str) -> None:
        compiler = os.environ.get('CC') or shutil.which('gcc') or shutil.which(
            'cc')
        if compiler is None:
            raise RuntimeError('no C compiler found (set CC)')
        directory = osp.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = osp.join(tmp, self.name + '.c')
            with open(src, 'w') as f:
                f.write(self.source)
            out = osp.join(tmp, self.name + '.so')
            returncode, messages = run_compiler(
                [compiler, *compiler_flags(), src, '-o', out], COMPILE_TIMEOUT)
            if returncode:
                messages = messages.strip()[-2000:]
                raise RuntimeError(f'{compiler} failed (exit {returncode})'
                                   f': {messages}')
            os.chmod(out, 0o644)
            digest = _sha256(out)
            with open(out + '.sha256', 'w') as f:
                f.write(digest)
            # Atomic: parallel test workers may build the same file. The
            # digest first: a library is never seen without its digest.
            os.replace(out + '.sha256', path + '.sha256')
            os.replace(out, path)

    def _intact(self, path: str) -> bool:
        """Whether the cached file is the one built (its recorded SHA-256)."""
        try:
            with open(path + '.sha256') as f:
                return f.read().strip() == _sha256(path)
        except OSError:
            return False

    def _load_cached(self, path: str) -> ctypes.CDLL:
        """Build when missing or not intact (once), check ownership and
        permissions, load."""
        if not osp.exists(path) or not self._intact(path):
            self._build(path)
            if not self._intact(path):
                raise RuntimeError(f'{path} does not match its recorded '
                                   'SHA-256 after a rebuild')
        reason = unsafe_reason(path)
        if reason is not None:
            raise RuntimeError(f'not loading {path}: {reason}')
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            # A file that passed its digest but does not load (e.g. built
            # by another compiler run): rebuild once.
            self._build(path)
            lib = ctypes.CDLL(path)
        self.declare(lib)
        return lib

    def enabled(self) -> bool:
        """Whether its switch is on and ``MMDYN_DISABLE_ACCEL`` is not set
        (read at every :meth:`load`)."""
        return not switches.accel_disabled() and switches.switch_on(
            self.switch)

    def require(self) -> ctypes.CDLL:
        """:meth:`load` for callers without a fallback: RuntimeError when the
        library is unavailable."""
        lib = self.load()
        if lib is None:
            raise RuntimeError(f'mmdyn: C kernels {self.name!r} unavailable '
                               f'(no C compiler, a failed build, or '
                               f'{self.switch}=0)')
        return lib

    def load(self) -> Optional[ctypes.CDLL]:
        """The loaded library, built on first use; None when unavailable (no
        compiler, a failed build, an unsafe cache, or the switch set to
        ``0``)."""
        if not self.enabled():
            return None
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    self._lib = self._load_cached(self.path())
                except Exception as e:  # noqa: BLE001 - any failure: fallback
                    warnings.warn(f'mmdyn: C kernels {self.name!r} '
                                  f'unavailable ({e}); {self.fallback}')
                self._tried = True
            return self._lib
