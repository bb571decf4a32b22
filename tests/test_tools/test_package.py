# Copyright (c) mmdyn contributors. All rights reserved.
"""The distribution: licence and headers, one version everywhere, and a
wheel that works away from the checkout.

``python -m build`` (no network: ``--no-isolation``) gives an sdist and a
wheel holding the C sources, the configs and the model index under
``mmdyn/.mim``; ``twine check`` accepts them; the wheel installed into a
fresh folder loads a config with ``mmdyn::`` bases and builds its model."""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import yaml
from script_loading import load_script as load_tool

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METAFILES = sorted(
    osp.join('configs', d, 'metafile.yml')
    for d in os.listdir(osp.join(REPO, 'configs'))
    if osp.isfile(osp.join(REPO, 'configs', d, 'metafile.yml')))


def package_version():
    scope = {}
    with open(osp.join(REPO, 'mmdyn', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


# --- licence -----------------------------------------------------------


def test_licence_is_apache_2_in_file_and_metadata():
    with open(osp.join(REPO, 'LICENSE')) as f:
        text = f.read()
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text
    assert 'TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION' \
        in text
    assert text.splitlines()[0] == \
        'Copyright (c) 2026 mmdyn contributors. All rights reserved.'
    with open(osp.join(REPO, 'setup.py')) as f:
        setup = f.read()
    assert "license='Apache-2.0'" in setup


def test_header_tool_adds_and_checks(tmp_path):
    tool = load_tool('tools/add_headers.py')
    (tmp_path / 'mmdyn').mkdir()
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'mmdyn' / 'a.py').write_text('import os\n')
    (tmp_path / 'mmdyn' / 'empty.py').write_text('')
    (tmp_path / 'tools' /
     'run.py').write_text('#!/usr/bin/env python\nprint(1)\n')
    (tmp_path / 'tools' / 'adapted.py'
     ).write_text('# Copyright (c) OpenMMLab. All rights reserved.\nx = 1\n')
    (tmp_path / 'mmdyn' / 'notes.txt').write_text('not python\n')
    assert tool.main(['--check', '--root', str(tmp_path)]) == 1
    assert sorted(tool.missing(
        str(tmp_path))) == ['mmdyn/a.py', 'mmdyn/empty.py', 'tools/run.py']
    assert tool.main(['--fix', '--root', str(tmp_path)]) == 0
    assert tool.main(['--check', '--root', str(tmp_path)]) == 0
    header = '# Copyright (c) mmdyn contributors. All rights reserved.'
    assert (tmp_path / 'mmdyn' / 'a.py').read_text() == \
        f'{header}\nimport os\n'
    # the shebang stays first
    assert (tmp_path / 'tools' / 'run.py').read_text() == \
        f'#!/usr/bin/env python\n{header}\nprint(1)\n'
    # another copyright line is kept as it is
    assert (tmp_path / 'tools' /
            'adapted.py').read_text().startswith('# Copyright (c) OpenMMLab.')
    # a second --fix changes nothing
    assert tool.fix(str(tmp_path)) == []


def test_every_python_file_has_the_header():
    """Fails until ``python tools/add_headers.py --fix`` has run."""
    tool = load_tool('tools/add_headers.py')
    missing = tool.missing(REPO)
    assert missing == [], (
        f'{len(missing)} files without the copyright header, e.g. '
        f'{missing[:5]}: run python tools/add_headers.py --fix')


def test_contributing_states_the_header_convention():
    with open(osp.join(REPO, 'CONTRIBUTING.md')) as f:
        text = f.read()
    assert '# Copyright (c) mmdyn contributors. All rights reserved.' in text
    assert 'tools/add_headers.py' in text and 'tools/lint.sh' in text


# --- one version ---------------------------------------------------------


def test_one_version_in_package_docs_changelog_and_model_index():
    import mmdyn
    version = package_version()
    assert re.fullmatch(r'\d+\.\d+\.\d+([a-z]+\d*)?', version)
    assert mmdyn.__version__ == version
    # the changelog's newest section is this version
    with open(osp.join(REPO, 'CHANGELOG.md')) as f:
        sections = re.findall(r'^## v(\S+)', f.read(), flags=re.M)
    assert sections and sections[0] == version
    # the docs read it from mmdyn/version.py
    scope = {'__file__': osp.join(REPO, 'docs', 'conf.py')}
    with open(osp.join(REPO, 'docs', 'conf.py')) as f:
        exec(compile(f.read(), 'docs/conf.py', 'exec'), scope)
    assert scope['release'] == version
    assert scope['version'] == '.'.join(version.split('.')[:2])
    # every collection of the model index names it
    with open(osp.join(REPO, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    assert sorted(imports) == METAFILES
    for path in METAFILES:
        with open(osp.join(REPO, path)) as f:
            meta = yaml.safe_load(f)
        for collection in meta['Collections']:
            assert collection['Code']['Version'] == f'v{version}', path
            code = collection['Code']['URL']
            assert osp.isfile(osp.join(REPO, code)), (path, code)


# --- the built package ---------------------------------------------------


def copy_checkout(dest):
    """The files a release is built from (no build outputs, no .git)."""
    ignore = shutil.ignore_patterns('.git', '__pycache__', '*.pyc', '.mim',
                                    'build', 'dist', '*.egg-info', '_build',
                                    'work_dirs', 'data', '.pytest_cache',
                                    '.benchmarks', '*.pth', '*.onnx')
    shutil.copytree(REPO, dest, ignore=ignore)


def check_members(names, prefix=''):
    """The C sources, configs and model index are in the archive."""
    csrc = [
        n for n in names if re.search(r'mmdyn/ops/(.+/)?csrc/[^/]+\.(c|h)$', n)
    ]
    sources = {osp.basename(n) for n in csrc}
    repo_sources = {
        f
        for _, _, files in os.walk(osp.join(REPO, 'mmdyn', 'ops'))
        for f in files if f.endswith(('.c', '.h'))
    }
    assert repo_sources and sources == repo_sources, (sources, repo_sources)
    for item in ('mmdyn/.mim/model-index.yml',
                 'mmdyn/.mim/configs/demo/_base_/demo_det_data.py',
                 'mmdyn/.mim/configs/odconv/resnet18-odconv1x_8xb32_in1k.py'
                 ) + tuple(f'mmdyn/.mim/{m}' for m in METAFILES):
        assert prefix + item in names, item


@pytest.mark.slow
def test_built_wheel_installs_and_runs_a_config(tmp_path):
    pytest.importorskip('build')
    source = tmp_path / 'src'
    copy_checkout(source)
    dist = tmp_path / 'dist'
    subprocess.run([
        sys.executable, '-m', 'build', '--no-isolation', '--outdir',
        str(dist),
        str(source)
    ],
                   check=True,
                   capture_output=True,
                   cwd=str(tmp_path))
    version = package_version()
    [wheel] = dist.glob(f'mmdyn-{version}-py3-none-any.whl')
    [sdist] = dist.glob(f'mmdyn-{version}.tar.gz')
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(f'mmdyn-{version}.dist-info/METADATA').decode()
    check_members(names)
    assert any(
        n.endswith('/licenses/LICENSE') or n.endswith('/LICENSE')
        for n in names)
    assert re.search(
        r'^License(-Expression)?: Apache-2\.0$', metadata,
        flags=re.M), metadata[:2000]
    with tarfile.open(sdist) as tf:
        sdist_names = tf.getnames()
    root = f'mmdyn-{version}/'
    check_members(sdist_names, prefix=root)
    for item in ('LICENSE', 'CHANGELOG.md', 'model-index.yml',
                 'requirements/runtime.txt', 'configs/odconv/metafile.yml'):
        assert root + item in sdist_names, item

    # twine check: the long description renders and the metadata is valid
    twine = subprocess.run([
        sys.executable, '-m', 'twine', 'check', '--strict',
        str(wheel),
        str(sdist)
    ],
                           capture_output=True,
                           text=True)
    assert twine.returncode == 0, twine.stdout + twine.stderr

    # installed into a fresh folder, away from the checkout
    target = tmp_path / 'site'
    subprocess.run([
        sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index',
        '--target',
        str(target),
        str(wheel)
    ],
                   check=True,
                   capture_output=True,
                   cwd=str(tmp_path))
    config = tmp_path / 'user_config.py'
    config.write_text(
        textwrap.dedent("""\
        _base_ = ['mmdyn::demo/resnet18-odconv1x_demo_cls.py']
        """))
    # what a user's script does: apply the compat fixes, read the config
    # with mmengine, build its model
    check = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(target)!r})
        import mmdyn, mmdyn.compat
        mmdyn.compat.apply()
        from mmengine.config import Config
        from mmengine.registry import MODELS, init_default_scope
        cfg = Config.fromfile({str(config)!r})
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        print(mmdyn.__file__)
        print(mmdyn.__version__)
        print(type(model.backbone).__name__)
        print(sum(p.numel() for p in model.parameters()))
        """)
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    out = subprocess.run([sys.executable, '-c', check],
                         capture_output=True,
                         text=True,
                         env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(target)), lines
    assert lines[1] == version
    assert lines[2] == 'DynamicResNet'
    assert int(lines[3]) > 0


# --- install without torch on a CPU-only machine -----------------------

FAKE_PYTHON = r'''#!/bin/bash
# Records its arguments; torch is "absent", the PyTorch index "unreachable".
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
    "-c import sys; assert"*) exit 0 ;;
    "-c import sys; print"*) echo "/fake/python 3.11"; exit 0 ;;
esac
case "$*" in
    *--index-url*) exit 1 ;;
    "-m pip install"*) exit 0 ;;
esac
exit 1
'''


@pytest.mark.parametrize('cpu_try', ['auto', '0'])
def test_install_tries_the_cpu_torch_then_pypi(tmp_path, cpu_try):
    """Without torch and without nvidia-smi, tools/install.sh asks the PyTorch
    CPU index first and falls back to PyPI when it is unreachable
    (MMDYN_TORCH_CPU=0: PyPI only)."""
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / 'calls.log'
    bin_dir = tmp_path / 'bin'  # a PATH without nvidia-smi
    bin_dir.mkdir()
    for tool in ('bash', 'dirname', 'cat', 'mktemp', 'rm', 'env'):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    env = dict(
        os.environ,
        PYTHON=str(fake),
        FAKE_LOG=str(log),
        PATH=str(bin_dir),
        MMDYN_TORCH_CPU=cpu_try)
    out = subprocess.run(['bash',
                          osp.join(REPO, 'tools', 'install.sh')],
                         capture_output=True,
                         text=True,
                         env=env)
    # the fake torch never imports, so the script stops after step 1
    assert out.returncode != 0
    assert 'torch/torchvision do not import' in out.stderr
    pip = [
        line for line in log.read_text().splitlines()
        if line.startswith('-m pip install')
    ]
    pypi = [
        line for line in pip if 'torch==' in line and '--index-url' not in line
    ]
    cpu = [line for line in pip if '--index-url' in line]
    assert len(pypi) == 1
    if cpu_try == 'auto':
        assert len(cpu) == 1 and 'download.pytorch.org/whl/cpu' in cpu[0]
        assert pip.index(cpu[0]) < pip.index(pypi[0])
        assert 'falling back' in out.stdout or 'from PyPI' in out.stdout
    else:
        assert cpu == []


def test_readme_says_how_to_get_the_cpu_torch_first():
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    install = text[text.index('## Install'):text.index('## Test')]
    command = ('pip install torch==2.14.1 torchvision==0.29.1 --index-url '
               'https://download.pytorch.org/whl/cpu')
    assert command in install
    assert install.index(command) < install.rindex('bash tools/install.sh')
    with open(osp.join(REPO, 'tools', 'install.sh')) as f:
        script = f.read()
    assert 'TORCH_VERSION=2.14.1' in script
    assert 'TORCHVISION_VERSION=0.29.1' in script


# --- lint -----------------------------------------------------------------


def test_lint_script_checks_and_fixes(tmp_path):
    """tools/lint.sh with the repository's settings: a misordered import and a
    misformatted call fail the check; --fix repairs them."""
    for module in ('flake8', 'isort', 'yapf', 'codespell_lib', 'docformatter'):
        pytest.importorskip(module)
    shutil.copy(osp.join(REPO, 'setup.cfg'), tmp_path / 'setup.cfg')
    (tmp_path / 'tools').mkdir()
    shutil.copy(osp.join(REPO, 'tools', 'lint.sh'), tmp_path / 'tools')
    for folder in ('mmdyn', 'tests', 'benchmarks', 'configs', 'docs'):
        (tmp_path / folder).mkdir()
    for name in ('setup.py', 'docs/conf.py'):
        (tmp_path / name).write_text('"""A module."""\n')
    for name in ('README.md', 'CHANGELOG.md'):
        (tmp_path / name).write_text('# Title\n')
    bad = tmp_path / 'mmdyn' / 'bad.py'
    bad.write_text('"""A module."""\nimport sys\nimport os\n\n'
                   'print( os.sep,sys.argv )\n')
    lint = ['bash', str(tmp_path / 'tools' / 'lint.sh')]
    check = subprocess.run(lint, capture_output=True, text=True)
    assert check.returncode == 1, check.stdout + check.stderr
    failed = check.stderr.strip().splitlines()[-1]
    assert 'isort' in failed and 'yapf' in failed and 'flake8' in failed
    fixed = subprocess.run(lint + ['--fix'], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert bad.read_text() == ('"""A module."""\nimport os\nimport sys\n\n'
                               'print(os.sep, sys.argv)\n')


def test_ci_lints_and_builds_the_docs_before_the_tests():
    with open(osp.join(REPO, '.ci', 'run')) as f:
        ci = f.read()
    lint = ci.index('bash tools/lint.sh ||')
    docs = ci.index('-m sphinx -W')
    tests = ci.index('python -m pytest tests')
    assert ci.index('requirements/lint.txt') < lint < docs < tests
    with open(osp.join(REPO, '.gitignore')) as f:
        assert 'docs/_build/' in f.read().split()
    with open(osp.join(REPO, '.pre-commit-config.yaml')) as f:
        hooks = yaml.safe_load(f)
    ids = {h['id'] for repo in hooks['repos'] for h in repo['hooks']}
    assert {'flake8', 'isort', 'yapf', 'codespell', 'docformatter'} <= ids
    # the same versions as requirements/lint.txt
    with open(osp.join(REPO, 'requirements', 'lint.txt')) as f:
        pins = dict(line.strip().split('==') for line in f
                    if '==' in line and not line.startswith('#'))
    for repo in hooks['repos']:
        for hook in repo['hooks']:
            if hook['id'] in pins:
                assert repo['rev'].lstrip('v') == pins[hook['id']], hook
