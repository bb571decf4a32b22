# Copyright (c) mmdyn contributors. All rights reserved.
"""tools/train.py and tools/test.py end to end on the demo configs.

Called in-process (their ``main(argv)``) on a few tiny images, shortened by
--cfg-options: these check the plumbing (metrics keys, checkpoints, resume
after an interruption, --amp, --out, --show-dir), not accuracy. One
interrupted detection run is shared by the tests of this module
(``interrupted_detector``, session-scoped).
"""
import glob
import math
import os
import os.path as osp
import pickle
import re
import shutil
import types

import pytest
import torch
from mmengine.runner.loops import EpochBasedTrainLoop
from script_loading import load_script

import mmdyn.engine  # noqa: F401  (registers mmdyn's hooks)
from mmdyn.datasets import make_demo_classification, make_demo_detection

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_CFG = osp.join(REPO, 'configs/demo/faster-rcnn_r18_fpn_demo.py')
CLS_CFG = osp.join(REPO, 'configs/demo/resnet18_demo_cls.py')


def load_tool(name):
    return load_script(f'tools/{name}.py')


def latest_log(work_dir):
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.log')))
    assert logs, f'no log under {work_dir}'
    with open(logs[-1]) as f:
        return f.read()


def losses(log):
    return [float(v) for v in re.findall(r'\bloss: ([-\w.+]+)', log)]


def det_options(data_root):
    """Point the demo detection config at a tiny demo set in ``data_root``:

    4 training images in batches of 2 (2 iterations an epoch).
    """
    ann = osp.join(data_root, 'annotations', 'instances_val.json')
    options = [
        'train_dataloader.batch_size=2', 'val_dataloader.batch_size=2',
        'test_dataloader.batch_size=2', f'val_evaluator.ann_file={ann}',
        f'test_evaluator.ann_file={ann}', 'default_hooks.logger.interval=1'
    ]
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [
            f'{loader}.dataset.data_root={data_root}/',
            f'{loader}.num_workers=0', f'{loader}.persistent_workers=False'
        ]
    return options


class Interrupted(Exception):
    """Stands in for a kill between two epochs."""


def interrupt_after_epoch(epoch):
    run_epoch = EpochBasedTrainLoop.run_epoch

    def run_epoch_then_stop(loop):
        run_epoch(loop)
        if loop.epoch == epoch:
            raise Interrupted(f'stopped after epoch {epoch}')

    return run_epoch_then_stop


@pytest.fixture(scope='session')
def interrupted_detector(tmp_path_factory):
    """The demo Faster R-CNN trained with --amp for 2 epochs, as configured
    (checkpoints every epoch), interrupted after epoch 1.

    Returns the run's folders and a copy of ``epoch_1.pth`` that later runs
    in the work dir cannot remove.
    """
    root = tmp_path_factory.mktemp('demo_detector')
    data_root = str(root / 'demo_det')
    make_demo_detection(
        data_root, num_train=4, num_val=2, min_size=96, max_size=128)
    options = det_options(data_root)
    work_dir = str(root / 'wd')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EpochBasedTrainLoop, 'run_epoch',
                      interrupt_after_epoch(1))
        with pytest.raises(Interrupted):
            load_tool('train').main([
                DET_CFG, '--work-dir', work_dir, '--amp', '--cfg-options',
                'train_cfg.max_epochs=2', *options
            ])
    log = latest_log(work_dir)
    checkpoint = str(root / 'epoch_1_copy.pth')
    shutil.copy(osp.join(work_dir, 'epoch_1.pth'), checkpoint)
    return types.SimpleNamespace(
        root=str(root),
        work_dir=work_dir,
        options=options,
        log=log,
        checkpoint=checkpoint)


