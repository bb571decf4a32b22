# Copyright (c) mmdyn contributors. All rights reserved.
"""Importing mmdyn registers its components and changes nothing else.

In a fresh interpreter, the modules of mmengine, mmcv, mmdet, mmpretrain,
pycocotools and torch are imported and snapshotted: every module attribute
(public and private) by identity, the ``__dict__`` entries of the classes
they define, the shallow contents of module-level dicts, lists and sets,
the contents of every registry (less the names mmdyn registers),
``sys.meta_path`` and torch's weights-only allow-list. Then ``mmdyn``,
``mmdyn.models`` and ``mmdyn.engine`` are imported, a config that names
them in ``custom_imports`` is read, and the snapshot must be unchanged.

Run this file as a script (``python tests/test_engine/
test_import_changes_nothing.py``) to print the changes as JSON, e.g. for
another checkout (``PYTHONPATH=<checkout>``).
"""
import json
import os
import subprocess
import sys
import tempfile
import warnings

PACKAGES = ('mmengine', 'mmcv', 'mmdet', 'mmpretrain', 'pycocotools', 'torch')
LIBRARY_MODULES = ('mmengine', 'mmengine.config', 'mmengine.runner',
                   'mmengine.registry', 'mmengine.dist', 'mmengine.hooks',
                   'mmengine.optim', 'mmengine.hub', 'mmcv', 'mmcv.ops',
                   'mmcv.cnn', 'mmdet', 'mmdet.models', 'mmdet.datasets',
                   'mmdet.apis', 'mmdet.evaluation', 'mmpretrain',
                   'mmpretrain.models', 'mmpretrain.apis',
                   'mmpretrain.evaluation', 'pycocotools.coco', 'torch',
                   'torch.serialization', 'torch.nn')
# Attributes that the interpreter itself updates.
IGNORED_ATTRIBUTES = ('__warningregistry__', )
# Registries kept as class attributes that their public ``register_*``
# methods rebuild on each registration: compared by contents instead.
REGISTRY_ATTRIBUTES = (
    'mmengine.runner.checkpoint.CheckpointLoader._schemes', )


def _owned_by_mmdyn(value):
    """Mmdyn's own classes and functions."""
    module = getattr(value, '__module__', None)
    if not isinstance(module, str):
        return False
    return module == 'mmdyn' or module.startswith('mmdyn.')


def _names_mmdyn_op(value):
    """Names of mmdyn's torch custom operators (``mmdyn::ddf``, namespace
    ``mmdyn``), which registering them adds to torch's operator tables."""
    return isinstance(value, str) and (value == 'mmdyn' or value.startswith(
        ('mmdyn::', 'mmdyn/')))


def _container_state(value, module_name):
    """Shallow contents of a module-level dict, list or set, by identity."""

    def ours(item):
        return _owned_by_mmdyn(item) or (module_name.startswith('torch')
                                         and _names_mmdyn_op(item))

    if isinstance(value, dict):
        return sorted(f'{key!r}:{id(item)}' for key, item in value.items()
                      if not (ours(key) or ours(item)))
    if isinstance(value, (list, set, frozenset)):
        return sorted(str(id(item)) for item in value if not ours(item))
    return None


def _registry_state(registry):
    return {
        name: id(obj)
        for name, obj in registry.module_dict.items()
        if not _owned_by_mmdyn(obj)
    }


def snapshot():
    """``{key: state}`` of the libraries' modules, registries, meta path and
    safe globals."""
    with warnings.catch_warnings():  # deprecated module attributes
        warnings.simplefilter('ignore')
        return _snapshot()


def _snapshot():
    import torch.serialization
    from mmengine.registry import Registry

    state = {}
    registries = {}
    for name, module in sorted(sys.modules.items()):
        if module is None or name.split('.')[0] not in PACKAGES:
            continue
        namespace = getattr(module, '__dict__', {})
        for attr, value in list(namespace.items()):
            if attr in IGNORED_ATTRIBUTES:
                continue
            state[f'{name}.{attr}'] = id(value)
            contents = _container_state(value, name)
            if contents is not None:
                state[f'{name}.{attr}[contents]'] = contents
            if isinstance(value, Registry):
                registries[id(value)] = value
            if isinstance(value, type) and value.__module__ == name:
                for key, item in list(vars(value).items()):
                    state[f'{name}.{attr}.{key}'] = id(item)
    for key in REGISTRY_ATTRIBUTES:
        if key in state:
            module_name, cls, attr = key.rsplit('.', 2)
            table = getattr(getattr(sys.modules[module_name], cls), attr)
            state[key] = {
                prefix: id(loader)
                for prefix, loader in table.items()
                if not _owned_by_mmdyn(loader)
            }
    for registry in registries.values():
        key = f'registry {registry.scope}.{registry.name}'
        state[key] = _registry_state(registry)
        for scope, child in registry.children.items():
            state[f'{key} child {scope}'] = _registry_state(child)
    state['sys.meta_path'] = [id(finder) for finder in sys.meta_path]
    state['torch.serialization safe globals'] = sorted(
        repr(item) for item in torch.serialization.get_safe_globals())
    return state


