# Copyright (c) mmdyn contributors. All rights reserved.
"""Tests of the DDF operator, DDFConv2d and DDFUpsample.

Every expected value is computed here, independently of mmdyn: an explicit
unfold-and-sum for the operator, per-sample / per-position recomputations of
the filter branches from the modules' own submodules, plain convs, and the
closed-form parameter count of the DDF paper's branches.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mmdyn.ops import DDFConv2d, DDFUpsample, ddf
from mmdyn.ops.accel import ddf_cpu


def unfold_sum(x, cf, sf, k, d=1, s=1, combine='mul', head=1):
    """Out[b,c,y,x] = sum_t in[b, c, y*s + (i-r)*d, x*s + (j-r)*d] * F_t, by
    zero-padding generously, unfolding and summing."""
    B, C, H, W = x.shape
    Ho, Wo = sf.shape[-2:]
    r = (k - 1) // 2 * d
    big = r + k * d + s  # more padding than any tap can reach
    xp = F.pad(x, (r, big, r, big))
    cols = F.unfold(xp, k, dilation=d, stride=s)
    n_rows = (xp.shape[2] - d * (k - 1) - 1) // s + 1
    cols = cols.view(B, C, k * k, n_rows, -1)[..., :Ho, :Wo]
    sf_c = sf.view(B, head, 1, k * k, Ho,
                   Wo).expand(B, head, C // head, k * k, Ho,
                              Wo).reshape(B, C, k * k, Ho, Wo)
    cf_c = cf.reshape(B, C, k * k, 1, 1)
    filt = cf_c * sf_c if combine == 'mul' else cf_c + sf_c
    return (cols * filt).sum(2)


def random_inputs(B, C, H, W, k, s, dtype=torch.float64, head=1, ceil=False):
    Ho, Wo = ((H - 1) // s + 1, (W - 1) // s + 1) if ceil else (H // s, W // s)
    x = torch.randn(B, C, H, W, dtype=dtype)
    cf = torch.randn(B, C, k, k, dtype=dtype)
    sf = torch.randn(B, head * k * k, Ho, Wo, dtype=dtype)
    return x, cf, sf


@pytest.mark.parametrize('impl', ['fused', 'taps'])
@pytest.mark.parametrize('k', [3, 5])
@pytest.mark.parametrize('d', [1, 2])
@pytest.mark.parametrize('s', [1, 2])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_ddf_matches_unfold_sum_forward_backward(impl, k, d, s, combine):
    x, cf, sf = random_inputs(2, 3, 7, 9, k, s)
    inputs = [t.clone().requires_grad_() for t in (x, cf, sf)]
    refs = [t.clone().requires_grad_() for t in (x, cf, sf)]
    out = ddf(*inputs, k, d, s, combine, impl=impl)
    expected = unfold_sum(*refs, k, d, s, combine)
    assert out.shape == (2, 3, 7 // s, 9 // s)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, refs):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize('B,s,combine', [(1, 1, 'mul'), (3, 1, 'add'),
                                         (4, 2, 'mul')])
def test_ddf_fused_multithreaded(B, s, combine, monkeypatch):
    # Big enough (> 4096 outputs) for the fused kernel to split the work
    # over two threads; B=1 also splits the spatial-filter gradient of one
    # sample in blocks.
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    x, cf, sf = random_inputs(B, 8, 24, 23, 3, s)
    inputs = [t.clone().requires_grad_() for t in (x, cf, sf)]
    refs = [t.clone().requires_grad_() for t in (x, cf, sf)]
    out = ddf(*inputs, 3, 1, s, combine, impl='fused')
    expected = unfold_sum(*refs, 3, 1, s, combine)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, refs):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize('impl', ['fused', 'taps'])
def test_ddf_non_contiguous_float32_and_ceil_size(impl):
    # x transposed, channel filter permuted, spatial filter sliced; output
    # at the conv size ceil(H / s) with an odd input.
    x = torch.randn(2, 6, 11, 7).transpose(2, 3)  # [2, 6, 7, 11]
    cf = torch.randn(2, 3, 3, 6).permute(0, 3, 1, 2)
    sf = torch.randn(2, 18, 4, 6)[:, ::2]
    assert not (x.is_contiguous() or cf.is_contiguous() or sf.is_contiguous())
    x, cf, sf = (t.requires_grad_() for t in (x, cf, sf))
    out = ddf(x, cf, sf, 3, 1, 2, 'mul', impl=impl)
    refs = [t.detach().clone().requires_grad_() for t in (x, cf, sf)]
    expected = unfold_sum(*refs, 3, 1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip((x, cf, sf), refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['fused', 'taps'])
def test_ddf_heads(impl):
    x, cf, sf = random_inputs(2, 6, 5, 6, 3, 1, head=3)
    torch.testing.assert_close(
        ddf(x, cf, sf, 3, head=3, impl=impl), unfold_sum(x, cf, sf, 3, head=3))


@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_ddf_gradcheck(combine):
    x, cf, sf = random_inputs(2, 3, 5, 6, 3, 2, ceil=True)
    inputs = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(
        lambda a, b, c: ddf(a, b, c, 3, 2, 2, combine, impl='fused'), inputs)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ddf(a, b, c, 3, 1, 1, combine, impl='taps'),
        tuple(t.detach()[..., :5, :6].requires_grad_()
              for t in random_inputs(1, 2, 5, 6, 3, 1)))


@pytest.mark.parametrize('s', [1, 2])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_ddf_with_constant_filters_is_a_depthwise_conv(s, combine):
    B, C, H, W = 3, 4, 9, 8
    x = torch.randn(B, C, H, W)
    weight = torch.randn(C, 1, 3, 3)
    cf = weight[:, 0].expand(B, C, 3, 3)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1  # the conv's output size
    # mul: sf = 1; add: sf = 0.
    sf = torch.full((B, 9, Ho, Wo), 1.0 if combine == 'mul' else 0.0)
    expected = F.conv2d(x, weight, stride=s, padding=2, dilation=2, groups=C)
    out = ddf(x, cf, sf, 3, dilation=2, stride=s, combine=combine)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_ddf_fused_kernel_is_built():
    # The fast CPU path must be there on a machine with a C compiler.
    assert ddf_cpu.load() is not None


def test_ddf_bfloat16_inputs():
    x, cf, sf = random_inputs(2, 4, 6, 6, 3, 1, dtype=torch.bfloat16)
    out = ddf(x, cf, sf, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(),
        unfold_sum(x.float(), cf.float(), sf.float(), 3),
        rtol=2e-2,
        atol=5e-2)


def test_ddf_argument_errors():
    x, cf, sf = random_inputs(1, 2, 6, 6, 3, 1)
    with pytest.raises(ValueError, match='kernel_size'):
        ddf(x, torch.randn(1, 2, 4, 4), torch.randn(1, 16, 6, 6), 4)
    with pytest.raises(ValueError, match='spatial_filter'):
        ddf(x, cf, sf[..., :5], 3)
    with pytest.raises(ValueError, match='channel_filter'):
        ddf(x, cf[:, :1], sf, 3)
    with pytest.raises(ValueError, match='combine'):
        ddf(x, cf, sf, 3, combine='max')
    with pytest.raises(ValueError, match='impl'):
        ddf(x, cf, sf, 3, impl='cuda')


def test_ddf_onnx_export_dynamic_batch(tmp_path):
    import onnxruntime as ort  # the 'tests' extra

    class Wrap(torch.nn.Module):

        def forward(self, x, cf, sf):
            return ddf(x, cf, sf, 3, 1, 2, 'mul')

    x, cf, sf = random_inputs(2, 4, 8, 9, 3, 2, dtype=torch.float32)
    path = str(tmp_path / 'ddf.onnx')
    names = ['x', 'cf', 'sf']
    torch.onnx.export(
        Wrap(), (x, cf, sf),
        path,
        input_names=names,
        dynamic_axes={n: {
            0: 'batch'
        }
                      for n in names},
        dynamo=False)
    x, cf, sf = random_inputs(3, 4, 8, 9, 3, 2, dtype=torch.float32)
    session = ort.InferenceSession(path)
    (got, ) = session.run(None,
                          dict(x=x.numpy(), cf=cf.numpy(), sf=sf.numpy()))
    torch.testing.assert_close(
        torch.from_numpy(got),
        unfold_sum(x, cf, sf, 3, 1, 2),
        rtol=1e-5,
        atol=1e-5)


def test_ddfconv_onnx_export_dynamic_batch(tmp_path):
    import onnxruntime as ort  # the 'tests' extra
    layer = DDFConv2d(16, 16, 3, stride=2, padding=1).eval()
    path = str(tmp_path / 'ddfconv.onnx')
    torch.onnx.export(
        layer, (torch.randn(2, 16, 10, 12), ),
        path,
        input_names=['x'],
        dynamic_axes={'x': {
            0: 'batch'
        }},
        dynamo=False)
    x = torch.randn(3, 16, 10, 12)
    (got, ) = ort.InferenceSession(path).run(None, dict(x=x.numpy()))
    with torch.no_grad():
        expected = ddfconv_per_sample(layer, x)
    torch.testing.assert_close(
        torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# DDFConv2d
# --------------------------------------------------------------------------
def spec_params(C):
    h = math.floor(0.2 * C)
    return (9 * C + 9) + (C * h + h) + (h * 9 * C + 9 * C) + 9 * C


@pytest.mark.parametrize('C', [16, 64, 256])
def test_ddfconv_parameter_count(C):
    with torch.device('meta'):
        layer = DDFConv2d(C, C, 3)
        with_bias = DDFConv2d(C, C, 3, bias=True)
    assert sum(p.numel() for p in layer.parameters()) == spec_params(C)
    assert sum(p.numel() for p in with_bias.parameters()) == spec_params(C) + C


def filter_norm(v, dim, eps=1e-10):
    v = v - v.mean(dim, keepdim=True)
    return v / (v.std(dim, keepdim=True) + eps)


def ddfconv_per_sample(layer, x):
    """DDFConv2d recomputed sample by sample from its submodules."""
    k = layer.kernel_size[0]
    s = layer.stride[0]
    d = layer.dilation[0]
    C = layer.in_channels
    conv_s = layer.spatial_branch[0]
    fc1, fc2 = layer.channel_branch[1], layer.channel_branch[3]
    std = layer.channel_branch[4].std
    outs = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        pooled = xb.mean((2, 3)).flatten()
        hidden = torch.relu(fc1.weight.flatten(1) @ pooled + fc1.bias)
        raw_cf = (fc2.weight.flatten(1) @ hidden + fc2.bias).view(C, k * k)
        cf = filter_norm(raw_cf, 1) * std.view(C, k * k)
        raw_sf = torch.einsum('oc,chw->ohw', conv_s.weight.flatten(1),
                              xb[0, :, ::s, ::s]) + conv_s.bias.view(-1, 1, 1)
        sf = filter_norm(raw_sf, 0) * math.sqrt(2) / k
        outs.append(unfold_sum(xb, cf[None], sf[None], k, d, s, layer.combine))
    return torch.cat(outs)


@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize('s,d', [(1, 1), (2, 1), (1, 2)])
def test_ddfconv_matches_per_sample_reference(combine, s, d):
    layer = DDFConv2d(
        8, 8, 3, stride=s, padding=d, dilation=d, combine=combine).double()
    x = torch.randn(3, 8, 9, 7, dtype=torch.float64)
    out = layer(x)
    # Odd input, stride 2: the output size is nn.Conv2d's.
    conv = torch.nn.Conv2d(8, 8, 3, s, d, d)
    assert out.shape == conv(x.float()).shape
    torch.testing.assert_close(out, ddfconv_per_sample(layer, x))


def test_ddfconv_contract_and_errors():
    layer = DDFConv2d(8, 8, 3, 2, 1, bias=False)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size,
            layer.stride, layer.padding, layer.dilation,
            layer.transposed) == (8, 8, (3, 3), (2, 2), (1, 1), (1, 1), False)
    with pytest.raises(ValueError, match='out_channels'):
        DDFConv2d(8, 16, 3)
    with pytest.raises(ValueError, match='kernel_size'):
        DDFConv2d(8, 8, 4)
    with pytest.raises(ValueError, match='padding'):
        DDFConv2d(8, 8, 3, padding=0)
    with pytest.raises(ValueError, match='combine'):
        DDFConv2d(8, 8, 3, combine='sub')
    with pytest.raises(ValueError, match='in_channels'):
        layer(torch.randn(1, 4, 8, 8))
    m = layer.madds_per_sample((9, 7))  # output 5 x 4
    assert m == dict(
        conv=8 * 20 * 9,
        att=9 * 8 * 20 + 8 * 1 + 1 * 72,
        agg=8 * 20 * 9,
        scal=0)


def test_ddfconv_batch1_training_step_and_bias():
    torch.manual_seed(0)
    layer = DDFConv2d(16, 16, 3, stride=2, padding=1, bias=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    loss = layer(torch.randn(1, 16, 10, 10)).square().mean()
    loss.backward()
    opt.step()
    for n, p in layer.named_parameters():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), n


def test_ddfconv_bf16_autocast_no_nan():
    layer = DDFConv2d(16, 16, 3)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize('value', [0.0, 3.0, 1e30, -1e35])
def test_filter_norm_constant_and_huge_inputs(value):
    layer = DDFConv2d(8, 8, 3)
    norm_s, norm_c = layer.spatial_branch[1], layer.channel_branch[4]
    constant = torch.full((2, 9, 4, 4), value, requires_grad=True)
    out = norm_s(constant)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(constant.grad).all()
    # Huge but varying filters: same result as the same filters scaled down.
    huge = torch.randn(2, 72, 1, 1) * (value or 1.0)
    got = norm_c(huge)
    assert torch.isfinite(got).all()
    small = huge / abs(value or 1.0)
    want = filter_norm(small.view(2, 8, 9), 2).view(2, 72, 1, 1) * (
        norm_c.std.view(1, 72, 1, 1))
    torch.testing.assert_close(got, want.detach())


# --------------------------------------------------------------------------
# DDFUpsample
# --------------------------------------------------------------------------
def ddf_up_per_position(up, x, guidance=None):
    """DDF-Up computed output pixel by output pixel from its submodules."""
    B, C, H, W = x.shape
    s, k, d = up.scale_factor, up.kernel_size, up.dilation
    r = (k - 1) // 2
    gain = 1.0 / k  # 'linear' nonlinearity
    out = torch.zeros(B, C, s * H, s * W, dtype=x.dtype)
    if guidance is not None:
        Hg, Wg = guidance.shape[-2:]
        guidance = F.pad(
            guidance, (0, s * W - Wg, 0, s * H - Hg), mode='replicate')
    for b in range(B):
        for p in range(s * s):
            py, px = divmod(p, s)
            cb, sb = up.channel_branch[p], up.spatial_branch[p]
            hidden = torch.relu(cb[1].weight.flatten(1) @ x[b].mean((1, 2)) +
                                cb[1].bias)
            cf = (cb[3].weight.flatten(1) @ hidden + cb[3].bias).view(C, k * k)
            cf = filter_norm(cf, 1) * cb[4].std.view(C, k * k)
            for y in range(H):
                for xx in range(W):
                    if guidance is None:
                        feat = x[b, :, y, xx]
                        conv1 = sb[0]
                    else:
                        # depthwise 3x3 gen conv on this phase's pixels
                        dw = sb[0]
                        feat = dw.bias.clone()
                        for a in range(3):
                            for c in range(3):
                                gy, gx = y + a - 1, xx + c - 1
                                if 0 <= gy < H and 0 <= gx < W:
                                    feat = feat + dw.weight[:, 0, a, c] * (
                                        guidance[b, :, gy * s + py,
                                                 gx * s + px])
                        conv1 = sb[1]
                    sf = conv1.weight.flatten(1) @ feat + conv1.bias
                    sf = filter_norm(sf, 0) * gain
                    acc = torch.zeros(C, dtype=x.dtype)
                    for i in range(k):
                        for j in range(k):
                            iy, ix = y + (i - r) * d, xx + (j - r) * d
                            if 0 <= iy < H and 0 <= ix < W:
                                t = i * k + j
                                filt = (
                                    cf[:, t] * sf[t] if up.combine == 'mul'
                                    else cf[:, t] + sf[t])
                                acc = acc + x[b, :, iy, ix] * filt
                    out[b, :, y * s + py, xx * s + px] = acc
    return out


@pytest.mark.parametrize('impl', ['auto', 'taps'])
@pytest.mark.parametrize('combine,s', [('mul', 2), ('add', 3)])
def test_ddf_up_matches_per_position_reference(combine, s, impl):
    up = DDFUpsample(6, s, combine=combine, impl=impl).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = up(x)
        assert out.shape == (2, 6, 3 * s, 4 * s)
        torch.testing.assert_close(out, ddf_up_per_position(up, x))


def test_ddf_up_guided_high_res_guidance():
    up = DDFUpsample(4, 2, guided=True, guide_channels=5).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    guidance = torch.randn(1, 5, 5, 7, dtype=torch.float64)  # ceil(5/2) = 3
    with torch.no_grad():
        torch.testing.assert_close(
            up(x, guidance), ddf_up_per_position(up, x, guidance))
    with pytest.raises(ValueError, match='guidance'):
        up(x)
    with pytest.raises(ValueError, match='guidance'):
        up(x, torch.randn(1, 5, 9, 9, dtype=torch.float64))


def test_ddf_up_odd_sizes_and_build_upsample_layer():
    from mmcv.cnn import build_upsample_layer

    import mmdyn.models  # noqa: F401 (registers 'ddf_up')
    up = build_upsample_layer(dict(type='ddf_up'), 16, 2)
    assert isinstance(up, DDFUpsample)
    assert up.channels == 16 and up.scale_factor == 2
    assert up(torch.randn(2, 16, 5, 7)).shape == (2, 16, 10, 14)
    up3 = build_upsample_layer(
        dict(type='DDFUpsample', kernel_size=5, combine='add'), 16, 3)
    assert up3(torch.randn(1, 16, 3, 1)).shape == (1, 16, 9, 3)
    m = up.madds_per_sample((5, 7))
    assert m['conv'] == m['agg'] == 4 * 16 * 35 * 9
    assert m['att'] == 4 * (9 * 16 * 35 + 16 * 3 + 3 * 144)


def test_ddf_up_gradcheck():
    up = DDFUpsample(5, 2).double()
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    # fast_mode: the slow mode needs one backward per output element.
    assert torch.autograd.gradcheck(up, (x, ), fast_mode=True)


def test_ddf_up_onnx_export_dynamic_batch(tmp_path):
    import onnxruntime as ort  # the 'tests' extra
    up = DDFUpsample(8, 2).eval()
    path = str(tmp_path / 'ddf_up.onnx')
    torch.onnx.export(
        up, (torch.randn(2, 8, 3, 4), ),
        path,
        input_names=['x'],
        dynamic_axes={'x': {
            0: 'batch'
        }},
        dynamo=False)
    x = torch.randn(3, 8, 3, 4)
    (got, ) = ort.InferenceSession(path).run(None, dict(x=x.numpy()))
    with torch.no_grad():
        expected = ddf_up_per_position(up, x)
    torch.testing.assert_close(
        torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def _branch_grads(layer, x, channel_filters):
    """``channel_filters(branch, x)`` and the gradients of its sum of squares
    with respect to ``x`` and the branch's parameters."""
    x = x.clone().requires_grad_()
    out = channel_filters(layer.channel_branch, x)
    params = list(layer.channel_branch.parameters())
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    return out, grads


