# Copyright (c) mmdyn contributors. All rights reserved.
"""Official checkpoints in the save formats of the official training scripts,
the converters' command line (``--weights``, ``--verify``), their refusals, and
that nothing is written when a conversion fails.

The files are written here as the official scripts write them: ODConv's
``main.py`` (``state_dict`` of a DataParallel model beside ``epoch``,
``acc``, ``best_acc``, ``optimizer``), KernelWarehouse's ``main.py``
(``model``, ``model_ema``, ``optimizer``, ``epoch``, ``scaler`` and
``args``, an ``argparse.Namespace``) and timm's ``CheckpointSaver`` used by
DDF (``state_dict``, ``state_dict_ema``, ``arch``, ``args``, ``version``,
``amp_scaler``, ``metric``).
"""
import argparse
import os
import os.path as osp

import pytest
import torch
from test_converters import (ROOT, ddf_layer_official, od_layer, plain_conv,
                             resnet_official)

from mmdyn.analysis.checkpoint_formats import (CheckpointFormatError,
                                               read_official_checkpoint)
from mmdyn.analysis.converters import (ConversionError, convert, convert_file,
                                       converter_cli)
from mmdyn.analysis.models import build_model

OD_R18 = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')


class TrainerState:
    """A class of the training script's own, pickled beside the weights."""

    def __init__(self):
        self.step = 3


def _od(prefix, name, ci, co, k, s, d):
    if name.startswith('downsample'):
        return plain_conv(prefix, name, ci, co, k, s, d)
    od_layer(prefix + name + '.', ci, co, k, 1, 1, d)


def _ddf(prefix, name, ci, co, k, s, d):
    if name == 'conv2':
        return ddf_layer_official(prefix + 'conv2.', ci, d)
    plain_conv(prefix, name, ci, co, k, s, d)


@pytest.fixture(scope='module')
def od_r18():
    torch.manual_seed(0)
    return resnet_official(18, _od)


def _optimizer_state(state):
    return dict(
        state={
            i: dict(momentum_buffer=torch.zeros_like(v))
            for i, v in enumerate(list(state.values())[:3])
        },
        param_groups=[dict(lr=0.1, momentum=0.9, params=[0, 1, 2])])


def kw_main_checkpoint(state, ema):
    """What KernelWarehouse's main.py (utils.save_model) writes."""
    args = argparse.Namespace(
        model='kw_resnet18',
        kw_config='configs/resnet18/kw1x_resnet18.json',
        batch_size=128,
        update_freq=4,
        reduction=[0.0625],
        sharing_range=['layer', 'pwconv'],
        cell_num_ratio=[1.0],
        nonlocal_basis_ratio=1.0,
        model_ema=True,
        output_dir='out',
        resume='',
        clip_grad=None,
        opt_betas=None,
        gpu=0,
        distributed=True)
    return dict(
        model=state,
        optimizer=_optimizer_state(state),
        epoch=299,
        scaler=dict(
            scale=65536.0,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=2000,
            _growth_tracker=17),
        args=args,
        model_ema=ema)


def timm_checkpoint(state, ema, arch):
    """What timm's CheckpointSaver (DDF's train.py) writes."""
    args = argparse.Namespace(
        model=arch,
        lr=0.4,
        epochs=120,
        amp=True,
        model_ema=True,
        mean=None,
        scale=[0.08, 1.0])
    return dict(
        epoch=129,
        arch=arch,
        state_dict=state,
        optimizer=_optimizer_state(state),
        version=2,
        args=args,
        amp_scaler=dict(scale=1024.0, _growth_tracker=5),
        state_dict_ema=ema,
        metric=79.1)


def odconv_main_checkpoint(state):
    """What ODConv's main.py writes: a DataParallel state dict."""
    return dict(
        epoch=100,
        state_dict={
            'module.' + k: v
            for k, v in state.items()
        },
        acc=torch.tensor(73.05),
        best_acc=torch.tensor(73.05),
        optimizer=_optimizer_state(state))


