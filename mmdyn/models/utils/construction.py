# Copyright (c) mmdyn contributors. All rights reserved.
"""Construction workarounds for backbones built on stock OpenMMLab ones."""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def build_on_cpu_if_meta(module: nn.Module) -> Iterator[None]:
    """Build the enclosed part on the CPU if the default device is ``meta``,
    then move ``module`` to ``meta``.

    mmpretrain's ResNet calls ``.item()`` on a tensor while building (its
    drop-path rates), which a meta tensor cannot do. Building the static
    network on the CPU and moving it keeps ``with torch.device('meta')``
    usable for counting parameters: the dynamic layers added afterwards
    are still not allocated.

    Example:
        >>> with build_on_cpu_if_meta(self):
        ...     super().__init__(depth)
    """
    if torch.get_default_device().type != 'meta':
        yield
        return
    with torch.device('cpu'):
        yield
    module.to('meta')


def register_first(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Register ``child`` as ``parent.<name>``, ahead of its other children.

    The order of submodules is the order of ``parameters()`` and
    ``state_dict()``, hence of the optimizer state saved in checkpoints. A
    backbone that adds a module after the stock constructor has run uses
    this to keep the order of a network that created it first.
    """
    setattr(parent, name, child)
    modules = parent._modules
    reordered = {name: modules.pop(name), **modules}
    modules.clear()
    modules.update(reordered)
