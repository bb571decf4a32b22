# Copyright (c) mmdyn contributors. All rights reserved.
"""DDFUpFPN: same pyramid as mmdet's FPN, learnable top-down upsamplers."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

import mmdyn.models  # noqa: F401  (registers DDFUpFPN and 'ddf_up')
from mmdyn.models.necks import DDFUpFPN

IN_CHANNELS = [4, 8, 16, 32]
OUT_CHANNELS = 8


def pyramid(height, width, batch=2, in_channels=IN_CHANNELS):
    """Backbone-like maps: each level is ceil(previous / 2), like a
    stride-2 3x3 conv with padding 1."""
    feats = []
    for channels in in_channels:
        feats.append(torch.randn(batch, channels, height, width))
        height, width = (height + 1) // 2, (width + 1) // 2
    return feats


def nearest_x2_then_crop(x, size):
    """Independent reference for an x2 nearest upsampling fitted to size."""
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return up[..., :size[0], :size[1]]


def build_neck(**kwargs):
    cfg = dict(
        type='DDFUpFPN',
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        num_outs=5)
    cfg.update(kwargs)
    return MODELS.build(cfg)


@pytest.mark.parametrize('extra', [
    dict(),
    dict(start_level=1, add_extra_convs='on_input'),
    dict(add_extra_convs='on_output', relu_before_extra_convs=True),
    dict(start_level=0, end_level=2, num_outs=3),
])
def test_nearest_matches_stock_fpn(extra):
    """With a nearest x2 upsampler the neck is exactly mmdet's FPN."""
    neck = build_neck(upsample_cfg=dict(type='nearest'), **extra)
    stock = FPN(
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        **dict(dict(num_outs=5), **extra))
    # Same parameter names: lateral_convs/fpn_convs; nearest has none.
    stock.load_state_dict(neck.state_dict(), strict=True)
    feats = pyramid(64, 96)
    with torch.no_grad():
        ours, theirs = neck(feats), stock(feats)
    assert len(ours) == len(theirs) == neck.num_outs
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_odd_sizes_crop_like_nearest():
    """125x130 input: levels are not exact halves; the x2 map is cropped."""
    neck = build_neck(upsample_cfg=dict(type='nearest')).eval()
    feats = pyramid(125, 130)
    with torch.no_grad():
        outs = neck(feats)
        laterals = [conv(f) for conv, f in zip(neck.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nearest_x2_then_crop(
                laterals[i], laterals[i - 1].shape[-2:])
        expected = [conv(lat) for conv, lat in zip(neck.fpn_convs, laterals)]
        expected.append(F.max_pool2d(expected[-1], 1, stride=2))
    assert [tuple(o.shape[-2:]) for o in outs] == [(125, 130), (63, 65),
                                                   (32, 33), (16, 17), (8, 9)]
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b)


def test_coarse_level_too_small_is_padded():
    """A finer level more than twice the next gets a replicate pad."""
    neck = build_neck(upsample_cfg=dict(type='nearest'), num_outs=4).eval()
    feats = [
        torch.randn(1, 4, 20, 20),
        torch.randn(1, 8, 9, 9),  # 2 * 9 = 18 < 20
        torch.randn(1, 16, 5, 5),
        torch.randn(1, 32, 3, 3)
    ]
    with torch.no_grad():
        outs = neck(feats)
        lat = [conv(f) for conv, f in zip(neck.lateral_convs, feats)]
        merged1 = lat[1] + nearest_x2_then_crop(
            lat[2] + nearest_x2_then_crop(lat[3], (5, 5)), (9, 9))
        up = F.pad(
            nearest_x2_then_crop(merged1, (18, 18)), (0, 2, 0, 2),
            mode='replicate')
        expected0 = neck.fpn_convs[0](lat[0] + up)
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 20), (9, 9), (5, 5),
                                                   (3, 3)]
    torch.testing.assert_close(outs[0], expected0)


