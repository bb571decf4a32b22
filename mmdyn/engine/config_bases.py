# Copyright (c) mmdyn contributors. All rights reserved.
"""Loading configs, and putting a complete config on other data.

Only mmengine's public ``Config`` API is used (``Config.fromfile``,
item assignment, ``Config.merge_from_dict``, ``Config.dump``); importing
this module changes nothing in mmengine.

* :func:`load_config` is the one loader of mmdyn's tools and analysis
  functions: a file path or a ``package::path`` name (``mmdyn::``,
  ``mmdet::``, ``mmpretrain::``), plus ``--cfg-options``.
* ``mmdyn::`` bases in a config (``_base_ = ['mmdyn::demo/_base_/...']``)
  are resolved by mmengine itself, from ``mmdyn/.mim/configs``, once
  :func:`mmdyn.compat.apply` has run (mmengine 0.10 only knows the
  OpenMMLab packages of its own table; see ``docs/compat.md``).
* :func:`overlay_config` replaces top-level variables of a complete config
  (its dataloaders, evaluators, schedule) by those of other config files,
  each variable as a whole. mmengine refuses two bases that define the same
  key, so a data base cannot be listed beside a stock detector that defines
  its own; the overlay is applied in Python instead, and
  ``tools/misc/overlay_config.py`` writes the result as a plain config file
  that any OpenMMLab tool reads.
"""
import ast
import os.path as osp
import warnings

from mmengine.config import Config

__all__ = [
    'SCOPE', 'DEMO_DET_DATA', 'DEMO_INS_DATA', 'DEMO_DET_SCHEDULE', 'DEMO_CLS',
    'OverlayError', 'resolve_config_path', 'load_config', 'overlay_config',
    'dropped_base_hooks', 'check_overlay_fits', 'set_num_classes',
    'on_demo_data'
]

SCOPE = 'mmdyn'
DEMO_DET_DATA = 'mmdyn::demo/_base_/demo_det_data.py'
DEMO_INS_DATA = 'mmdyn::demo/_base_/demo_ins_data.py'
DEMO_DET_SCHEDULE = 'mmdyn::demo/_base_/demo_det_schedule.py'
# The classification demo: its data and schedule variables are put on a
# classifier (its model is not).
DEMO_CLS = 'mmdyn::demo/resnet18_demo_cls.py'
DEMO_CLS_KEYS = ('data_root', 'train_pipeline', 'test_pipeline',
                 'train_dataloader', 'val_dataloader', 'test_dataloader',
                 'val_evaluator', 'test_evaluator', 'optim_wrapper',
                 'param_scheduler', 'train_cfg', 'auto_scale_lr', 'randomness')
DEMO_NUM_CLASSES = dict(detection=3, classification=4)

# Stock hooks that rebuild or switch the training pipeline of the dataset
# they were configured with: on other data they break (YOLOX) or silently
# put the stock pipeline back (RTMDet).
PIPELINE_HOOKS = ('YOLOXModeSwitchHook', 'PipelineSwitchHook')
# Dataset wrappers whose pipeline the stock config builds around its data.
MIXING_DATASETS = ('MultiImageMixDataset', )


class OverlayError(ValueError):
    """A config that an overlay cannot be put on, with the reason."""


def _package_config_root(package):
    # Looked up at call time: mmdyn.compat.apply() may have replaced it.
    from mmengine import utils
    return osp.join(utils.get_installed_path(package), '.mim', 'configs')


def resolve_config_path(path):
    """File path of a config named by a path or ``package::relative``.

    Args:
        path (str): e.g. ``'configs/demo/x.py'`` or
            ``'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'``.

    Returns:
        str: the file path (an existing path is returned unchanged).

    Raises:
        FileNotFoundError: no such file.
    """
    path = str(path)
    if '::' in path and not osp.exists(path):
        package, relative = path.split('::', 1)
        root = _package_config_root(package)
        resolved = osp.join(root, relative)
        if not osp.isfile(resolved):
            hint = ''
            if package == SCOPE and not osp.isdir(root):
                hint = (': mmdyn/.mim/configs is missing; reinstall mmdyn '
                        '(pip install -e . links it, pip install . copies '
                        'it)')
            raise FileNotFoundError(
                f'config {path!r}: no file {relative} under {root}{hint}')
        return resolved
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    return path


