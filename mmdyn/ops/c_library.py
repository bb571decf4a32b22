"""Small C kernels compiled on first use and called through ``ctypes``.

Some CPU loops have no single PyTorch op (DDF's filter-tap sum, the
Winograd transform of per-sample kernels). Their C sources include no
PyTorch headers, so a build takes about a second with the system C compiler.
A :class:`CLibrary` compiles its source once into
``$MMDYN_CACHE_DIR`` (default ``~/.cache/mmdyn``), keyed by the source, the
compiler flags and the CPU model, and loads it. Everything degrades
gracefully: with no compiler, a failed build, or its environment switch set
to ``0``, :meth:`CLibrary.load` returns None (once warned) and the caller
takes its pure-PyTorch path.
"""
import ctypes
import hashlib
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Callable, Optional

import torch

# -mprefer-vector-width=256: gcc's tuning for some AVX2 CPUs (e.g. AMD Zen 1)
# vectorises with 128-bit registers; 256-bit ones make DDF's fused forward
# markedly faster there (benchmarks/ddf.md).
FLAGS = ('-O3', '-march=native', '-mprefer-vector-width=256', '-fopenmp',
         '-shared', '-fPIC', '-std=c99')


def cpu_model() -> str:
    """CPU name and instruction-set flags: a build with -march=native must
    not be reused on a CPU that lacks some of its instructions."""
    found = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key = line.split(':', 1)[0].strip()
                if key in ('model name', 'flags') and key not in found:
                    found[key] = line
    except OSError:
        pass
    return ''.join(found.values()) or platform.processor()


def cache_dir() -> str:
    return os.environ.get('MMDYN_CACHE_DIR') or osp.join(
        osp.expanduser('~'), '.cache', 'mmdyn')


def ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    """A tensor's data pointer for ctypes (NULL for None). The caller must
    hold a reference to ``t`` until the C call returns."""
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def check_float32_cpu(what: str,
                      *tensors: Optional[torch.Tensor]) -> None:
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
    return max(1, min(torch.get_num_threads(), work // 4096 + 1))


class CLibrary:
    """A C source built once per machine and loaded on first use.

    Args:
        name (str): File stem of the shared object.
        source (str): The C source.
        declare (callable): Sets ``argtypes``/``restype`` on the loaded
            ``ctypes.CDLL``.
        switch (str): Environment variable; ``0`` disables the library.
        fallback (str): What the caller does without it (for the warning).
    """

    def __init__(self, name: str, source: str,
                 declare: Callable[[ctypes.CDLL], None], switch: str,
                 fallback: str):
        self.name = name
        self.source = source
        self.declare = declare
        self.switch = switch
        self.fallback = fallback
        self._lock = threading.Lock()
        self._tried = False
        self._lib = None

    def path(self) -> str:
        key = hashlib.sha1((self.source + ' '.join(FLAGS) +
                            cpu_model()).encode()).hexdigest()
        return osp.join(cache_dir(), f'{self.name}_{key[:16]}.so')

    def _build(self, path: str) -> None:
        compiler = os.environ.get('CC') or shutil.which(
            'gcc') or shutil.which('cc')
        if compiler is None:
            raise RuntimeError('no C compiler found (set CC)')
        os.makedirs(osp.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=osp.dirname(path)) as tmp:
            src = osp.join(tmp, self.name + '.c')
            with open(src, 'w') as f:
                f.write(self.source)
            out = osp.join(tmp, self.name + '.so')
            subprocess.run([compiler, *FLAGS, src, '-o', out],
                           check=True,
                           capture_output=True,
                           timeout=120)
            # Atomic: parallel test workers may build the same file.
            os.replace(out, path)

    def enabled(self) -> bool:
        return os.environ.get(self.switch, '1') != '0'

    def require(self) -> ctypes.CDLL:
        """:meth:`load` for callers without a fallback: RuntimeError when
        the library is unavailable."""
        lib = self.load()
        if lib is None:
            raise RuntimeError(f'mmdyn: C kernels {self.name!r} unavailable '
                               f'(no C compiler, a failed build, or '
                               f'{self.switch}=0)')
        return lib

    def load(self) -> Optional[ctypes.CDLL]:
        """The loaded library, built on first use; None when unavailable
        (no compiler, a failed build, or the switch set to ``0``)."""
        if self._tried:
            return self._lib
        with self._lock:
            if self._tried:
                return self._lib
            if self.enabled():
                path = self.path()
                try:
                    if not osp.exists(path):
                        self._build(path)
                    lib = ctypes.CDLL(path)
                    self.declare(lib)
                    self._lib = lib
                except Exception as e:  # noqa: BLE001 - any failure: fallback
                    warnings.warn(f'mmdyn: C kernels {self.name!r} '
                                  f'unavailable ({e}); {self.fallback}')
            self._tried = True
            return self._lib
