# Copyright (c) mmdyn contributors. All rights reserved.
"""The docs site (Sphinx + MyST under docs/): the model-zoo pages generated
from the metafiles carry every model, its numbers and its convert command; the
site builds with warnings as errors."""
import importlib.util
import os.path as osp
import re
import subprocess
import sys

import pytest
import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DOCS = osp.join(REPO, 'docs')


def load_docs_module(name):
    spec = importlib.util.spec_from_file_location(f'mmdyn_docs_{name}',
                                                  osp.join(DOCS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_zoo_pages_carry_the_metafiles(tmp_path):
    zoo = load_docs_module('model_zoo')
    paths = zoo.write_pages(REPO, str(tmp_path))
    with open(osp.join(REPO, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    assert len(paths) == len(imports)
    for metafile in imports:
        with open(osp.join(REPO, metafile)) as f:
            meta = yaml.safe_load(f)
        folder = osp.basename(osp.dirname(metafile))
        with open(tmp_path / f'{folder}.md') as f:
            page = f.read()
        readme = osp.join(REPO, meta['Collections'][0]['README'])
        with open(readme) as f:
            readme_text = f.read()
        for model in meta['Models']:
            row = [
                line for line in page.splitlines()
                if line.startswith(f'| {model["Name"]} |')
            ]
            assert len(row) == 1, model['Name']
            cells = [c.strip() for c in row[0].strip('|').split('|')]
            assert cells[1] == f'{model["Metadata"]["Parameters"] / 1e6:.2f}'
            assert cells[2] == f'{model["Metadata"]["FLOPs"] / 1e9:.3f}'
            weights = (model.get('Converted From') or {}).get('Weights')
            if weights:
                assert f'[download]({weights})' in row[0]
        # every convert command of the README is on the page, verbatim
        commands = re.findall(r'`(python tools/model_converters/[^`]+)`',
                              readme_text)
        for command in commands:
            assert f'\n{command}\n' in page, command


def test_conf_mocks_no_required_dependency():
    scope = {'__file__': osp.join(DOCS, 'conf.py')}
    with open(osp.join(DOCS, 'conf.py')) as f:
        exec(compile(f.read(), 'docs/conf.py', 'exec'), scope)
    required = {'torch', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain', 'numpy'}
    assert not required & set(scope['autodoc_mock_imports'])
    assert 'myst_parser' in scope['extensions']
    assert 'dollarmath' in scope['myst_enable_extensions']


def test_docs_pages_in_the_toctree():
    with open(osp.join(DOCS, 'index.md')) as f:
        index = f.read()
    for page in ('get_started', 'methods', 'model_zoo', 'flops', 'plug_in',
                 'dcn_slot', 'compat*', 'changelog', 'api'):
        assert f'\n{page}\n' in index, page
    with open(osp.join(DOCS, 'api.md')) as f:
        api = f.read()
    for module in ('mmdyn.ops', 'mmdyn.models', 'mmdyn.engine'):
        assert f'.. automodule:: {module}\n' in api


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip('sphinx')
    pytest.importorskip('myst_parser')
    out = subprocess.run([
        sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
        'html', '-d',
        str(tmp_path / 'doctrees'), DOCS,
        str(tmp_path / 'html')
    ],
                         capture_output=True,
                         text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-5000:]
    html = (tmp_path / 'html')
    for page in ('index', 'get_started', 'methods', 'api', 'plug_in',
                 'model_zoo_generated/odconv'):
        assert (html / f'{page}.html').is_file(), page
    api = (html / 'api.html').read_text()
    for name in ('ODConv2d', 'KWConv2d', 'DDFUpsample',
                 'DynamicTemperatureHook'):
        assert name in api, name
    methods = (html / 'methods.html').read_text()
    assert 'class="math' in methods