def load_config(config, cfg_options=None):
    """The config loader of every mmdyn tool.

    Args:
        config (str | Config): a config file, a ``package::relative`` name
            or a loaded config (returned as is, with the options merged).
        cfg_options (dict, optional): ``--cfg-options`` overrides.

    Returns:
        Config
    """
    if isinstance(config, Config):
        cfg = config
    else:
        path = resolve_config_path(config)
        cfg = Config.fromfile(path)
        dropped = dropped_base_hooks(path, cfg)
        if dropped:
            warnings.warn(
                f'{path}: its custom_hooks replace those of its bases, '
                f'which had {dropped}; to keep them, append: custom_hooks = '
                '_base_.custom_hooks + [...] (docs/plug_in.md)')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _base_entries(path):
    """The ``_base_`` entries a ``.py`` config file assigns literally."""
    if not path.endswith('.py'):
        return []
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_'
                for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [value] if isinstance(value, str) else list(value)
    return []


def _hook_types(cfg):
    return [
        h.get('type') for h in cfg.get('custom_hooks', None) or []
        if isinstance(h, dict)
    ]


def dropped_base_hooks(path, cfg):
    """Custom hooks of the bases of ``path`` that ``cfg`` (the loaded config)
    lost because the file sets ``custom_hooks`` to a list of its own, where
    that list names one of mmdyn's hooks.

    mmengine replaces a list as a whole: ``custom_hooks =
    [dict(type='DynamicTemperatureHook')]`` on top of YOLOX drops its
    ``EMAHook``, ``YOLOXModeSwitchHook`` and ``SyncNormHook``.

    Returns:
        list[str]: the dropped hook types (empty when nothing is dropped).
    """
    from mmengine.registry import HOOKS
    hooks = _hook_types(cfg)
    ours = [
        h for h in hooks if getattr(
            HOOKS.module_dict.get(h), '__module__', '').startswith(__package__)
    ]
    if not ours:
        return []
    dropped = []
    for entry in _base_entries(path):
        base_path = resolve_config_path(entry) if '::' in entry else \
            osp.join(osp.dirname(path), entry)
        base = Config.fromfile(base_path, import_custom_modules=False)
        dropped += [h for h in _hook_types(base) if h not in hooks]
    return dropped


def check_overlay_fits(cfg, overlay):
    """Refuse an overlay that replaces the data of a config whose hooks or
    dataset wrappers are built around that data.

    Raises:
        OverlayError: naming what would break and why.
    """
    if not any(key.endswith('_dataloader') for key in overlay.keys()):
        return
    problems = []
    hooks = [
        h.get('type') for h in cfg.get('custom_hooks', None) or []
        if isinstance(h, dict)
    ]
    for hook in hooks:
        if hook in PIPELINE_HOOKS:
            problems.append(
                f'its custom hook {hook} switches the training pipeline of '
                'the stock dataset mid-training (on the replaced data it '
                'fails, or puts the stock pipeline back)')
    train_dataset = cfg.get('train_dataloader', {}).get('dataset', {})
    if train_dataset.get('type') in MIXING_DATASETS:
        problems.append(
            f"its training set is a {train_dataset['type']} (mosaic/mixup "
            'around the stock data) that the overlay would replace by a '
            'plain dataset')
    if problems:
        raise OverlayError(
            'cannot put this config on other data: ' + '; '.join(problems) +
            '. Write a config for it from its model instead (e.g. '
            "_base_ = [<its model base>, 'mmdet::_base_/default_runtime.py', "
            'the data and schedule bases]); see docs/plug_in.md')


def overlay_config(cfg, overlays, cfg_options=None, keys=None):
    """Replace top-level variables of ``cfg`` by those of ``overlays``.

    Each variable an overlay file defines replaces the one of ``cfg`` as a
    whole (not merged key by key); ``cfg_options`` are merged last.

    Args:
        cfg (str | Config): the config (loaded with :func:`load_config`).
        overlays (Sequence[str]): config files or ``package::`` names,
            applied in order.
        cfg_options (dict, optional): merged after the overlays.
        keys (Sequence[str], optional): take only these variables of the
            overlays (default: all).

    Returns:
        Config: a new config.

    Raises:
        OverlayError: see :func:`check_overlay_fits`.
    """
    cfg = load_config(cfg)
    merged = Config(cfg.to_dict(), filename=cfg.filename)
    for overlay in overlays:
        overlay_cfg = load_config(overlay)
        if keys is not None:
            overlay_cfg = Config({
                key: value
                for key, value in overlay_cfg.to_dict().items() if key in keys
            })
        check_overlay_fits(merged, overlay_cfg)
        for key, value in overlay_cfg.to_dict().items():
            merged[key] = value
    _import_what_is_named(merged)
    if cfg_options:
        merged.merge_from_dict(cfg_options)
    return merged


