# Copyright (c) mmdyn contributors. All rights reserved.
"""tools/analysis_tools/vis_dynamic.py and mmdyn.analysis.vis_dynamic: the
recorded filters and attentions are the ones the layers applied (their outputs
recomputed by hand from them), the statistics match a hand computation, and the
tool writes non-trivial pictures for a config + checkpoint."""
import importlib.util
import json
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmdyn.analysis.vis_dynamic import (OD_ATTENTIONS, DynamicLayerRecorder,
                                        LayerRecord, Moments,
                                        normalized_entropy, pixel_filters,
                                        render)
from mmdyn.ops import DDFConv2d, DDFUpsample, DyConv2d, KWConv2d, ODConv2d

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _record(model, inputs):
    """Run each input (one image each) under a recorder."""
    recorder = DynamicLayerRecorder(model, filter_images=len(inputs))
    outputs = []
    with recorder, torch.no_grad():
        for args in inputs:
            recorder.next_image()
            outputs.append(model(*args))
    return recorder.records, outputs


def _ddf_by_hand(x, cf, sf, k):
    """Out[c, y, x] = sum_ij x[c, y+i-r, x+j-r] * cf[c, ij] * sf[ij, y, x] (one
    sample, one head, stride 1, 'mul')."""
    r = k // 2
    padded = F.pad(x, (r, r, r, r))
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    for i in range(k):
        for j in range(k):
            tap = padded[:, i:i + height, j:j + width]
            out += tap * cf[:, i * k + j, None, None] * sf[i * k + j]
    return out


@pytest.mark.parametrize('guided', [False, True])
def test_ddf_up_filters_reproduce_the_output(guided):
    torch.manual_seed(0)
    layer = DDFUpsample(8, scale_factor=2, guided=guided).eval()
    x = torch.randn(1, 8, 5, 6)
    args = (x, torch.randn(1, 8, 10, 12)) if guided else (x, )
    records, outputs = _record(layer, [args])
    record = records['']
    assert record.kind == 'ddf_up' and record.scale_factor == 2
    sf = record.spatial_filters[0]  # [4 phases, 9, 5, 6]
    cf = record.channel_filters[0]  # [4 phases, 8, 9]
    assert sf.shape == (4, 9, 5, 6) and cf.shape == (4, 8, 9)
    out = outputs[0][0]
    for phase in range(4):
        py, px = divmod(phase, 2)
        expected = _ddf_by_hand(x[0], cf[phase], sf[phase], 3)
        torch.testing.assert_close(
            out[:, py::2, px::2], expected, rtol=1e-4, atol=1e-5)
    # The filter read at an input pixel is that of its output pixel:
    # output (Y, X) = (7, 4) is phase (1, 0) at low-res (3, 2); with a
    # 20x24 network input the output map (10x12) has stride 2.
    (got, ) = pixel_filters(record, 0, (20, 24), [(8, 14)])
    torch.testing.assert_close(got, sf[2, :, 3, 2].reshape(3, 3))


def test_ddf_conv_filters_reproduce_the_output():
    torch.manual_seed(0)
    layer = DDFConv2d(6, 6, 3).eval()
    x = torch.randn(1, 6, 7, 7)
    records, outputs = _record(layer, [(x, )])
    record = records['']
    cf = record.channel_filters[0][0]
    sf = record.spatial_filters[0][0]
    torch.testing.assert_close(
        outputs[0][0], _ddf_by_hand(x[0], cf, sf, 3), rtol=1e-4, atol=1e-5)


def test_odconv_attentions_reproduce_the_output(tmp_path):
    torch.manual_seed(0)
    layer = ODConv2d(8, 12, 3, padding=1, kernel_num=4, bias=False).eval()
    images = [torch.randn(1, 8, 6, 6) for _ in range(3)]
    records, outputs = _record(layer, [(x, ) for x in images])
    record = records['']
    for n, x in enumerate(images):
        channel, filt, spatial, kernel = (
            record.profiles[name][n]
            for name in ('channel', 'filter', 'spatial', 'kernel'))
        # y = alpha_f * conv(alpha_c * x, sum_i alpha_w[i] alpha_s W_i)
        weight = (kernel[:, None, None, None, None] * layer.weight *
                  spatial.view(1, 1, 1, 3, 3)).sum(0)
        expected = F.conv2d(
            x * channel.view(1, -1, 1, 1), weight, padding=1) * filt.view(
                1, -1, 1, 1)
        torch.testing.assert_close(outputs[n], expected, rtol=1e-4, atol=1e-5)
    # Statistics by hand: variance over the 3 images, entropy of alpha_w.
    stacked = torch.stack(record.profiles['kernel']).double()
    assert record.moments['kernel'].mean_variance() == pytest.approx(
        float(stacked.var(0, unbiased=False).mean()), rel=1e-6)
    by_hand = [float(-(p * p.log()).sum() / np.log(4)) for p in stacked]
    assert record.entropies == pytest.approx(by_hand, rel=1e-6)
    # The root module's attention picture (four panels).
    render([record], str(tmp_path), [], (6, 6))
    _non_constant_png(str(tmp_path / 'attention' / 'model.png'))


