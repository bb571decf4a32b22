"""Fixes that let mmengine 0.10 run on today's torch, numpy and setuptools.

Applied once by ``import mmdyn.engine`` (:func:`apply_compat_fixes` is
idempotent). Each fix is small, targeted and has a test in
``tests/test_engine/test_compat.py``:

1. **torch >= 2.6 loads with** ``weights_only=True`` **by default.**
   mmengine's checkpoints hold more than tensors: the ``message_hub`` state
   (``HistoryBuffer`` objects holding numpy arrays, numpy scalars and dtypes)
   and, inside ``HistoryBuffer``, references to its statistics methods
   pickled as ``getattr(HistoryBuffer, 'mean')``. Without the fix ``resume``
   and ``load_from`` fail with ``UnpicklingError: Unsupported global``.
   Rather than turning ``weights_only`` off (which would execute arbitrary
   pickled code), the few globals these checkpoints need are allow-listed
   with :func:`torch.serialization.add_safe_globals`. ``builtins.getattr``
   is NOT allow-listed as such: its name is mapped to
   :func:`_restricted_getattr`, which only looks up HistoryBuffer's
   statistics methods. Checkpoints written under numpy 1.x name numpy's
   internals ``numpy.core.*``; those names are mapped too.
2. **setuptools >= 81 has no** ``pkg_resources``. mmengine's
   ``is_installed``/``get_installed_path`` import it, and
   ``Config.fromfile`` calls them for every ``mmdet::``/``mmpretrain::``
   base config, so every inherited config failed with
   ``ModuleNotFoundError: No module named 'pkg_resources'``. They are
   replaced by equivalents on :mod:`importlib.metadata` (the standard
   library's successor of ``pkg_resources``), in every module that imported
   them by name.

3. **DDP on a CPU-only machine.** mmengine's ``init_dist('pytorch')`` calls
   ``torch.cuda.set_device`` unconditionally, which raises "Found no NVIDIA
   driver" without a GPU. Without CUDA the replacement skips it and uses
   the ``gloo`` backend (``nccl`` needs GPUs). ``tools/train.py`` also sets
   ``model_wrapper_cfg.device_ids=None`` there (DDP refuses device ids for
   CPU modules); see :func:`mmdyn.engine.launch.configure_cpu_distributed`.

4. **mmcv 2.1's layer builders hide the unknown name.** For a type that
   is not registered (a typo such as ``conv_cfg=dict(type='ODConv')``, or
   a config without ``custom_imports``), ``build_conv_layer`` and its
   siblings raise ``KeyError: Cannot find None in registry`` (they format
   the lookup result instead of the name). The wrapped builders re-raise
   with the config's ``type``, the scope and the closest registered names.

5. **numpy >= 2.4 removed** ``np.in1d``, which mmpretrain 1.2's retrieval
   metrics (``RetrievalRecall``, ``RetrievalAveragePrecision``) call. That
   module alone gets a numpy namespace with ``in1d`` (= ``np.isin`` on the
   flattened input, its documented equivalent); numpy itself is untouched.

6. **Every** ``mmdet::``/``mmpretrain::`` **base re-reads the package's
   metafiles.** mmengine's ``_get_cfg_metainfo`` parses the package's
   ``model-index.yml`` and all the metafiles it imports (hundreds of YAML
   files, 1-3 s) for each such base a config names, and again for every
   base that is not a model config (then it raises ``ValueError``, which
   the caller catches). The replacement reads each package's index once
   per process (keyed on the path and modification time of its
   ``model-index.yml``) and answers from it, with the same results and
   errors.

Otherwise numpy 2.x needs no runtime patch on this stack (mmcv 2.1, mmdet
3.3, mmpretrain 1.2, pycocotools 2.0.11): the demo trainings, CocoMetric
(bbox, segm), Accuracy and the mmcv/mmdet transforms run; the remaining
removed aliases (``np.float`` in ``mmcv.ops.pixel_group``, mmdet's
``ytviseval``) are in code mmdyn never reaches.
"""
import difflib
import functools
import importlib
import importlib.metadata
import sys
import importlib.util
import os
import os.path as osp

import numpy as np
import torch

__all__ = [
    'apply_compat_fixes', 'checkpoint_safe_globals', 'is_installed',
    'get_installed_path'
]

_APPLIED = False

