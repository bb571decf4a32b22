# Copyright (c) mmdyn contributors. All rights reserved.
"""The machine description in every benchmark header
(:mod:`mmdyn.analysis.machine`), read from fake ``/proc`` texts."""
import subprocess
import sys

import pytest

from mmdyn.analysis import machine


def _cpuinfo(model, flags, sockets=1, cores=2, threads_per_core=1):
    """A /proc/cpuinfo text of ``sockets`` x ``cores`` x ``threads``."""
    blocks, n = [], 0
    for socket in range(sockets):
        for core in range(cores):
            for _ in range(threads_per_core):
                blocks.append('\n'.join([
                    f'processor\t: {n}', 'vendor_id\t: AuthenticAMD',
                    f'model name\t: {model}', f'physical id\t: {socket}',
                    f'siblings\t: {cores * threads_per_core}',
                    f'core id\t\t: {core}', f'cpu cores\t: {cores}',
                    f'flags\t\t: {flags}'
                ]))
                n += 1
    return '\n\n'.join(blocks) + '\n'


X86 = 'fpu vme sse sse2 ssse3 sse4_1 sse4_2 lm'
CASES = {
    'AVX-512': ('AMD EPYC 9R14', X86 + ' avx avx2 fma avx512f avx512bw'),
    'AVX2': ('Intel(R) Core(TM) i7-8700', X86 + ' avx avx2 fma'),
    'x86-64': ('QEMU Virtual CPU', X86),
}


@pytest.mark.parametrize('isa', list(CASES))
def test_isa_from_cpuinfo(isa):
    model, flags = CASES[isa]
    text = _cpuinfo(model, flags, sockets=2, cores=4, threads_per_core=2)
    d = machine.cpu_description(text, '0.50 1.25 2.00 1/100 42\n')
    assert d['isa'] == isa
    assert d['model'] == model
    assert d['cores'] == 8  # 2 sockets x 4 cores
    assert d['threads'] == 16
    assert d['load_average'] == (0.5, 1.25, 2.0)


def test_avx512_only_from_the_foundation_flag():
    """``avx512`` in another flag name (e.g. only ``avx512_vnni`` listed by a
    hypervisor) is not AVX-512 F."""
    assert machine.isa_level({'avx2', 'avx512_vnni'}) == 'AVX2'
    assert machine.isa_level(['avx512f']) == 'AVX-512'


def test_arm_and_unknown():
    text = ('processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n'
            'CPU part\t: 0xd0c\n\nprocessor\t: 1\n'
            'Features\t: fp asimd evtstrm aes\n')
    d = machine.cpu_description(text, '1 2 3')
    assert d['isa'] == 'NEON'
    assert d['threads'] == 2 and d['cores'] == 2
    assert machine.isa_level(set(), machine='riscv64') == 'riscv64'


def test_header_lines_name_the_isa_and_threads():
    d = machine.cpu_description(_cpuinfo(*CASES['AVX2']), '3.00 2.00 1.00')
    lines = machine.header_lines(threads=2, description=d)
    assert lines[0] == ('- CPU: Intel(R) Core(TM) i7-8700; ISA AVX2; 2 cores,'
                        ' 2 hardware threads, 2 intra-op threads used')
    assert 'load average 3.00, 2.00, 1.00' in lines[1]
    assert all(line.startswith('- ') for line in lines)


def test_this_machine_and_no_torch_import():
    code = ('import sys; from mmdyn.analysis import machine; '
            'd = machine.cpu_description(); '
            "assert d['isa'] and d['threads'] >= 1, d; "
            "assert 'torch' not in sys.modules; "
            "print(machine.header_lines()[0])")
    out = subprocess.run([sys.executable, '-c', code],
                         capture_output=True,
                         text=True,
                         check=True)
    assert out.stdout.startswith('- CPU: ')


def test_isa_cap_names_the_full_cap_only(monkeypatch):
    for name in machine.ISA_CAPS['avx2']:
        monkeypatch.delenv(name, raising=False)
    assert machine.isa_cap() is None
    env = dict(machine.ISA_CAPS['avx2'])
    assert machine.isa_cap(env) == 'avx2'
    env.pop('MKL_ENABLE_INSTRUCTIONS')
    with pytest.raises(ValueError, match='MKL_ENABLE_INSTRUCTIONS'):
        machine.isa_cap(env)  # a half-capped run would be mislabelled
    for name, value in machine.ISA_CAPS['avx2'].items():
        monkeypatch.setenv(name, value)
    d = machine.cpu_description(_cpuinfo(*CASES['AVX-512']), '0 0 0')
    line = machine.header_lines(description=d)[0]
    assert 'ISA capped to AVX2 on an AVX-512 CPU' in line
    assert 'ONEDNN_MAX_CPU_ISA=AVX2' in line
    assert 'MMDYN_C_MARCH=haswell' in line


def test_cap_runs_the_command_with_avx2_libraries():
    """``python -m mmdyn.analysis.machine --cap avx2 -- CMD``: the command's
    torch reports the AVX2 kernels (or less, on a CPU without AVX2), and
    mmdyn's C loops are built for a CPU without AVX-512."""
    code = ('import torch; from mmdyn.ops.accel import c_library; '
            'print(torch.backends.cpu.get_cpu_capability()); '
            "print(' '.join(c_library.compiler_flags('x86_64')))")
    out = subprocess.run([
        sys.executable, '-m', 'mmdyn.analysis.machine', '--cap', 'avx2', '--',
        sys.executable, '-c', code
    ],
                         capture_output=True,
                         text=True,
                         check=True).stdout.split('\n')
    assert out[0] in ('AVX2', 'DEFAULT'), out
    assert '-march=haswell' in out[1].split(), out


def test_cap_needs_a_command():
    with pytest.raises(SystemExit):
        machine.main(['--cap', 'avx2'])
    with pytest.raises(SystemExit):
        machine.main(['--', 'true'])
