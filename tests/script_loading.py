# Copyright (c) mmdyn contributors. All rights reserved.
"""Load a script of the repository (``tools/*.py``, ``docs/*.py``,
``benchmarks/*.py``) as a module, to call its functions in-process."""
import importlib.util
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_script(path):
    """The script at ``path`` (relative to the repository root) as a new module
    object."""
    name = 'mmdyn_script_' + osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
