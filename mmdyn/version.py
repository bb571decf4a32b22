# Copyright (c) mmdyn contributors. All rights reserved.
"""The version of mmdyn.

The package (setup.py reads this file), the docs (docs/conf.py) and the
model index (the ``Version`` of each metafile's collection code) share it;
CHANGELOG.md has one section per version.
"""
__version__ = '0.1.0'


def parse_version_info(version: str) -> tuple:
    """``'0.1.0'`` -> ``(0, 1, 0)``; a suffix such as ``'rc1'`` is kept as a
    last string item (``'0.2.0rc1'`` -> ``(0, 2, 0, 'rc1')``)."""
    parts = []
    for part in version.split('.'):
        digits = ''.join(c for c in part if c.isdigit())
        if digits == part:
            parts.append(int(part))
        else:
            head = len(part) - len(part.lstrip('0123456789'))
            parts.extend([int(part[:head]), part[head:]])
    return tuple(parts)


version_info = parse_version_info(__version__)
