# Copyright (c) mmdyn contributors. All rights reserved.
"""Whether a forward is being captured into a graph, and the layers as
``torch.fx`` leaves.

:func:`graph_capture` is the one predicate every dispatch in
:mod:`mmdyn.ops` asks: under it the layers take paths made of plain
PyTorch ops; ctypes calls, raw data pointers and reused buffers have no
place in a captured graph. Under ``torch.compile`` (:func:`compiling`)
the CPU inference paths built on the C loops are kept: each runs as one
``mmdyn::`` custom operator (:mod:`mmdyn.ops.accel.custom_ops`), opaque to
the compiler, the loops and their workspaces inside it.

torch only.
"""
import torch


def graph_capture() -> bool:
    """Whether the forward is being captured into a graph: traced or
    scripted by TorchScript, exported to ONNX, compiled or exported by
    ``torch.compile``/``torch.export`` (TorchDynamo), or traced by
    ``torch.fx.symbolic_trace``.

    Under TorchDynamo a data pointer may outlive the tensor it was taken
    from (wrong results, not an error), so the C loops stay out.
    """
    onnx = getattr(torch.onnx, 'is_in_onnx_export', None)
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.jit.is_scripting() or (onnx is not None and onnx())
                or _fx_tracing())


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing (and not ``torch.export``):

    graphs that run in this process, where the ``mmdyn::`` custom
    operators (:mod:`mmdyn.ops.accel.custom_ops`) may stand for the C
    loops.
    """
    exporting = getattr(torch.compiler, 'is_exporting', None)
    return torch.compiler.is_compiling() and not (exporting is not None
                                                  and exporting())


def captured_without_operators() -> bool:
    """Graph capture where the C loops cannot run: every kind but
    ``torch.compile`` (export, ONNX, TorchScript, ``torch.fx``); under
    ``torch.compile`` they run as the ``mmdyn::`` custom operators of
    :mod:`mmdyn.ops.accel.custom_ops`."""
    return graph_capture() and not compiling()


def _fx_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` is running."""
    trace = torch.fx._symbolic_trace
    is_tracing = getattr(trace, 'is_fx_symbolic_tracing', None) or getattr(
        trace, 'is_fx_tracing', None)
    return bool(is_tracing is not None and is_tracing())


def fx_leaf(module, *args):
    """Under ``torch.fx.symbolic_trace``: the graph node that calls ``module``
    on ``args`` as a leaf (a ``call_module`` node, or a call of its ``forward``
    when ``module`` is the traced root); None when no argument is an fx
    ``Proxy`` (no fx tracing: the caller runs its forward).

    The layers' forwards branch on shapes and check their inputs, which a
    ``Proxy`` cannot answer, so the layers enter fx graphs whole, as
    ``nn.Conv2d`` does; the graph runs them by their usual dispatch.
    """
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    if module is tracer.root:
        return tracer.create_proxy('call_function', module.forward, args, {})
    return tracer.create_proxy('call_module', tracer.path_of_module(module),
                               args, {})