def test_odconv_1x_has_no_kernel_attention_but_is_summarised(tmp_path):
    torch.manual_seed(0)
    layer = ODConv2d(8, 8, 3, padding=1, kernel_num=1).eval()
    images = [torch.randn(1, 8, 6, 6) for _ in range(2)]
    records, _ = _record(layer, [(x, ) for x in images])
    render(list(records.values()), str(tmp_path), [], (6, 6))
    summary = json.load(open(tmp_path / 'summary.json'))['']
    assert summary['samples'] == 2
    assert summary['kernel_entropy'] is None
    channel = torch.stack(records[''].profiles['channel']).double()
    assert sorted(
        summary['variance_over_images']) == ['channel', 'filter', 'spatial']
    assert summary['variance_over_images']['channel'] == pytest.approx(
        float(channel.var(0, unbiased=False).mean()), rel=1e-6)
    _non_constant_png(str(tmp_path / 'summary.png'))


def test_dyconv_and_kw_kernel_attentions(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        DyConv2d(8, 8, 3, padding=1, kernel_num=4),
        KWConv2d(8, 8, 3, padding=1, cell_num_ratio=1)).eval()
    model[0].update_temperature(2.0)
    images = [torch.randn(1, 8, 6, 6) for _ in range(2)]
    records, outputs = _record(model, [(x, ) for x in images])
    dy, kw = records['0'], records['1']
    assert (dy.kind, kw.kind) == ('dyconv', 'kw')
    for n, x in enumerate(images):
        pi = dy.profiles['kernel'][n]
        weight = (pi[:, None, None, None, None] * model[0].weight).sum(0)
        bias = pi @ model[0].bias
        torch.testing.assert_close(
            model[0](x),
            F.conv2d(x, weight, bias, padding=1),
            rtol=1e-4,
            atol=1e-5)
    assert kw.moments['kernel'].count == 2
    assert len(kw.entropies) == 2
    assert all(0 <= e <= 1 for e in kw.entropies)
    written = render(list(records.values()), str(tmp_path), [], (6, 6))
    assert sorted(osp.basename(p) for p in written) == [
        '0.png', '1.png', 'summary.json', 'summary.png'
    ]
    for path in written[1:]:
        _non_constant_png(path)


def test_normalized_entropy():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0],
                          [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(
        normalized_entropy(probs),
        torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))


