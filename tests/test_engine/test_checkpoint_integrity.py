# Copyright (c) mmdyn contributors. All rights reserved.
"""Checkpoints prove their content on load, and a checkpoint of another model
may not leave the dynamic layers silently at their random init.

* A file with a few flipped bytes inside a tensor (which torch loads
  without complaint) fails the CRC-32 of its zip record: it is refused as
  damaged, naming the file, by mmengine's ``load_checkpoint`` with an
  ``mmdyn://`` path, ``load_from``, ``resume`` and ``tools/test.py``.
* mmdyn's saves record a SHA-256 of the content in ``meta``: a file whose
  records are intact but whose content differs (loaded, edited, re-saved)
  loads with a warning that says it was edited; a file that says it was
  saved by mmdyn but lost its hash (the key renamed) is refused.
* A checkpoint that has no value for more than half of a dynamic layer
  family's tensors (a KernelWarehouse checkpoint for the ODConv config) is
  refused, naming the first missing keys, unless ``allow_partial_load``.
"""
import importlib.util
import os.path as osp

import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from toy_runner import ToyNet, make_runner

from mmdyn.datasets import make_demo_classification
from mmdyn.engine import CheckpointLoadError
from mmdyn.engine.checkpoint import (CheckpointEditedWarning, checked_path,
                                     load_checkpoint_file)
from mmdyn.engine.checkpoint_io import (HASH_KEY, WRITER_KEY, content_hash,
                                        save_checkpoint)
from mmdyn.engine.launch import load_config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CLS_CFG = osp.join(REPO, 'configs/demo/resnet18_demo_cls.py')
ODCONV_CFG = osp.join(REPO, 'configs/demo/resnet18-odconv1x_demo_cls.py')
KW_CFG = osp.join(REPO, 'configs/demo/resnet18-kw1x_demo_cls.py')
TINY_TEST = [
    'test_dataloader.dataset.indices=1', 'test_dataloader.num_workers=0'
]


