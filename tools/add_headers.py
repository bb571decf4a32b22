# Copyright (c) mmdyn contributors. All rights reserved.
"""Check or add the copyright header of mmdyn's Python files.

    python tools/add_headers.py --check   # list files without it, exit 1
    python tools/add_headers.py --fix     # add it where missing

The header is one line, the first of the file (after a ``#!`` line where
there is one)::

    # Copyright (c) mmdyn contributors. All rights reserved.

Checked: ``mmdyn/``, ``tools/``, ``tests/``, ``benchmarks/``, ``docs/`` and
``setup.py`` (configs are data and carry none). Files that carry a different
copyright line of their own (code adapted from elsewhere) are left alone.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Iterator, List, Optional

HEADER = '# Copyright (c) mmdyn contributors. All rights reserved.'
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FOLDERS = ('mmdyn', 'tools', 'tests', 'benchmarks', 'docs')
FILES = ('setup.py', )
SKIP_DIRS = {'__pycache__', '.mim', 'build', 'dist', '_build'}


def python_files(root: str = ROOT) -> Iterator[str]:
    """The checked ``.py`` files under ``root``, sorted."""
    for name in FILES:
        if osp.isfile(osp.join(root, name)):
            yield osp.join(root, name)
    for folder in FOLDERS:
        top = osp.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(
                d for d in dirnames
                if d not in SKIP_DIRS and not d.endswith('.egg-info'))
            for filename in sorted(filenames):
                if filename.endswith('.py'):
                    yield osp.join(dirpath, filename)


def has_header(text: str) -> bool:
    """Whether the file's first line (after a shebang) is a copyright."""
    lines = text.splitlines()
    if lines and lines[0].startswith('#!'):
        lines = lines[1:]
    return bool(lines) and lines[0].startswith('# Copyright')


def with_header(text: str) -> str:
    """``text`` with :data:`HEADER` added (unchanged if it has one)."""
    if has_header(text):
        return text
    if text.startswith('#!'):
        shebang, _, rest = text.partition('\n')
        return f'{shebang}\n{HEADER}\n{rest}'
    return f'{HEADER}\n{text}'


def missing(root: str = ROOT) -> List[str]:
    """Paths (relative to ``root``) of checked files without a header."""
    out = []
    for path in python_files(root):
        with open(path, encoding='utf-8') as f:
            if not has_header(f.read()):
                out.append(osp.relpath(path, root))
    return out


def fix(root: str = ROOT) -> List[str]:
    """Add the header where it is missing; returns the changed paths."""
    changed = missing(root)
    for relative in changed:
        path = osp.join(root, relative)
        with open(path, encoding='utf-8') as f:
            text = f.read()
        with open(path, 'w', encoding='utf-8') as f:
            f.write(with_header(text))
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        '--check',
        action='store_true',
        help='list the files without the header; exit 1 if there are any')
    mode.add_argument(
        '--fix', action='store_true', help='add the header where missing')
    parser.add_argument(
        '--root', default=ROOT, help='repository root (default: this one)')
    args = parser.parse_args(argv)
    if args.fix:
        for path in fix(args.root):
            print(f'added the header to {path}')
        return 0
    paths = missing(args.root)
    for path in paths:
        print(f'{path}: no copyright header (python tools/add_headers.py '
              '--fix adds it)')
    return 1 if paths else 0


if __name__ == '__main__':
    sys.exit(main())
