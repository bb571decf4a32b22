# Copyright (c) mmdyn contributors. All rights reserved.
"""per_sample_conv2d: every implementation against an independent direct
convolution (padding + strided slices + einsum, no F.conv2d), forward and
backward, and gradcheck in float64."""
import pytest
import torch
import torch.nn.functional as F

from mmdyn.ops.per_sample_conv import (PER_SAMPLE_CONV_IMPLS, choose_impl,
                                       per_sample_conv2d)

IMPLS = ('loop', 'grouped', 'unfold', 'auto')

# (B, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
CASES = [
    (3, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 6, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (2, 6, 6, 8, 9, (3, 3), (1, 2), (2, 1), (2, 1), 6),  # depthwise
    (1, 4, 5, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (4, 2, 4, 5, 11, (2, 3), (1, 3), (0, 2), (1, 2), 2),
]


def direct_per_sample_conv(x, weight, bias, stride, padding, dilation, groups):
    """Each sample with its own kernel, as an explicit sum over taps."""
    batch, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape[1:]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    xp = xp.view(batch, groups, c_in_g, *xp.shape[2:])
    wg = weight.view(batch, groups, c_out // groups, c_in_g, kh, kw)
    out = x.new_zeros(batch, groups, c_out // groups, h_out, w_out)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            patch = xp[..., y0:y0 + stride[0] * (h_out - 1) + 1:stride[0],
                       x0:x0 + stride[1] * (w_out - 1) + 1:stride[1]]
            out = out + torch.einsum('bgchw,bgoc->bgohw', patch, wg[..., i, j])
    out = out.reshape(batch, c_out, h_out, w_out)
    if bias is not None:
        out = out + (bias if bias.dim() == 2 else bias.expand(
            batch, c_out))[:, :, None, None]
    return out


def make_case(case, dtype=torch.float32, bias_kind='per_sample'):
    b, c_in, c_out, h, w, k, s, p, d, g = case
    x = torch.randn(b, c_in, h, w, dtype=dtype)
    weight = torch.randn(b, c_out, c_in // g, *k, dtype=dtype)
    bias = {
        'per_sample': torch.randn(b, c_out, dtype=dtype),
        'shared': torch.randn(c_out, dtype=dtype),
        None: None
    }[bias_kind]
    return x, weight, bias, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('bias_kind', ['per_sample', 'shared', None])
def test_forward_matches_direct_sum(impl, case, bias_kind):
    x, weight, bias, kw = make_case(case, bias_kind=bias_kind)
    expected = direct_per_sample_conv(x, weight, bias, **kw)
    out = per_sample_conv2d(x, weight, bias, impl=impl, **kw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', CASES[:3])
def test_backward_matches_direct_sum(impl, case):
    x, weight, bias, kw = make_case(case)
    grad_out = None
    grads = []
    for fn in (direct_per_sample_conv,
               lambda *a, **k: per_sample_conv2d(*a, impl=impl, **k)):
        xs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*xs, **kw)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        grads.append([t.grad for t in xs])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', ('loop', 'grouped', 'unfold'))
def test_gradcheck_float64(impl):
    case = (2, 4, 2, 5, 6, (3, 2), (2, 1), (1, 1), (1, 2), 2)
    x, weight, bias, kw = make_case(case, dtype=torch.float64)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, w, b: per_sample_conv2d(a, w, b, impl=impl, **kw),
        (x, weight, bias),
        fast_mode=True)


def test_non_contiguous_and_channels_last_input():
    x, weight, bias, kw = make_case(CASES[0])
    expected = direct_per_sample_conv(x, weight, bias, **kw)
    variants = [
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
    ]
    for xv in variants:
        assert not xv.is_contiguous()
        for impl in IMPLS:
            torch.testing.assert_close(
                per_sample_conv2d(xv, weight, bias, impl=impl, **kw),
                expected,
                rtol=1e-4,
                atol=1e-4)


def test_invalid_impl_names_the_argument():
    x, weight, bias, kw = make_case(CASES[0])
    with pytest.raises(ValueError, match='impl'):
        per_sample_conv2d(x, weight, bias, impl='fast', **kw)
    assert set(IMPLS) == set(PER_SAMPLE_CONV_IMPLS)


def test_auto_uses_batch_independent_graph_when_tracing():
    x, weight, _, kw = make_case(CASES[0], bias_kind=None)
    assert choose_impl(x, weight, 1) != 'unfold'
    seen = []

    def fn(a, w):
        seen.append(choose_impl(a, w, 1))
        return per_sample_conv2d(a, w, None, **kw)

    traced = torch.jit.trace(fn, (x, weight), check_trace=False)
    assert seen == ['unfold']
    # The traced graph must not have the batch size of the example baked in.
    x2, w2, _, _ = make_case((5, ) + CASES[0][1:], bias_kind=None)
    torch.testing.assert_close(
        traced(x2, w2),
        direct_per_sample_conv(x2, w2, None, **kw),
        rtol=1e-4,
        atol=1e-4)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('workspace_samples', [1, 2, 100])
def test_chunked_conv_matches_direct_sum(case, workspace_samples, monkeypatch):
    """Kernels built chunk by chunk into the workspace (chunks of 1, of 2 with
    a shorter last chunk, and the whole batch) against the direct
    convolution."""
    from mmdyn.ops.accel import chunked
    from mmdyn.ops.accel.thresholds import THRESHOLDS
    x, weight, _, kw = make_case(case, bias_kind=None)
    numel = weight[0].numel()
    monkeypatch.setitem(THRESHOLDS['workspace'], 'kernel_bytes',
                        workspace_samples * numel * 4)
    chunked.release_kernel_workspaces()
    chunks = []

    def kernels(start, stop, out):
        chunks.append((start, stop))
        assert out.shape == (stop - start, numel)
        return torch.mul(weight[start:stop].flatten(1), 1.0, out=out)

    out = chunked.chunked_per_sample_conv2d(x, kernels, weight.shape[1:],
                                            torch.float32, **kw)
    torch.testing.assert_close(
        out,
        direct_per_sample_conv(x, weight, None, **kw),
        rtol=1e-4,
        atol=1e-4)
    size = min(workspace_samples, x.shape[0])
    assert chunks == [(s, min(s + size, x.shape[0]))
                      for s in range(0, x.shape[0], size)]


def test_kernel_workspace_is_reused_per_thread_and_released():
    import threading

    from mmdyn.ops.accel.chunked import (kernel_workspace,
                                         release_kernel_workspaces)
    release_kernel_workspaces()
    first = kernel_workspace(100, torch.float32, torch.device('cpu'))
    # Smaller requests share the block; a larger one grows it.
    assert kernel_workspace(50, torch.float32,
                            torch.device('cpu')).data_ptr() == \
        first.data_ptr()
    grown = kernel_workspace(1000, torch.float32, torch.device('cpu'))
    assert grown.numel() == 1000
    assert kernel_workspace(10, torch.float64,
                            torch.device('cpu')).dtype == torch.float64
    other = []
    thread = threading.Thread(target=lambda: other.append(
        kernel_workspace(1000, torch.float32, torch.device('cpu'))))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != grown.data_ptr()
    import weakref
    alive = weakref.ref(grown.untyped_storage())
    del first, grown
    release_kernel_workspaces()
    assert alive() is None  # the block is freed
