# Copyright (c) mmdyn contributors. All rights reserved.
"""Every tool answers ``--help`` without importing torch or the OpenMMLab
model libraries (they are imported once the arguments are parsed), so that
``--help`` is immediate even on a loaded machine."""
import glob
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'tools', '*.py')) +
    glob.glob(osp.join(REPO, 'tools', '*', '*.py')))
HEAVY = ('torch', 'mmdet', 'mmpretrain', 'mmcv', 'mmengine.runner')

CHECK = '''
import contextlib, io, runpy, sys
sys.argv = [{tool!r}, '--help']
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_path({path!r}, run_name='__main__')
    except SystemExit as err:
        code = err.code
    else:
        code = 'no exit'
print(repr(code))
print('usage:' in out.getvalue())
print(' '.join(m for m in {heavy!r} if m in sys.modules))
'''


def test_tools_are_found():
    assert 'tools/train.py' in TOOLS
    assert 'tools/model_converters/odconv2mmdyn.py' in TOOLS
    assert len(TOOLS) >= 12


@pytest.mark.parametrize('tool', TOOLS)
def test_help_imports_no_heavy_module(tool):
    code = CHECK.format(tool=tool, path=osp.join(REPO, tool), heavy=HEAVY)
    out = subprocess.run([sys.executable, '-c', code],
                         capture_output=True,
                         text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    exit_code, has_usage, heavy = (out.stdout.splitlines() + ['', '', ''])[:3]
    assert exit_code == '0' and has_usage == 'True', (tool, out.stdout)
    assert heavy == '', f'{tool} --help imports {heavy}'
