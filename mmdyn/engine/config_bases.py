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
   own. A base file that sets ``__overlay__ = True`` is applied *on top of*
   the bases listed before it: each top-level variable it defines replaces
   the one of those bases as a whole (its dataloaders, evaluators, schedule
   and optimizer wrapper, not merged key by key into the stock ones), and
   the body of the config that lists it is merged last, as usual::

       _base_ = [
           'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
           'mmdyn::demo/_base_/demo_det_data.py',       # overlay
           'mmdyn::demo/_base_/demo_det_schedule.py',   # overlay
       ]
       model = dict(bbox_head=dict(num_classes=3))

   Overlays come after all ordinary bases of a list. An overlay is read as
   an ordinary config first (its own ``_base_`` is resolved as usual).
   ``__overlay__`` starts with two underscores, so mmengine does not keep it
   as a config key: where overlays define disjoint keys and nothing is
   below them to replace (the demo configs: model base + runtime + overlays),
   a config loads to the same result with plain mmengine. Without
   ``__overlay__`` nothing changes.
"""
import ast
import os.path as osp
import tempfile

from mmengine.config import Config
from mmengine.config import utils as config_utils

__all__ = [
    'OVERLAY_KEY', 'SCOPE', 'mmdyn_config_root', 'resolve_config_path',
    'is_overlay', 'register_config_bases'
]

SCOPE = 'mmdyn'
OVERLAY_KEY = '__overlay__'
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
    """Whether the config file at ``path`` sets ``__overlay__ = True``.

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


def _chain_link_body(path, use_predefined_variables):
    """The text of a config with its ``_base_`` and ``__overlay__``
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


def _plain(value):
    """ConfigDicts, lists and tuples as plain Python literals."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _replacing_body(cfg_dict):
    """Config text that, as the child of the bases before an overlay,
    replaces each top-level variable of the overlay as a whole."""
    lines = []
    for key, value in cfg_dict.items():
        value = _plain(value)
        if isinstance(value, dict):
            value = {DELETE_KEY: True, **value}
        lines.append(f'{key} = {value!r}\n')
    return ''.join(lines)


def _file2dict(filename, use_predefined_variables=True,
               use_environment_variables=True, lazy_import=None):
    """``Config._file2dict`` with overlay bases applied as a chain.

    A config whose ``_base_`` is ``[B1, ..., O1, O2]`` (``O`` overlays) is
    read as the chain ``B1, ...`` <- ``O1`` <- ``O2`` <- its own body: each
    link a temporary config whose single base is the previous link; an
    overlay's link replaces the top-level variables the overlay defines.
    """
    original = _ORIGINAL['file2dict']
    path = osp.abspath(osp.expanduser(filename))
    if not path.endswith('.py') or lazy_import or not osp.isfile(path) \
            or Config._is_lazy_import(path):
        return original(filename, use_predefined_variables,
                        use_environment_variables, lazy_import)
    ordinary, overlays = _split_bases(path)
    if not overlays:
        return original(filename, use_predefined_variables,
                        use_environment_variables, lazy_import)
    with tempfile.TemporaryDirectory(prefix='mmdyn_overlay_') as tmp:
        bases = ordinary
        for index, overlay in enumerate(overlays):
            overlay_dict = Config._file2dict(overlay, use_predefined_variables,
                                             use_environment_variables)[0]
            link = osp.join(tmp, f'{index}_{osp.basename(overlay)}')
            with open(link, 'w', encoding='utf-8') as f:
                if bases:
                    f.write(f'_base_ = {bases!r}\n')
                f.write(_replacing_body(overlay_dict))
            bases = [link]
        body = osp.join(tmp, f'body_{osp.basename(path)}')
        with open(body, 'w', encoding='utf-8') as f:
            f.write(f'_base_ = {bases!r}\n')
            f.write(_chain_link_body(path, use_predefined_variables))
        cfg_dict, text, env = original(body, use_predefined_variables,
                                       use_environment_variables, lazy_import)
    # An overlay's variable that replaced nothing keeps its `_delete_`.
    for value in cfg_dict.values():
        if isinstance(value, dict):
            value.pop(DELETE_KEY, None)
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