# -- the pictures, checked on the figure objects ---------------------------
@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved while the test runs, drawn; its renderer
    (``fig.saved_renderer``, kept as closing the figure drops its canvas) gives
    the extents of its texts and patches."""
    from matplotlib.figure import Figure
    figures = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        fig.canvas.draw()
        fig.saved_renderer = fig.canvas.get_renderer()
        figures.append(fig)

    monkeypatch.setattr(Figure, 'savefig', record)
    return figures


def _image_axes(fig):
    """The panels of a figure that show an image (not the colorbars)."""
    return [
        ax for ax in fig.axes if ax.images and ax.get_label() != '<colorbar>'
    ]


def _visible_ticks(ticks, limits):
    low, high = sorted(limits)
    return [t for t in ticks if low - 1e-9 <= t <= high + 1e-9]


def _nested_model(**layers):
    """A module holding each layer under its dotted name."""
    model = nn.Module()
    for name, layer in layers.items():
        parent = model
        *path, last = name.split('.')
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, layer)
    return model


def _record_layers(model, images):
    recorder = DynamicLayerRecorder(model, filter_images=len(images))
    layers = [(n, m) for n, m in model.named_modules()
              if n in recorder.records]
    with recorder, torch.no_grad():
        for x in images:
            recorder.next_image()
            for _, layer in layers:
                layer(x)
    return list(recorder.records.values())


def test_one_kernel_layer_says_so_instead_of_an_empty_bar(
        tmp_path, saved_figures):
    torch.manual_seed(0)
    model = _nested_model(
        **{
            'a': ODConv2d(8, 8, 3, padding=1, kernel_num=1),
            'b': ODConv2d(8, 8, 3, padding=1, kernel_num=4)
        }).eval()
    records = _record_layers(model, [torch.randn(1, 8, 6, 6)] * 2)
    render(records, str(tmp_path), [], (6, 6))
    summary = saved_figures[0]
    entropy_panel = summary.axes[0]
    notes = [(t.get_text(), t.get_position()[0]) for t in entropy_panel.texts]
    assert notes == [('one kernel', 0)]  # at layer 'a', the first bar
    one_kernel = saved_figures[1]
    assert 'one kernel' in one_kernel._suptitle.get_text()
    assert 'one kernel' not in saved_figures[2]._suptitle.get_text()


def test_sample_and_entry_ticks_are_whole_numbers(tmp_path, saved_figures):
    torch.manual_seed(0)
    model = _nested_model(od=ODConv2d(8, 8, 3, padding=1)).eval()
    records = _record_layers(model, [torch.randn(1, 8, 6, 6)] * 2)
    render(records, str(tmp_path), [], (6, 6))
    panels = _image_axes(saved_figures[1])
    assert len(panels) == 4
    for ax in panels:
        for ticks, limits in ((ax.get_xticks(), ax.get_xlim()),
                              (ax.get_yticks(), ax.get_ylim())):
            shown = _visible_ticks(ticks, limits)
            assert shown and all(float(t).is_integer()
                                 for t in shown), (ax.get_title(), shown)


def test_odconv_spatial_attention_is_drawn_k_by_k(tmp_path, saved_figures):
    """The panel is the kernel's k x k grid: the mean over the samples of the
    spatial attention the layer's attention branch gives."""
    torch.manual_seed(0)
    layer = ODConv2d(8, 8, 5, padding=2).eval()
    images = [torch.randn(1, 8, 6, 6) for _ in range(3)]
    records = _record_layers(_nested_model(od=layer), images)
    render(records, str(tmp_path), [], (6, 6))
    spatial = [
        ax for ax in _image_axes(saved_figures[1])
        if ax.get_title().startswith('spatial')
    ]
    assert len(spatial) == 1
    drawn = np.asarray(spatial[0].images[0].get_array())
    assert drawn.shape == (5, 5)
    with torch.no_grad():
        expected = torch.stack([
            layer.attention(x.mean((2, 3)),
                            layer.temperature)[2].reshape(5, 5) for x in images
        ]).mean(0)
    np.testing.assert_allclose(drawn, expected.numpy(), rtol=1e-5, atol=1e-6)


def _fits(fig) -> bool:
    """Whether everything drawn in ``fig`` (texts included) lies inside the
    figure, to half a pixel."""
    drawn = fig.get_tightbbox(fig.saved_renderer)  # inches
    slack = 0.5 / fig.dpi
    return (drawn.x0 >= -slack and drawn.y0 >= -slack
            and drawn.x1 <= fig.get_figwidth() + slack
            and drawn.y1 <= fig.get_figheight() + slack)


def test_long_layer_names_keep_every_letter(tmp_path, saved_figures):
    """Module names of a detector's RoI head and a ConvNeXt stage: the one-
    panel attention picture and the summary show them whole."""
    torch.manual_seed(0)
    model = _nested_model(
        **{
            'roi_head.bbox_head.shared_convs.0.conv': DyConv2d(
                8, 8, 3, padding=1),
            'backbone.stages.3.2.pointwise_conv1': DyConv2d(8, 8, 1),
        }).eval()
    records = _record_layers(model, [torch.randn(1, 8, 6, 6)] * 2)
    render(records, str(tmp_path), [], (6, 6))
    assert len(saved_figures) == 3
    for fig in saved_figures:
        assert _fits(fig), fig._suptitle
    titles = [fig._suptitle.get_text() for fig in saved_figures[1:]]
    assert titles == [
        'roi_head.bbox_head.shared_convs.0.conv (DyConv2d)',
        'backbone.stages.3.2.pointwise_conv1 (DyConv2d)'
    ]


