
import pytest
import torch

# One intra-op thread: on a busy 2-core machine more threads make tiny ops
# ~100x slower, and results stay repeatable. Tests that need several threads
# (and the subprocesses the tool tests start) set their own.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolate_default_scope():
    """Give each test a clean mmengine default scope and restore it after.

    mmengine keeps the latest ``DefaultScope`` globally, and registries build
    from it: a test that ran a Runner with ``default_scope='mmdet'`` would
    otherwise change where the next test's ``MODELS.build`` looks names up.
    """
    try:
        from mmengine.registry import DefaultScope
    except ImportError:  # pragma: no cover - mmengine is installed in CI
        yield
        return
    saved = DefaultScope._instance_dict.copy()
    # Start every test with no default scope (module-scoped fixtures may have
    # run a Runner): a test that needs one sets it itself.
    DefaultScope._instance_dict.clear()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


@pytest.fixture
def small_winograd(monkeypatch):
    """Winograd thresholds of the public dispatch table lowered so that
    small test layers take the path (mmdyn/ops/fast_paths.py)."""
    from mmdyn.ops.fast_paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['winograd'], 'min_channels', 1)
    monkeypatch.setitem(THRESHOLDS['winograd'], 'min_tiles', 1)
