# Copyright (c) mmdyn contributors. All rights reserved.

import os
import warnings

import pytest
import torch

import mmdyn.compat

# As every tool and the README's scripts do: the pinned libraries' fixes for
# today's torch/numpy/setuptools (docs/compat.md). Importing mmdyn applies
# nothing (tests/test_engine/test_import_changes_nothing.py).
mmdyn.compat.apply()

# One intra-op thread: on a busy 2-core machine more threads make tiny ops
# ~100x slower, and results stay repeatable. Tests that need several threads
# (and the subprocesses the tool tests start) set their own.
torch.set_num_threads(1)

# The fast tier, `python -m pytest tests -m "not slow"` (README, "Test"), is
# the edit-test loop; CI runs everything. Tests that take more than ~4 s on
# a 2-core machine are marked slow here, in one list, rather than in their
# files: node-id prefixes (a module, a test, or one parametrisation). Tests
# that are slow by design (training runs, installs, several processes) may
# also carry `@pytest.mark.slow` themselves.
SLOW_TESTS = (
    # end-to-end runs of the tools (shared interrupted demo run, in-process)
    'tests/test_tools/test_train_tools.py::test_demo_detector_trains_with_amp',
    'tests/test_tools/test_train_tools.py::test_interrupted_demo_run_resumes',
    'tests/test_tools/test_train_tools.py::test_test_tool_out_and_show_dir',
    'tests/test_tools/test_train_tools.py::test_classification_amp_train',
    'tests/test_tools/test_detection_demo.py',
    # several processes
    'tests/test_engine/test_distributed.py',
    'tests/test_tools/test_coco_configs_ddp.py::test_two_process_ddp',
    'tests/test_engine/test_malloc.py::test_tuned_malloc_keeps_multi_mb',
    # every config loaded, every COCO config trained for one step (the
    # fast tier builds them: test_detection_configs, test_parity_od_dy_ddf,
    # test_kw_resnet)
    'tests/test_tools/test_configs.py::test_config_loads',
    'tests/test_tools/test_train_tools.py::test_config_loads_by_name_and_',
    'tests/test_tools/test_coco_configs_ddp.py::test_every_trainable_param',
    'tests/test_models/test_detection_configs.py::test_loss_forward_backward',
    'tests/test_tools/test_config_bases.py::test_stock_detector_trains_one_'
    'step_on_demo_data[atss]',
    'tests/test_tools/test_config_bases.py::test_stock_detector_trains_one_'
    'step_on_demo_data[fcos]',
    # every demo config trained for a few iterations
    'tests/test_engine/test_amp_demo_configs.py',
    'tests/test_engine/test_temperature_hook.py::test_iteration_based_loop',
    # every plug-in recipe and every metafile config built (and trained)
    'tests/test_tools/test_plug_in.py::test_detection_recipe_trains_one_step',
    'tests/test_tools/test_plug_in.py::test_classification_recipe_trains_one_'
    'step[resnet50-',
    'tests/test_tools/test_metafiles.py::test_every_named_config_builds',
    'tests/test_models/test_empty_batch.py::test_mask_rcnn_trains_through',
    # torch.compile of whole backbones and necks, and of DDF-Up
    'tests/test_ops/test_pt2_models.py::test_compile_fullgraph_model',
    'tests/test_ops/test_pt2_compile.py::test_compile_fullgraph_train_and_'
    'eval[ddf_up',
    # whole models: exports, converted official checkpoints, pictures
    'tests/test_tools/test_onnx.py::test_tiny_models_dynamic_batch[ddf-',
    'tests/test_tools/test_converters.py::test_odconv_mobilenet_v2_whole_model',  # noqa: E501
    'tests/test_tools/test_converters.py::test_dyconv_resnet18_whole_model',
    'tests/test_tools/test_converters_kw.py::test_kw_mobilenet_v2_matches_',
    'tests/test_tools/test_converters_kw.py::test_kw_convnext_tiny_matches_',
    'tests/test_tools/test_vis_dynamic.py::test_tool_on_a_',
    'tests/test_engine/test_checkpoint_integrity.py::test_other_method_',
)


def pytest_collection_modifyitems(config, items):
    """Mark the tests of :data:`SLOW_TESTS` slow; when the whole suite is
    collected, warn about entries that match no test (renamed tests)."""
    matched = set()
    for item in items:
        hits = [p for p in SLOW_TESTS if item.nodeid.startswith(p)]
        if hits:
            item.add_marker(pytest.mark.slow)
            matched.update(hits)
    tests_root = os.path.dirname(os.path.abspath(__file__))
    paths = {os.path.abspath(str(arg).split('::')[0]) for arg in config.args}
    if paths == {tests_root} and not config.option.keyword:
        stale = [p for p in SLOW_TESTS if p not in matched]
        if stale:
            warnings.warn(f'SLOW_TESTS entries in tests/conftest.py match no '
                          f'test (renamed?): {stale}')


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


@pytest.fixture(autouse=True)
def _forget_visualizers():
    """Drop the visualizers a test's Runners made.

    mmdet's and mmpretrain's runtime configs name their visualizer
    ``'visualizer'``, and mmengine hands an existing instance of that name
    to the next Runner: with the previous run's (maybe deleted) folder.
    """
    try:
        from mmengine.visualization import Visualizer
    except ImportError:  # pragma: no cover - mmengine is installed in CI
        yield
        return

    def classes(cls=Visualizer):
        yield cls
        for sub in cls.__subclasses__():
            yield from classes(sub)

    before = {cls: set(cls._instance_dict) for cls in classes()}
    yield
    for cls in classes():
        for name in set(cls._instance_dict) - before.get(cls, set()):
            del cls._instance_dict[name]


@pytest.fixture
def small_winograd(monkeypatch):
    """Winograd thresholds of the public dispatch table lowered so that small
    test layers take the path (mmdyn/ops/accel/thresholds.py)."""
    from mmdyn.ops.accel.paths import THRESHOLDS
    monkeypatch.setitem(THRESHOLDS['winograd'], 'min_channels', 1)
    monkeypatch.setitem(THRESHOLDS['winograd'], 'min_tiles', 1)