def test_demo_detector_trains_with_amp(interrupted_detector):
    log = interrupted_detector.log
    assert 'CPUAmpOptimWrapper' in log or 'AmpOptimWrapper' in log
    values = losses(log)
    assert values and all(math.isfinite(v) for v in values), values
    meta = torch.load(
        interrupted_detector.checkpoint,
        map_location='cpu',
        weights_only=False)['meta']
    assert meta['epoch'] == 1 and meta['iter'] == 2


def test_interrupted_demo_run_resumes(interrupted_detector):
    """The demo configs checkpoint every epoch: `--resume` after an
    interruption continues from the last finished epoch."""
    work_dir = interrupted_detector.work_dir
    load_tool('train').main([
        DET_CFG, '--work-dir', work_dir, '--amp', '--resume', '--cfg-options',
        'train_cfg.max_epochs=2', *interrupted_detector.options
    ])
    log = latest_log(work_dir)
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'Epoch(train) [2]' in log and 'Epoch(train) [1]' not in log
    # validation at the last epoch
    assert 'coco/bbox_mAP' in log
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))


def test_test_tool_out_and_show_dir(interrupted_detector, tmp_path):
    out = str(tmp_path / 'preds.pkl')
    work_dir = str(tmp_path / 'wd_test')
    metrics = load_tool('test').main([
        DET_CFG, interrupted_detector.checkpoint, '--work-dir', work_dir,
        '--out', out, '--show-dir', 'vis', '--cfg-options',
        *interrupted_detector.options
    ])
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75'):
        assert 0.0 <= metrics[key] <= 1.0
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 2 and 'pred_instances' in preds[0]
    # mmdet puts --show-dir under WORK_DIR/TIMESTAMP/ (README says so)
    assert glob.glob(osp.join(work_dir, '*', 'vis', '*.png'))


def test_classification_amp_train_and_test(tmp_path):
    data_root = str(tmp_path / 'demo_cls')
    make_demo_classification(data_root, num_train=4, num_val=2)
    small = [
        'train_cfg.max_epochs=1', 'train_dataloader.batch_size=8',
        'val_dataloader.batch_size=8', 'test_dataloader.batch_size=8',
        'default_hooks.logger.interval=1'
    ]
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        small += [
            f'{loader}.dataset.data_root={data_root}',
            f'{loader}.num_workers=0', f'{loader}.persistent_workers=False'
        ]
    work_dir = str(tmp_path / 'wd')
    load_tool('train').main(
        [CLS_CFG, '--work-dir', work_dir, '--amp', '--cfg-options', *small])
    log = latest_log(work_dir)
    values = losses(log)
    assert values and all(math.isfinite(v) for v in values), values
    assert 'accuracy/top1' in log
    out = str(tmp_path / 'preds.pkl')
    metrics = load_tool('test').main([
        CLS_CFG,
        osp.join(work_dir, 'epoch_1.pth'), '--work-dir', work_dir, '--out',
        out, '--cfg-options', *small
    ])
    assert 'accuracy/top1' in metrics
    with open(out, 'rb') as f:
        assert len(pickle.load(f)) == 8


def test_resume_and_amp_flags(tmp_path):
    train = load_tool('train')
    assert train.parse_args(['c.py', '--resume']).resume == 'auto'
    assert train.parse_args(['c.py', '--resume', 'x.pth']).resume == 'x.pth'
    assert train.parse_args(['c.py']).resume is None
    assert train.parse_args(['c.py', '--threads', '1']).threads == 1
    assert train.parse_args(['c.py']).threads is None
    assert load_tool('test').parse_args(['c.py', 'x.pth', '--threads',
                                         '1']).threads == 1
    # a thread count below 1 is refused by the parser, naming the option
    for bad in ('0', '-2', 'two'):
        with pytest.raises(SystemExit):
            train.parse_args(['c.py', '--threads', bad])
    assert train.parse_args(['c.py',
                             '--allow-partial-load']).allow_partial_load
    from mmdyn.engine.launch import enable_amp, load_config, set_resume
    cfg = load_config(DET_CFG, launcher='pytorch', work_dir=str(tmp_path))
    enable_amp(cfg)
    assert cfg.optim_wrapper.type in ('CPUAmpOptimWrapper', 'AmpOptimWrapper')
    set_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from is None
    if not torch.cuda.is_available():
        assert cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert cfg.model_wrapper_cfg.device_ids is None
        assert cfg.model_wrapper_cfg.find_unused_parameters is False


