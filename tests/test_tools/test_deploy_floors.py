# Copyright (c) mmdyn contributors. All rights reserved.
"""``benchmarks/deploy_floors.py``: its synthetic convs compute what they stand
for (against ``F.conv2d`` on scaled inputs), the ``mixed`` model picks the form
the ODConv export picks, and the profile's nodes are attributed to the right
conv."""
import pytest
import torch
import torch.nn.functional as F
from script_loading import load_script

floors = load_script('benchmarks/deploy_floors.py')


def _reference(conv, x, scale_outputs, spatial):
    """The conv one sample at a time by ``F.conv2d`` on ``x * a`` with the
    kernel's taps times ``t`` (when ``spatial``), ``a`` the sigmoid of the
    input's mean, ``t`` of the hidden layer; times ``f`` when
    ``scale_outputs``; plus the bias."""
    a = torch.sigmoid(x.mean((2, 3)))
    hidden = conv.to_hidden(a)
    f = torch.sigmoid(conv.to_filter(hidden))
    t = torch.sigmoid(conv.to_taps(hidden))
    outputs = []
    for b in range(x.shape[0]):
        weight = conv.weight
        if spatial:
            weight = weight * t[b].view(1, 1, conv.kernel, conv.kernel)
        y = F.conv2d(x[b:b + 1] * a[b].view(1, -1, 1, 1), weight, None,
                     conv.stride, conv.kernel // 2)
        if scale_outputs:
            y = y * f[b].view(1, -1, 1, 1)
        outputs.append(y + conv.bias.view(1, -1, 1, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize('kernel,stride', [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_floor_forms(kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(3, 13, 11, 9)
    spatial = kernel > 1
    for form, scale_outputs, taps in (('scales', True, False), ('columns',
                                                                True, spatial),
                                      ('kernels', False, spatial)):
        conv = floors.FloorConv(13, 10, kernel, stride, form, out_hw=1)
        with torch.no_grad():
            got = conv(x)
            want = _reference(conv, x, scale_outputs, taps)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    static = floors.FloorConv(13, 10, kernel, stride, 'static', out_hw=1)
    with torch.no_grad():
        torch.testing.assert_close(
            static(x),
            F.conv2d(x, static.weight, static.bias, stride, kernel // 2))


def test_mixed_takes_the_odconv_export_choice():
    """Per-sample kernels for a 3x3 conv with ``C_out <= H' * W'`` (early
    layers), scaled maps (and scaled columns for a 3x3 conv) for the others."""
    model = floors.FloorResNet50('mixed')
    forms = {
        name: module.form
        for name, module in model.named_modules()
        if isinstance(module, floors.FloorConv) and 'downsample' not in name
    }
    assert len(forms) == 48
    assert forms['blocks.0.conv2'] == 'kernels'  # 64 <= 56 * 56
    assert forms['blocks.15.conv2'] == 'columns'  # 512 > 7 * 7
    assert forms['blocks.0.conv1'] == 'columns'  # a 1x1: scaled maps
    with pytest.raises(ValueError, match='form must be one of'):
        floors.FloorResNet50('fast')


def test_conv_of_node():
    conv_of = floors.conv_of_node
    assert conv_of('/blocks/blocks.3/conv1/Mul', 'Mul') == '03 conv1'
    assert conv_of('/blocks/blocks.3/Relu', 'Relu') == '03 conv1'
    assert conv_of('/blocks/blocks.3/Relu_output_0_nchwc', 'Conv') == \
        '03 conv1'
    assert conv_of('/blocks/blocks.3/Relu_1', 'Relu') == '03 conv2'
    assert conv_of('fused /blocks/blocks.12/conv2/to_hidden/Gemm',
                   'FusedGemm') == '12 conv2'
    assert conv_of('/blocks/blocks.3/Add', 'Add') == '03 conv3'
    assert conv_of('/blocks/blocks.3/Relu_2', 'Relu') == '03 conv3'
    assert conv_of('/blocks/blocks.3/downsample/Conv', 'Conv') == 'other'
    assert conv_of('/stem/Conv', 'Conv') == 'other'
    assert conv_of('ReorderInput_12', 'ReorderInput') == 'reorder'


@pytest.mark.parametrize('form', ['scales', 'columns', 'kernels'])
@pytest.mark.parametrize('kernel', [1, 3])
def test_floor_exports_have_no_shape_nodes(tmp_path, form, kernel):
    """A floor is the least its form can do: no shape computations in the
    exported graph (the shapes are Python ints), and a 1x1 conv computes no
    tap attention."""
    onnx = pytest.importorskip('onnx')
    from mmdyn.analysis.onnx_export import export_onnx
    conv = floors.FloorConv(3, 8, kernel, 1, form, out_hw=1).eval()
    path = str(tmp_path / 'conv.onnx')
    export_onnx(conv, path, (12, 10))
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert not ops & {'Shape', 'Gather', 'Expand', 'ConstantOfShape', 'Where'
                      }, ops
    gemms = sum(node.op_type == 'Gemm' for node in onnx.load(path).graph.node)
    # the hidden layer and the filters' scales; with taps: their scales; the
    # kernels: no filter scales
    spatial = kernel > 1
    expected = {'scales': 2, 'columns': 2 + spatial, 'kernels': 2 * spatial}
    assert gemms == expected[form]