def _modules(keys):
    return {
        key
        for key in keys
        if not key.startswith(('registry ', 'sys.', 'torch.serial'))
    }


def compare(before, after):
    """The changes from ``before`` to ``after`` (a list of strings).

    A new attribute that is a module (a submodule imported later) is not a
    change; any other new, removed or replaced entry is.
    """
    changes = []
    for key, value in before.items():
        if key not in after:
            changes.append(f'removed: {key}')
        elif after[key] != value:
            if isinstance(value, dict):
                diff = sorted(k for k in value.keys() | after[key].keys()
                              if value.get(k) != after[key].get(k))
                changes.append(f'changed: {key}: {diff}')
            else:
                changes.append(f'changed: {key}')
    for key in after.keys() - before.keys():
        if key.startswith('registry '):
            if after[key]:
                changes.append(f'added: {key}: {sorted(after[key])}')
            continue
        if key.endswith('[contents]'):
            continue
        module_name, _, attr = key.rpartition('.')
        if module_name in sys.modules and f'{module_name}.{attr}' == key:
            value = getattr(sys.modules[module_name], attr, None)
            if isinstance(value, type(sys)):
                continue  # a submodule imported later
        owner = key.rsplit('.', 2)[0]
        if f'{owner}.__name__' not in before and \
                f'{module_name}.__name__' not in before:
            continue  # a module (or its class) loaded later
        changes.append(f'added: {key}')
    return sorted(changes)


def main():
    import importlib
    warnings.simplefilter('ignore')

    from mmengine.config import Config

    for name in LIBRARY_MODULES:
        importlib.import_module(name)
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, 'plain.py')
        with open(plain, 'w') as f:
            f.write("_base_ = ['mmdet::_base_/default_runtime.py']\n")
        Config.fromfile(plain)  # config machinery warmed up first
        before = snapshot()
        import mmdyn  # noqa: F401
        import mmdyn.engine  # noqa: F401
        import mmdyn.models  # noqa: F401
        path = os.path.join(tmp, 'with_imports.py')
        with open(path, 'w') as f:
            f.write("_base_ = ['mmdet::_base_/default_runtime.py']\n"
                    'custom_imports = dict(imports=[\'mmdyn.models\', '
                    "'mmdyn.engine'], allow_failed_imports=False)\n")
        Config.fromfile(path)
        after = snapshot()
    print(json.dumps(compare(before, after), indent=1))


def test_importing_mmdyn_changes_no_library():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable,
                             os.path.abspath(__file__)],
                            capture_output=True,
                            text=True,
                            env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    changes = json.loads(result.stdout)
    assert changes == [], '\n'.join(changes)


def test_the_snapshot_sees_a_patch():
    """The comparison catches what a patch would do (the test can fail)."""
    import mmengine.config.config as config_module
    from mmengine.registry import HOOKS
    from mmengine.runner.checkpoint import CheckpointLoader

    before = snapshot()
    original = vars(config_module.Config)['_file2dict']
    schemes = type(CheckpointLoader._schemes)(CheckpointLoader._schemes)
    saved_meta_path = list(sys.meta_path)
    try:
        config_module.Config._file2dict = staticmethod(lambda *a: None)
        sys.meta_path.insert(0, object())
        HOOKS._module_dict['CheckpointHook'] = object
        CheckpointLoader.register_scheme('', lambda *a: None, force=True)
        after = snapshot()
    finally:
        config_module.Config._file2dict = original
        sys.meta_path[:] = saved_meta_path
        from mmengine.hooks import CheckpointHook
        HOOKS._module_dict['CheckpointHook'] = CheckpointHook
        CheckpointLoader._schemes = schemes
    changes = compare(before, after)
    assert 'changed: mmengine.config.config.Config._file2dict' in changes
    assert 'changed: sys.meta_path' in changes
    assert any('CheckpointHook' in c and 'registry' in c for c in changes)
    schemes = "CheckpointLoader._schemes: ['']"
    assert any(
        c.startswith('changed: mmengine.runner.checkpoint.' + schemes)
        for c in changes)
    assert compare(before, snapshot()) == []


if __name__ == '__main__':
    main()
