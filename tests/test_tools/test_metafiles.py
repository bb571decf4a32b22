# Copyright (c) mmdyn contributors. All rights reserved.
"""The model index (``model-index.yml`` and ``configs/*/metafile.yml``, mim's
schema): it loads with the ``modelindex`` package, every config it names exists
and builds (on the meta device: shapes and parameter counts, no memory or
initialisation) with the parameter count the metafile states, every
classification and detection config of the method folders is named, and each
README is an OpenMMLab model-zoo page."""
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


# --- checkpoints named in the docs and what the converters write ---------

PAGES = sorted(
    glob.glob(osp.join(ROOT, 'configs', '*', 'README*.md')) +
    glob.glob(osp.join(ROOT, 'docs', '*.md')) + [osp.join(ROOT, 'README.md')])
CONVERT = re.compile(r'python tools/model_converters/\S+\.py (\S+) (\S+)')
TRAIN = re.compile(
    r'python tools/train\.py (\S+)((?: --?[\w-]+(?: [^\s-]\S*)?)*)')
CHECKPOINT = re.compile(r'[\w.\-/<>*]+\.pth\b')


def _work_dirs_trained(text):
    """The work dirs the ``tools/train.py`` commands of a page write to."""
    dirs = set()
    for config, options in TRAIN.findall(text):
        argv = options.split()
        if '--work-dir' in argv:
            dirs.add(argv[argv.index('--work-dir') + 1].rstrip('/'))
        else:
            dirs.add('work_dirs/' + osp.splitext(osp.basename(config))[0])
    return dirs


@pytest.mark.parametrize(
    'page', PAGES, ids=[osp.relpath(p, ROOT) for p in PAGES])
def test_checkpoint_names_are_what_the_page_writes(page):
    """Every checkpoint file a page uses is one a converter command of the same
    page writes (or reads: the official file), or one a training command of the
    page writes into its work dir."""
    with open(page) as f:
        text = f.read()
    converted = CONVERT.findall(text)
    official = {src for src, _ in converted}
    written = {dst for _, dst in converted}
    work_dirs = _work_dirs_trained(text)
    for name in sorted(set(CHECKPOINT.findall(text))):
        if name in official or name in written:
            continue
        if name.startswith('work_dirs/'):
            if '<' in name or '...' in name:
                continue  # a placeholder the text explains
            assert osp.dirname(name) in work_dirs, (
                f'{osp.relpath(page, ROOT)}: {name} is in no work dir a '
                f'training command of the page writes ({sorted(work_dirs)})')
            continue
        pytest.fail(f'{osp.relpath(page, ROOT)} uses {name}, which no '
                    f'converter command of the page writes (they write '
                    f'{sorted(written)})')


def test_every_official_checkpoint_has_its_convert_command(index):
    """Each model converted from official weights: its page shows the
    convert command that writes ``<config name>.pth`` for its config, and
    every convert command of a page is for a model of the index."""
    for path, meta in index.items():
        [collection] = meta['Collections']
        with open(osp.join(ROOT, collection['README'])) as f:
            text = f.read()
        commands = {}
        for line in text.splitlines():
            for match in re.finditer(
                    r'`(python tools/model_converters/[^`]+)`', line):
                argv = match.group(1).split()
                assert '--config' in argv, match.group(1)
                config = argv[argv.index('--config') + 1]
                commands[config] = argv
        configs = {m['Config'] for m in meta['Models']}
        assert set(commands) <= configs, set(commands) - configs
        for model in meta['Models']:
            weights = (model.get('Converted From') or {}).get('Weights')
            if not weights:
                continue
            assert weights.startswith('https://'), model['Name']
            argv = commands.get(model['Config'])
            assert argv is not None, (path, model['Name'])
            assert argv[3] == model['Name'] + '.pth', argv
            assert weights in text, (path, model['Name'])


def test_model_index_fields_mim_reads(index):
    """The fields ``mim search``/``mim download`` read, with their types."""
    names = set()
    for path, meta in index.items():
        [collection] = meta['Collections']
        for key in ('Name', 'Metadata', 'Paper', 'README', 'Code'):
            assert key in collection, (path, key)
        for model in meta['Models']:
            assert model['Name'] not in names, model['Name']
            names.add(model['Name'])
            assert isinstance(model['Metadata']['Parameters'], int)
            flops = model['Metadata'].get('FLOPs')
            assert isinstance(flops, int) and flops > 0, model['Name']
            assert model['Metadata']['Training Data'] in ('ImageNet-1k',
                                                          'COCO')
            for result in model.get('Results', []):
                assert set(result) == {'Task', 'Dataset', 'Metrics'}
                assert result['Task'] in ('Image Classification',
                                          'Object Detection',
                                          'Instance Segmentation')
            if 'Weights' in model:
                assert model['Weights'].startswith('https://')


def test_detector_madds_differ_by_the_mask_head(index):
    """Published detector MAdds: Mask R-CNN = Faster R-CNN of the same
    backbone + the FCN mask head (four 3x3 256->256 convs on 14x14, a 2x2
    deconv 256->256, a 1x1 conv to 80 classes on 28x28) on 100 RoIs."""
    per_roi = (4 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 256 * 256 * 4 +
               28 * 28 * 256 * 80)
    flops = {
        m['Name']: m['Metadata']['FLOPs']
        for meta in index.values()
        for m in meta['Models']
    }
    pairs = [(name, 'mask-rcnn' + name[len('faster-rcnn'):]) for name in flops
             if name.startswith('faster-rcnn')]
    # (the DDF-Up Mask R-CNN has a DDF-Up mask head, not the FCN one)
    pairs = [(f, m) for f, m in pairs if m in flops and 'ddfup' not in m]
    assert len(pairs) >= 4, pairs
    for faster, mask in pairs:
        # metafile FLOPs are rounded to 1e6
        assert abs(flops[mask] - flops[faster] - 100 * per_roi) <= 1e6, \
            (faster, mask)