@pytest.mark.parametrize('upsample_cfg', [
    dict(type='bilinear'),
    dict(type='deconv'),
    dict(type='deconv', upsample_kernel=3),
    dict(type='pixel_shuffle', upsample_kernel=3),
    dict(type='ddf_up'),
    dict(type='ddf_up', guided=True),
])
def test_upsampler_alternatives_shapes_and_backward(upsample_cfg):
    neck = build_neck(upsample_cfg=upsample_cfg)
    stock = FPN(IN_CHANNELS, OUT_CHANNELS, num_outs=5)
    assert len(neck.upsamplers) == len(IN_CHANNELS) - 1
    for size in [(64, 64), (125, 130)]:
        feats = pyramid(*size)
        outs = neck(feats)
        with torch.no_grad():
            ref = stock(feats)
        assert [o.shape for o in outs] == [r.shape for r in ref]
    sum(o.square().mean() for o in outs).backward()
    for name, param in neck.upsamplers.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_default_is_guided_ddf_up_fed_with_the_finer_lateral():
    neck = build_neck().eval()
    assert neck.upsample_cfg['type'] == 'ddf_up'
    seen = {}

    def record(step):

        def hook(module, args):
            seen[step] = args

        return hook

    for step, upsampler in enumerate(neck.upsamplers):
        assert type(upsampler).__name__ == 'DDFUpsample'
        assert upsampler.guided
        upsampler.register_forward_pre_hook(record(step))
    feats = pyramid(125, 130, batch=1)
    with torch.no_grad():
        neck(feats)
        laterals = [conv(f) for conv, f in zip(neck.lateral_convs, feats)]
    # step i upsamples level i + 1 into level i, guided by lateral i.
    for step in range(3):
        coarse, guidance = seen[step][:2]
        h, w = coarse.shape[-2:]
        assert guidance.shape[-2:] == (2 * h, 2 * w)
        fine = laterals[step]
        torch.testing.assert_close(
            guidance[..., :fine.shape[-2], :fine.shape[-1]],
            fine[..., :2 * h, :2 * w])
    # the coarsest step sees the pure top lateral
    torch.testing.assert_close(seen[2][0], laterals[3])


def test_ddf_up_changes_the_pyramid_and_batch_is_independent():
    """Content-aware upsampling must not mix samples of a batch."""
    neck = build_neck().eval()
    feats = pyramid(48, 40, batch=2)
    with torch.no_grad():
        both = neck(feats)
        first = neck([f[:1] for f in feats])
    for a, b in zip(both, first):
        torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)


def test_init_weights_reaches_the_upsamplers():
    neck = build_neck(upsample_cfg=dict(type='pixel_shuffle'))
    conv = neck.upsamplers[0].upsample_conv
    with torch.no_grad():
        conv.weight.fill_(123.0)
    neck.init_weights()
    assert conv.weight.abs().max() < 123.0


def test_errors_name_the_key():
    neck = build_neck(upsample_cfg=dict(type='nearest'))
    feats = pyramid(32, 32)
    with pytest.raises(ValueError, match='in_channels'):
        neck(feats[:3])
    bad = list(feats)
    bad[2] = torch.randn(2, 17, 8, 8)
    with pytest.raises(ValueError, match=r'in_channels\[2\]'):
        neck(bad)
    with pytest.raises(ValueError, match='in_channels'):
        DDFUpFPN(in_channels=8, out_channels=8, num_outs=1)
    with pytest.raises(ValueError, match='in_channels'):
        DDFUpFPN(in_channels=[8, -1], out_channels=8, num_outs=2)
    with pytest.raises(ValueError, match='upsample_cfg'):
        build_neck(upsample_cfg=dict(type='nearest', scale_factor=4))
    with pytest.raises(ValueError, match='upsample_cfg'):
        build_neck(upsample_cfg='ddf_up')


