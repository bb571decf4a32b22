from setuptools import find_packages, setup


def read_version():
    scope = {}
    with open('mmdyn/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmdyn',
    version=read_version(),
    description='Dynamic convolutions (CondConv/DyConv, ODConv, '
    'KernelWarehouse, DDF) as drop-in OpenMMLab layers',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'benchmarks',
                                    'configs.*', 'tools.*', 'tests.*')),
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
