# Copyright (c) mmdyn contributors. All rights reserved.
"""Mmengine's package lookup without ``pkg_resources``, and right for editable
installs.

mmengine 0.10's ``is_installed`` and ``get_installed_path`` (which
``Config.fromfile`` calls for every ``mmdet::``/``mmpretrain::``/``mmdyn::``
base) import ``pkg_resources``:

* setuptools >= 81 no longer has it: every such config base fails with
  ``ModuleNotFoundError: No module named 'pkg_resources'``;
* older setuptools warn ``pkg_resources is deprecated`` on every run;
* ``get_installed_path`` returns ``<distribution location>/<name>``, which
  for a PEP 660 editable install (``pip install -e .``) is a folder in
  ``site-packages`` that does not exist, so ``mmdyn::`` bases of an
  editable checkout are not found.

The fix points the names that mmengine's modules imported at two functions
on :mod:`importlib.metadata` and :func:`importlib.util.find_spec` with the
same contract. mmengine replaced ``pkg_resources`` upstream after 0.10.7.
"""
import importlib
import importlib.metadata
import importlib.util
import os.path as osp

PACKAGE = 'mmengine'
VERSIONS = '>=0.10.0,<=0.10.7'
SUMMARY = ("mmengine's is_installed/get_installed_path need pkg_resources "
           '(gone in setuptools >= 81) and miss editable installs: '
           '`pkg::` config bases fail')
UPSTREAM = 'open-mmlab/mmengine#1676'

# mmengine modules that hold the two functions under their own names.
MODULES = ('mmengine.utils.package_utils', 'mmengine.utils',
           'mmengine.config.config', 'mmengine.hub.hub')
NAMES = ('is_installed', 'get_installed_path')


def _module_name(package):
    """The top-level module a distribution installs (``opencv-python`` ->
    ``cv2``); ``package`` itself when it is not a distribution."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return package
    top_level = dist.read_text('top_level.txt')
    if top_level and top_level.split():
        return top_level.split()[0]
    return package.replace('-', '_')


def is_installed(package):
    """Whether distribution (or module) ``package`` is installed.

    Args:
        package (str): distribution or module name.

    Returns:
        bool
    """
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def get_installed_path(package):
    """The folder of the module that ``package`` installs, where Python imports
    it from (for an editable install: the checkout).

    Args:
        package (str): distribution or module name (e.g. ``'mmdet'``).

    Returns:
        str

    Raises:
        importlib.metadata.PackageNotFoundError: not installed.
        RuntimeError: ``package`` is a namespace package.
    """
    spec = importlib.util.find_spec(_module_name(package))
    if spec is None:
        raise importlib.metadata.PackageNotFoundError(package)
    if spec.origin is None:
        raise RuntimeError(f'{package} is a namespace package, which is '
                           'invalid for `get_installed_path`')
    return osp.dirname(spec.origin)


def _applied():
    module = importlib.import_module(MODULES[-2])
    return module.get_installed_path is get_installed_path


def is_needed():
    """Needed until applied: in its version range mmengine always goes
    through ``pkg_resources`` (missing, or deprecated with a warning on
    every run, and wrong for editable installs)."""
    return not _applied()


def apply():
    """Point mmengine's module-level names at this module's functions."""
    ours = dict(
        is_installed=is_installed, get_installed_path=get_installed_path)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in NAMES:
            if hasattr(module, name):
                setattr(module, name, ours[name])
