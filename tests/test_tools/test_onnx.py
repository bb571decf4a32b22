# Copyright (c) mmdyn contributors. All rights reserved.
"""ONNX export with a dynamic batch: onnxruntime equals PyTorch at batch 1
and 4 for ODConv, KernelWarehouse and DDF models (and a backbone)."""
import os.path as osp

import pytest
import torch

pytest.importorskip('onnx', reason='pip install onnx onnxruntime')
pytest.importorskip('onnxruntime', reason='pip install onnx onnxruntime')

from script_loading import load_script as load_tool  # noqa: E402

from mmdyn.analysis.models import build_model  # noqa: E402
from mmdyn.analysis.onnx_export import compare_with_onnxruntime  # noqa
from mmdyn.analysis.onnx_export import export_onnx, exportable

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

TINY = """
custom_imports = dict(imports=['mmdyn.models', 'mmdyn.engine'],
                      allow_failed_imports=False)
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='{backbone}', depth={depth}, stem_channels=8,
                  base_channels=8{extra}),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels={head_in}))
"""

TINY_MODELS = {
    'kw':
    dict(backbone='KWResNet', depth=18, head_in=64, extra=''),
    'ddf':
    dict(
        backbone='DDFResNet',
        depth=50,
        head_in=256,
        extra=", combine='add', out_indices=(2, 3)"),
}


def _tiny(tmp_path, name):
    path = tmp_path / f'tiny_{name}.py'
    path.write_text(TINY.format(**TINY_MODELS[name]))
    return str(path)


def _perturb_norms(model):
    # Non-trivial BN statistics, so that the comparison is not between two
    # near-constant outputs.
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
            module.weight.data.uniform_(0.5, 1.5, generator=gen)


@pytest.mark.parametrize('name,backbone_only', [('kw', False), ('ddf', True)])
def test_tiny_models_dynamic_batch(tmp_path, name, backbone_only):
    model = build_model(_tiny(tmp_path, name))
    _perturb_norms(model)
    module = exportable(model, backbone_only)
    onnx_file = str(tmp_path / f'{name}.onnx')
    names = export_onnx(module, onnx_file, (32, 32), dynamic_batch=True)
    assert len(names) == (2 if backbone_only else 1)
    import onnx
    graph_input = onnx.load(onnx_file).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == 'batch'
    for batch, diff in compare_with_onnxruntime(module, onnx_file, (32, 32),
                                                (1, 4)):
        assert diff < 1e-4, (batch, diff)


def test_cli_resnet18_odconv(tmp_path, capsys):
    config = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    onnx_file = tmp_path / 'od.onnx'
    load_tool('tools/deployment/pytorch2onnx.py').main([
        config, '--output-file',
        str(onnx_file), '--shape', '64', '64', '--dynamic-batch', '--verify'
    ])
    assert 'batch 4: max abs difference' in capsys.readouterr().out
    assert onnx_file.exists()


def test_whole_detector_refused():

    class FakeDetector(torch.nn.Module):
        roi_head = None

        def _forward(self, *args):
            pass

    with pytest.raises(ValueError, match='backbone_only'):
        exportable(FakeDetector())


@pytest.mark.parametrize('show', [False, True])
def test_tracer_warnings_counted_not_printed(tmp_path, show):
    """A dynamic-batch export prints no TracerWarning unless asked to."""
    model = build_model(_tiny(tmp_path, 'kw'))
    module = exportable(model)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        export_onnx(
            module,
            str(tmp_path / 'kw.onnx'), (32, 32),
            dynamic_batch=True,
            show_tracer_warnings=show)
    tracer = [
        w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
    ]
    assert bool(tracer) == show