def test_kw_main_checkpoint_with_args_and_ema(tmp_path, od_r18):
    ema = {k: v + 1 for k, v in od_r18.items()}
    path = str(tmp_path / 'checkpoint-299.pth')
    torch.save(kw_main_checkpoint(od_r18, ema), path)
    ckpt = read_official_checkpoint(path)
    assert ckpt.arch == 'kw_resnet18' and ckpt.ema_available
    assert "'model' of a training checkpoint (epoch 299, args" in ckpt.source
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in od_r18.items())
    ckpt = read_official_checkpoint(path, weights='ema')
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in ema.items())
    # and through the converter, EMA weights selected on the command line
    dst = tmp_path / 'out.pth'
    converter_cli('odconv', 'test',
                  [path,
                   str(dst), '--config', OD_R18, '--weights', 'ema'])
    out = torch.load(dst, weights_only=True)['state_dict']
    assert torch.equal(out['backbone.layer3.1.conv2.weight'],
                       ema['layer3.1.conv2.weight'])
    assert torch.equal(out['head.fc.weight'], ema['fc.weight'])


def test_timm_checkpoint_and_ddf_mul_add_needs_config(tmp_path):
    torch.manual_seed(0)
    official = resnet_official(50, _ddf)
    path = str(tmp_path / 'model_best.pth.tar')
    torch.save(timm_checkpoint(official, official, 'ddf_mul_resnet50'), path)
    ckpt = read_official_checkpoint(path)
    assert ckpt.arch == 'ddf_mul_resnet50' and ckpt.ema_available
    assert "'state_dict' of a training checkpoint" in ckpt.source
    with pytest.raises(ConversionError) as info:
        convert(ckpt.state_dict, 'ddf', arch=ckpt.arch, src=path)
    message = str(info.value)
    assert '\n' not in message and 'pass --config' in message
    # both candidates with the command to run, the recorded model first
    mul = 'configs/ddf/resnet50-ddf-mul_8xb128-130e_in1k.py'
    add = 'configs/ddf/resnet50-ddf-add_8xb128-130e_in1k.py'
    assert "records the model 'ddf_mul_resnet50'" in message
    assert (f'run python tools/model_converters/ddf2mmdyn.py {path} OUT.pth '
            f'--config {mul} or python tools/model_converters/ddf2mmdyn.py '
            f'{path} OUT.pth --config {add}') in message
    dst = tmp_path / 'ddf.pth'
    assert not dst.exists()
    converter_cli('ddf', 'test',
                  [path, str(dst), '--config',
                   osp.join(ROOT, mul)])
    out = torch.load(dst, weights_only=True)['state_dict']
    assert torch.equal(out['backbone.layer4.2.conv2.channel_branch.4.std'],
                       official['layer4.2.conv2.channel_branch.4.std'])


def test_odconv_main_checkpoint(tmp_path, od_r18):
    path = str(tmp_path / 'model_best.pth.tar')
    torch.save(odconv_main_checkpoint(od_r18), path)
    ckpt = read_official_checkpoint(path)
    assert list(ckpt.state_dict) == list(od_r18)
    assert not ckpt.ema_available and ckpt.arch is None
    with pytest.raises(CheckpointFormatError, match='has no EMA weights'):
        read_official_checkpoint(path, weights='ema')


def test_unknown_global_is_named_and_trust_loads_it(tmp_path, od_r18):
    path = str(tmp_path / 'ckpt.pth')
    torch.save(dict(model=od_r18, trainer=TrainerState()), path)
    with pytest.raises(CheckpointFormatError) as info:
        read_official_checkpoint(path)
    message = str(info.value)
    assert '\n' not in message
    assert 'TrainerState' in message and '--trust-checkpoint' in message
    ckpt = read_official_checkpoint(path, trust=True)
    assert list(ckpt.state_dict) == list(od_r18)
    # the command line says the same in one line, without a traceback
    with pytest.raises(SystemExit, match='conversion refused: .*TrainerState'):
        converter_cli('odconv', 'test', [path, str(tmp_path / 'o.pth')])
    assert not (tmp_path / 'o.pth').exists()


def test_numpy_scalars_of_numpy1_and_numpy2(tmp_path, od_r18):
    """A metric saved as a numpy scalar, by numpy 2 and (the official
    checkpoints' era) numpy 1, which names it numpy.core.multiarray."""
    import zipfile

    import numpy as np
    new, old = tmp_path / 'np2.pth', tmp_path / 'np1.pth'
    torch.save(dict(model=od_r18, metric=np.float64(79.1)), new)
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, 'w') as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith('data.pkl'):
                data = data.replace(b'numpy._core.multiarray\n',
                                    b'numpy.core.multiarray\n')
            dst.writestr(info, data)
    for path in (new, old):
        ckpt = read_official_checkpoint(str(path))
        assert ckpt.extra_keys == ['metric']


