# Copyright (c) mmdyn contributors. All rights reserved.
"""Counting the memory a training step keeps, and the largest tensor a captured
graph makes.

* :class:`SavedTensorBytes`: the tensors autograd keeps for the backward
  pass (``torch.autograd.graph.saved_tensors_hooks``), as the bytes of the
  distinct storages they live in. Everything saved during a forward stays
  alive until the backward, so the total at the end of the forward is the
  step's peak of saved activations. Parameters and buffers (given as
  ``exclude``) are left out: they are held whether or not they are saved.
* :func:`largest_graph_tensors`: a ``torch.compile`` backend that records,
  from the fake tensors AOTAutograd attaches to the nodes of the forward
  and backward graphs, the largest tensor each graph computes, then runs
  the graphs eagerly.

Both count what exists, not what a device allocator reserves; they run on
any device, CPU included.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch


def _storage_key(tensor: torch.Tensor) -> Tuple[str, int]:
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages saved for backward
    by the autograd graph built inside it.

    Args:
        exclude (Iterable[Tensor]): Tensors whose storages are not counted
            (a model's parameters and buffers).

    Attributes:
        total (int): Bytes of the distinct storages saved so far.
        count (int): Number of distinct storages saved.
        largest (int): Bytes of the largest of them.

    Example:
        >>> model = torch.nn.Conv2d(3, 8, 3)
        >>> with SavedTensorBytes(exclude=model.parameters()) as saved:
        ...     loss = model(torch.rand(2, 3, 8, 8)).sum()
        >>> saved.total  # the input is saved, the weight is excluded
        1536
        >>> with SavedTensorBytes(exclude=model.parameters()) as saved:
        ...     loss = model(torch.rand(2, 3, 8, 8)).square().sum()
        >>> saved.total  # and the conv's output, for the square's backward
        3840
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {
            _storage_key(t)
            for t in exclude if isinstance(t, torch.Tensor)
        }
        self._storages: Dict[Tuple[str, int], int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != 'meta':
            key = _storage_key(tensor)
            if key not in self._excluded and key[1] != 0:
                self._storages[key] = max(
                    self._storages.get(key, 0),
                    tensor.untyped_storage().nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self._storages.values())

    @property
    def count(self) -> int:
        return len(self._storages)

    @property
    def largest(self) -> int:
        return max(self._storages.values(), default=0)

    def __enter__(self) -> 'SavedTensorBytes':
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def saved_bytes_of_step(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes saved for backward by ``model(inputs)`` and a scalar loss made
    from its output(s), parameters and buffers excluded.

    The backward is run too (so the step is complete and the graph freed).
    """
    exclude = [*model.parameters(), *model.buffers()]
    with SavedTensorBytes(exclude) as saved:
        out = model(inputs)
        outs = out if isinstance(out, (tuple, list)) else (out, )
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    return saved.total


class GraphTensorRecord:
    """What :func:`largest_graph_tensors` saw: for each graph compiled (forward
    graphs then backward graphs, in order), the largest tensor it computes as
    ``(numel, node name, op)``."""

    def __init__(self):
        self.forward: List[Tuple[int, str, str]] = []
        self.backward: List[Tuple[int, str, str]] = []

    @property
    def largest(self) -> int:
        """Elements of the largest tensor any recorded graph computes."""
        return max((r[0] for r in self.forward + self.backward), default=0)

    def describe(self) -> str:
        return f'forward {self.forward}, backward {self.backward}'


def _largest_node(gm: torch.fx.GraphModule) -> Tuple[int, str, str]:
    best = (0, '', '')
    for node in gm.graph.nodes:
        if node.op != 'call_function':
            continue
        vals = node.meta.get('val')
        vals = vals if isinstance(vals, (tuple, list)) else (vals, )
        for val in vals:
            if isinstance(val, torch.Tensor):
                numel = int(val.numel())
                if numel > best[0]:
                    best = (numel, node.name, str(node.target))
    return best


def largest_graph_tensors(record: Optional[GraphTensorRecord] = None):
    """A ``torch.compile`` backend (AOTAutograd, graphs run eagerly) that
    appends the largest intermediate of each forward and backward graph to
    ``record``. Returns ``(backend, record)``.

    Example:
        >>> backend, record = largest_graph_tensors()
        >>> f = torch.compile(lambda x: (x @ x.t()).sum(), backend=backend)
        >>> f(torch.rand(4, 3, requires_grad=True)).backward()
        >>> record.largest
        16
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    record = GraphTensorRecord() if record is None else record

    def forward_compiler(gm, example_inputs):
        record.forward.append(_largest_node(gm))
        return make_boxed_func(gm)

    def backward_compiler(gm, example_inputs):
        record.backward.append(_largest_node(gm))
        return make_boxed_func(gm)

    backend = aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=backward_compiler)
    return backend, record
