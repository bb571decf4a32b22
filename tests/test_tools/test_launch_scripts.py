# Copyright (c) mmdyn contributors. All rights reserved.
"""tools/dist_train.sh, dist_test.sh and slurm_train.sh run the interpreter
named by PYTHON (a virtual environment that is not on PATH), with the arguments
they document.

A stand-in interpreter records its command line.
"""
import os
import os.path as osp
import stat
import subprocess

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def fake_program(folder, name, record):
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> {record}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize('script,args,expected', [
    ('dist_train.sh', ['cfg.py', '2', '--amp'
                       ], '-m torch.distributed.run --nnodes=1 --node_rank=0 '
     '--master_addr=127.0.0.1 --nproc_per_node=2 --master_port=29500 '
     f'{REPO}/tools/train.py cfg.py --launcher pytorch --amp'),
    ('dist_test.sh', ['cfg.py', 'ckpt.pth', '2'
                      ], '-m torch.distributed.run --nnodes=1 --node_rank=0 '
     '--master_addr=127.0.0.1 --nproc_per_node=2 --master_port=29500 '
     f'{REPO}/tools/test.py cfg.py ckpt.pth --launcher pytorch'),
])
def test_dist_scripts_use_python_from_env(tmp_path, script, args, expected):
    record = tmp_path / 'calls.txt'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    venv_python = fake_program(tmp_path, 'venv-python', record)
    env = dict(os.environ, PYTHON=venv_python, PATH=f'{bin_dir}:/usr/bin:/bin')
    env.pop('PORT', None)
    subprocess.run(['bash', osp.join(REPO, 'tools', script), *args],
                   env=env,
                   check=True,
                   cwd=str(tmp_path))
    assert record.read_text().strip() == f'{venv_python} {expected}'


def test_slurm_script_uses_python_from_env(tmp_path):
    record = tmp_path / 'calls.txt'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake_program(bin_dir, 'srun', record)
    venv_python = str(tmp_path / 'venv' / 'bin' / 'python')
    env = dict(os.environ, PYTHON=venv_python, PATH=f'{bin_dir}:/usr/bin:/bin')
    subprocess.run([
        'bash',
        osp.join(REPO, 'tools', 'slurm_train.sh'), 'part', 'job', 'cfg.py',
        'wd'
    ],
                   env=env,
                   check=True,
                   cwd=str(tmp_path))
    line = record.read_text().strip()
    assert line.startswith(f'{bin_dir}/srun -p part --job-name=job')
    assert line.endswith(f'{venv_python} -u {REPO}/tools/train.py cfg.py '
                         '--launcher slurm --work-dir wd')
