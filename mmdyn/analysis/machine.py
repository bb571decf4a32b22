# Copyright (c) mmdyn contributors. All rights reserved.
"""Which machine a benchmark ran on: the CPU model, its instruction-set
level (ISA), cores, threads and load, for the header of every table in
``benchmarks/``.

A speed ratio measured on one ISA may not hold on another (oneDNN's
convolutions gain more from AVX-512 than hand-written loops do), so every
table says which ISA it was measured on.

Reads ``/proc/cpuinfo`` and ``/proc/loadavg`` (Linux); elsewhere the
fields fall back to :mod:`platform` and :mod:`os`. No torch import.

An AVX-512 machine can measure what an AVX2 machine would run: the
variables of :data:`ISA_CAPS` make ATen's kernels, oneDNN, MKL and mmdyn's
C loops use AVX2 code. They are read when the libraries load, so they must
be set before the process starts::

    python -m mmdyn.analysis.machine --cap avx2 -- python benchmarks/ops.py

runs the command under them, and :func:`header_lines` then names the cap.
The caches, clock and memory remain this machine's: an emulation of the
instruction set, not of another CPU.
"""
import argparse
import datetime
import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Optional, Tuple

__all__ = [
    'parse_cpuinfo', 'isa_level', 'load_average', 'cpu_description',
    'header_lines', 'ISA_CAPS', 'isa_cap'
]

#: ISA name -> the environment that keeps ATen's CPU kernels
#: (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``), MKL
#: (``MKL_ENABLE_INSTRUCTIONS``) and mmdyn's C loops (``MMDYN_C_MARCH``, a
#: CPU with that ISA and no more) at that ISA.
ISA_CAPS = {
    'avx2': {
        'ATEN_CPU_CAPABILITY': 'avx2',
        'ONEDNN_MAX_CPU_ISA': 'AVX2',
        'MKL_ENABLE_INSTRUCTIONS': 'AVX2',
        'MMDYN_C_MARCH': 'haswell',
    },
}


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def parse_cpuinfo(text: str) -> Dict[str, object]:
    """The fields of a ``/proc/cpuinfo`` text that describe the CPU.

    Returns:
        dict: ``model`` (the first ``model name``, or ARM's ``Processor``/
        ``CPU part``; '' when none), ``flags`` (the set of the first
        ``flags``/``Features`` line), ``threads`` (``processor`` entries,
        0 when none) and ``cores`` (distinct ``physical id``/``core id``
        pairs, else ``cpu cores``, else 0).
    """
    model, flags = '', None
    threads = 0
    core_ids = set()
    physical = None
    cpu_cores = 0
    for line in text.splitlines():
        if ':' not in line:
            continue
        key, value = (part.strip() for part in line.split(':', 1))
        if key == 'processor':
            threads += 1
        elif key in ('model name', 'Processor', 'cpu model') and not model:
            model = value
        elif key in ('flags', 'Features') and flags is None:
            flags = set(value.split())
        elif key == 'physical id':
            physical = value
        elif key == 'core id':
            core_ids.add((physical, value))
        elif key == 'cpu cores' and not cpu_cores:
            cpu_cores = int(value) if value.isdigit() else 0
    return dict(
        model=model,
        flags=flags or set(),
        threads=threads,
        cores=len(core_ids) or cpu_cores)


def isa_level(flags, machine: Optional[str] = None) -> str:
    """The vector ISA level of a CPU with these ``/proc/cpuinfo`` flags:

    ``'AVX-512'`` (``avx512f``), ``'AVX2'`` (``avx2``), ``'x86-64'`` (any
    other x86: ``sse2`` or ``lm``), ``'NEON'`` (ARM ``asimd``/``neon``),
    else the machine type (``platform.machine()``) or ``'unknown'``.
    """
    flags = set(flags)
    if 'avx512f' in flags:
        return 'AVX-512'
    if 'avx2' in flags:
        return 'AVX2'
    if flags & {'sse2', 'lm'}:
        return 'x86-64'
    if flags & {'asimd', 'neon'}:
        return 'NEON'
    return machine if machine is not None else (platform.machine()
                                                or 'unknown')


def load_average(text: Optional[str] = None) -> Optional[Tuple[float, ...]]:
    """The 1, 5 and 15 minute load averages: from a ``/proc/loadavg`` text
    (read when not given), else :func:`os.getloadavg`; None when neither is
    available."""
    if text is None:
        text = _read('/proc/loadavg')
    if text:
        try:
            return tuple(float(v) for v in text.split()[:3])
        except ValueError:
            pass
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):
        return None


