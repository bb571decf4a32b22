# Copyright (c) mmdyn contributors. All rights reserved.
"""``mmdyn::`` config bases.

mmengine documents that any package laid out as OpenMMLab's (configs in
``<package>/.mim/configs``) can be named in a base, ``'pkg::path'``, but
0.10 only accepts the packages of its table
``mmengine.config.utils.MODULE2PACKAGE``: ``'mmdyn::demo/...'`` fails with
``AssertionError: mmengine does not support to load mmdyn config.`` The
fix adds ``'mmdyn': 'mmdyn'`` to that table; mmengine's own lookup does the
rest (``mmdyn/.mim/configs``, which ``pip install .`` ships and an editable
install links to the checkout's ``configs/``).
"""
PACKAGE = 'mmengine'
VERSIONS = '>=0.10.0,<0.11'
SUMMARY = ("mmengine accepts `pkg::` config bases only for its own table "
           "of packages: 'mmdyn::' bases fail")
UPSTREAM = 'none found (related: open-mmlab/mmengine#1581)'

SCOPE = 'mmdyn'


def is_needed():
    from mmengine.config import utils
    return SCOPE not in utils.MODULE2PACKAGE


def apply():
    from mmengine.config import utils
    utils.MODULE2PACKAGE[SCOPE] = SCOPE
