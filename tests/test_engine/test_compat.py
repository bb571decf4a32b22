"""mmdyn.engine.compat: each compatibility fix and what failed before it."""
import importlib.util
import io
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer

import mmdyn.engine  # noqa: F401
from mmdyn.engine import compat
from toy_runner import make_runner


# --- fix 2: setuptools >= 81 has no pkg_resources --------------------------

def test_installed_package_helpers_without_pkg_resources():
    import mmdet
    import mmengine.config.config as config_module
    import mmengine.utils
    # Before the fix these called into pkg_resources.
    for module in (mmengine.utils, config_module):
        assert module.is_installed is compat.is_installed
        assert module.get_installed_path is compat.get_installed_path
    assert compat.is_installed('mmdet')
    assert not compat.is_installed('mmdyn-no-such-package-xyz')
    assert compat.get_installed_path('mmdet') == osp.dirname(mmdet.__file__)
    # A distribution whose module name differs from its name.
    assert compat.get_installed_path('opencv-python') == osp.dirname(
        importlib.util.find_spec('cv2').origin)


def test_config_with_installed_base(tmp_path):
    # Failed with "No module named 'pkg_resources'" under setuptools >= 81.
    path = tmp_path / 'cfg.py'
    path.write_text("_base_ = 'mmdet::faster_rcnn/"
                    "faster-rcnn_r50_fpn_1x_coco.py'\n"
                    "model = dict(backbone=dict(depth=18))\n")
    cfg = Config.fromfile(str(path))
    assert cfg.model.type == 'FasterRCNN'
    assert cfg.model.backbone.depth == 18
    assert cfg.model.neck.type == 'FPN'


# --- fix 1: weights_only=True loading of mmengine checkpoints --------------

@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('compat_runner'))
    runner = make_runner(work_dir, 'compat_a', max_iters=4, ckpt_interval=4)
    runner.train()
    return osp.join(work_dir, 'iter_4.pth')


def test_checkpoint_needs_only_allowed_globals(trained_checkpoint):
    # What torch's own allow-list (without mmdyn's additions) refuses.
    ours = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(
            trained_checkpoint))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(trained_checkpoint, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(ours)
    # What mmengine 0.10.7 + numpy 2 put in a checkpoint: torch's default
    # allow-list refuses all of these.
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    assert 'builtins.getattr' in unsafe
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    buffers = ckpt['message_hub']['log_scalars']
    assert isinstance(buffers['train/loss'], HistoryBuffer)
    assert buffers['train/loss'].mean() == pytest.approx(
        float(np.mean(buffers['train/loss'].data[0])))
    assert ckpt['meta']['iter'] == 4


def test_resume_and_load_from_in_fresh_runners(trained_checkpoint, tmp_path):
    # Resume: before the fix, Runner.resume raised UnpicklingError.
    runner = make_runner(str(tmp_path / 'resume'), 'compat_b', max_iters=6,
                         resume=True, load_from=trained_checkpoint)
    runner.train()
    assert runner.iter == 6
    # load_from (weights only, training restarts at iteration 0).
    runner = make_runner(str(tmp_path / 'load'), 'compat_c', max_iters=2,
                         load_from=trained_checkpoint)
    runner.train()
    assert runner.iter == 2


def test_restricted_getattr_refuses_anything_else(tmp_path):
    assert compat._restricted_getattr(HistoryBuffer, 'mean') is \
        HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, '__init__'), (np.ndarray, 'tofile'),
                      (torch, 'load')):
        with pytest.raises(pickle.UnpicklingError, match='refused'):
            compat._restricted_getattr(obj, name)

    class Evil:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    path = str(tmp_path / 'evil.pth')
    torch.save({'x': Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_numpy1_checkpoint_names_load(tmp_path):
    # Checkpoints written under numpy 1.x name 'numpy.core.multiarray.*'.
    buf = io.BytesIO()
    state = {'a': np.arange(5, dtype=np.int64), 's': np.float64(2.5)}
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue().replace(b'numpy._core.multiarray',
                                  b'numpy.core.multiarray')
    assert b'numpy.core.multiarray\n_reconstruct' in data
    path = tmp_path / 'np1.pth'
    path.write_bytes(data)
    loaded = torch.load(str(path), weights_only=True)
    np.testing.assert_array_equal(loaded['a'], np.arange(5))
    assert loaded['s'] == 2.5


# --- fix 5: numpy >= 2.4 has no np.in1d (mmpretrain retrieval metrics) -----

def test_retrieval_metric_under_numpy2():
    from mmpretrain.evaluation.metrics import RetrievalRecall
    # Before the fix: AttributeError: module 'numpy' has no attribute 'in1d'.
    pred = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.7]])
    target = [torch.tensor([1]), torch.tensor([0])]
    recall = RetrievalRecall.calculate(pred, target, topk=(1, 2),
                                      target_indices=True)
    # Sample 0: top-1 is class 0 (miss), top-2 adds class 1 (hit).
    # Sample 1: top-1 is class 2, top-2 adds class 1: class 0 never found.
    assert [float(r) for r in recall] == [0.0, 50.0]


# --- fix 4: mmcv's builders named the unknown type "None" ------------------

def test_unknown_conv_type_is_named():
    from mmcv.cnn import build_conv_layer

    import mmdyn.models  # noqa: F401  (registers ODConv2d)
    with pytest.raises(KeyError, match=r"'ODConv'.*Did you mean.*ODConv2d"):
        build_conv_layer(dict(type='ODConv'), 3, 8, 3)
    # Registered types still build.
    assert build_conv_layer(dict(type='Conv2d'), 3, 8, 3).out_channels == 8


# --- fix 3: DDP initialisation without CUDA --------------------------------

def test_init_dist_without_cuda_uses_gloo(monkeypatch):
    import mmengine.dist.utils as dist_utils
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'set_device',
                        lambda *a: calls.append('set_device'))
    monkeypatch.setattr(dist_utils.torch_dist, 'init_process_group',
                        lambda backend, **kw: calls.append(backend))
    dist_utils._init_dist_pytorch('nccl')
    assert calls == ['gloo']


def test_package_metainfo_read_once_with_mmengines_answers(monkeypatch):
    from mmengine import fileio
    from mmengine.config import utils as config_utils

    from mmdyn.engine.compat import get_installed_path
    original = compat._ORIGINAL['_get_cfg_metainfo']
    assert config_utils._get_cfg_metainfo is not original
    package = get_installed_path('mmdet')
    name = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
    base = '_base_/models/faster-rcnn_r50_fpn'
    # The same entry as mmengine's own lookup, and the same error for a
    # base config (which has no metafile entry).
    assert config_utils._get_cfg_metainfo(package, name) == \
        original(package, name)
    with pytest.raises(ValueError, match='Expected configs'):
        original(package, base)
    with pytest.raises(ValueError, match='Expected configs'):
        config_utils._get_cfg_metainfo(package, base)
    # Once cached, further lookups read no YAML at all.
    loads = []
    real_load = fileio.load
    monkeypatch.setattr(fileio, 'load',
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    for _ in range(3):
        config_utils._get_cfg_metainfo(package, name)
        with pytest.raises(ValueError):
            config_utils._get_cfg_metainfo(package, base)
    assert loads == []