def test_legend_is_not_drawn_over_the_bars(tmp_path, saved_figures):
    """Layers whose attentions all vary the same over the images: bars of
    one height everywhere, so no place inside the panel is free."""
    records = []
    for n in range(6):
        record = LayerRecord(
            name=f'layer{n}',
            kind='odconv',
            type='ODConv2d',
            images=[0, 1],
            entropies=[0.9, 0.9],
            num_kernels=4)
        for name in OD_ATTENTIONS:
            moments = Moments()
            moments.add(torch.tensor([[0.0], [0.2]]))  # variance 0.01
            record.moments[name] = moments
        records.append(record)
    from mmdyn.analysis.vis_dynamic import plot_summary
    assert plot_summary(records, str(tmp_path / 'summary.png'))
    fig = saved_figures[0]
    panel = fig.axes[1]
    renderer = fig.saved_renderer
    legend = panel.get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in panel.patches]
    assert len(bars) == 6 * 4
    assert not any(bar.overlaps(legend) for bar in bars)
    assert _fits(fig)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    from mmdyn.datasets.demo_data import make_demo_detection
    root = str(tmp_path_factory.mktemp('vis') / 'demo_det')
    make_demo_detection(root, num_train=3, num_val=1, min_size=64, max_size=64)
    return [osp.join(root, 'train', f'{i:05d}.png') for i in range(3)]


def _checkpoint(cfg, path):
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import save_checkpoint
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    save_checkpoint(model.state_dict(), path)
    return model


def _non_constant_png(path):
    pixels = np.asarray(Image.open(path).convert('RGB'))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 10, path


def test_tool_on_a_detector_with_ddf_and_ddf_up(images, tmp_path):
    from mmengine.config import Config
    spec = importlib.util.spec_from_file_location(
        'vis_dynamic_tool',
        osp.join(REPO, 'tools', 'analysis_tools', 'vis_dynamic.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = osp.join(REPO, 'configs', 'plug_in',
                      'mask-rcnn_r50-ddf-dcn_fpn-ddfup_1x_coco.py')
    cfg = Config.fromfile(config)
    small = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs')
    ]
    cfg.test_dataloader.dataset.pipeline = small
    cfg.model.test_cfg.rpn.update(nms_pre=100, max_per_img=20)
    small_cfg = str(tmp_path / 'small.py')
    cfg.dump(small_cfg)
    model = _checkpoint(cfg, str(tmp_path / 'model.pth'))
    out_dir = str(tmp_path / 'vis')
    written = tool.main([
        small_cfg,
        str(tmp_path / 'model.pth'), *images[:2], '--out-dir', out_dir,
        '--pixels', '32,32', '10,50', '--layers',
        r'backbone\.layer4\.2\.|neck\.upsamplers\.0'
    ])
    summary = json.load(open(osp.join(out_dir, 'summary.json')))
    # Only the matched layers: a DDF layer and the first DDF-Up step.
    assert {
        k: v['type']
        for k, v in summary.items()
    } == {
        'backbone.layer4.2.conv2': 'DDFConv2d',
        'neck.upsamplers.0': 'DDFUpsample'
    }
    pictures = [p for p in written if p.endswith('.png')]
    assert len(pictures) == 2  # one per layer, for the first image
    for path in pictures:
        _non_constant_png(path)
    # The checkpoint was loaded: the recorded channel filters of the first
    # DDF-Up are those of the saved model on the same input.
    name = 'neck.upsamplers.0'
    assert summary[name]['samples'] == 2
    assert np.isfinite(summary[name]['channel_filter_std'])
    assert summary[name]['channel_filter_std'] > 0
    assert isinstance(model.neck.upsamplers[0], DDFUpsample)


def test_tool_on_a_classifier_with_dyconv(images, tmp_path):
    from mmengine.config import Config

    from mmdyn.analysis.vis_dynamic import visualize
    config = osp.join(REPO, 'configs', 'plug_in',
                      'resnet18-dynamicresnet-dyconv4x_8xb32_in1k.py')
    cfg = Config.fromfile(config)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='PackInputs')
    ]
    _checkpoint(cfg, str(tmp_path / 'model.pth'))
    out_dir = str(tmp_path / 'vis')
    written = visualize(
        cfg,
        str(tmp_path / 'model.pth'),
        images,
        out_dir,
        layers='layer4',
        progress=False)
    summary = json.load(open(osp.join(out_dir, 'summary.json')))
    assert len(summary) == 4  # 2 BasicBlocks x 2 DyConv2d in layer4
    for stats in summary.values():
        assert stats['samples'] == 3
        assert 0 <= stats['kernel_entropy'] <= 1
        assert stats['variance_over_images']['kernel'] >= 0
    assert any(s['variance_over_images']['kernel'] > 0
               for s in summary.values())
    assert osp.join(out_dir, 'summary.png') in written
    assert len([p for p in written if '/attention/' in p]) == 4
    _non_constant_png(osp.join(out_dir, 'summary.png'))
