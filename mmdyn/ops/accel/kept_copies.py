# Copyright (c) mmdyn contributors. All rights reserved.
"""Rearranged copies of a parameter kept between inference calls while the
parameter is unchanged (ODConv's tap-major kernel, KernelWarehouse's packed
cells, the tap-major kernel bank of CondConv/DyConv).

A copy is rebuilt when its source tensor's storage, shape, dtype, device or
version counter changes (every in-place update through the parameter:
``load_state_dict``, optimiser steps, ``torch.no_grad()`` writes), or when
any of 256 evenly spaced values of the source differs from the values seen
when the copy was built. The values catch writes through ``.data``, which
leave the version counter alone: mmengine's ``EMAHook`` swaps the averaged
and the trained parameters with ``p.data.copy_``, changing every value.
A ``.data`` write to a few values only can be missed: call
:meth:`KeptCopies.clear` after one (or ``layer.train()``, which drops a
dynamic layer's copies, :func:`release_layer_copies`).

torch only.
"""
from typing import Callable, Dict, Hashable, NamedTuple

import torch
from torch import nn

#: How many of the source's values are compared on every use.
SAMPLED_VALUES = 256


class Fingerprint(NamedTuple):
    """What a kept copy was built from."""
    identity: tuple  # storage address, version, shape, dtype, device
    sample: torch.Tensor  # evenly spaced values of the source


def fingerprint(source: torch.Tensor) -> Fingerprint:
    """The :class:`Fingerprint` of ``source`` now."""
    flat = source.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // SAMPLED_VALUES)].clone()
    identity = (source.data_ptr(), source._version, tuple(source.shape),
                source.dtype, source.device)
    return Fingerprint(identity, sample)


def same_source(kept: Fingerprint, now: Fingerprint) -> bool:
    """Whether a copy built at ``kept`` is still a copy of the source at
    ``now``."""
    return kept.identity == now.identity and torch.equal(
        kept.sample, now.sample)


class KeptCopies:
    """Copies ``build(source)`` by key, each rebuilt when its source changes
    (see the module's docstring for what counts as a change)."""

    def __init__(self):
        self._copies: Dict[Hashable, tuple] = {}
        #: How many copies were built (a record for tests and profiling).
        self.builds = 0

    def get(self, key: Hashable, source: torch.Tensor,
            build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The copy ``key`` of ``source``, built by ``build(source)`` when
        missing or stale."""
        now = fingerprint(source)
        kept = self._copies.get(key)
        if kept is None or not same_source(kept[0], now):
            kept = self._copies[key] = (now, build(source))
            self.builds += 1
        return kept[1]

    def clear(self) -> None:
        """Drop every kept copy."""
        self._copies = {}

    def __len__(self) -> int:
        """How many copies are kept now."""
        return len(self._copies)


def layer_copies(layer: nn.Module, name: str) -> KeptCopies:
    """The :class:`KeptCopies` ``name`` of ``layer`` (a plain attribute, not in
    the state dict), created on first use."""
    copies = layer.__dict__.get(name)
    if copies is None:
        copies = layer.__dict__[name] = KeptCopies()
    return copies


def release_layer_copies(layer: nn.Module) -> None:
    """Drop every copy kept on ``layer`` (not on its children)."""
    for value in vars(layer).values():
        if isinstance(value, KeptCopies):
            value.clear()