@pytest.mark.parametrize(
    'config',
    sorted(glob.glob(osp.join(REPO, 'configs', 'demo', '*.py'))),
    ids=lambda p: osp.basename(p))
def test_demo_config_schedule(config):
    """Every demo config checkpoints every epoch (so that `--resume` continues
    an interrupted run), and the epoch counts its header comment names ("the
    first 2 of the 10 demo epochs", "over all 30 epochs") are its
    schedule's."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    assert cfg.default_hooks.checkpoint.interval == 1
    assert cfg.default_hooks.checkpoint.get('by_epoch', True)
    with open(config) as f:
        header = ''.join(line for line in f if line.startswith('#'))
    header = ' '.join(header.replace('#', ' ').split())
    for pattern in (r'of the (\d+) demo epochs', r'over all (\d+) epochs'):
        for count in re.findall(pattern, header):
            assert int(count) == cfg.train_cfg.max_epochs, (pattern, count)


README_INFERENCE = """
import json, sys
{compat}
from mmdet.apis import DetInferencer, inference_detector, init_detector
try:
    model = init_detector({config!r}, {checkpoint!r}, device='cpu')
except Exception as e:
    print(json.dumps(type(e).__name__ + ': ' + str(e)))
    sys.exit()
sample = inference_detector(model, {image!r})
inferencer = DetInferencer(model={config!r}, weights={checkpoint!r},
                           device='cpu')
result = inferencer({image!r}, return_vis=False)
print(json.dumps([len(sample.pred_instances),
                  len(result['predictions'][0]['labels'])]))
