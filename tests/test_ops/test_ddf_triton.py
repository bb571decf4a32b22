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
    """float64 (x, cf [B, C, k, k], sf) for a DDF of stride s."""
    Ho, Wo = ((H - 1) // s + 1, (W - 1) // s + 1) if ceil else (H // s,
                                                                   W // s)
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + k)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    cf = torch.randn(B, C, k, k, dtype=torch.float64, generator=g)
    sf = torch.randn(B, head * k * k, Ho, Wo, dtype=torch.float64,
                     generator=g)
    return [t.to(device) for t in (x, cf, sf)]


def non_contiguous(t):
    """The same values as ``t`` in a tensor with permuted, gapped strides."""
    big = torch.zeros(*t.shape[:-2], t.shape[-1], 2 * t.shape[-2],
                      dtype=t.dtype, device=t.device)
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
    out = ddf_triton.ddf(leaves[0], leaves[1].reshape(B, C, k * k),
                         leaves[2], k, d, s, combine == 'add', head)
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
        out = ddf_triton.ddf(x.float(), cf.float().reshape(1, 4, k * k),
                             sf.float(), k, d, s, combine == 'add', head)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5,
                                   atol=1e-5)


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
    grad = torch.randn(2, 4, *sf.shape[-2:], dtype=torch.float64,
                       device=device)
    expected, expected_grads = reference_and_grads(x, cf, sf, k, d, s,
                                                   combine, head, grad)
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
    out, grads = run_triton(x.float(), cf.float(), sf.float(), 3, 1, 2,
                            'mul', 1, grad.float())
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
    expected, expected_grads = reference_and_grads(x, cf, sf, 3, 1, 1,
                                                   combine, 2, grad)
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
    out = ddf_triton.ddf(x.half(), cf.float().reshape(1, 2, 9), sf.float(),
                         3, 1, 1, False, 1)
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
    sf = torch.randn(n, B, head * k * k, H, W, dtype=torch.float64,
                     generator=g)
    x, cf, sf = (t.to(device) for t in (x, cf, sf))
    leaves = [t.clone().requires_grad_() for t in (x, cf, sf)]
    expected = torch.zeros(B, C, scale * H, scale * W, dtype=torch.float64,
                           device=device)
    for p in range(n):
        py, px = divmod(p, scale)
        expected[:, :, py::scale, px::scale] = ddf_reference(
            leaves[0], leaves[1][p].view(B, C, k, k), leaves[2][p], k, d, 1,
            combine, head)
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


def test_no_k_by_k_buffer(device):
    k, head = 7, 1
    x, cf, sf = (t.float() for t in filters(1, 8, 9, 9, k, 1, head,
                                            device=device))
    cf = cf.reshape(1, 8, k * k)
    out_numel = x.numel()
    with NewStorages() as fwd:
        out = ddf_triton._ddf_forward(x, cf, sf, k, 1, 1, False, head)
    with NewStorages() as bwd:
        ddf_triton._ddf_backward(out, x, cf, sf, k, 1, 1, False, head,
                                 [True, True, True])
    # The output, then the three gradients: each the size of its input.
    assert fwd.sizes == [out_numel]
    assert sorted(bwd.sizes) == sorted([x.numel(), cf.numel(), sf.numel()])
    up_cf, up_sf = cf.expand(4, -1, -1, -1), sf.expand(4, -1, -1, -1, -1)
    with NewStorages() as up:
        out = ddf_triton._ddf_up_forward(x, up_cf, up_sf, k, 1, False, head,
                                         2)
        ddf_triton._ddf_up_backward(out, x, up_cf, up_sf, k, 1, False, head,
                                    2, [True, False, False])
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

    x, cf, sf = (t.float() for t in filters(1, 2, 6, 5, 3, 2, 1,
                                            device=device))
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
    x, cf, sf = (t.float() for t in filters(1, 2, 5, 4, 3, 1, 1,
                                            device=device))
    cf = cf.reshape(1, 2, 9)
    up_cf, up_sf = cf.expand(4, -1, -1, -1), sf.expand(4, -1, -1, -1, -1)
    ops = torch.ops.mmdyn
    cases = [
        (ops.ddf_triton_forward, (x, cf, sf, 3, 1, 1, False, 1)),
        (ops.ddf_triton_backward,
         (torch.randn_like(x), x, cf, sf, 3, 1, 1, False, 1,
          [True, True, True])),
        (ops.ddf_up_triton_forward, (x, up_cf, up_sf, 3, 1, True, 1, 2)),
        (ops.ddf_up_triton_backward,
         (torch.randn(1, 2, 10, 8, device=device), x, up_cf, up_sf, 3, 1,
          True, 1, 2, [True, True, True])),
    ]
    for op, args in cases:
        args = tuple(
            a.clone().requires_grad_(op in (ops.ddf_triton_forward,
                                            ops.ddf_up_triton_forward))
            if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op.default, args,
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
    from types import SimpleNamespace

    from mmdyn.ops import DDFConv2d, DDFUpsample, ddf
    from mmdyn.ops.fast_paths import ddf_path
    x, cf, sf = (t.float() for t in filters(2, 4, 7, 5, 3, 2, 2,
                                            device=device))
    torch.testing.assert_close(
        ddf(x, cf, sf, 3, 1, 2, 'add', 2, impl='triton'),
        ddf(x, cf, sf, 3, 1, 2, 'add', 2, impl='reference'))
    assert ddf_path('auto', SimpleNamespace(device=torch.device('cuda'))) \
        == 'triton'
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
        ddf(x, torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 4, 4), 3,
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
    kkp, block = ddf_triton._tiles(5)
    constants = dict(K=5, STRIDE=2, DIL=2, ADD=False, KKP=kkp, BLOCK=block)
    if name == 'grad_input_kernel':
        constants['ACCUMULATE'] = True
    signature = {
        arg: 'constexpr' if arg in constants else
        ('*bf16' if arg == 'x_ptr' else '*fp32')
        if arg.endswith('_ptr') else 'i32'
        for arg in kernel.arg_names
    }
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget('cuda', 90, 32))
    assert compiled.asm['cubin']
