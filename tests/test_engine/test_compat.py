# Copyright (c) mmdyn contributors. All rights reserved.
"""mmdyn.compat: each fix against the real library (what fails without it, in a
fresh interpreter), and inert outside the versions it was written for."""
import importlib.util
import json
import logging
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
from packaging.specifiers import SpecifierSet

import mmdyn.compat
from mmdyn.compat import config_package_scope, numpy_in1d, package_paths

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def run_python(tmp_path, *parts):
    """Run the code ``parts`` in a fresh interpreter; its last stdout line as
    JSON."""
    code = ''.join(textwrap.dedent(part) for part in parts)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True,
                            text=True,
                            env=env,
                            cwd=str(tmp_path),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the interface of every fix ---------------------------------------------


def test_every_fix_states_its_versions_and_upstream():
    import importlib.metadata
    assert len(mmdyn.compat.FIXES) == len(set(mmdyn.compat.FIXES))
    for name, fix in zip(mmdyn.compat.FIXES, mmdyn.compat.fix_modules()):
        importlib.metadata.distribution(fix.PACKAGE)  # a real distribution
        assert len(SpecifierSet(fix.VERSIONS)) >= 1, name
        assert fix.SUMMARY and '\n' not in fix.SUMMARY, name
        assert fix.UPSTREAM, name
        assert callable(fix.is_needed) and callable(fix.apply), name
        doc = open(osp.join(REPO, 'docs', 'compat.md')).read()
        assert f'`{name}`' in doc, f'{name} is not listed in docs/compat.md'


@pytest.mark.parametrize('version, expected', [('99.0.0', 'out of range'),
                                               (None, 'not installed')])
def test_fixes_are_inert_outside_their_range(monkeypatch, caplog, version,
                                             expected):
    monkeypatch.setattr(mmdyn.compat, 'installed_version', lambda _: version)
    for fix in mmdyn.compat.fix_modules():
        monkeypatch.setattr(fix, 'apply', lambda: pytest.fail('applied'))
        monkeypatch.setattr(fix, 'is_needed', lambda: pytest.fail('asked'))
    with caplog.at_level(logging.INFO, logger='mmdyn.compat'):
        results = mmdyn.compat.apply()
    assert results == {name: expected for name in mmdyn.compat.FIXES}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(mmdyn.compat.FIXES)  # one line per fix
    if version is not None:
        assert all('written for' in line and version in line for line in lines)
        assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_fix_not_needed_is_not_applied(monkeypatch):
    for fix in mmdyn.compat.fix_modules():
        monkeypatch.setattr(fix, 'is_needed', lambda: False)
        monkeypatch.setattr(fix, 'apply', lambda: pytest.fail('applied'))
    results = mmdyn.compat.apply()
    assert set(results.values()) <= {'not needed', 'not installed'}


def test_nothing_applied_on_import(tmp_path):
    out = run_python(
        tmp_path, """
        import json, sys
        import numpy as np
        import mmdyn, mmdyn.compat, mmdyn.engine, mmdyn.models
        from mmengine.config import utils
        import mmengine.config.config as config_module
        from mmdyn.compat import package_paths
        print(json.dumps([
            'mmdyn' in utils.MODULE2PACKAGE,
            config_module.get_installed_path is
            package_paths.get_installed_path,
            getattr(sys.modules.get('mmpretrain.evaluation.metrics.retrieval'),
                    'np', np) is np]))
        """)
    assert out == [False, False, True]


# --- package_paths: mmengine's package lookup -------------------------------

NO_PKG_RESOURCES = """
    import sys
    sys.modules['pkg_resources'] = None  # as under setuptools >= 81
    from mmengine.config import Config
    open('cfg.py', 'w').write(
        "_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'\\n"
        "model = dict(backbone=dict(depth=18))\\n")
    """


def test_config_bases_without_pkg_resources(tmp_path):
    before = run_python(
        tmp_path, NO_PKG_RESOURCES, """
        import json
        try:
            Config.fromfile('cfg.py')
            print(json.dumps('loaded'))
        except ModuleNotFoundError as e:
            print(json.dumps(str(e)))
        """)
    assert 'pkg_resources' in before
    after = run_python(
        tmp_path, NO_PKG_RESOURCES, """
        import json
        import mmdyn.compat
        assert mmdyn.compat.apply()['package_paths'] == 'applied'
        cfg = Config.fromfile('cfg.py')
        print(json.dumps([cfg.model.type, cfg.model.backbone.depth]))
        """)
    assert after == ['FasterRCNN', 18]


def test_installed_paths_match_the_imported_modules():
    import importlib.util

    import mmdet
    assert package_paths.is_installed('mmdet')
    assert not package_paths.is_installed('mmdyn-no-such-package-xyz')
    assert package_paths.get_installed_path('mmdet') == osp.dirname(
        mmdet.__file__)
    # a distribution whose module name differs from its name
    assert package_paths.get_installed_path('opencv-python') == osp.dirname(
        importlib.util.find_spec('cv2').origin)
    # mmdyn where Python imports it from (the checkout, when editable)
    assert package_paths.get_installed_path('mmdyn') == osp.dirname(
        mmdyn.__file__)


# --- config_package_scope: mmdyn:: bases -------------------------------------

MMDYN_BASE = """
    import json
    from mmengine.config import Config
    open('cfg.py', 'w').write(
        "_base_ = ['mmdyn::demo/_base_/demo_det_data.py']\\n")
    """


