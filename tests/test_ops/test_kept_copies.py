# Copyright (c) mmdyn contributors. All rights reserved.
"""Kept copies of a parameter: rebuilt on every kind of change a training
run makes (optimiser steps, ``load_state_dict``, writes through ``.data``
as mmengine's EMA swap does, moves), kept otherwise."""
import torch

from mmdyn.ops import DyConv2d, ODConv2d
from mmdyn.ops.accel.kept_copies import KeptCopies


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
    """Every 4th value of 1024 is sampled (256 of them): a change to a sampled
    value alone rebuilds the copy."""
    param = torch.nn.Parameter(torch.zeros(1024))
    copies = KeptCopies()
    copies.get(0, param, torch.clone)
    for index in (0, 4, 1020):
        param.data[index] += 1.0
        assert torch.equal(copies.get(0, param, torch.clone), param.detach())
    assert copies.builds == 4


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