def _tools_test():
    spec = importlib.util.spec_from_file_location(
        'mmdyn_tools_test', osp.join(REPO, 'tools', 'test.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_model_of(config, path):
    import mmpretrain.models  # noqa: F401
    from mmpretrain.registry import MODELS

    import mmdyn.models  # noqa: F401
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(load_config(config).model)
    save_checkpoint(dict(state_dict=model.state_dict(), meta={}), path)
    return model


def _flip_bytes_inside(path, tensor, count=16):
    """XOR ``count`` bytes in the middle of ``tensor``'s storage in the file
    (the zip archive stores storages uncompressed)."""
    raw = tensor.contiguous().numpy().tobytes()
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    start = data.find(raw[:256])
    assert start >= 0 and data[start:start + len(raw)] == raw
    middle = start + len(raw) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    with open(path, 'wb') as f:
        f.write(bytes(data))


@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('integrity'))
    make_runner(
        work_dir, 'integrity_src', max_iters=2, ckpt_interval=2,
        dynamic=True).train()
    return osp.join(work_dir, 'iter_2.pth')


def test_saved_hash_survives_save_and_load(toy_checkpoint):
    checkpoint = torch.load(toy_checkpoint, weights_only=True)
    recorded = checkpoint['meta'][HASH_KEY]
    # Recomputed from what torch.load returns (message hub, optimizer,
    # schedulers, random state included).
    assert content_hash(checkpoint) == recorded
    checkpoint['state_dict']['fc.bias'][0] += 1e-6
    assert content_hash(checkpoint) != recorded


def test_flipped_bytes_are_refused(toy_checkpoint, tmp_path):
    path = str(tmp_path / 'flipped.pth')
    with open(toy_checkpoint, 'rb') as src, open(path, 'wb') as dst:
        dst.write(src.read())
    weight = torch.load(path, weights_only=True)['state_dict']['conv.weight']
    _flip_bytes_inside(path, weight)
    # torch itself loads it, with other values.
    damaged = torch.load(path, weights_only=True)['state_dict']['conv.weight']
    assert not torch.equal(damaged, weight)

    model = ToyNet(dynamic=True)
    before = model.conv.weight.detach().clone()
    with pytest.raises(
            CheckpointLoadError,
            match=r'flipped\.pth is damaged .*record '
            r'\S+/data/\d+ fails the CRC-32 check'):
        load_checkpoint(model, checked_path(path))
    assert torch.equal(model.conv.weight, before)
    for resume in (False, True):
        runner = make_runner(
            str(tmp_path / f'wd{resume}'),
            f'flip{resume}',
            max_iters=4,
            dynamic=True,
            resume=resume,
            load_from=path)
        with pytest.raises(CheckpointLoadError, match='flipped.pth'):
            runner.train()


def test_checkpoint_of_another_tool_loads(toy_checkpoint, tmp_path):
    checkpoint = torch.load(toy_checkpoint, weights_only=True)
    del checkpoint['meta'][HASH_KEY], checkpoint['meta'][WRITER_KEY]
    path = str(tmp_path / 'foreign.pth')
    torch.save(checkpoint, path)
    model = ToyNet(dynamic=True)
    load_checkpoint(model, checked_path(path))
    assert torch.equal(model.conv.weight,
                       checkpoint['state_dict']['conv.weight'])


def test_tools_test_refuses_flipped_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo_classification('data/demo_cls', num_train=1, num_val=1)
    model = _save_model_of(CLS_CFG, 'model.pth')
    _flip_bytes_inside('model.pth',
                       model.state_dict()['backbone.layer4.1.conv2.weight'])
    with pytest.raises(
            CheckpointLoadError, match=r'model\.pth is damaged .*CRC-32'):
        _tools_test().main(
            [CLS_CFG, 'model.pth', '--work-dir', 'wd', '--cfg-options'] +
            TINY_TEST)


def test_other_method_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo_classification('data/demo_cls', num_train=1, num_val=1)
    _save_model_of(KW_CFG, 'kw.pth')
    tools_test = _tools_test()
    with pytest.raises(CheckpointLoadError) as info:
        tools_test.main(
            [ODCONV_CFG, 'kw.pth', '--work-dir', 'wd', '--cfg-options'] +
            TINY_TEST)
    message = str(info.value)
    assert 'no value for 208 of the 224 ODConv tensors' in message
    assert 'backbone.layer1.0.conv1.weight' in message
    assert '--allow-partial-load' in message
    # Explicitly allowed: loads (with a warning) and evaluates.
    metrics = tools_test.main([
        ODCONV_CFG, 'kw.pth', '--work-dir', 'wd', '--allow-partial-load',
        '--cfg-options'
    ] + TINY_TEST)
    assert 'accuracy/top1' in metrics


def _copy(src, dst):
    with open(src, 'rb') as f, open(dst, 'wb') as g:
        g.write(f.read())
    return dst


def test_edited_checkpoint_loads_with_a_warning_saying_so(
        toy_checkpoint, tmp_path):
    # Loaded, one weight changed, re-saved with torch.save: the zip records
    # are intact, the recorded hash is stale. Edited, not damaged.
    checkpoint = torch.load(toy_checkpoint, weights_only=True)
    checkpoint['state_dict']['fc.bias'] = torch.tensor([0.25, -0.5])
    path = str(tmp_path / 'edited.pth')
    torch.save(checkpoint, path)
    with pytest.warns(
            CheckpointEditedWarning,
            match=r'edited\.pth was edited after it was saved: '
            r'its zip records are intact \(not damaged\)'):
        loaded = load_checkpoint_file(path)
    assert loaded['state_dict']['fc.bias'].tolist() == [0.25, -0.5]
    model = ToyNet(dynamic=True)
    with pytest.warns(CheckpointEditedWarning):
        load_checkpoint(model, checked_path(path))
    assert model.fc.bias.tolist() == [0.25, -0.5]


def test_renamed_hash_key_is_refused(toy_checkpoint, tmp_path):
    checkpoint = torch.load(toy_checkpoint, weights_only=True)
    checkpoint['meta']['content_sha256_old'] = checkpoint['meta'].pop(HASH_KEY)
    checkpoint['state_dict']['fc.bias'] += 1
    path = str(tmp_path / 'renamed.pth')
    torch.save(checkpoint, path)
    model = ToyNet(dynamic=True)
    before = model.fc.bias.detach().clone()
    with pytest.raises(
            CheckpointLoadError,
            match=r"renamed\.pth says it was saved by mmdyn .*"
            r"records no content hash"):
        load_checkpoint(model, checked_path(path))
    assert torch.equal(model.fc.bias, before)


def test_damaged_pickle_record_is_refused(toy_checkpoint, tmp_path):
    # A byte of data.pkl flipped in place (same length): the CRC-32 of that
    # record no longer matches, whatever torch makes of the content.
    path = _copy(toy_checkpoint, str(tmp_path / 'pickle.pth'))
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    at = data.find(b'fc.bias')
    assert at > 0
    data[at + 3] ^= 0x01  # 'fc.bias' -> 'fc/bias'
    with open(path, 'wb') as f:
        f.write(bytes(data))
    with pytest.raises(
            CheckpointLoadError,
            match=r'pickle\.pth is damaged .*data\.pkl fails the '
            'CRC-32 check'):
        load_checkpoint_file(path)
