# Copyright (c) mmdyn contributors. All rights reserved.
"""The paths made of library ops (oneDNN/MKL convolutions and GEMMs):

ODConv's ``tap_gemm`` (one kernel: one 1x1 GEMM to every tap, then the
weighted shift-sum) and CondConv/DyConv's ``grouped`` (the mixed kernels,
one batch-as-groups conv). Each, forced by ``impl``, against the layer's
``forward_reference`` in inference and training (gradients of the input
and of every parameter), and the shapes the default rules send to them.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from test_dyconv import randomise
from test_dyconv import reference_forward as dyconv_reference
from test_odconv import reference_forward as odconv_reference

from mmdyn.ops import CondConv2d, DyConv2d, ODConv2d, switches
from mmdyn.ops.accel import autotune, tap_sum_cpu
from mmdyn.ops.accel.paths import (MIXTURE_PATHS, ODCONV_PATHS, THRESHOLDS,
                                   choose_path, layer_impls)

# (C_in, C_out, kernel, stride, padding, dilation, input H x W)
GEOMETRIES = [
    (5, 7, 3, 1, 1, 1, (6, 5)),
    (13, 11, 3, 2, 1, 1, (9, 8)),
    (6, 9, 3, 1, 2, 2, (7, 7)),
    (7, 5, 5, 2, 2, 1, (8, 9)),
    (9, 10, 5, 1, 0, 1, (6, 7)),
    (3, 4, 3, 2, 0, 2, (9, 10)),
    (10, 6, (1, 3), 1, (0, 1), 1, (4, 5)),
    (4, 3, 5, 2, 2, 1, (1, 2)),  # taps that read padding only
    (5, 6, 3, 2, 1, 1, (1, 1)),  # a residue class with no pixel
]
MIXTURE_GEOMETRIES = GEOMETRIES + [
    (5, 7, 1, 1, 0, 1, (4, 5)),
    (6, 9, 1, 2, 1, 1, (5, 5)),
]


def _randomised(layer, seed):
    """:func:`test_dyconv.randomise` (random attentions and bias) after
    seeding."""
    torch.manual_seed(seed)
    return randomise(layer)


def _compare(layer, impl, x, train):
    """``layer`` with ``impl`` forced against ``forward_reference`` of an
    identical copy; in training also every gradient."""
    forced = copy.deepcopy(layer).train(train)
    forced.impl = impl
    reference = copy.deepcopy(layer).train(train)
    if not train:
        with torch.no_grad():
            out = forced(x)
            torch.testing.assert_close(
                out, reference.forward_reference(x), rtol=1e-4, atol=1e-5)
        assert forced.last_path == impl
        return
    x_forced = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = forced(x_forced)
    assert forced.last_path == impl
    ref = reference.forward_reference(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x_forced.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    params = dict(reference.named_parameters())
    for name, param in forced.named_parameters():
        want = params[name].grad
        if want is None:  # not in the graph (e.g. BN at batch 1)
            assert param.grad is None or not param.grad.any(), name
            continue
        torch.testing.assert_close(
            param.grad, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('impl', ['tap_gemm', 'scaled_columns'])
def test_odconv_one_kernel_gemm_paths_match_the_reference(
        impl, geometry, bias, batch, train):
    """The tap GEMM, and the scaled columns (its inference form is one GEMM of
    the whole batch), channels-last inputs included."""
    c_in, c_out, k, s, p, d, hw = geometry
    layer = _randomised(
        ODConv2d(c_in, c_out, k, s, p, d, bias=bias, kernel_num=1), batch)
    torch.manual_seed(batch)
    x = torch.randn(batch, c_in, *hw)
    _compare(layer, impl, x, train)
    _compare(layer, impl, x.to(memory_format=torch.channels_last), train)


def test_tap_gemm_follows_kernel_swaps_through_data():
    """The tap-major kernel kept between inference calls follows each swap of
    mmengine's EMAHook (``p.data.copy_``, which leaves the version counter and
    the storage alone); it did not: every output after a swap came from the
    kernel before it."""
    from mmengine.hooks import EMAHook
    torch.manual_seed(0)
    layer = _randomised(ODConv2d(8, 6, 3, padding=1, kernel_num=1), 2)
    layer.impl = 'tap_gemm'
    model = torch.nn.Sequential(layer).eval()
    hook = EMAHook()
    hook.before_run(SimpleNamespace(model=model))
    with torch.no_grad():
        hook.ema_model.module[0].weight.mul_(-2.0)  # the average differs
        x = torch.randn(2, 8, 5, 5)
        for swaps in range(4):
            expected = odconv_reference(layer, x)
            torch.testing.assert_close(
                layer(x), expected, rtol=1e-4, atol=1e-5)
            assert layer.last_path == 'tap_gemm'
            hook._swap_ema_parameters()
    # a kernel written in place through .data by hand, the same
    with torch.no_grad():
        layer.weight.data.copy_(torch.randn_like(layer.weight))
        torch.testing.assert_close(
            layer(x), odconv_reference(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('geometry', MIXTURE_GEOMETRIES)
def test_mixture_grouped_matches_the_reference(geometry, cls, batch, train):
    c_in, c_out, k, s, p, d, hw = geometry
    layer = _randomised(cls(c_in, c_out, k, s, p, d, kernel_num=3), batch)
    torch.manual_seed(batch)
    _compare(layer, 'batch_grouped', torch.randn(batch, c_in, *hw), train)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_mixture_grouped_with_groups(train):
    layer = _randomised(
        DyConv2d(12, 18, 3, 2, 1, 1, groups=3, kernel_num=4), 0)
    _compare(layer, 'batch_grouped', torch.randn(3, 12, 7, 6), train)


STRIDE1_GEOMETRIES = [g for g in GEOMETRIES if g[3] == 1]


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('geometry', STRIDE1_GEOMETRIES)
def test_mixture_taps_matches_the_reference(geometry, cls, batch):
    """The tap-major mixtures, one batched GEMM and the C tap sum (with the
    mixed bias), NCHW and channels-last inputs, in float32 and float64."""
    c_in, c_out, k, s, p, d, hw = geometry
    layer = _randomised(cls(c_in, c_out, k, s, p, d, kernel_num=3), batch)
    torch.manual_seed(batch)
    x = torch.randn(batch, c_in, *hw)
    _compare(layer, 'taps', x, False)
    _compare(layer, 'taps', x.to(memory_format=torch.channels_last), False)
    _compare(layer.double(), 'taps', x.double(), False)


def test_mixture_taps_follows_bank_swaps_through_data():
    """The tap-major bank is kept between inference calls; a swap through
    ``.data`` (mmengine's EMA swap) or an in-place update changes every later
    output, each against a per-sample ``F.conv2d`` of the mixed kernel."""
    layer = _randomised(DyConv2d(6, 5, 3, padding=1, kernel_num=4), 0).eval()
    layer.impl = 'taps'
    x = torch.randn(3, 6, 5, 4)

    with torch.no_grad():
        for change in (None, lambda w: w.data.copy_(torch.randn_like(w)),
                       lambda w: w.mul_(-0.5), lambda w: w.data[1].add_(1.0)):
            if change is not None:
                change(layer.weight)
            torch.testing.assert_close(
                layer(x), dyconv_reference(layer, x), rtol=1e-4, atol=1e-5)
            assert layer.last_path == 'taps'


def test_mixture_taps_refuses_what_it_does_not_run():
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for layer in (DyConv2d(8, 8, 3, 2, 1,
                               impl='taps'), DyConv2d(8, 8, 1, impl='taps'),
                      DyConv2d(8, 8, 3, padding=1, groups=2, impl='taps')):
            with pytest.raises(ValueError, match="impl='taps' cannot run"):
                layer(x)
    with pytest.raises(ValueError, match="impl='taps' cannot run"):
        DyConv2d(8, 8, 3, padding=1, impl='taps')(x)  # autograd
    layer = DyConv2d(256, 256, 3, padding=1, kernel_num=4).eval()
    x = torch.randn(2, 256, 6, 6)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x)  # CPU autocast: not the float32/float64 tap sum
        assert layer.last_path != 'taps'
        layer.impl = 'taps'
        with pytest.raises(ValueError, match="impl='taps' cannot run"):
            layer(x)


def test_the_paths_are_impl_choices():
    assert 'tap_gemm' in ODCONV_PATHS
    assert 'tap_gemm' in layer_impls(ODCONV_PATHS)
    assert 'batch_grouped' in MIXTURE_PATHS
    assert 'batch_grouped' in layer_impls(MIXTURE_PATHS)
    assert ODConv2d(8, 8, 3, kernel_num=1, impl='tap_gemm').impl == 'tap_gemm'
    assert CondConv2d(8, 8, 3, impl='batch_grouped').impl == 'batch_grouped'


def test_tap_gemm_needs_one_kernel_larger_than_1x1():
    x = torch.randn(2, 8, 5, 5)
    for layer in (ODConv2d(8, 8, 3, kernel_num=4, impl='tap_gemm'),
                  ODConv2d(8, 8, 1, kernel_num=1, impl='tap_gemm'),
                  ODConv2d(8, 8, 3, groups=2, kernel_num=1, impl='tap_gemm')):
        with pytest.raises(ValueError, match="impl='tap_gemm' cannot run"):
            layer(x)


def _auto_path(family, layer, x, train):
    """The path the threshold rule chooses (no measured choice)."""
    layer.train(train)
    with torch.set_grad_enabled(train), autotune.autotuning(False):
        context = layer.attentions(x) if family == 'odconv' else \
            (layer.routing_weights(x), )
        return choose_path(family, layer, x, context).name


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_rules_for_resnet_odconv_1x(train, monkeypatch):
    """ResNet-50 at 224 px.

    Inference with the C tap sum: the stride-1
    layers of stages 3-4 (256 ch 14x14, 512 ch 7x7) take the tap GEMM from
    batch 2, the stride-2 ones the scaled columns. Training, or inference with
    the sum in PyTorch ops: stage 3 (batch 2) the tap GEMM in training and
    the scaled columns in inference (one GEMM of the batch), not its
    stride-2 layer, not a batch of one; stage 4 the scaled columns. Stage 2
    (128 ch, 28x28) neither.
    """
    stage3 = ODConv2d(256, 256, 3, padding=1, bias=False, kernel_num=1)
    stage4 = ODConv2d(512, 512, 3, padding=1, bias=False, kernel_num=1)
    strided = ODConv2d(256, 256, 3, 2, 1, bias=False, kernel_num=1)
    stage2 = ODConv2d(128, 128, 3, padding=1, bias=False, kernel_num=1)
    x3, x4 = torch.randn(2, 256, 14, 14), torch.randn(2, 512, 7, 7)
    x_strided, x2 = torch.randn(2, 256, 28, 28), torch.randn(2, 128, 28, 28)
    c_sum = not train and tap_sum_cpu.load() is not None
    for switch in ('1', '0'):
        monkeypatch.setenv(switches.TAP_SUM_CPU_KERNEL, switch)
        if c_sum and switch == '1':
            assert _auto_path('odconv', stage3, x3, train) == 'tap_gemm'
            assert _auto_path('odconv', stage3, x3[:1],
                              train) == 'scaled_columns'
            assert _auto_path('odconv', stage4, x4, train) == 'tap_gemm'
        else:
            assert _auto_path(
                'odconv', stage3, x3,
                train) == ('tap_gemm' if train else 'scaled_columns')
            assert _auto_path('odconv', stage3, x3[:1], train) != 'tap_gemm'
            assert _auto_path('odconv', stage4, x4, train) == 'scaled_columns'
        assert _auto_path('odconv', strided, x_strided, train) != 'tap_gemm'
        assert _auto_path('odconv', stage2, x2,
                          train) not in ('tap_gemm', 'scaled_columns')


def test_tap_gemm_rule_follows_the_threshold_table(monkeypatch):
    layer = ODConv2d(24, 24, 3, padding=1, kernel_num=1)
    x = torch.randn(2, 24, 9, 9)
    assert _auto_path('odconv', layer, x, False) != 'tap_gemm'
    monkeypatch.setitem(THRESHOLDS['odconv'], 'tap_gemm_min_in_channels', 24)
    assert _auto_path('odconv', layer, x, False) == 'tap_gemm'


def test_rules_send_resnet_dyconv_layers_to_their_paths(monkeypatch):
    """CPU inference: the stride-1 3x3 layers of ResNet-50 stages 3-4 (256 ch
    14x14, 512 ch 7x7) take the tap GEMM at batch 2, stage 4 also at batch 1
    (stage 3 the reference there, a plain conv); stage 2 (128 ch 28x28) and a
    strided stage-3 layer the batch-as-groups conv. Without the C tap sum
    stage 3 takes the grouped conv, stage 4 the chunked kernels; training
    never a path of inference."""
    stage2 = DyConv2d(128, 128, 3, padding=1, bias=False, kernel_num=4)
    stage3 = DyConv2d(256, 256, 3, padding=1, bias=False, kernel_num=4)
    stage4 = DyConv2d(512, 512, 3, padding=1, bias=False, kernel_num=4)
    strided = DyConv2d(256, 256, 3, 2, 1, bias=False, kernel_num=4)
    x2, x3 = torch.randn(2, 128, 28, 28), torch.randn(2, 256, 14, 14)
    x4 = torch.randn(2, 512, 7, 7)
    for layer, x in ((stage3, x3), (stage4, x4)):
        assert _auto_path('mixture', layer, x, False) == 'taps'
        assert _auto_path('mixture', layer, x,
                          True) not in ('taps', 'batch_grouped')
    assert _auto_path('mixture', stage2, x2, False) == 'batch_grouped'
    assert _auto_path('mixture', stage2, x2[:1], False) == 'reference'
    assert _auto_path('mixture', stage4, x4[:1], False) == 'taps'
    assert _auto_path('mixture', stage3, x3[:1], False) == 'reference'
    monkeypatch.setitem(THRESHOLDS['mixture'],
                        'taps_min_in_channels_one_sample', 256)
    assert _auto_path('mixture', stage3, x3[:1], False) == 'taps'
    assert _auto_path('mixture', strided, torch.randn(2, 256, 28, 28),
                      False) == 'batch_grouped'
    monkeypatch.setitem(THRESHOLDS['mixture'], 'taps_min_in_channels', 128)
    assert _auto_path('mixture', stage2, x2, False) == 'taps'
    monkeypatch.setitem(THRESHOLDS['mixture'], 'taps_min_in_channels', 256)
    monkeypatch.setenv(switches.TAP_SUM_CPU_KERNEL, '0')
    assert _auto_path('mixture', stage3, x3, False) == 'batch_grouped'
    assert _auto_path('mixture', stage3, x3[:1], False) == 'reference'
    assert _auto_path('mixture', stage4, x4, False) == 'chunked'


def test_tap_gemm_sees_a_changed_kernel():
    """The rearranged kernel kept between inference calls follows in-place
    changes of the layer's weight (an optimizer step, a loaded state)."""
    layer = _randomised(ODConv2d(6, 5, 3, padding=1, kernel_num=1), 0).eval()
    layer.impl = 'tap_gemm'
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(
            layer(x), layer.forward_reference(x), rtol=1e-4, atol=1e-5)
        state = copy.deepcopy(layer.state_dict())
        state['weight'].normal_()
        layer.load_state_dict(state)
        torch.testing.assert_close(
            layer(x), layer.forward_reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('impl', ['tap_gemm', 'scaled_columns'])
def test_odconv_one_kernel_gemm_paths_under_autocast(impl, stride, train):
    """bfloat16 CPU autocast: the reference's output dtype, its values and
    gradients within bfloat16 rounding (the backward of ``tap_gemm`` runs in
    float32)."""
    layer = _randomised(
        ODConv2d(12, 10, 3, stride, 1, kernel_num=1, impl=impl), 0)
    layer.train(train)
    x = torch.randn(3, 12, 8, 8, requires_grad=train)
    with torch.autocast('cpu', dtype=torch.bfloat16), \
            torch.set_grad_enabled(train):
        out = layer(x)
        ref = layer.forward_reference(x)
    assert layer.last_path == impl and out.dtype == ref.dtype
    scale = ref.float().abs().max()
    assert (out.float() - ref.float()).abs().max() <= 3e-2 * scale
    if train:
        grad, = torch.autograd.grad(out.float().sum(), x)
        want, = torch.autograd.grad(ref.float().sum(), x)
        assert (grad - want).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.parametrize('impl', ['tap_gemm', 'scaled_columns'])
def test_odconv_one_kernel_gemm_paths_on_a_view(impl):
    """An input that is a batch slice of a larger tensor (a storage offset) and
    no padding (nothing copies it)."""
    layer = _randomised(ODConv2d(6, 5, 3, kernel_num=1), 0).eval()
    big = torch.randn(5, 6, 7, 7)
    _compare(layer, impl, big[2:4], train=False)


# (C_in, C_out, input H x W) of 1x1 layers
POINTWISE_GEOMETRIES = [(5, 7, (6, 5)), (13, 3, (1, 1)), (9, 16, (7, 4))]


def _compare_pointwise_layouts(layer, batch, hw, train):
    """``pointwise_gemm`` against the reference on three inputs: contiguous, in
    channels-last memory format and strided."""
    torch.manual_seed(batch)
    c_in = layer.in_channels
    x = torch.randn(batch, c_in, *hw)
    wide = torch.randn(batch, c_in, hw[0], 2 * hw[1])
    for inputs in (x, x.to(memory_format=torch.channels_last), wide[..., ::2]):
        _compare(layer, 'pointwise_gemm', inputs, train)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('geometry', POINTWISE_GEOMETRIES)
def test_odconv_pointwise_gemm_matches_the_reference(geometry, bias, batch,
                                                     train):
    """ODConv 1x1 with one kernel as one batched matmul of the per-sample
    matrices, channels-last and non-contiguous inputs included."""
    c_in, c_out, hw = geometry
    layer = _randomised(
        ODConv2d(c_in, c_out, 1, bias=bias, kernel_num=1), batch)
    _compare_pointwise_layouts(layer, batch, hw, train)


def test_pointwise_gemm_needs_a_plain_1x1_with_one_kernel():
    x = torch.randn(2, 8, 5, 5)
    for layer in (
            ODConv2d(8, 8, 1, kernel_num=4, impl='pointwise_gemm'),
            ODConv2d(8, 8, 3, kernel_num=1, impl='pointwise_gemm'),
            ODConv2d(8, 8, 1, 2, kernel_num=1, impl='pointwise_gemm'),
            ODConv2d(8, 8, 1, padding=1, kernel_num=1, impl='pointwise_gemm'),
            ODConv2d(8, 8, 1, groups=2, kernel_num=1, impl='pointwise_gemm')):
        with pytest.raises(
                ValueError, match="impl='pointwise_gemm' cannot run"):
            layer(x)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_rules_for_resnet_odconv_1x_pointwise(train):
    """ResNet-50 at 224 px: the 1x1 layers of stages 1-2 with at least 128
    input channels take the batched matmul; stage 1's 64 -> 256 and the
    14x14 and 7x7 layers do not."""
    for c_in, c_out, hw, want in [(256, 64, 56, True), (512, 128, 28, True),
                                  (128, 512, 28, True), (64, 256, 56, False),
                                  (1024, 256, 14, False),
                                  (512, 2048, 7, False)]:
        layer = ODConv2d(c_in, c_out, 1, bias=False, kernel_num=1)
        path = _auto_path('odconv', layer, torch.randn(2, c_in, hw, hw), train)
        assert (path == 'pointwise_gemm') == want, (c_in, c_out, hw, path)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('cls', [CondConv2d, DyConv2d])
@pytest.mark.parametrize('geometry', POINTWISE_GEOMETRIES)
def test_mixture_pointwise_gemm_matches_the_reference(geometry, cls, batch,
                                                      train):
    """CondConv/DyConv 1x1 as the mixed matrices and one batched matmul (forced
    in training too), channels-last and strided inputs included."""
    c_in, c_out, hw = geometry
    layer = _randomised(cls(c_in, c_out, 1, kernel_num=3), batch)
    _compare_pointwise_layouts(layer, batch, hw, train)


def test_mixture_pointwise_rule():
    """Inference of 1x1 layers with 14x14 outputs or more (ResNet-50 stages
    1-3), not 7x7 (stage 4), not training, not 3x3 or strided layers."""
    for hw, want in [(56, True), (14, True), (7, False)]:
        layer = DyConv2d(64, 32, 1, kernel_num=4)
        path = _auto_path('mixture', layer, torch.randn(2, 64, hw, hw), False)
        assert (path == 'pointwise_gemm') == want, (hw, path)
    layer = DyConv2d(64, 32, 1, kernel_num=4)
    assert _auto_path('mixture', layer, torch.randn(2, 64, 28, 28),
                      True) != 'pointwise_gemm'
    for layer in (DyConv2d(64, 32, 3, padding=1,
                           kernel_num=4), DyConv2d(64, 32, 1, 2,
                                                   kernel_num=4)):
        assert _auto_path('mixture', layer, torch.randn(2, 64, 28, 28),
                          False) != 'pointwise_gemm'
        layer.impl = 'pointwise_gemm'
        with pytest.raises(
                ValueError, match="impl='pointwise_gemm' cannot run"):
            layer.eval()(torch.randn(2, 64, 28, 28))
