# Copyright (c) mmdyn contributors. All rights reserved.
"""Tests of the Triton DDF kernels (:mod:`mmdyn.ops.accel.ddf_triton`).

Without a GPU the kernels run in Triton's interpreter on CPU tensors: the
``device`` fixture sets ``TRITON_INTERPRET=1`` for these tests only (the
module reads it at each launch and builds interpreted kernels then, so it
does not matter whether triton was imported earlier). With CUDA the same
tests run the compiled kernels on the GPU.

Expected values: an explicit loop over outputs and taps for one small case,
and the unfold-and-sum :func:`~mmdyn.ops.ddf.ddf_reference` in float64
(forward and autograd gradients) for the rest.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmdyn.ops.accel import ddf_triton
from mmdyn.ops.ddf import ddf_reference

pytestmark = pytest.mark.skipif(
    ddf_triton._import_triton() is None,
    reason='triton is not installed (it ships with torch on Linux)')


@pytest.fixture(scope='module')
def device():
    if torch.cuda.is_available():
        yield 'cuda'
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TRITON_INTERPRET', '1')
        yield 'cpu'


def filters(B, C, H, W, k, s, head, ceil=True, device='cpu'):
    """Float64 (x, cf [B, C, k, k], sf) for a DDF of stride s."""
    Ho, Wo = ((H - 1) // s + 1, (W - 1) // s + 1) if ceil else (H // s, W // s)
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + k)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    cf = torch.randn(B, C, k, k, dtype=torch.float64, generator=g)
    sf = torch.randn(B, head * k * k, Ho, Wo, dtype=torch.float64, generator=g)
    return [t.to(device) for t in (x, cf, sf)]


def non_contiguous(t):
    """The same values as ``t`` in a tensor with permuted, gapped strides."""
    big = torch.zeros(
        *t.shape[:-2],
        t.shape[-1],
        2 * t.shape[-2],
        dtype=t.dtype,
        device=t.device)
    view = big[..., ::2].transpose(-1, -2)
    view.copy_(t)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def reference_and_grads(x, cf, sf, k, d, s, combine, head, grad):
    leaves = [t.detach().double().requires_grad_() for t in (x, cf, sf)]
    out = ddf_reference(*leaves, k, d, s, combine, head)
    grads = torch.autograd.grad(out, leaves, grad.double())
    return out, grads


def run_triton(x, cf, sf, k, d, s, combine, head, grad):
    leaves = [t.detach().requires_grad_() for t in (x, cf, sf)]
    B, C = x.shape[:2]
    out = ddf_triton.ddf(leaves[0], leaves[1].reshape(B, C, k * k), leaves[2],
                         k, d, s, combine == 'add', head)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out, grads


def test_matches_an_explicit_loop(device):
    k, d, s, head = 3, 2, 2, 2
    x, cf, sf = filters(1, 4, 5, 6, k, s, head, device=device)
    r = (k - 1) // 2 * d
    for combine in ('mul', 'add'):
        expected = torch.zeros(1, 4, *sf.shape[-2:], dtype=torch.float64)
        for c in range(4):
            h = c // 2
            for y in range(sf.shape[2]):
                for xo in range(sf.shape[3]):
                    for i in range(k):
                        for j in range(k):
                            iy, ix = y * s + i * d - r, xo * s + j * d - r
                            if not (0 <= iy < 5 and 0 <= ix < 6):
                                continue
                            cv = cf[0, c, i, j].item()
                            sv = sf[0, h * k * k + i * k + j, y, xo].item()
                            f = cv * sv if combine == 'mul' else cv + sv
                            expected[0, c, y, xo] += x[0, c, iy, ix].item() * f
        out = ddf_triton.ddf(x.float(),
                             cf.float().reshape(1, 4, k * k), sf.float(), k, d,
                             s, combine == 'add', head)
        torch.testing.assert_close(
            out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,d,s,combine,head,hw', [
    (3, 1, 1, 'mul', 1, (7, 9)),
    (3, 1, 1, 'add', 1, (7, 9)),
    (3, 1, 2, 'mul', 1, (9, 8)),
    (3, 2, 2, 'add', 2, (8, 11)),
    (5, 2, 1, 'mul', 2, (7, 6)),
    (5, 1, 2, 'add', 1, (10, 9)),
    (7, 1, 1, 'mul', 4, (6, 7)),
    (7, 2, 2, 'add', 1, (9, 9)),
])
def test_output_and_three_gradients_match_reference(device, k, d, s, combine,
                                                    head, hw):
    x, cf, sf = filters(2, 4, *hw, k, s, head, device=device)
    grad = torch.randn(
        2, 4, *sf.shape[-2:], dtype=torch.float64, device=device)
    expected, expected_grads = reference_and_grads(x, cf, sf, k, d, s, combine,
                                                   head, grad)
    inputs = [non_contiguous(t.float()) for t in (x, cf, sf)]
    out, grads = run_triton(*inputs, k, d, s, combine, head,
                            non_contiguous(grad.float()))
    assert out.dtype == torch.float32 and out.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)
    for name, g, e in zip(('x', 'channel_filter', 'spatial_filter'), grads,
                          expected_grads):
        assert g.shape == e.shape and g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), e, **tol, msg=name)


def test_official_output_size_and_contiguous_inputs(device):
    # sf of size H // s (the official operator's), contiguous inputs.
    x, cf, sf = filters(1, 2, 9, 7, 3, 2, 1, ceil=False, device=device)
    assert sf.shape[-2:] == (4, 3)
    grad = torch.randn(1, 2, 4, 3, dtype=torch.float64, device=device)
    expected, expected_grads = reference_and_grads(x, cf, sf, 3, 1, 2, 'mul',
                                                   1, grad)
    out, grads = run_triton(x.float(), cf.float(), sf.float(), 3, 1, 2, 'mul',
                            1, grad.float())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_half_inputs_accumulate_in_float32(device, dtype, combine):
    x, cf, sf = filters(2, 4, 7, 6, 3, 1, 2, device=device)
    x, cf, sf = (t.to(dtype) for t in (x, cf, sf))
    grad = torch.randn(2, 4, 7, 6, device=device).to(dtype)
    # The reference sees the same rounded values, in float64: what is left
    # is the rounding of each result (one half-precision ulp, relative to
    # the largest value) and of the float32 sums.
    expected, expected_grads = reference_and_grads(x, cf, sf, 3, 1, 1, combine,
                                                   2, grad)
    out, grads = run_triton(x, cf, sf, 3, 1, 1, combine, 2, grad)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    for name, got, e in zip(('out', 'x', 'channel_filter', 'spatial_filter'),
                            (out, *grads), (expected, *expected_grads)):
        assert got.dtype == dtype, name
        err = (got.double() - e).abs().max().item()
        assert err <= eps * e.abs().max().item(), (name, err)


def test_mixed_dtypes_promote(device):
    x, cf, sf = filters(1, 2, 5, 5, 3, 1, 1, device=device)
    out = ddf_triton.ddf(x.half(),
                         cf.float().reshape(1, 2, 9), sf.float(), 3, 1, 1,
                         False, 1)
    assert out.dtype == torch.float32
    expected = ddf_reference(x.half().double(), cf, sf, 3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scale,d,head,combine', [(2, 1, 1, 'mul'),
                                                  (2, 2, 2, 'add'),
                                                  (3, 1, 1, 'add')])
def test_ddf_up_sub_pixel_form(device, scale, d, head, combine):
    B, C, H, W, k = 2, 4, 5, 3, 3
    n = scale * scale
    g = torch.Generator().manual_seed(scale)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    cf = torch.randn(n, B, C, k * k, dtype=torch.float64, generator=g)
    sf = torch.randn(
        n, B, head * k * k, H, W, dtype=torch.float64, generator=g)
    x, cf, sf = (t.to(device) for t in (x, cf, sf))
    leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
    expected = torch.zeros(
        B, C, scale * H, scale * W, dtype=torch.float64, device=device)
    for p in range(n):
        py, px = divmod(p, scale)
        expected[:, :, py::scale,
                 px::scale] = ddf_reference(leaves[0],
                                            leaves[1][p].view(B, C, k,
                                                              k), leaves[2][p],
                                            k, d, 1, combine, head)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    floats = [t.float().requires_grad_() for t in (x, cf, sf)]
    out = ddf_triton.ddf_up(*floats, k, d, combine == 'add', head, scale)
    grads = torch.autograd.grad(out, floats, grad.float())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for g_, e in zip(grads, expected_grads):
        torch.testing.assert_close(g_.double(), e, rtol=1e-5, atol=1e-5)


class NewStorages(TorchDispatchMode):
    """Records the size of every new storage an aten op returns.

    The interpreter's own host copies of kernel arguments (made with
    ``set_`` from storages it builds, then ``copy_``) are not allocations
    of the operator (they do not exist on a GPU) and are left out.
    """

    def __init__(self):
        super().__init__()
        self.seen = set()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, torch.Tensor):
                self.seen.add(a.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.set_, torch.ops.aten.copy_):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out, ):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen and t.numel():
                    self.seen.add(ptr)
                    self.sizes.append(t.untyped_storage().nbytes() //
                                      t.element_size())
        return out


def test_no_k_by_k_buffer(device, monkeypatch):
    # One stage for the filter gradients (no partial sums), as on CPU.
    monkeypatch.setattr(ddf_triton, 'TARGET_PROGRAMS', 1)
    k, head = 7, 1
    x, cf, sf = (
        t.float() for t in filters(1, 8, 9, 9, k, 1, head, device=device))
    cf = cf.reshape(1, 8, k * k)
    out_numel = x.numel()
    up_cf, up_sf = cf.expand(4, -1, -1, -1), sf.expand(4, -1, -1, -1, -1)
    if device == 'cuda':
        # Once before counting: the first launch of a size autotunes
        # (timing buffers are no allocations of the operator).
        out = ddf_triton._ddf_forward(x, cf, sf, k, 1, 1, False, head)
        ddf_triton._ddf_backward(out, x, cf, sf, k, 1, 1, False, head,
                                 [True, True, True])
        ddf_triton._ddf_up_backward(
            ddf_triton._ddf_up_forward(x, up_cf, up_sf, k, 1, False, head, 2),
            x, up_cf, up_sf, k, 1, False, head, 2, [True, False, False])
    with NewStorages() as fwd:
        out = ddf_triton._ddf_forward(x, cf, sf, k, 1, 1, False, head)
    with NewStorages() as bwd:
        ddf_triton._ddf_backward(out, x, cf, sf, k, 1, 1, False, head,
                                 [True, True, True])
    # The output, then the three gradients: each the size of its input.
    assert fwd.sizes == [out_numel]
    assert sorted(bwd.sizes) == sorted([x.numel(), cf.numel(), sf.numel()])
    with NewStorages() as up:
        out = ddf_triton._ddf_up_forward(x, up_cf, up_sf, k, 1, False, head, 2)
        ddf_triton._ddf_up_backward(out, x, up_cf, up_sf, k, 1, False, head, 2,
                                    [True, False, False])
    # Output, float32 input-gradient sum (cast in place for float32 x).
    assert max(up.sizes) == 4 * out_numel and sum(up.sizes) <= 5 * out_numel
    # The counter sees a k*k buffer where there is one.
    with NewStorages() as unfold:
        ddf_reference(x, cf.view(1, 8, k, k), sf, k)
    assert max(unfold.sizes) >= k * k * out_numel


def test_compiled_graph_keeps_the_operator(device):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def fn(x, cf, sf):
        return ddf_triton.ddf(x, cf, sf, 3, 1, 2, True, 1).tanh()

    x, cf, sf = (
        t.float() for t in filters(1, 2, 6, 5, 3, 2, 1, device=device))
    cf = cf.reshape(1, 2, 9)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
        out = f(*leaves)
        out.sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    assert 'mmdyn.ddf_triton_forward' in graphs[0].code
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_opcheck(device):
    x, cf, sf = (
        t.float() for t in filters(1, 2, 5, 4, 3, 1, 1, device=device))
    cf = cf.reshape(1, 2, 9)
    up_cf, up_sf = cf.expand(4, -1, -1, -1), sf.expand(4, -1, -1, -1, -1)
    ops = torch.ops.mmdyn
    cases = [
        (ops.ddf_triton_forward, (x, cf, sf, 3, 1, 1, False, 1)),
        (ops.ddf_triton_backward, (torch.randn_like(x), x, cf, sf, 3, 1, 1,
                                   False, 1, [True, True, True])),
        (ops.ddf_up_triton_forward, (x, up_cf, up_sf, 3, 1, True, 1, 2)),
        (ops.ddf_up_triton_backward,
         (torch.randn(1, 2, 10, 8, device=device), x, up_cf, up_sf, 3, 1, True,
          1, 2, [True, True, True])),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_(
            op in (ops.ddf_triton_forward, ops.ddf_up_triton_forward
                   )) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(
            op.default,
            args,
            test_utils=('test_schema', 'test_faketensor',
                        'test_autograd_registration'))


def test_clear_errors_without_triton_or_gpu(monkeypatch):
    x = torch.zeros(1, 1, 3, 3)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match="impl='triton' runs on CUDA"):
        ddf_triton.check_available(x)
    monkeypatch.setattr(ddf_triton, '_import_triton', lambda: None)
    with pytest.raises(RuntimeError, match='needs the triton package'):
        ddf_triton.check_available(x)
    assert not ddf_triton.available('cuda')


def test_public_api_selects_the_kernels(device):
    from mmdyn.ops import DDFConv2d, DDFUpsample, ddf
    x, cf, sf = (
        t.float() for t in filters(2, 4, 7, 5, 3, 2, 2, device=device))
    torch.testing.assert_close(
        ddf(x, cf, sf, 3, 1, 2, 'add', 2, impl='triton'),
        ddf(x, cf, sf, 3, 1, 2, 'add', 2, impl='reference'))
    torch.manual_seed(0)
    conv = DDFConv2d(4, 4, 3, stride=2, head=2, impl='triton').to(device)
    up = DDFUpsample(4, 2, guided=True, impl='triton').to(device)
    guide = torch.randn(2, 4, 14, 10, device=device)
    for layer, args in ((conv, (x, )), (up, (x, guide))):
        leaves = [a.clone().requires_grad_() for a in args]
        out = layer(*leaves)
        assert layer.last_path == 'triton'
        out.square().sum().backward()
        got = [out] + [a.grad for a in leaves]
        layer.impl = 'reference'
        leaves = [a.clone().requires_grad_() for a in args]
        out = layer(*leaves)
        out.square().sum().backward()
        for g, e in zip(got, [out] + [a.grad for a in leaves]):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_impl_triton_without_a_gpu_says_so(monkeypatch):
    from mmdyn.ops import ddf
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="impl='triton' runs on CUDA"):
        ddf(x,
            torch.zeros(1, 2, 3, 3),
            torch.zeros(1, 9, 4, 4),
            3,
            impl='triton')


@pytest.mark.parametrize('name', [
    'forward_kernel', 'grad_input_kernel', 'grad_channel_filter_kernel',
    'grad_spatial_filter_kernel'
])
def test_kernels_compile_for_a_gpu(name, monkeypatch, tmp_path):
    # No GPU needed: Triton compiles to an sm_90 binary with its own
    # ptxas; this checks what the interpreter does not (types, layouts).
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    kernel = getattr(ddf_triton._kernels(ddf_triton.interpreting()), name)
    kkp, base = ddf_triton._tiles(5)
    constants = dict(
        K=5, STRIDE=2, DIL=2, ADD=False, KKP=kkp, BASE=base, MULT=2)
    if name == 'grad_input_kernel':
        constants['ACCUMULATE'] = True
    signature = {
        arg:
        'constexpr' if arg in constants else
        ('*bf16' if arg == 'x_ptr' else '*fp32')
        if arg.endswith('_ptr') else 'i32'
        for arg in kernel.arg_names
    }
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget('cuda', 90, 32))
    assert compiled.asm['cubin']


# --------------------------------------------------------------------------
# Launch grid, device guard, dtypes, compile errors, parallel backward,
# specialisation and autotuning
# --------------------------------------------------------------------------
def test_launch_grids_stay_within_cuda_limits():
    limits = (2**31 - 1, 65535, 65535)
    assert ddf_triton.MAX_GRID == limits
    # 2048x1024 at k=7: 65536 pixel blocks of 32, one more than a grid's
    # dimension 1 holds (where the blocks used to go).
    kkp, base = ddf_triton._tiles(7)
    assert -(-2048 * 1024 // base) > limits[1]
    for B, C, head in ((1, 1, 1), (2, 64, 4), (64, 512, 1)):
        for mult in (1, 2):
            for target in (1, 528):
                grids = ddf_triton.launch_grids(B, C, 2048, 1024, 2048, 1024,
                                                7, head, target, mult)
                assert set(grids) == {
                    'forward', 'grad_input', 'grad_channel_filter',
                    'grad_spatial_filter'
                }
                for name, grid in grids.items():
                    assert len(grid) == 3, name
                    assert all(1 <= g <= m for g, m in zip(grid, limits)), \
                        (name, grid)
    # Beyond dimension 0, the tiles fold into dimension 1, all covered.
    for tiles in (1, 65536, limits[0], limits[0] + 1, 3 * limits[0] + 5):
        g0, g1, g2 = ddf_triton.launch_grid(tiles)
        assert g0 <= limits[0] and g1 <= limits[1] and g2 == 1
        assert g0 * g1 >= tiles > g0 * (g1 - 1)


def ddf_case(B=2,
             C=6,
             H=13,
             W=12,
             k=3,
             d=1,
             s=1,
             head=2,
             combine='mul',
             device='cpu'):
    x, cf, sf = filters(B, C, H, W, k, s, head, device=device)
    grad = torch.randn(
        B,
        C,
        *sf.shape[-2:],
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(7)).to(device)
    expected = reference_and_grads(x, cf, sf, k, d, s, combine, head, grad)
    got = run_triton(x.float(), cf.float(), sf.float(), k, d, s, combine, head,
                     grad.float())
    return expected, got


def assert_all_close(expected, got):
    (out_e, grads_e), (out_g, grads_g) = expected, got
    torch.testing.assert_close(out_g.double(), out_e, rtol=1e-5, atol=1e-5)
    for name, g, e in zip(('x', 'cf', 'sf'), grads_g, grads_e):
        torch.testing.assert_close(
            g.double(), e, rtol=1e-5, atol=1e-5, msg=name)


def test_folded_grid_computes_every_tile(device, monkeypatch):
    # A grid dimension 0 of 7 programs: the tiles of every kernel fold into
    # dimension 1 (the last row partly past the tiles).
    monkeypatch.setattr(ddf_triton, 'MAX_GRID', (7, 65535, 65535))
    assert ddf_triton.launch_grid(30) == (6, 5, 1)
    for s, combine in ((1, 'mul'), (2, 'add')):
        assert_all_close(*ddf_case(s=s, combine=combine, device=device))


@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_split_reductions_match_reference(device, monkeypatch, combine):
    # Enough programs wanted that the channel-filter gradient sums its
    # pixels in chunks and the spatial-filter gradient its channels in
    # splits (5 channels a head: 3 splits of 2, 2 and 1).
    monkeypatch.setattr(ddf_triton, 'TARGET_PROGRAMS', 10**6)
    B, C, H, W, k, head = 2, 10, 9, 8, 7, 2
    plan = ddf_triton.reduction_plan(B, C, H, W, k, head, 10**6)
    assert plan.chunks > 1 and plan.splits == 5
    assert_all_close(
        *ddf_case(B, C, H, W, k, head=head, combine=combine, device=device))
    monkeypatch.setattr(ddf_triton, 'MAX_SPLITS', 3)
    assert ddf_triton.reduction_plan(B, C, H, W, k, head, 10**6).splits == 3
    assert_all_close(
        *ddf_case(B, C, H, W, k, head=head, combine=combine, device=device))


def test_split_reductions_are_deterministic(device, monkeypatch):
    monkeypatch.setattr(ddf_triton, 'TARGET_PROGRAMS', 10**6)
    results = [ddf_case(device=device)[1] for _ in range(2)]
    for a, b in zip((results[0][0], *results[0][1]),
                    (results[1][0], *results[1][1])):
        assert torch.equal(a, b)


def test_reduction_plan_fills_a_gpu():
    # B=32, head=1, a 7x7 output: 32 programs before the split.
    plan = ddf_triton.reduction_plan(32, 64, 7, 7, 3, 1, 4 * 132)
    assert plan.splits == ddf_triton.MAX_SPLITS
    plan = ddf_triton.reduction_plan(1, 4, 112, 112, 3, 1, 4 * 132)
    assert plan.chunks > 1 and plan.chunks * plan.chunk >= 112 * 112
    # Planes enough already: one stage.
    assert ddf_triton.reduction_plan(64, 256, 56, 56, 3, 1, 528) == \
        (ddf_triton.reduction_plan(64, 256, 56, 56, 3, 1, 528).chunk, 1, 1)


def test_launches_run_under_a_device_guard(device, monkeypatch):
    from contextlib import contextmanager
    entered = []

    @contextmanager
    def record(t):
        entered.append(t.device)
        yield

    monkeypatch.setattr(ddf_triton, '_on_device', record)
    x, cf, sf = (
        t.float() for t in filters(1, 2, 5, 4, 3, 1, 1, device=device))
    out = ddf_triton._ddf_forward(x, cf.reshape(1, 2, 9), sf, 3, 1, 1, False,
                                  1)
    ddf_triton._ddf_backward(out, x, cf.reshape(1, 2, 9), sf, 3, 1, 1, False,
                             1, [True, True, True])
    assert entered == [x.device, x.device]


def test_device_guard_makes_the_tensor_device_current(monkeypatch):
    from types import SimpleNamespace
    made = []

    class FakeGuard:

        def __init__(self, device):
            made.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, 'device', FakeGuard)
    cuda1 = SimpleNamespace(device=torch.device('cuda', 1))
    with ddf_triton._on_device(cuda1):
        pass
    assert made == [torch.device('cuda', 1)]
    with ddf_triton._on_device(torch.zeros(1)):
        pass
    assert made == [torch.device('cuda', 1)]


def test_supports_only_cuda_half_and_single(monkeypatch):
    from types import SimpleNamespace

    def tensor(device, dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ddf_triton.supports(tensor('cuda', dtype))
        assert not ddf_triton.supports(tensor('cpu', dtype))
    assert not ddf_triton.supports(tensor('cuda', torch.float64))
    assert not ddf_triton.supports(
        tensor('cuda', torch.float32), tensor('cuda', torch.float64))
    monkeypatch.setattr(ddf_triton, 'TRITON_IMPORTED', False)
    assert not ddf_triton.supports(tensor('cuda', torch.float32))


def test_float64_is_refused_not_rounded(device):
    from mmdyn.ops import ddf
    x, cf, sf = filters(1, 2, 5, 4, 3, 1, 1, device=device)
    with pytest.raises(TypeError, match='float64'):
        ddf_triton.ddf(x, cf.reshape(1, 2, 9), sf, 3, 1, 1, False, 1)
    with pytest.raises(TypeError, match='float64'):
        ddf_triton.ddf(x.float(),
                       cf.reshape(1, 2, 9).float(), sf, 3, 1, 1, False, 1)
    with pytest.raises(TypeError, match='float64'):
        ddf(x, cf, sf, 3, impl='triton')
    with pytest.raises(TypeError, match='float64'):
        ddf_triton.ddf_up(x,
                          cf.reshape(1, 1, 2, 9).expand(4, 1, 2, 9),
                          sf.expand(4, 1, 9, 5, 4), 3, 1, False, 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks a CPU error')
def test_compiled_impl_triton_without_a_gpu_says_so(monkeypatch):
    from mmdyn.ops import ddf
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def fn(x, cf, sf):
        return ddf(x, cf, sf, 3, impl='triton')

    with pytest.raises(Exception, match="impl='triton' runs on CUDA"):
        fn(
            torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 3),
            torch.zeros(1, 9, 4, 4))
    torch._dynamo.reset()


def test_sizes_and_outer_strides_are_not_specialised(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    kernels = ddf_triton._kernels(ddf_triton.interpreting())
    for name in ('forward', 'grad_input', 'grad_channel_filter',
                 'grad_spatial_filter'):
        kernel = getattr(kernels, name + '_kernel')
        free = {p.name for p in kernel.params if p.do_not_specialize}
        assert {'H', 'W', 'Ho', 'Wo', 'CG', 'PLANES'} <= free, name
        assert {'C', 'HEAD'} & free, name
        assert {'sgh', 'sxh'} & free or {'sxh', 'soh'} <= free, name
        # The innermost strides stay specialised (1 for contiguous rows).
        assert not {'sxw', 'sgw', 'sow', 'ssw'} & free, name


def test_autotuned_over_a_small_set_and_cached_by_size(monkeypatch):
    import triton
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    kernels = ddf_triton._kernels(ddf_triton.interpreting())
    for name in ('forward', 'grad_input', 'grad_channel_filter',
                 'grad_spatial_filter'):
        tuned = getattr(kernels, name + '_tuned')
        assert isinstance(tuned, triton.runtime.Autotuner), name
        assert 2 <= len(tuned.configs) <= 8
        assert {c.num_warps for c in tuned.configs} == {4, 8}
        assert {c.kwargs['MULT'] for c in tuned.configs} == {1, 2}
        assert list(tuned.keys) == ['K', 'STRIDE', 'SIZE_CLASS']
    # The interpreter gets one configuration (nothing to benchmark).
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    interp = ddf_triton._kernels(ddf_triton.interpreting())
    assert len(interp.forward_tuned.configs) == 1
    assert ddf_triton._size_class(4000) == ddf_triton._size_class(4090)
    assert ddf_triton._size_class(4000) != ddf_triton._size_class(8200)


def launches_of_an_up_backward(device, monkeypatch):
    """(kernel, tuned) of each launch of a DDF-Up backward; its gradients
    against the reference's."""
    launched = []
    kernel = ddf_triton._kernel

    def record(name, tuned=True):
        launched.append((name, tuned))
        return kernel(name, tuned)

    monkeypatch.setattr(ddf_triton, '_kernel', record)
    x, cf, sf = (
        t.float() for t in filters(1, 2, 5, 4, 3, 1, 1, device=device))
    up_cf = cf.reshape(1, 2, 9).expand(4, -1, -1, -1)
    up_sf = sf.expand(4, -1, -1, -1, -1)
    grads = ddf_triton._ddf_up_backward(
        torch.ones(1, 2, 10, 8, device=device), x, up_cf, up_sf, 3, 1, False,
        1, 2, [True, True, True])
    leaves = [t.double().requires_grad_() for t in (x, cf, sf)]
    out = torch.zeros(1, 2, 10, 8, dtype=torch.float64, device=device)
    for p in range(4):
        out[:, :, p // 2::2, p % 2::2] = ddf_reference(*leaves, 3)
    expected = torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(
        grads[0].double(), expected[0], rtol=1e-5, atol=1e-5)
    # Each phase's filter gradients (the phases share their filters here).
    for got, e in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(
            got.double().sum(0).view_as(e), e, rtol=1e-5, atol=1e-5)
    return launched


def test_accumulating_launch_is_not_autotuned(device, monkeypatch):
    # The autotuner runs a kernel several times: one that adds into its
    # output (DDF-Up's input gradient) must be launched untuned.
    monkeypatch.setenv('MMDYN_TRITON_AUTOTUNE', '1')
    launched = launches_of_an_up_backward(device, monkeypatch)
    assert ('grad_input', False) in launched
    assert ('grad_input', True) not in launched
    assert ('grad_spatial_filter', True) in launched
    assert ('grad_channel_filter', True) in launched


def test_autotuning_switched_off(device, monkeypatch):
    monkeypatch.setenv('MMDYN_TRITON_AUTOTUNE', '0')
    launched = launches_of_an_up_backward(device, monkeypatch)
    assert launched and not [t for _, t in launched if t]
