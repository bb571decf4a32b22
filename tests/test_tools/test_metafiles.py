"""The model index (``model-index.yml`` and ``configs/*/metafile.yml``, mim's
schema): it loads with the ``modelindex`` package, every config it names
exists and builds (on the meta device: shapes and parameter counts, no
memory or initialisation) with the parameter count the metafile states,
every classification and detection config of the method folders is named,
and each README is an OpenMMLab model-zoo page."""
import glob
import os.path as osp
import re

import pytest
import yaml

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METHODS = ('odconv', 'kernelwarehouse', 'ddf', 'dyconv')


@pytest.fixture(scope='module')
def index():
    with open(osp.join(ROOT, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    metafiles = {}
    for path in imports:
        with open(osp.join(ROOT, path)) as f:
            metafiles[path] = yaml.safe_load(f)
    return metafiles


def test_model_index_loads_in_mim_schema():
    from modelindex.load_model_index import load
    model_index = load(osp.join(ROOT, 'model-index.yml'))
    # README paths are relative to the repository root, as in mmdet and
    # mmpretrain; the modelindex checker looks for them next to the
    # metafile, so those messages are checked below instead.
    errors = [
        e for e in (model_index.check(silent=True) or [])
        if 'Path to README file' not in e
    ]
    assert errors == []
    assert len(model_index.models) >= 50


def test_every_method_folder_config_is_named(index):
    assert sorted(index) == sorted(f'configs/{m}/metafile.yml'
                                   for m in METHODS)
    named = {m['Config'] for meta in index.values() for m in meta['Models']}
    for method in METHODS:
        for path in glob.glob(osp.join(ROOT, 'configs', method, '*.py')):
            assert osp.relpath(path, ROOT) in named, path


def test_collections_and_readmes(index):
    for path, meta in index.items():
        [collection] = meta['Collections']
        readme = osp.join(ROOT, collection['README'])
        assert osp.isfile(readme), readme
        with open(readme) as f:
            text = f.read()
        # the OpenMMLab model-zoo page layout
        assert text.startswith('# '), readme
        for marker in ('<!-- [ALGORITHM] -->', '## Abstract',
                       '## Results and models', '## Citation', '```bibtex'):
            assert marker in text, (readme, marker)
        assert collection['Paper']['URL'] in text
        # every config link of the page points to an existing file
        folder = osp.dirname(readme)
        for link in re.findall(r'\]\((\./[^)#]+)\)', text):
            assert osp.isfile(osp.join(folder, link)), (readme, link)
        for model in meta['Models']:
            assert model['In Collection'] == collection['Name']
            assert osp.basename(model['Config']) in text, (readme,
                                                           model['Name'])


def test_every_named_config_builds_with_its_params(index):
    from mmdyn.analysis.converters import meta_model_summary
    for meta in index.values():
        for model in meta['Models']:
            config = osp.join(ROOT, model['Config'])
            assert osp.isfile(config), config
            assert model['Name'] == osp.splitext(osp.basename(config))[0]
            _, params = meta_model_summary(config)
            assert params == model['Metadata']['Parameters'], config
            for result in model.get('Results', []):
                assert result['Dataset'] in ('ImageNet-1k', 'COCO')
                assert all(0 < v < 100 for v in result['Metrics'].values())
