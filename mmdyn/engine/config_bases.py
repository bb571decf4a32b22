"""``mmdyn::`` config bases and overlay bases.

Applied by ``import mmdyn.engine`` (every mmdyn config imports it through
``custom_imports``, and the tools import it first). Two additions to
mmengine's config inheritance, both tested in
``tests/test_tools/test_config_bases.py``:

1. **``mmdyn::`` bases**, as ``mmdet::`` and ``mmpretrain::`` are::

       _base_ = ['mmdyn::demo/_base_/demo_det_data.py']

   The path is relative to mmdyn's ``configs/`` folder: the checkout's
   for an editable install (``pip install -e .``), else the copy that
   ``pip install .`` ships as package data in ``mmdyn/.mim/configs``, as
   OpenMMLab packages do.

2. **Overlay bases.** mmengine refuses two bases that define the same
   top-level key ("Duplicate key is not allowed among bases"), so a data
   or schedule base cannot be put beside a complete config such as
   ``mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py``, which defines its
   own. A base file that sets ``_overlay_ = True`` is applied *on top of*
   the bases listed before it, as a child config would be (dicts merged key
   by key, other values replaced, ``_delete_=True`` honoured), and before
   the body of the config that lists it::

       _base_ = [
           'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
           'mmdyn::demo/_base_/demo_det_data.py',       # overlay
           'mmdyn::demo/_base_/demo_det_schedule.py',   # overlay
       ]
       model = dict(bbox_head=dict(num_classes=3))

   Overlays come after all ordinary bases of a list; an overlay's own
   ``_base_`` may list other overlays only. Without ``_overlay_`` nothing
   changes: configs that loaded before load to the same result.
"""
import ast
import os
import os.path as osp
import tempfile

from mmengine.config import Config
from mmengine.config import utils as config_utils

__all__ = [
    'OVERLAY_KEY', 'SCOPE', 'mmdyn_config_root', 'resolve_config_path',
    'is_overlay', 'register_config_bases'
]

SCOPE = 'mmdyn'
OVERLAY_KEY = '_overlay_'
DELETE_KEY = '_delete_'

_ORIGINAL = {}


def mmdyn_config_root():
    """The folder ``mmdyn::`` config paths are relative to.

    Returns:
        str: the checkout's ``configs/`` for an editable install (a
        ``setup.py`` and ``configs/`` beside the ``mmdyn`` package), else
        the ``mmdyn/.mim/configs`` that ``pip install .`` ships.

    Raises:
        FileNotFoundError: neither exists.
    """
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    checkout = osp.dirname(package)
    candidates = (osp.join(checkout, 'configs'),
                  osp.join(package, '.mim', 'configs'))
    if osp.isfile(osp.join(checkout, 'setup.py')) and \
            osp.isdir(candidates[0]):
        return candidates[0]
    if osp.isdir(candidates[1]):
        return candidates[1]
    raise FileNotFoundError(
        'mmdyn:: config bases need the mmdyn configs, found in neither '
        f'{candidates[0]} nor {candidates[1]}: reinstall mmdyn '
        '(pip install . ships them) or give the path to the config file')


def resolve_config_path(path, including_file):
    """Absolute path of a ``_base_`` entry, as mmengine resolves it.

    Args:
        path (str): the entry, e.g. ``'./x.py'``, ``'mmdet::a/b.py'`` or
            ``'mmdyn::demo/_base_/demo_det_data.py'``.
        including_file (str): the config file that lists it.

    Returns:
        str: the absolute file path.
    """
    return Config._get_cfg_path(path, including_file)[0]


def _mmdyn_path(path):
    relative = path.partition('::')[2]
    resolved = osp.join(mmdyn_config_root(), relative)
    if not osp.isfile(resolved):
        raise FileNotFoundError(
            f'config base {path!r}: no file {relative} under mmdyn\'s '
            f'configs ({mmdyn_config_root()})')
    return resolved


def _get_cfg_path(cfg_path, filename):
    """``Config._get_cfg_path`` that also resolves ``mmdyn::`` paths.

    Returns ``scope=None`` for them, as for a local file: mmdyn's configs
    set their own ``default_scope`` (mmdet or mmpretrain) through their
    bases.
    """
    if cfg_path.startswith(SCOPE + '::'):
        return _mmdyn_path(cfg_path), None
    return _ORIGINAL['get_cfg_path'](cfg_path, filename)


def _assignments(tree, *names):
    return [
        node for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and node.targets[0].id in
        names
    ]


def _read_tree(path):
    with open(path, encoding='utf-8') as f:
        return ast.parse(f.read(), filename=path)


def is_overlay(path):
    """Whether the config file at ``path`` sets ``_overlay_ = True``.

    Args:
        path (str): a ``.py`` config file.

    Returns:
        bool
    """
    if not path.endswith('.py'):
        return False
    for node in _assignments(_read_tree(path), OVERLAY_KEY):
        return isinstance(node.value, ast.Constant) and \
            node.value.value is True
    return False