# The HistoryBuffer attributes a checkpoint may legitimately reference
# (``HistoryBuffer._set_default_statistics`` registers these).
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def _restricted_getattr(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling a checkpoint.

    Only ``getattr(HistoryBuffer, <statistics method>)`` is allowed: that is
    the one use mmengine's checkpoints make of it. Anything else is refused,
    so allow-listing this does not reopen ``weights_only``'s guarantees.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise torch.serialization.pickle.UnpicklingError(
        f'weights_only load refused getattr({obj!r}, {name!r}): mmdyn only '
        'allows HistoryBuffer statistics methods')


def checkpoint_safe_globals():
    """List the globals an mmengine checkpoint needs for a weights-only load.

    Returns:
        list: entries for :func:`torch.serialization.add_safe_globals`
        (objects, or ``(object, 'pickled.name')`` pairs where the name a
        checkpoint uses differs from the object's own).
    """
    from mmengine.logging import HistoryBuffer
    from numpy._core import multiarray
    safe = [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
        (_restricted_getattr, 'builtins.getattr'),
        # numpy 1.x wrote these names; numpy 2 keeps them importable only
        # through a deprecation shim, so map them to the new objects.
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
    ]
    # A dtype pickles as ``numpy.dtype`` plus arguments, but its class (e.g.
    # ``numpy.dtypes.Float64DType``) appears when a dtype type is stored.
    import numpy.dtypes
    for name in dir(numpy.dtypes):
        obj = getattr(numpy.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            safe.append(obj)
    return safe


# --- importlib.metadata replacements of mmengine's pkg_resources helpers ---


def _top_level_module(package):
    """Module name a distribution installs (``mmcv-full`` -> ``mmcv``)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return package
    top_level = dist.read_text('top_level.txt')
    if top_level and top_level.split():
        return top_level.split()[0]
    return package.replace('-', '_')


def is_installed(package):
    """Whether ``package`` is installed or importable.

    Args:
        package (str): distribution or module name.

    Returns:
        bool: True if installed.
    """
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def get_installed_path(package):
    """Folder of the module that ``package`` installs.

    Args:
        package (str): distribution or module name (e.g. ``'mmdet'``).

    Returns:
        str: the package folder.

    Raises:
        importlib.metadata.PackageNotFoundError: neither installed nor on
            ``sys.path``.
        RuntimeError: ``package`` is a namespace package.
    """
    module = _top_level_module(package)
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise importlib.metadata.PackageNotFoundError(package)
    if spec.origin is None:
        raise RuntimeError(f'{package} is a namespace package, which is '
                           'invalid for `get_installed_path`')
    return osp.dirname(spec.origin)


def _patch_package_utils():
    """Point every by-name import of mmengine's helpers at ours."""
    names = dict(is_installed=is_installed,
                 get_installed_path=get_installed_path)
    for module_name in ('mmengine.utils.package_utils', 'mmengine.utils',
                        'mmengine.config.config', 'mmengine.hub.hub'):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - optional module
            continue
        for name, func in names.items():
            if hasattr(module, name):
                setattr(module, name, func)


def _init_dist_pytorch_cpu_aware(backend='nccl', init_backend='torch',
                                 **kwargs):
    """mmengine's ``_init_dist_pytorch``, usable without CUDA."""
    from mmengine.dist import utils as dist_utils
    if torch.cuda.is_available() or init_backend != 'torch':
        return _ORIGINAL['init_dist_pytorch'](backend, init_backend, **kwargs)
    if backend == 'nccl':
        backend = 'gloo'
    dist_utils.torch_dist.init_process_group(backend=backend, **kwargs)


_ORIGINAL = {}


def _patch_init_dist():
    from mmengine.dist import utils as dist_utils
    if 'init_dist_pytorch' not in _ORIGINAL:
        _ORIGINAL['init_dist_pytorch'] = dist_utils._init_dist_pytorch
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu_aware


def _registered_layer_names():
    from mmengine.registry import MODELS, DefaultScope
    names = set(MODELS.module_dict)
    scope = DefaultScope.get_current_instance()
    if scope is not None:
        registry = MODELS._get_root_registry()
        # Children of the root registry, by scope (e.g. 'mmdet').
        child = registry.children.get(scope.scope_name)
        if child is not None:
            names.update(child.module_dict)
    return sorted(names)


def _naming_builder(builder, kind):
    """Wrap an mmcv ``build_*_layer`` to name an unknown ``type``."""

    @functools.wraps(builder)
    def build(cfg, *args, **kwargs):
        try:
            return builder(cfg, *args, **kwargs)
        except KeyError as err:
            if 'Cannot find None' not in str(err) or not isinstance(
                    cfg, dict):
                raise
            layer_type = cfg.get('type')
            close = difflib.get_close_matches(
                str(layer_type), _registered_layer_names(), n=3)
            hint = f' Did you mean {close}?' if close else ''
            raise KeyError(
                f'{kind} type {layer_type!r} (config {dict(cfg)}) is not '
                f'registered.{hint} mmdyn layers need custom_imports=dict('
                "imports=['mmdyn.models']) in the config.") from err

    build.__mmdyn_wrapped__ = builder
    return build


def _patch_layer_builders():
    from mmcv.cnn.bricks import conv, norm, padding, plugin, upsample
    replacements = {}
    for module, name, kind in ((conv, 'build_conv_layer', 'conv layer'),
                               (norm, 'build_norm_layer', 'norm layer'),
                               (padding, 'build_padding_layer',
                                'padding layer'),
                               (plugin, 'build_plugin_layer', 'plugin'),
                               (upsample, 'build_upsample_layer',
                                'upsample layer')):
        original = getattr(module, name)
        if hasattr(original, '__mmdyn_wrapped__'):
            continue
        replacements[id(original)] = (original,
                                      _naming_builder(original, kind))
    # Modules that did `from mmcv.cnn import build_conv_layer` hold their own
    # reference: replace it everywhere it was imported so far. Modules
    # imported later read the patched attributes of mmcv's modules.
    for module in list(sys.modules.values()):
        namespace = getattr(module, '__dict__', None)
        if not namespace or not getattr(module, '__name__', '').startswith(
                ('mmcv', 'mmdet', 'mmpretrain', 'mmengine', 'mmdyn')):
            continue
        for attr, value in list(namespace.items()):
            hit = replacements.get(id(value))
            if hit is not None and value is hit[0]:
                setattr(module, attr, hit[1])


class _NumpyWithIn1d:
    """numpy, plus the ``in1d`` that numpy 2.4 removed."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique=False, invert=False):
        return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique,
                       invert=invert)


def _patch_numpy_in1d():
    if hasattr(np, 'in1d'):
        return
    try:
        from mmpretrain.evaluation.metrics import retrieval
    except ImportError:  # pragma: no cover - mmpretrain not installed
        return
    if retrieval.np is np:
        retrieval.np = _NumpyWithIn1d()


@functools.lru_cache(maxsize=None)
def _package_cfg_index(meta_index_path, mtime):
    """``{config name: model entry}`` of a package's metafiles, as
    mmengine's ``_get_cfg_metainfo`` builds it (first entry of a name
    wins; entries without ``Config`` warned about and skipped). ``mtime``
    is part of the cache key only."""
    import warnings
    from mmengine.fileio import load
    package_mim = osp.dirname(meta_index_path)
    cfg_dict = {}
    for meta_path in load(meta_index_path)['Import']:
        for model_cfg in load(osp.join(package_mim, meta_path))['Models']:
            if 'Config' not in model_cfg:
                warnings.warn(f'There is not `Config` define in {model_cfg}')
                continue
            cfg_dict.setdefault(model_cfg['Config'].partition('/')[-1],
                                model_cfg)
    return cfg_dict


def _cached_cfg_metainfo(package_path, cfg_path):
    """Drop-in for ``mmengine.config.utils._get_cfg_metainfo``."""
    meta_index_path = osp.join(package_path, '.mim', 'model-index.yml')
    cfg_dict = _package_cfg_index(meta_index_path,
                                  os.stat(meta_index_path).st_mtime_ns)
    if cfg_path not in cfg_dict:
        raise ValueError(f'Expected configs: {cfg_dict.keys()}, but got '
                         f'{cfg_path}')
    return dict(cfg_dict[cfg_path])


def _patch_cfg_metainfo():
    from mmengine.config import utils as config_utils
    _ORIGINAL.setdefault('_get_cfg_metainfo', config_utils._get_cfg_metainfo)
    config_utils._get_cfg_metainfo = _cached_cfg_metainfo
    from mmengine.hub import hub
    hub._get_cfg_metainfo = _cached_cfg_metainfo


def apply_compat_fixes():
    """Apply the fixes described in this module (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    _patch_package_utils()
    _patch_init_dist()
    _patch_layer_builders()
    _patch_numpy_in1d()
    _patch_cfg_metainfo()
    _APPLIED = True