def test_mmdyn_bases_need_the_fix(tmp_path):
    before = run_python(
        tmp_path, MMDYN_BASE, """
        try:
            Config.fromfile('cfg.py')
            print(json.dumps('loaded'))
        except AssertionError as e:
            print(json.dumps(str(e)))
        """)
    assert 'does not support to load mmdyn config' in before
    after = run_python(
        tmp_path, MMDYN_BASE, """
        import mmdyn.compat
        results = mmdyn.compat.apply()
        cfg = Config.fromfile('cfg.py')
        print(json.dumps([results['config_package_scope'], cfg.data_root,
                          cfg.filename]))
        """)
    assert after[:2] == ['applied', 'data/demo_det/']
    assert not config_package_scope.is_needed()  # applied by conftest


# --- numpy_in1d: mmpretrain's retrieval metrics under numpy >= 2.4 -----------

RETRIEVAL = """
    import json
    import torch
    from mmpretrain.evaluation.metrics import RetrievalRecall
    pred = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.7]])
    target = [torch.tensor([1]), torch.tensor([0])]
    """


def test_retrieval_metric_under_numpy2(tmp_path):
    import numpy as np
    if hasattr(np, 'in1d'):
        pytest.skip('this numpy still has in1d: the fix is not needed')
    before = run_python(
        tmp_path, RETRIEVAL, """
        try:
            RetrievalRecall.calculate(pred, target, topk=(1, 2),
                                      target_indices=True)
            print(json.dumps('ran'))
        except AttributeError as e:
            print(json.dumps(str(e)))
        """)
    assert 'in1d' in before
    after = run_python(
        tmp_path, RETRIEVAL, """
        import mmdyn.compat
        assert mmdyn.compat.apply()['numpy_in1d'] == 'applied'
        recall = RetrievalRecall.calculate(pred, target, topk=(1, 2),
                                           target_indices=True)
        print(json.dumps([float(r) for r in recall]))
        """)
    # Sample 0: top-1 is class 0 (miss), top-2 adds class 1 (hit).
    # Sample 1: top-1 is class 2, top-2 adds class 1: class 0 never found.
    assert after == [0.0, 50.0]


def test_in1d_matches_numpys_definition():
    import numpy as np
    a = np.array([[0, 1], [5, 2]])
    b = [1, 2, 7]
    expected = np.array([False, True, False, True])  # in1d flattens
    np.testing.assert_array_equal(
        numpy_in1d.NumpyWithIn1d.in1d(a, b), expected)
    np.testing.assert_array_equal(
        numpy_in1d.NumpyWithIn1d.in1d(a, b, invert=True), ~expected)
    assert numpy_in1d.NumpyWithIn1d().isin is np.isin


# --- DDP on CPU: the tools start the process group, mmengine unpatched ------


def test_cpu_process_group_started_by_the_tools(tmp_path):
    out = run_python(
        tmp_path, f"""
        import json, os, socket
        import torch
        import torch.distributed as dist
        torch.cuda.is_available = lambda: False
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1',
                          MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        import mmengine.dist.utils as dist_utils
        original = dist_utils._init_dist_pytorch
        from mmdyn.engine.launch import init_cpu_process_group, load_config
        cfg = load_config({osp.join(REPO, 'configs', 'demo',
                                    'resnet18_demo_cls.py')!r},
                          launcher='pytorch')
        started = init_cpu_process_group(cfg)
        backend = dist.get_backend()
        again = init_cpu_process_group(cfg)
        dist.destroy_process_group()
        print(json.dumps([started, backend, again,
                          dist_utils._init_dist_pytorch is original,
                          cfg.model_wrapper_cfg.device_ids]))
        """)
    assert out == [True, 'gloo', False, True, None]


_PKG_RESOURCES_WARNINGS = """
import json, sys, warnings
warnings.simplefilter('always')
seen = []
def show(message, category, filename, lineno, file=None, line=None):
    if 'pkg_resources' in str(message):
        seen.append(str(message))
warnings.showwarning = show
if sys.argv[1:] == ['apply']:
    import mmdyn.compat
    mmdyn.compat.apply()
from mmengine.config import Config
from mmengine.utils import get_installed_path, is_installed
is_installed('mmdet')
get_installed_path('mmdet')
Config.fromfile(sys.argv[0].rsplit('/', 1)[0] + '/cfg.py')
print(json.dumps(len(seen)))
"""


@pytest.mark.skipif(
    importlib.util.find_spec('pkg_resources') is None,
    reason='setuptools >= 81: no pkg_resources (test_config_bases_without_'
    'pkg_resources covers that case)')
def test_no_pkg_resources_warnings_after_apply(tmp_path):
    """The inferencer and vis runs printed three ``pkg_resources is
    deprecated`` warnings (mmengine's package lookups import it); after
    ``mmdyn.compat.apply()`` the same lookups print none."""
    config = tmp_path / 'cfg.py'
    config.write_text("_base_ = ['mmdet::_base_/default_runtime.py']\n")
    script = tmp_path / 'lookups.py'
    script.write_text(_PKG_RESOURCES_WARNINGS)

    def warnings_seen(*args):
        env = dict(os.environ, OMP_NUM_THREADS='1')
        env.pop('PYTHONWARNINGS', None)
        command = [sys.executable, str(script), *args]
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert warnings_seen() >= 1  # the stock lookups warn
    assert warnings_seen('apply') == 0