@pytest.mark.parametrize('channels_last', [False, True])
def test_pooled_channel_filters_equal_the_branch_modules(channels_last):
    """The forward's channel branch (mean, two matrix products) against the
    branch's own modules (pooling, two 1x1 convs), values and gradients."""
    from mmdyn.ops.ddf import pooled_channel_filters
    torch.manual_seed(0)
    layer = DDFConv2d(13, 13, 3, stride=2, padding=1)
    layer.channel_branch[4].std.data.normal_()
    x = torch.randn(3, 13, 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out, grads = _branch_grads(layer, x, pooled_channel_filters)
    want, want_grads = _branch_grads(layer, x, lambda branch, x: branch(x))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # and the layer's forward against its reference
        torch.testing.assert_close(
            layer.eval()(x), layer.forward_reference(x), rtol=1e-4, atol=1e-5)


def test_pooled_channel_filters_keep_hooks_and_replaced_modules():
    """A hook on a branch module still runs (once per forward), and a
    replaced activation is used: the branch's modules run then."""
    from mmdyn.ops.ddf import pooled_channel_filters
    torch.manual_seed(0)
    layer = DDFConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    calls = []
    handle = layer.channel_branch[1].register_forward_hook(
        lambda *args: calls.append(1))
    with torch.no_grad():
        layer(x)
    assert calls == [1]
    handle.remove()
    layer.channel_branch[2] = torch.nn.GELU()
    with torch.no_grad():
        got = pooled_channel_filters(layer.channel_branch, x)
        pooled = x.mean((2, 3), keepdim=True)
        hidden = F.gelu(layer.channel_branch[1](pooled))
        want = layer.channel_branch[4](layer.channel_branch[3](hidden))
    torch.testing.assert_close(got, want)
