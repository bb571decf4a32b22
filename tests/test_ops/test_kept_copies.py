# Copyright (c) mmdyn contributors. All rights reserved.
"""Kept copies of a parameter: rebuilt on every kind of change a training
run makes (optimiser steps, ``load_state_dict``, writes through ``.data``
as mmengine's EMA swap does, moves), kept otherwise."""
import pytest
import torch

from mmdyn.ops import DyConv2d, ODConv2d
from mmdyn.ops.accel.kept_copies import KeptCopies, sampled_positions


def test_a_copy_is_kept_until_its_source_changes():
    param = torch.nn.Parameter(torch.randn(40, 30))
    copies = KeptCopies()

    def transposed():
        return copies.get('t', param, lambda p: p.detach().t().contiguous())

    def check(builds):
        # against the source read now, not against an earlier copy
        assert torch.equal(transposed(), param.detach().t())
        assert copies.builds == builds

    check(1)
    check(1)  # kept
    with torch.no_grad():
        param.add_(1.0)  # an optimiser step: the version counter moves
    check(2)
    param.data.copy_(torch.randn(40, 30))  # an EMA swap: only the values
    check(3)
    param.data = torch.randn(40, 30)  # new storage
    check(4)
    param.data = param.data.double()  # a dtype move
    check(5)
    copies.get('other key', param, lambda p: p.detach().sum().view(1))
    assert len(copies) == 2 and copies.builds == 6
    copies.clear()
    assert len(copies) == 0
    check(7)


def test_a_write_through_data_to_any_sampled_value_is_seen():
    """A change to one sampled value alone rebuilds the copy."""
    param = torch.nn.Parameter(torch.zeros(1024))
    copies = KeptCopies()
    copies.get(0, param, torch.clone)
    positions = sampled_positions(1024, param.device)
    assert len(set(positions.tolist())) == 256
    for index in positions[[0, 1, -1]].tolist():
        param.data[index] += 1.0
        assert torch.equal(copies.get(0, param, torch.clone), param.detach())
    assert copies.builds == 4


def test_sampled_positions_cover_every_tap_and_most_channels():
    """On a DyConv bank [4, 256, 256, 3, 3] (a size where a constant step of
    numel / 256 samples one tap of input channel 0 only)."""
    positions = sampled_positions(4 * 256 * 256 * 9, torch.device('cpu'))
    rest, tap = positions // 9, positions % 9
    assert set(tap.tolist()) == set(range(9))
    assert len(set((rest % 256).tolist())) >= 150  # input channels
    assert len(set((rest // 256 % 256).tolist())) >= 150  # output channels
    assert len(set((rest // 65536).tolist())) == 4  # kernels
    small = sampled_positions(10, torch.device('cpu'))
    assert sorted(small.tolist()) == list(range(10))


@pytest.mark.parametrize(
    'write',
    [
        lambda w: w[:, :, :, 1, 1].add_(1.0),  # the centre tap (Dirac add)
        lambda w: w[:, :, 128:].zero_(),  # half of the input channels
        lambda w: w[:, 64:96].mul_(-1.0),  # an eighth of the filters
    ],
    ids=['centre tap', 'pruned inputs', 'flipped filters'])
def test_structured_writes_through_data_are_seen(write):
    """Writes through ``.data`` to one tap or a block of channels of a conv
    kernel bank rebuild the copy (with a constant sampling step they were
    missed and the stale copy returned)."""
    bank = torch.nn.Parameter(torch.randn(4, 256, 256, 3, 3))
    copies = KeptCopies()
    copies.get(0, bank, torch.clone)
    write(bank.data)
    assert torch.equal(copies.get(0, bank, torch.clone), bank.detach())
    assert copies.builds == 2


def test_inference_mode_sources_and_calls():
    """A copy first built inside ``torch.inference_mode`` serves calls outside
    it; a source made there (no version counter) is copied on every call."""
    param = torch.nn.Parameter(torch.randn(6, 5))
    copies = KeptCopies()
    with torch.inference_mode():
        kept = copies.get(0, param, lambda p: p * 2)
    # a normal tensor, off the autograd graph (inference_mode(False) alone
    # turns grad mode on)
    assert not kept.is_inference() and not kept.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(
            copies.get(0, param, lambda p: p * 2), param * 2)
    assert copies.builds == 1
    assert not copies.get(1, param, lambda p: p * 2).requires_grad
    with torch.inference_mode():
        made_there = torch.randn(6, 5)
        for _ in range(2):
            assert torch.equal(
                copies.get(2, made_there, torch.clone), made_there)
    assert copies.builds == 2 and len(copies) == 2


@pytest.mark.parametrize('cls,impl,channels', [(DyConv2d, 'taps', 256),
                                               (DyConv2d, 'chunked', 512),
                                               (ODConv2d, 'tap_gemm', 256)])
def test_layers_run_outside_inference_mode_after_it(cls, impl, channels):
    """The paths' reused buffers and kept copies made under
    ``torch.inference_mode`` do not break a later ``no_grad`` call (the reused
    workspace was an inference tensor, and every later write to it outside
    inference mode raised), nor does a layer built there."""
    torch.manual_seed(0)
    layer = cls(
        channels,
        channels,
        3,
        padding=1,
        kernel_num=4 if cls is DyConv2d else 1).eval()
    x = torch.randn(2, channels, 7, 7)
    with torch.no_grad():
        expected = layer.forward_reference(x)
    layer.impl = impl
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert layer.last_path == impl
    with torch.inference_mode():
        built_there = cls(
            channels,
            channels,
            3,
            padding=1,
            impl=impl,
            kernel_num=layer.kernel_num).eval()
        built_there.load_state_dict(layer.state_dict())
        assert built_there.weight.is_inference()
        for _ in range(2):
            torch.testing.assert_close(
                built_there(x), expected, rtol=1e-4, atol=1e-4)


def test_dynamic_layers_drop_their_copies_on_train_and_moves():
    """ODConv's tap-major kernel and DyConv's tap-major bank live while the
    layer runs inference; ``train()``/``eval()`` and dtype or device moves drop
    them (no copy held through a training run)."""
    odconv = ODConv2d(8, 8, 3, padding=1, kernel_num=1, impl='tap_gemm')
    dyconv = DyConv2d(8, 8, 3, padding=1, kernel_num=4, impl='taps')
    x = torch.randn(2, 8, 5, 5)
    for layer, name in ((odconv, '_tap_gemm_weights'), (dyconv,
                                                        '_tap_major_bank')):
        for move in (lambda m: m.train(), lambda m: m.eval(),
                     lambda m: m.double(), lambda m: m.float()):
            layer.eval()
            with torch.no_grad():
                layer(x.to(layer.weight.dtype))
            assert len(getattr(layer, name)) == 1
            move(layer)
            assert len(getattr(layer, name)) == 0