NECKS = ('DDFUpFPN', 'DDFUpPAFPN', 'DDFUpNASFPN')
# (arguments over the 4-level IN_CHANNELS, the key named, a phrase of the
# allowed range)
BAD_LEVEL_ARGUMENTS = [
    (dict(num_outs=0), 'num_outs', 'an int >= 4'),
    (dict(num_outs=-1), 'num_outs', 'an int >= 4'),
    (dict(end_level=7), 'end_level', 'from start_level (0) to 3'),
    (dict(start_level=5), 'start_level', 'from 0 to 3'),
    (dict(start_level=-1), 'start_level', 'from 0 to 3'),
    (dict(in_channels=[]), 'in_channels', 'non-empty list'),
    (dict(num_outs=3, start_level=1, end_level=2), 'num_outs', 'must be 2'),
]


@pytest.mark.parametrize(
    'neck,arguments,key,allowed',
    [
        (neck, *case) for neck in NECKS for case in BAD_LEVEL_ARGUMENTS
        # NAS-FPN takes num_outs=5 only, checked before the levels
        if not (neck == 'DDFUpNASFPN' and case[1] == 'num_outs')
    ])
def test_bad_level_arguments_are_refused_at_construction(
        neck, arguments, key, allowed):
    cfg = dict(
        type=neck,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        num_outs=5)
    if neck == 'DDFUpNASFPN':
        cfg.update(stack_times=1, upsample_cfg=dict(type='nearest'))
    cfg.update(arguments)
    with pytest.raises(ValueError) as info:
        MODELS.build(cfg)
    message = str(info.value)
    assert message.startswith(f'{neck}: neck.{key} must be'), message
    assert allowed in message, message


def test_level_checks_accept_what_stock_fpn_builds_and_runs():
    """Over a grid of level arguments, every value the check accepts builds a
    stock mmdet FPN that returns num_outs maps (the independent reference), and
    every grid point the stock FPN's own asserts refuse is refused too."""
    feats = pyramid(16, 16, batch=1)
    accepted = 0
    for start in range(-1, 6):
        for end in range(-2, 6):
            for num_outs in range(-1, 8):
                args = dict(
                    in_channels=IN_CHANNELS,
                    out_channels=4,
                    num_outs=num_outs,
                    start_level=start,
                    end_level=end)
                try:
                    stock = FPN(**args)
                except (AssertionError, IndexError):
                    stock = None
                try:
                    ours = DDFUpFPN(**args, upsample_cfg=dict(type='nearest'))
                except ValueError:
                    ours = None
                if ours is None:
                    continue
                accepted += 1
                assert stock is not None, args
                assert len(stock(feats)) == num_outs, args
                assert len(ours(feats)) == num_outs, args
    # end_level -1 or 3: start 0..3, num_outs >= 4 - start; end 0..2:
    # start <= end, num_outs == end - start + 1
    expected = 2 * sum(8 - (4 - s) for s in range(4)) + 6
    assert accepted == expected


def test_nas_fpn_refuses_a_level_past_the_backbone():
    with pytest.raises(ValueError, match=r'DDFUpNASFPN: neck\.start_level'):
        MODELS.build(
            dict(
                type='DDFUpNASFPN',
                in_channels=IN_CHANNELS,
                out_channels=OUT_CHANNELS,
                num_outs=5,
                stack_times=1,
                start_level=5))


@pytest.mark.parametrize('neck', ('DDFUpFPN', 'DDFUpPAFPN'))
def test_empty_feature_map_is_named(neck):
    """A level with no rows: the stock FPN's lateral conv refuses it; the
    message names the neck and the level."""
    feats = pyramid(16, 16)
    feats[1] = torch.randn(2, IN_CHANNELS[1], 0, 8)
    with pytest.raises(RuntimeError):
        FPN(IN_CHANNELS, OUT_CHANNELS, 5)(feats)
    with pytest.raises(ValueError) as info:
        build_neck(type=neck)(feats)
    message = str(info.value)
    assert message.startswith(f'{neck}: feature map 1 has shape '
                              '(2, 8, 0, 8)'), message
