# Copyright (c) mmdyn contributors. All rights reserved.
"""The compat fixes of checkpoints and CPU AMP, run against the real
libraries: needed without them, working with them, undone by ``revert``
and inert outside their version range.

(tests/conftest.py applies every fix for the session, as the tools do;
each test here reverts its fix first and re-applies it at the end.)
"""
import pickle

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import load_checkpoint
from toy_runner import ToyNet, make_runner

import mmdyn.compat
from mmdyn.compat import cpu_amp_ops, weights_only_checkpoints


@pytest.fixture
def reverted(request):
    fix = request.param
    fix.revert()
    yield fix
    fix.revert()
    mmdyn.compat.apply()


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('compat_ckpt'))
    make_runner(work_dir, 'compat_src', max_iters=2, ckpt_interval=2).train()
    return f'{work_dir}/iter_2.pth'


def _out_of_range(monkeypatch, package, version):
    real = mmdyn.compat.installed_version
    monkeypatch.setattr(
        mmdyn.compat, 'installed_version', lambda name: version
        if name == package else real(name))


class _GetattrOf:
    """Pickles as ``getattr(HistoryBuffer, name)``."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return getattr, (HistoryBuffer, self.name)


@pytest.mark.parametrize('reverted', [weights_only_checkpoints], indirect=True)
def test_weights_only_checkpoints(reverted, runner_checkpoint, tmp_path):
    before = list(torch.serialization.get_safe_globals())
    assert weights_only_checkpoints.is_needed()
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(runner_checkpoint, weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ToyNet(), runner_checkpoint)  # mmengine's loader

    assert mmdyn.compat.apply()['weights_only_checkpoints'] == 'applied'
    assert not weights_only_checkpoints.is_needed()
    checkpoint = torch.load(runner_checkpoint, weights_only=True)
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/lr'],
                      HistoryBuffer)
    model = ToyNet()
    load_checkpoint(model, runner_checkpoint)
    assert torch.equal(model.fc.weight, checkpoint['state_dict']['fc.weight'])
    # getattr stays refused for anything but HistoryBuffer's statistics.
    torch.save(_GetattrOf('mean'), str(tmp_path / 'mean.pth'))
    assert torch.load(
        str(tmp_path / 'mean.pth'), weights_only=True) is HistoryBuffer.mean
    torch.save(_GetattrOf('__init__'), str(tmp_path / 'init.pth'))
    with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
        torch.load(str(tmp_path / 'init.pth'), weights_only=True)

    weights_only_checkpoints.revert()
    # What was allowed before stays; what the fix added is gone (torch may
    # have allowed entries of its own meanwhile).
    after = torch.serialization.get_safe_globals()
    assert all(g in after for g in before)
    assert not [
        g for g in weights_only_checkpoints.checkpoint_safe_globals()
        if g in after and g not in before
    ]
    assert weights_only_checkpoints.is_needed()


@pytest.mark.parametrize('reverted', [weights_only_checkpoints], indirect=True)
def test_weights_only_checkpoints_inert_out_of_range(reverted, monkeypatch):
    before = list(torch.serialization.get_safe_globals())
    _out_of_range(monkeypatch, 'mmengine', '0.11.0')
    assert mmdyn.compat.apply()['weights_only_checkpoints'] == 'out of range'
    assert list(torch.serialization.get_safe_globals()) == before
    assert weights_only_checkpoints.is_needed()


def _boxes(dtype):
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=gen) * 30
    wh = torch.rand(40, 2, generator=gen) * 10 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(40, generator=gen)
    return boxes.to(dtype), scores.to(dtype)


def _naive_nms(boxes, scores, iou_threshold):
    """Greedy NMS by the definition (mmcv's +0 pixel convention)."""
    boxes, scores = boxes.double(), scores.double()
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            lt = torch.maximum(boxes[i, :2], boxes[j, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = (rb - lt).clamp(min=0).prod()
            area = lambda b: (b[2:] - b[:2]).prod()  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > \
                    iou_threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize('reverted', [cpu_amp_ops], indirect=True)
def test_cpu_amp_ops(reverted):
    from mmcv.ops import nms, roi_align
    boxes, scores = _boxes(torch.bfloat16)
    assert cpu_amp_ops.is_needed()
    with pytest.raises(RuntimeError):
        nms(boxes, scores, 0.3)

    assert mmdyn.compat.apply()['cpu_amp_ops'] == 'applied'
    assert not cpu_amp_ops.is_needed()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dets, keep = nms(boxes, scores, 0.3)
    assert dets.dtype == torch.bfloat16
    assert keep.tolist() == _naive_nms(boxes.float(), scores.float(), 0.3)
    # roi_align: bfloat16 features give the float32 result, rounded, and
    # gradients flow back in the features' dtype.
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 4, 16, 16, generator=gen)
    rois = torch.tensor([[0, 1.5, 2.0, 9.0, 12.5], [0, 0.0, 0.0, 15.0, 7.0]])
    expected = roi_align(feats, rois, (3, 3), 1.0, 2, 'avg', True)
    x = feats.bfloat16().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = roi_align(x, rois.bfloat16(), (3, 3), 1.0, 2, 'avg', True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0

    cpu_amp_ops.revert()
    with pytest.raises(RuntimeError):
        nms(boxes, scores, 0.3)


@pytest.mark.parametrize('reverted', [cpu_amp_ops], indirect=True)
def test_cpu_amp_ops_inert_out_of_range(reverted, monkeypatch):
    from mmcv.ops import nms
    _out_of_range(monkeypatch, 'mmcv', '2.3.0')
    assert mmdyn.compat.apply()['cpu_amp_ops'] == 'out of range'
    with pytest.raises(RuntimeError):
        nms(*_boxes(torch.bfloat16), 0.3)
