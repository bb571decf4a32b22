# Copyright (c) mmdyn contributors. All rights reserved.
"""Explicit, versioned fixes that let the pinned OpenMMLab stack (mmengine
0.10, mmcv 2.1, mmdet 3.3, mmpretrain 1.2) run on today's torch, numpy and
setuptools.

Nothing here is applied on import: importing ``mmdyn``, ``mmdyn.models`` or
``mmdyn.engine`` changes nothing in other libraries. A script applies the
fixes with one call, before it reads a config or loads a checkpoint::

    import mmdyn.compat
    mmdyn.compat.apply()

``tools/train.py``, ``tools/test.py`` and the other tools make that call.

Each fix is one module of this package (listed in :data:`FIXES`) that
defines:

* ``PACKAGE``: the distribution whose behaviour it changes;
* ``VERSIONS``: the versions of ``PACKAGE`` it was written for (a
  ``packaging`` specifier, e.g. ``'>=0.10.0,<=0.10.7'``);
* ``SUMMARY``: what breaks without it (one line);
* ``UPSTREAM``: the upstream issue or pull request, or ``'none'``;
* ``is_needed() -> bool`` and ``apply() -> None``.

:func:`apply` applies a fix only where the installed ``PACKAGE`` is in
``VERSIONS`` and the fix ``is_needed()``; otherwise it does nothing and logs
one line saying why. ``docs/compat.md`` lists the fixes.
"""
import importlib
import importlib.metadata
import logging

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ['FIXES', 'apply', 'fix_modules', 'installed_version', 'status']

# Module names (in this package) of the fixes, in the order they apply.
FIXES = (
    'package_paths',
    'config_package_scope',
    'numpy_in1d',
    'weights_only_checkpoints',
    'cpu_amp_ops',
)

APPLIED = 'applied'
NOT_NEEDED = 'not needed'
OUT_OF_RANGE = 'out of range'
NOT_INSTALLED = 'not installed'

logger = logging.getLogger(__name__)


def installed_version(package):
    """The installed version of distribution ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fix_modules():
    """The fix modules of :data:`FIXES`, imported (importing a fix module
    changes nothing)."""
    return [importlib.import_module(f'{__name__}.{name}') for name in FIXES]


def _in_range(fix):
    version = installed_version(fix.PACKAGE)
    if version is None:
        return NOT_INSTALLED, version
    try:
        inside = Version(version) in SpecifierSet(fix.VERSIONS)
    except InvalidVersion:
        inside = False
    return (None if inside else OUT_OF_RANGE), version


def status(fix):
    """What :func:`apply` would do with ``fix`` (a fix module) now.

    Returns:
        str: ``'out of range'``, ``'not installed'``, ``'not needed'`` or
        ``'needed'``.
    """
    skip, _ = _in_range(fix)
    if skip is not None:
        return skip
    return 'needed' if fix.is_needed() else NOT_NEEDED


def apply():
    """Apply every fix of :data:`FIXES` that the installed versions need.

    Idempotent: a fix already applied is no longer needed.

    Returns:
        dict: ``{fix name: 'applied' | 'not needed' | 'out of range' |
        'not installed'}``.
    """
    results = {}
    for name, fix in zip(FIXES, fix_modules()):
        skip, version = _in_range(fix)
        if skip == OUT_OF_RANGE:
            logger.warning(
                'mmdyn.compat: %s not applied: written for %s%s, installed '
                '%s (check whether it is still needed: docs/compat.md)', name,
                fix.PACKAGE, fix.VERSIONS, version)
        elif skip == NOT_INSTALLED:
            logger.info('mmdyn.compat: %s not applied: %s is not installed',
                        name, fix.PACKAGE)
        elif not fix.is_needed():
            skip = NOT_NEEDED
            logger.info('mmdyn.compat: %s not needed here', name)
        else:
            fix.apply()
            logger.info('mmdyn.compat: %s applied (%s)', name, fix.SUMMARY)
        results[name] = skip or APPLIED
    return results