def cpu_description(cpuinfo: Optional[str] = None,
                    loadavg: Optional[str] = None) -> Dict[str, object]:
    """This machine's CPU, for a benchmark header.

    Args:
        cpuinfo (str, optional): A ``/proc/cpuinfo`` text; read when not
            given.
        loadavg (str, optional): A ``/proc/loadavg`` text; read when not
            given.

    Returns:
        dict: ``model`` (str), ``isa`` (:func:`isa_level`), ``cores`` and
        ``threads`` (hardware threads; :func:`os.cpu_count` when cpuinfo
        lacks them), ``load_average`` (three floats or None) and
        ``machine`` (``platform.machine()``).
    """
    if cpuinfo is None:
        cpuinfo = _read('/proc/cpuinfo') or ''
    info = parse_cpuinfo(cpuinfo)
    threads = info['threads'] or os.cpu_count() or 0
    return dict(
        model=info['model'] or platform.processor() or platform.machine(),
        isa=isa_level(info['flags']),
        cores=info['cores'] or threads,
        threads=threads,
        load_average=load_average(loadavg),
        machine=platform.machine())


def _torch_version() -> str:
    try:
        return metadata.version('torch')
    except metadata.PackageNotFoundError:
        return 'not installed'


def isa_cap(environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The name of the :data:`ISA_CAPS` entry this process runs under.

    Its name when all its variables are set to its values in ``environ``
    (``os.environ`` when not given), None when none of them is set.
    Raises ValueError when only some are (a mixed measurement would be
    mislabelled).
    """
    environ = os.environ if environ is None else environ
    for name, variables in ISA_CAPS.items():
        matching = [k for k, v in variables.items() if environ.get(k) == v]
        if len(matching) == len(variables):
            return name
        if matching:
            missing = sorted(set(variables) - set(matching))
            raise ValueError(
                f'partial {name} ISA cap: {", ".join(missing)} not set as '
                f'ISA_CAPS[{name!r}] sets it; run the command under '
                f'`python -m mmdyn.analysis.machine --cap {name} --`')
    return None


def header_lines(threads: Optional[int] = None,
                 description: Optional[Dict[str, object]] = None) -> List[str]:
    """Markdown lines naming the machine a table was measured on: CPU model
    and ISA, cores and hardware threads, the intra-op threads used
    (``threads``, e.g. ``torch.get_num_threads()``, when given), torch's
    version, the load average and the date (UTC).

    Args:
        threads (int, optional): The intra-op threads the benchmark ran with.
        description (dict, optional): A :func:`cpu_description`; read when
            not given.
    """
    d = description if description is not None else cpu_description()
    load = d['load_average']
    load_text = ', '.join(f'{v:.2f}' for v in load) if load else 'unknown'
    used = f', {threads} intra-op threads used' if threads is not None else ''
    today = datetime.datetime.now(datetime.timezone.utc)
    isa = f'ISA {d["isa"]}'
    cap = isa_cap()
    if cap is not None:
        settings = ', '.join(f'{k}={v}' for k, v in ISA_CAPS[cap].items())
        isa = (f'ISA capped to {cap.upper()} on an {d["isa"]} CPU '
               f'({settings})')
    return [
        f'- CPU: {d["model"]}; {isa}; {d["cores"]} cores, '
        f'{d["threads"]} hardware threads{used}',
        f'- torch {_torch_version()}; load average {load_text}; '
        f'{today:%Y-%m-%d %H:%M} UTC',
    ]


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m mmdyn.analysis.machine``: print the header lines; with
    ``--cap ISA -- COMMAND ...``, run the command under that ISA cap."""
    parser = argparse.ArgumentParser(
        prog='python -m mmdyn.analysis.machine',
        description='This machine for a benchmark header; --cap runs a '
        'command with the libraries kept at a lower ISA.')
    parser.add_argument('--cap', choices=sorted(ISA_CAPS))
    parser.add_argument(
        'command',
        nargs=argparse.REMAINDER,
        help='-- then the command (with --cap)')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else \
        args.command
    if args.cap is None:
        if command:
            parser.error('a command needs --cap')
        print('\n'.join(header_lines()))
        return
    if not command:
        parser.error('--cap needs a command after --')
    env = dict(os.environ, **ISA_CAPS[args.cap])
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


if __name__ == '__main__':
    main()
