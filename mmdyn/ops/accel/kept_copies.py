# Copyright (c) mmdyn contributors. All rights reserved.
"""Rearranged copies of a parameter kept between inference calls while the
parameter is unchanged (ODConv's tap-major kernel, KernelWarehouse's packed
cells, the tap-major kernel bank of CondConv/DyConv).

A copy is rebuilt when its source tensor's storage, strides, shape, dtype,
device or version counter changes (every in-place update through the
parameter: ``load_state_dict``, optimiser steps, ``torch.no_grad()``
writes), or when any of 256 values of the source, at positions spread over
the whole tensor by a multiplicative hash (every kernel tap and most input
channels of a conv kernel), differs from the values seen when the copy was
built. The values catch writes through ``.data``, which leave the version
counter alone: mmengine's ``EMAHook`` swaps the averaged and the trained
parameters with ``p.data.copy_``, changing every value; a write to one
kernel tap or one tenth of the input channels changes some of them with
near certainty. A ``.data`` write to a few values only can be missed: call
:meth:`KeptCopies.clear` after one (or ``layer.train()``, which drops a
dynamic layer's copies, :func:`release_layer_copies`).

A source that is an inference tensor (made under ``torch.inference_mode``)
has no version counter: its copy is built on every call, not kept.

torch only.
"""
import functools
from typing import Callable, Dict, Hashable, NamedTuple

import torch
from torch import nn

#: How many of the source's values are compared on every use.
SAMPLED_VALUES = 256
#: The multiplier spreading the sampled positions: a prime above 2**31, so
#: coprime with every smaller tensor size (the positions are distinct).
_SPREAD = 2654435761


@functools.lru_cache(maxsize=64)
def sampled_positions(numel: int, device: torch.device) -> torch.Tensor:
    """The flat indices (on ``device``) of the values :func:`fingerprint`
    compares: ``i * _SPREAD mod numel`` for ``i < SAMPLED_VALUES`` (every
    index of a smaller tensor). Distinct, and with a prime multiplier they
    fall on every kernel tap and most input channels of a conv kernel,
    where a constant step could land on one tap of one channel only."""
    count = min(numel, SAMPLED_VALUES)
    positions = (torch.arange(count, dtype=torch.int64) * _SPREAD) % max(
        numel, 1)
    return positions.to(device)


class Fingerprint(NamedTuple):
    """What a kept copy was built from."""
    identity: tuple  # storage address, layout, version, dtype, device
    sample: torch.Tensor  # the values at sampled_positions


def fingerprint(source: torch.Tensor) -> Fingerprint:
    """The :class:`Fingerprint` of ``source`` now (not for inference tensors,
    which have no version counter)."""
    source = source.detach()
    sample = torch.take(source, sampled_positions(source.numel(),
                                                  source.device))
    identity = (source.data_ptr(), source.storage_offset(),
                tuple(source.shape), source.stride(), source._version,
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
        missing or stale (every call for an inference tensor)."""
        if source.is_inference():
            return build(source)
        now = fingerprint(source)
        kept = self._copies.get(key)
        if kept is None or not same_source(kept[0], now):
            # A normal tensor even when first built in inference mode, so
            # that later calls outside it can use it (inference_mode(False)
            # turns grad mode on: no_grad keeps the copy off the graph).
            with torch.inference_mode(False), torch.no_grad():
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
