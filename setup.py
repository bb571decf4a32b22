import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

MIM_FOLDER = osp.join('mmdyn', '.mim')
# Shipped in mmdyn/.mim as OpenMMLab packages do: `mmdyn::` config bases
# (mmdyn/engine/config_bases.py) and mim read them from there.
MIM_ITEMS = ('configs', 'model-index.yml')


def read_version():
    scope = {}
    with open('mmdyn/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


def add_mim_extension():
    """Copy ``configs/`` (and ``model-index.yml``) into ``mmdyn/.mim``
    for wheels and sdists. An editable install reads the checkout's
    ``configs/`` directly, so nothing is copied for it."""
    if {'develop', 'editable_wheel'} & set(sys.argv):
        return
    root = osp.dirname(osp.abspath(__file__))
    if not osp.isdir(osp.join(root, 'configs')):
        return  # building from an sdist: mmdyn/.mim is already filled
    mim = osp.join(root, MIM_FOLDER)
    shutil.rmtree(mim, ignore_errors=True)
    os.makedirs(mim)
    for item in MIM_ITEMS:
        source = osp.join(root, item)
        if osp.isdir(source):
            shutil.copytree(
                source, osp.join(mim, item),
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
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'benchmarks',
                                    'configs.*', 'tools.*', 'tests.*')),
    package_data={'mmdyn': ['.mim/**/*', 'ops/csrc/*.c', 'ops/csrc/*.h']},
    include_package_data=True,
    python_requires='>=3.8',
    # torch, torchvision and mmcv (compiled ops) are installed by
    # tools/install.sh: pip cannot pick the right builds of them by itself.
    install_requires=[
        'mmengine>=0.10.0,<1.0.0',
        'mmdet>=3.3.0,<3.4.0',
        'mmpretrain>=1.2.0,<1.3.0',
        'numpy',
        'pycocotools',
    ],
    extras_require={
        'tests': ['pytest', 'onnx', 'onnxruntime'],
    },
    license='Apache License 2.0',
    zip_safe=False,
)