def _types(node):
    if isinstance(node, dict):
        own = node.get('type')
        found = [own] if isinstance(own, str) else []
        return found + [t for v in node.values() for t in _types(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _types(v)]
    return []


def _import_what_is_named(cfg):
    """Add ``mmdyn.engine`` to ``custom_imports`` where the config names a
    hook, loop or optimizer wrapper that it registers (an overlay may bring one
    to a stock config)."""
    from mmengine.registry import HOOKS, LOOPS, OPTIM_WRAPPERS
    ours = {
        name
        for registry in (HOOKS, LOOPS, OPTIM_WRAPPERS)
        for name, obj in registry.module_dict.items()
        if getattr(obj, '__module__', '').startswith(__package__)
    }
    if not ours & set(_types(cfg.to_dict())):
        return
    custom = dict(cfg.get('custom_imports') or {})
    imports = list(custom.get('imports', []))
    if __package__ not in imports:
        custom['imports'] = imports + [__package__]
        custom.setdefault('allow_failed_imports', False)
        cfg['custom_imports'] = custom


def set_num_classes(model_cfg, num_classes):
    """Set every ``num_classes`` of a model config (heads given as lists, such
    as Cascade R-CNN's or Sparse R-CNN's, included).

    Returns:
        int: how many were set.
    """
    count = 0
    if isinstance(model_cfg, dict):
        for key, value in model_cfg.items():
            if key == 'num_classes' and isinstance(value, int):
                model_cfg[key] = num_classes
                count += 1
            else:
                count += set_num_classes(value, num_classes)
    elif isinstance(model_cfg, (list, tuple)):
        for item in model_cfg:
            count += set_num_classes(item, num_classes)
    return count


def _has_masks(model_cfg):
    if isinstance(model_cfg, dict):
        return 'mask_head' in model_cfg or any(
            _has_masks(v) for v in model_cfg.values())
    if isinstance(model_cfg, (list, tuple)):
        return any(_has_masks(v) for v in model_cfg)
    return False


def _task(cfg):
    scope = cfg.get('default_scope')
    if scope == 'mmpretrain' or 'Classifier' in str(
            cfg.get('model', {}).get('type')):
        return 'classification'
    return 'detection'


def on_demo_data(config, cfg_options=None, keep_pretrained=False):
    """A detector or classifier config put on mmdyn's synthetic demo data.

    Detectors get the demo detection set (3 classes; with masks where the
    model has a mask head) and the demo schedule; classifiers the data and
    schedule of ``configs/demo/resnet18_demo_cls.py`` (4 classes). Every
    ``num_classes`` of the model (and of a classifier's data preprocessor)
    is set to the demo's; the backbone's pretrained ``init_cfg`` is dropped
    (the demo trains from scratch and offline) unless ``keep_pretrained``.
    The config's own model and hooks are kept.

    Args:
        config (str | Config): an mmdet detector or mmpretrain classifier
            config.
        cfg_options (dict, optional): merged last.
        keep_pretrained (bool): keep ``model.backbone.init_cfg``.

    Returns:
        Config

    Raises:
        OverlayError: see :func:`check_overlay_fits`.
    """
    cfg = load_config(config)
    task = _task(cfg)
    if task == 'classification':
        merged = overlay_config(cfg, [DEMO_CLS], keys=DEMO_CLS_KEYS)
        if isinstance(merged.get('data_preprocessor'), dict):
            merged.data_preprocessor['num_classes'] = \
                DEMO_NUM_CLASSES[task]
    else:
        data = DEMO_INS_DATA if _has_masks(cfg.get('model')) else \
            DEMO_DET_DATA
        merged = overlay_config(cfg, [data, DEMO_DET_SCHEDULE])
    set_num_classes(merged.model, DEMO_NUM_CLASSES[task])
    backbone = merged.model.get('backbone')
    if not keep_pretrained and isinstance(backbone, dict):
        backbone['init_cfg'] = None
    if cfg_options:
        merged.merge_from_dict(cfg_options)
    return merged
