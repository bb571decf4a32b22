# Copyright (c) mmdyn contributors. All rights reserved.
import os
import os.path as osp
import shutil
import sys
from setuptools import find_packages, setup

MIM_FOLDER = osp.join('mmdyn', '.mim')
# Shipped in mmdyn/.mim as OpenMMLab packages do: `mmdyn::` config bases
# (mmengine's lookup, with mmdyn.compat applied) and mim read them there.
MIM_ITEMS = ('configs', 'model-index.yml')


def read_requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` (no comments)."""
    path = osp.join(
        osp.dirname(osp.abspath(__file__)), 'requirements', f'{name}.txt')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line and not line.startswith('-')]


def read_version():
    scope = {}
    with open('mmdyn/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


def add_mim_extension():
    """Copy ``configs/`` (and ``model-index.yml``) into ``mmdyn/.mim``
    for wheels and sdists; for an editable install, link them, so that
    mmengine's ``mmdyn::`` lookup reads the checkout's files."""
    editable = bool({'develop', 'editable_wheel'} & set(sys.argv))
    root = osp.dirname(osp.abspath(__file__))
    if not osp.isdir(osp.join(root, 'configs')):
        return  # building from an sdist: mmdyn/.mim is already filled
    mim = osp.join(root, MIM_FOLDER)
    shutil.rmtree(mim, ignore_errors=True)
    os.makedirs(mim)
    for item in MIM_ITEMS:
        source = osp.join(root, item)
        if editable and osp.exists(source):
            os.symlink(osp.relpath(source, mim), osp.join(mim, item))
        elif osp.isdir(source):
            shutil.copytree(
                source,
                osp.join(mim, item),
                ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        elif osp.isfile(source):
            shutil.copyfile(source, osp.join(mim, item))


add_mim_extension()

setup(
    name='mmdyn',
    version=read_version(),
    description='Dynamic convolutions (CondConv/DyConv, ODConv, '
    'KernelWarehouse, DDF) as drop-in OpenMMLab layers',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(
        exclude=('configs', 'tools', 'tests', 'benchmarks', 'configs.*',
                 'tools.*', 'tests.*')),
    # The C sources are compiled at run time, so they ship as data; the
    # recursive pattern also covers csrc/ folders below mmdyn/ops/ (e.g.
    # mmdyn/ops/accel/csrc/).
    package_data={
        'mmdyn': ['.mim/**/*', 'ops/csrc/*', 'ops/**/csrc/*'],
    },
    include_package_data=True,
    python_requires='>=3.8',
    # torch, torchvision and mmcv (compiled ops) are installed by
    # tools/install.sh: pip cannot pick the right builds of them by itself.
    install_requires=read_requirements('runtime'),
    extras_require={
        'tests': read_requirements('tests'),
        'lint': read_requirements('lint'),
        'docs': read_requirements('docs'),
        'dev': read_requirements('dev'),
        'deploy': read_requirements('deploy'),
    },
    author='mmdyn contributors',
    license='Apache-2.0',  # an SPDX expression
    license_files=['LICENSE'],
    keywords='computer vision, dynamic convolution, OpenMMLab',
    classifiers=[
        'Development Status :: 4 - Beta',
        'Operating System :: OS Independent',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.8',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