"""


def test_readme_inference_snippet_on_the_demo_model(tmp_path):
    """The README's inference snippet, in a fresh script, on the quick start's
    first model and a checkpoint as mmengine's Runner writes it (with the
    message hub's HistoryBuffers): it needs the one documented line,
    mmdyn.compat.apply(), and nothing else (the config's custom_imports only
    register mmdyn's components)."""
    import json
    import subprocess
    import sys

    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import save_checkpoint
    from PIL import Image

    from mmdyn.datasets.demo_data import DET_CLASSES
    cfg = Config.fromfile(DET_CFG)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    hub = MessageHub.get_instance('readme_inference')
    hub.update_scalar('train/loss', 1.5)
    checkpoint = str(tmp_path / 'epoch_1.pth')
    save_checkpoint(
        dict(
            meta=dict(dataset_meta=dict(classes=DET_CLASSES)),
            state_dict=model.state_dict(),
            message_hub=hub.state_dict()), checkpoint)
    image = str(tmp_path / 'demo.jpg')
    Image.fromarray((torch.rand(96, 128, 3) * 255).byte().numpy()).save(image)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')

    def run(compat):
        code = README_INFERENCE.format(
            compat=compat, config=DET_CFG, checkpoint=checkpoint, image=image)
        result = subprocess.run([sys.executable, '-c', code],
                                env=env,
                                capture_output=True,
                                text=True,
                                cwd=str(tmp_path),
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    without = run('')
    assert 'UnpicklingError' in without and 'HistoryBuffer' in without
    counts = run('import mmdyn.compat\nmmdyn.compat.apply()')
    assert counts[0] == counts[1] >= 0


def test_every_tool_loads_configs_with_one_loader():
    """tools/ and mmdyn/ read config files only through
    mmdyn.engine.config_bases.load_config (vis_dynamic used to call
    Config.fromfile itself and refused `mmdyn::` bases)."""
    callers = []
    for folder in ('tools', 'mmdyn'):
        for path in glob.glob(
                osp.join(REPO, folder, '**', '*.py'), recursive=True):
            if '.mim' in path or path.endswith(
                    osp.join('engine', 'config_bases.py')):
                continue
            with open(path) as f:
                if 'Config.fromfile(' in f.read():
                    callers.append(osp.relpath(path, REPO))
    assert callers == []


ALL_CONFIGS = sorted(
    p for p in glob.glob(
        osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p)


@pytest.mark.parametrize(
    'config',
    ALL_CONFIGS,
    ids=lambda p: osp.relpath(p, osp.join(REPO, 'configs')))
def test_config_loads_by_name_and_path_alike(config):
    """Every config in configs/ loads through the tools' loader by path and
    by its `mmdyn::` name (mmengine's lookup, mmdyn/.mim/configs), to the
    same config."""
    from mmdyn.engine.config_bases import load_config
    name = 'mmdyn::' + osp.relpath(config, osp.join(REPO, 'configs'))
    by_path = load_config(config)
    by_name = load_config(name)
    assert by_name.to_dict() == by_path.to_dict()
    assert by_path.get('model') is not None
    # a config that names an mmdyn component imports the package that
    # registers it (as the stock components need nothing)
    imports = by_path.get('custom_imports', {}).get('imports', [])
    needed = {
        MMDYN_TYPES[t]
        for t in _types(by_path.to_dict()) if t in MMDYN_TYPES
    }
    assert needed <= set(imports), (needed, imports)


def _mmdyn_types():
    """{type name: mmdyn package that registers it}, for names that only mmdyn
    registers."""
    import mmdet.registry
    import mmpretrain.registry
    from mmengine import registry

    import mmdyn.models  # noqa: F401
    owners, stock = {}, set()
    for reg in (registry.HOOKS, registry.LOOPS, registry.OPTIM_WRAPPERS,
                registry.MODELS, mmdet.registry.MODELS,
                mmpretrain.registry.MODELS, mmdet.registry.HOOKS,
                mmpretrain.registry.HOOKS):
        reg.import_from_location()
        for name, obj in reg.module_dict.items():
            module = getattr(obj, '__module__', '')
            if module.startswith('mmdyn.engine'):
                owners[name] = 'mmdyn.engine'
            elif module.startswith('mmdyn.'):
                owners[name] = 'mmdyn.models'
            else:
                stock.add(name)
    return {name: pkg for name, pkg in owners.items() if name not in stock}


MMDYN_TYPES = _mmdyn_types()


def _types(node):
    if isinstance(node, dict):
        own = node.get('type')
        found = [own.split('.')[-1]] if isinstance(own, str) else []
        return found + [t for v in node.values() for t in _types(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _types(v)]
    return []


def test_vis_dynamic_reads_a_config_with_mmdyn_bases(tmp_path):
    from mmdyn.analysis.vis_dynamic import build_model
    path = tmp_path / 'cls.py'
    path.write_text("_base_ = ['mmdyn::demo/resnet18-odconv1x_demo_cls.py']\n")
    model, pipeline, cfg = build_model(str(path))
    assert any(type(m).__name__ == 'ODConv2d' for m in model.modules())


# Tools that read no config and load no checkpoint.
TOOLS_WITHOUT_CONFIGS = ('add_headers.py', 'gpu_check.py', 'make_demo_data.py')


def test_every_tool_applies_the_compat_fixes():
    """Each tool that reads configs or checkpoints makes the one documented
    call (importing mmdyn applies nothing: docs/compat.md)."""
    missing = []
    for path in sorted(
            glob.glob(osp.join(REPO, 'tools', '**', '*.py'), recursive=True)):
        if osp.basename(path) in TOOLS_WITHOUT_CONFIGS:
            continue
        with open(path) as f:
            if 'mmdyn.compat.apply()' not in f.read():
                missing.append(osp.relpath(path, REPO))
    assert missing == []
