# Copyright (c) mmdyn contributors. All rights reserved.
"""Sphinx configuration of the mmdyn docs (Sphinx + MyST, OpenMMLab's form).

    pip install -r requirements/docs.txt
    sphinx-build -W -b html docs docs/_build/html

The model-zoo pages are generated from ``configs/*/metafile.yml`` at build
time (:mod:`model_zoo`); the version is ``mmdyn/version.py``'s.
"""
import os
import os.path as osp
import sys

DOCS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(DOCS)
sys.path.insert(0, ROOT)
sys.path.insert(0, DOCS)


def read_version():
    scope = {}
    with open(osp.join(ROOT, 'mmdyn', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


project = 'mmdyn'
author = 'mmdyn contributors'
copyright = '2026, mmdyn contributors'  # noqa: A001
release = read_version()
version = '.'.join(release.split('.')[:2])

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
    'sphinx.ext.mathjax',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

# MyST: $...$ and $$...$$ math (the methods page), ``:::`` fences, heading
# anchors for in-page links.
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
# The Markdown pages are also read on GitHub, where they link to files of
# the repository (configs, tools) that are not pages of this site.
suppress_warnings = ['myst.xref_missing']

# API reference: Google-style docstrings; torch, mmengine, mmcv, mmdet and
# mmpretrain must be installed. Nothing is mocked: the optional Triton is
# detected at import time by mmdyn.ops.accel (a mocked triton would look
# installed and break torch.library's registration of its kernels), and the
# docs build without it.
autodoc_mock_imports = []
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as :ivar: fields: a dataclass or NamedTuple whose
# fields autodoc also lists would otherwise describe each field twice.
napoleon_use_ivar = True

html_theme = os.environ.get('MMDYN_DOCS_THEME', 'alabaster')
html_title = f'mmdyn {release}'
html_static_path = []


def generate_model_zoo(app):
    """Write ``docs/model_zoo_generated/*.md`` from the metafiles."""
    from model_zoo import write_pages
    write_pages(ROOT, osp.join(DOCS, 'model_zoo_generated'))


def setup(app):
    app.connect('builder-inited', generate_model_zoo)
