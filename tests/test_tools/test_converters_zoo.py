# Copyright (c) mmdyn contributors. All rights reserved.
"""Every ODConv, DDF and DyConv classification config takes its official
checkpoint: official keys made from each config's shapes (models built on
the meta device) are renamed back by the converter, and the config is found
by shapes alone (DDF mul/add, which share their weights, need --config).
The KernelWarehouse configs are covered in test_converters_kw.py."""
import glob
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from test_converters_kw import _MetaModel, mbv2_to_official, resnet_to_official

from mmdyn.analysis.converters import ConversionError, convert, target_shapes

# A sweep over every config (meta builds, ~30 s): the fast tier keeps the
# representative conversions of test_converters*.py.
pytestmark = pytest.mark.slow
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def configs(folder):
    return sorted(
        osp.basename(p)
        for p in glob.glob(osp.join(ROOT, 'configs', folder, '*_in1k.py')))


def official_keys(config):
    shapes = target_shapes(config)
    if osp.basename(config).startswith('mobilenet'):
        mapping = mbv2_to_official(0, False, classifier='classifier.1.')
    else:
        mapping = resnet_to_official
    official = OrderedDict()
    for i, (key, shape) in enumerate(shapes.items()):
        if not key.endswith('temperature'):
            official[mapping(key)] = torch.full(shape, float(i))
    return official


@pytest.mark.parametrize('folder,family,name',
                         [('odconv', 'odconv', n) for n in configs('odconv')] +
                         [('dyconv', 'dyconv', n) for n in configs('dyconv')])
def test_config_found_by_shapes(folder, family, name):
    config = osp.join(ROOT, 'configs', folder, name)
    official = official_keys(config)
    converted, used = convert(official, family, build=_MetaModel)
    assert osp.basename(used) == name
    shapes = target_shapes(config)
    assert list(converted) == list(shapes)
    for i, key in enumerate(shapes):
        if not key.endswith('temperature'):
            assert float(converted[key].flatten()[0]) == i, key


@pytest.mark.parametrize('name', configs('ddf'))
def test_ddf_configs_need_config_and_take_it(name):
    config = osp.join(ROOT, 'configs', 'ddf', name)
    official = official_keys(config)
    with pytest.raises(ConversionError, match='several configs'):
        convert(official, 'ddf', build=_MetaModel)
    converted, used = convert(official, 'ddf', config=config, build=_MetaModel)
    assert used == config and len(converted) == len(target_shapes(config))