def _split_bases(path):
    """The ``_base_`` entries of ``path``: (ordinary, overlays), resolved."""
    ordinary, overlays = [], []
    for entry in Config._get_base_files(path):
        resolved = resolve_config_path(entry, path)
        if is_overlay(resolved):
            overlays.append(resolved)
        elif overlays:
            raise ValueError(
                f'{path}: _base_ lists {entry!r} after the overlay '
                f'{overlays[-1]}: put overlay bases (files with '
                f'{OVERLAY_KEY} = True) after all other bases')
        else:
            # Scoped entries ('mmdet::...') stay as written so that
            # mmengine keeps their scope.
            ordinary.append(entry if '::' in entry else resolved)
    return ordinary, overlays


def _expand_overlays(overlays, seen=()):
    """Overlays in application order, each preceded by the overlays its
    own ``_base_`` lists."""
    order = []
    for overlay in overlays:
        if overlay in seen:
            raise ValueError(f'overlay base {overlay} includes itself')
        ordinary, inner = _split_bases(overlay)
        if ordinary:
            raise ValueError(
                f'overlay base {overlay} lists ordinary bases {ordinary}: an '
                'overlay may only build on other overlays; move those bases '
                'into the config that uses the overlay')
        for path in _expand_overlays(inner, seen + (overlay, )):
            if path not in order:
                order.append(path)
        if overlay not in order:
            order.append(overlay)
    return order


def _chain_link_body(path, use_predefined_variables):
    """The text of a config with its ``_base_`` and ``_overlay_``
    assignments removed (a link of the chain is an ordinary config) and its
    predefined variables ({{ fileDirname }}, ...) substituted for its own
    location."""
    if use_predefined_variables:
        with tempfile.TemporaryDirectory() as tmp:
            substituted = osp.join(tmp, osp.basename(path))
            Config._substitute_predefined_vars(path, substituted)
            with open(substituted, encoding='utf-8') as f:
                text = f.read()
    else:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    lines = text.splitlines(keepends=True)
    nodes = _assignments(ast.parse(text, filename=path), '_base_',
                         OVERLAY_KEY)
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):
        del lines[node.lineno - 1:node.end_lineno]
    return ''.join(lines)


def _strip_unused_delete(cfg):
    """Drop ``_delete_`` keys left where an overlay had nothing to
    replace (mmengine keeps them in that case)."""
    if isinstance(cfg, dict):
        cfg.pop(DELETE_KEY, None)
        for value in cfg.values():
            _strip_unused_delete(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _strip_unused_delete(value)


def _file2dict(filename, use_predefined_variables=True,
               use_environment_variables=True, lazy_import=None):
    """``Config._file2dict`` with overlay bases applied as a chain.

    A config whose ``_base_`` is ``[B1, ..., O1, O2]`` (``O`` overlays) is
    read as the chain ``B1, ...`` <- ``O1`` <- ``O2`` <- its own body, each
    link a temporary config whose single base is the previous link.
    """
    original = _ORIGINAL['file2dict']
    path = osp.abspath(osp.expanduser(filename))
    if not path.endswith('.py') or lazy_import or not osp.isfile(path) \
            or Config._is_lazy_import(path):
        return original(filename, use_predefined_variables,
                        use_environment_variables, lazy_import)
    ordinary, overlays = _split_bases(path)
    if not overlays:
        cfg_dict, text, env = original(filename, use_predefined_variables,
                                       use_environment_variables, lazy_import)
        cfg_dict.pop(OVERLAY_KEY, None)
        return cfg_dict, text, env
    chain = _expand_overlays(overlays) + [path]
    with tempfile.TemporaryDirectory(prefix='mmdyn_overlay_') as tmp:
        bases = ordinary
        for index, link in enumerate(chain):
            link_file = osp.join(tmp, f'{index}_{osp.basename(link)}')
            with open(link_file, 'w', encoding='utf-8') as f:
                if bases:
                    f.write(f'_base_ = {bases!r}\n')
                f.write(_chain_link_body(link, use_predefined_variables))
            bases = [link_file]
        cfg_dict, text, env = original(link_file, use_predefined_variables,
                                       use_environment_variables, lazy_import)
    cfg_dict.pop(OVERLAY_KEY, None)
    _strip_unused_delete(cfg_dict)
    return cfg_dict, text, env


def register_config_bases():
    """Teach mmengine's ``Config`` ``mmdyn::`` paths and overlay bases
    (idempotent)."""
    if _ORIGINAL:
        return
    _ORIGINAL['get_cfg_path'] = Config._get_cfg_path
    _ORIGINAL['file2dict'] = Config._file2dict
    config_utils.MODULE2PACKAGE.setdefault(SCOPE, SCOPE)
    Config._get_cfg_path = staticmethod(_get_cfg_path)
    Config._file2dict = staticmethod(_file2dict)


register_config_bases()
