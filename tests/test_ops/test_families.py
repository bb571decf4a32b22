# Copyright (c) mmdyn contributors. All rights reserved.
"""The table of layer families: every layer of :mod:`mmdyn.ops` is in it
once, its state-dict keys are the layer's, and the registration in
mmengine's ``MODELS`` comes from it (without replacing other names)."""
import inspect

import pytest
import torch
from torch import nn

import mmdyn.ops as ops
from mmdyn.ops.families import (FAMILIES, family_of, owning_family, owns_key,
                                registry_names)

LAYERS = {
    'ODConv2d': lambda: ops.ODConv2d(8, 8, 3),
    'DyConv2d': lambda: ops.DyConv2d(8, 8, 3),
    'CondConv2d': lambda: ops.CondConv2d(8, 8, 3),
    'KWConv2d': lambda: ops.KWConv2d(8, 8, 3),
    'KWLinear': lambda: ops.KWLinear(8, 8),
    'DDFConv2d': lambda: ops.DDFConv2d(8, 8, 3, bias=True),
    'DDFUpsample': lambda: ops.DDFUpsample(8, 2, guided=True),
}


def test_every_public_layer_is_in_one_family():
    layers = {
        name: cls
        for name, cls in vars(ops).items()
        if inspect.isclass(cls) and issubclass(cls, nn.Module) and name in
        ops.__all__ and name not in ('DynamicConv2dBase', 'WarehouseManager')
    }
    assert set(layers) == set(LAYERS)
    for name, cls in layers.items():
        owners = [f.kind for f in FAMILIES if issubclass(cls, f.classes)]
        assert len(owners) == 1, (name, owners)
    assert owning_family(ops.WarehouseManager()).kind == 'kw'
    assert family_of(ops.WarehouseManager()) is None
    assert family_of(nn.Conv2d(3, 3, 3)) is None


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_state_dict_keys_are_the_family_patterns(name):
    layer = LAYERS[name]()
    family = family_of(layer)
    keys = list(layer.state_dict())
    assert keys and all(owns_key(family, key) for key in keys), keys
    others = [f for f in FAMILIES if f.kind != family.kind]
    # A layer's attention keys are not mistaken for another family's,
    # where the layouts differ (DDF's branches, ODConv's four heads).
    if family.kind in ('odconv', 'ddf', 'ddf_up'):
        assert not any(
            all(owns_key(other, key) for key in keys)
            for other in others if other.name != family.name)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_attention_modules_and_madds(name):
    layer = LAYERS[name]()
    family = family_of(layer)
    for module in family.attention_modules:
        assert isinstance(getattr(layer, module), nn.Module)
    costs = getattr(layer, family.madds)((8, 8))
    assert set(costs) == {'conv', 'att', 'agg', 'scal'}
    assert costs['conv'] > 0


def test_registration_comes_from_the_table():
    from mmengine.registry import MODELS

    import mmdyn.models.layers as layers
    names = registry_names()
    assert layers.LAYER_NAMES == names
    assert set(names) == {
        'ODConv2d', 'DyConv2d', 'CondConv2d', 'KWConv2d', 'KWLinear',
        'DDFConv2d', 'DDFUpsample', 'ddf_up'
    }
    for name, cls in names.items():
        assert MODELS.get(name) is cls
    layer = MODELS.build(
        dict(type='ODConv2d', in_channels=4, out_channels=4, kernel_size=3))
    assert isinstance(layer, ops.ODConv2d)


def test_registration_does_not_replace_a_name_owned_elsewhere():
    """Registering over another class under a family name raises (no
    ``force``): the module registers only names that are free or already its
    own."""
    from mmengine.registry import Registry

    import mmdyn.models.layers as layers
    registry = Registry('probe')

    class Other(nn.Module):
        pass

    registry.register_module(name='ODConv2d', module=Other)
    with pytest.raises(KeyError):
        for name, cls in layers.LAYER_NAMES.items():
            registry.register_module(name=name, module=cls)
    assert registry.get('ODConv2d') is Other


def test_a_new_family_is_one_entry(monkeypatch):
    from mmdyn.ops import families

    class Probe(nn.Conv2d):
        pass

    entry = families.LayerFamily('Probe', 'probe', (Probe, ),
                                 {'ProbeConv': Probe}, (Probe, ),
                                 (r'weight', r'bias'), ())
    monkeypatch.setattr(families, 'FAMILIES', (*families.FAMILIES, entry))
    probe = Probe(2, 2, 1)
    assert families.family_of(probe) is entry
    assert families.registry_names()['ProbeConv'] is Probe
    assert all(families.owns_key(entry, k) for k in probe.state_dict())
    assert torch.is_tensor(probe.weight)