def test_unreadable_files(tmp_path, od_r18):
    path = tmp_path / 'cut.pth'
    torch.save(od_r18, path)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointFormatError, match='truncated'):
        read_official_checkpoint(str(path))
    with pytest.raises(CheckpointFormatError, match='does not exist'):
        read_official_checkpoint(str(tmp_path / 'missing.pth'))
    torch.save(dict(model=dict(od_r18, epoch=3)), path)
    with pytest.raises(CheckpointFormatError, match="holds 'epoch' = int"):
        read_official_checkpoint(str(path))


def test_nothing_written_on_failure(tmp_path, od_r18, monkeypatch):
    src, dst = str(tmp_path / 'od.pth'), tmp_path / 'out.pth'
    torch.save(od_r18, src)
    dst.write_bytes(b'previous result')
    wrong = osp.join(ROOT, 'configs/odconv/resnet18-odconv4x_8xb32_in1k.py')
    with pytest.raises(ConversionError, match='first shape mismatch'):
        convert_file('odconv', src, str(dst), wrong, log=None)
    # a save that fails half-way leaves neither a partial file nor a temp
    import mmdyn.analysis.converters as converters

    def failing_save(obj, f):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(converters.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        convert_file('odconv', src, str(dst), OD_R18, log=None)
    assert dst.read_bytes() == b'previous result'
    assert sorted(os.listdir(tmp_path)) == ['od.pth', 'out.pth']


def test_verify_prints_logits_of_the_documented_input(tmp_path, od_r18,
                                                      capsys):
    src, dst = str(tmp_path / 'od.pth'), str(tmp_path / 'out.pth')
    torch.save(odconv_main_checkpoint(od_r18), src)
    converter_cli('odconv', 'test', [src, dst, '--config', OD_R18, '--verify'])
    printed = capsys.readouterr().out
    # the input as the README writes it for the official code
    x = (torch.arange(3 * 224 * 224, dtype=torch.float64) *
         0.7).sin().float().reshape(1, 3, 224, 224)
    model = build_model(OD_R18)
    model.load_state_dict(torch.load(dst, weights_only=True)['state_dict'])
    with torch.no_grad():
        logits = model(x, mode='tensor')[0].double()
    values, indices = logits.topk(5)
    top5 = ', '.join(f'{int(i)}: {float(v):.6f}'
                     for i, v in zip(indices, values))
    assert f'top-5 logits (class: logit): {top5}' in printed
    assert f'checksum: sum {float(logits.sum()):.6f}' in printed
    assert float(values[0]) != 0


def test_converted_checkpoint_carries_a_verified_content_hash(
        tmp_path, od_r18):
    from mmdyn.engine.checkpoint_io import HASH_KEY, verify_content_hash
    src, dst = str(tmp_path / 'od.pth'), str(tmp_path / 'out.pth')
    torch.save(od_r18, src)
    convert_file('odconv', src, dst, OD_R18, log=None)
    checkpoint = torch.load(dst, weights_only=True)
    assert len(checkpoint['meta'][HASH_KEY]) == 64
    assert verify_content_hash(checkpoint, dst)
    # one changed weight no longer matches the recorded hash
    name = next(iter(checkpoint['state_dict']))
    checkpoint['state_dict'][name].view(-1)[0] += 1
    with pytest.raises(ValueError, match='out.pth'):
        verify_content_hash(checkpoint, dst)


def test_reading_leaves_the_process_allow_list_intact(tmp_path, od_r18):
    """The official-format reader allows its globals only while it reads:
    what was allowed before (mmengine checkpoints' numpy dtypes, set on
    ``import mmdyn.engine``) stays allowed afterwards."""
    import argparse

    import numpy as np

    import mmdyn.engine  # noqa: F401
    before = set(map(str, torch.serialization.get_safe_globals()))
    assert any('dtype' in g for g in before)
    src = str(tmp_path / 'od.pth')
    torch.save(
        dict(model=od_r18, args=argparse.Namespace(lr=0.1), epoch=np.int64(3)),
        src)
    read_official_checkpoint(src)
    assert set(map(str, torch.serialization.get_safe_globals())) == before
    # an mmengine-style payload with a numpy dtype still loads weights-only
    other = str(tmp_path / 'meta.pth')
    torch.save(dict(meta=dict(dtype=np.dtype('float32'))), other)
    assert torch.load(other, weights_only=True)['meta']['dtype'] == \
        np.float32
