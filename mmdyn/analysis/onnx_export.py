# Copyright (c) mmdyn contributors. All rights reserved.
"""ONNX export of classifiers and detection backbones, with a dynamic batch.

Dynamic layers compute one kernel per sample; while exporting they take
their export forms (:mod:`mmdyn.ops.accel.export_forms`: im2col as one
``Conv``, per-sample products as batched ``MatMul``), whose graphs do not
depend on the batch size and run in the runtimes' conv and GEMM kernels.
The BatchNorm after a ``mul`` DDF layer of a ResNet block is folded into
the layer first (:func:`fold_norms_into_ddf`, on a copy). The exported file
is then simplified (:func:`simplify_onnx`: constants folded, identities and
no-op casts dropped, a norm that follows a ``MatMul`` folded into it,
``x / max(||x||, eps)`` as one ``LpNormalization``, the batch named in the
reshapes that keep it) when ``onnxscript`` is installed.

The model is traced with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``: torch 2.14's default dynamo
exporter needs onnxscript and handles the data-dependent parts of detectors
poorly) and with a batch of 2 example inputs, so that no batch-size-1
special case (e.g. "one kernel for the whole batch") is baked into the
graph.

**TracerWarnings.** Tracing an mmdyn model makes torch print a dozen
``TracerWarning: Converting a tensor to a Python boolean/integer``: the
layers check their input shapes and pick an execution path from the
channel counts and the spatial size in Python. Those values are constants of
the exported graph anyway (its input height and width are fixed; only the
batch is dynamic), and no decision depends on the batch size: the export
takes the batch-independent path for every batch, which
:func:`compare_with_onnxruntime` (``--verify``: batch 1 and 4) checks. So
:func:`export_onnx` records them and logs one line with their count instead;
``show_tracer_warnings=True`` (``--show-tracer-warnings``) shows them.
"""
import collections
import copy
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

EXAMPLE_BATCH = 2


class ClassifierLogits(nn.Module):
    """``inputs -> logits`` of an mmpretrain classifier (no softmax)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs, mode='tensor')
        return out[-1] if isinstance(out, (tuple, list)) else out


class BackboneFeatures(nn.Module):
    """``inputs -> tuple of feature maps`` of a model's backbone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out, )


class NeckFeatures(nn.Module):
    """``inputs -> tuple of the neck's feature maps`` (a detector's backbone
    and neck, e.g. an FPN)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.neck(self.backbone(inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out, )


def exportable(model: nn.Module,
               backbone_only: bool = False,
               with_neck: bool = False) -> nn.Module:
    """The module to export: classifier logits, backbone features, or
    (``backbone_only`` and ``with_neck``) the features after the neck."""
    from .models import task_of
    if backbone_only:
        if not hasattr(model, 'backbone'):
            raise ValueError('backbone_only=True needs a model with a '
                             '.backbone')
        if with_neck:
            if getattr(model, 'neck', None) is None:
                raise ValueError('with_neck=True needs a model with a .neck')
            return NeckFeatures(model.backbone, model.neck).eval()
        return BackboneFeatures(model.backbone).eval()
    if task_of(model) == 'detection':
        raise ValueError('whole detectors are not exported (their proposal '
                         'selection is data dependent): use '
                         'backbone_only=True (--backbone-only)')
    return ClassifierLogits(model).eval()


def _resnet_block_types() -> tuple:
    """The ResNet blocks whose forward applies ``norm{i}`` right after
    ``conv{i}`` (mmpretrain's and, where installed, mmdet's)."""
    from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck
    types = [BasicBlock, Bottleneck]
    try:
        from mmdet.models.backbones import resnet as mmdet_resnet
    except ImportError:  # mmdet is optional
        pass
    else:
        types += [mmdet_resnet.BasicBlock, mmdet_resnet.Bottleneck]
    return tuple(types)


def _ddf_norm_pairs(model: nn.Module):
    """``(block, conv, norm name, norm)`` for every ``mul`` DDF layer of a
    ResNet block followed by an eval BatchNorm that :func:`fold_norms_into_ddf`
    folds."""
    from mmdyn.ops.ddf import DDFConv2d, FilterNorm
    blocks = _resnet_block_types()
    for block in model.modules():
        if not isinstance(block, blocks):
            continue
        for i in (1, 2, 3):
            conv = getattr(block, f'conv{i}', None)
            norm_name = getattr(block, f'norm{i}_name', None)
            norm = getattr(block, norm_name, None) if norm_name else None
            if isinstance(conv, DDFConv2d) and conv.combine == 'mul' and \
                    isinstance(norm, nn.modules.batchnorm._BatchNorm) and \
                    not norm.training and norm.running_mean is not None and \
                    isinstance(conv.channel_branch[-1], FilterNorm):
                yield block, conv, norm_name, norm


def fold_norms_into_ddf(model: nn.Module) -> int:
    """Fold the eval-mode BatchNorm after each ``mul`` DDF layer of a ResNet
    block into that layer, in place; the norm becomes ``nn.Identity``. Returns
    the number folded.

    In mmpretrain's and mmdet's ``BasicBlock``/``Bottleneck``, ``norm{i}``
    is applied right after ``conv{i}``. Where ``conv{i}`` is a
    :class:`~mmdyn.ops.ddf.DDFConv2d` with ``combine='mul'`` whose channel
    filters end in a ``FilterNorm``, output channel ``c`` is linear in that
    norm's scale of the filter of channel ``c``: the BatchNorm's
    ``s = gamma / sqrt(var + eps)`` multiplies that scale (``std``, created
    from the constant gain where the norm has none), and ``beta - mean * s``
    plus ``s`` times the layer's bias becomes its bias. The values are
    unchanged (up to rounding); the export then has an ``Add`` of the bias
    instead of a ``BatchNormalization``, and the scale is folded into the
    im2col weights (:func:`mmdyn.ops.accel.ddf_export_forms.ddf_apply`).
    ``add`` DDF layers are left as they are (their spatial part is per head,
    not per channel).
    """
    folded = 0
    for block, conv, norm_name, norm in list(_ddf_norm_pairs(model)):
        filter_norm = conv.channel_branch[-1]
        kk = filter_norm.kernel_size**2
        with torch.no_grad():
            scale = norm.running_var.add(norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            std = filter_norm.std
            if std is None:
                std = torch.full((filter_norm.channels * kk, ),
                                 float(filter_norm.gain),
                                 dtype=scale.dtype,
                                 device=scale.device)
            filter_norm.std = nn.Parameter(
                (std.reshape(-1, kk) *
                 scale.to(std.dtype)[:, None]).reshape(-1).detach())
            bias = shift if conv.bias is None else \
                shift + scale * conv.bias
            conv.bias = nn.Parameter(bias.detach())
        setattr(block, norm_name, nn.Identity())
        folded += 1
    return folded


def export_onnx(module: nn.Module,
                output_file: str,
                shape: Sequence[int],
                dynamic_batch: bool = True,
                opset_version: int = 17,
                show_tracer_warnings: bool = False,
                dynamo: bool = False,
                simplify: bool = True) -> List[str]:
    """Export ``module`` (``inputs [B, 3, H, W] -> tensor(s)``) to ONNX.

    Where a BatchNorm after a DDF layer folds into it
    (:func:`fold_norms_into_ddf`), a copy of ``module`` with the norms
    folded is exported: hooks on those norms do not run in the export, and
    hooks on those DDF layers see the normalised outputs.

    Args:
        module (nn.Module): From :func:`exportable`.
        output_file (str): The .onnx path.
        shape (sequence[int]): (H, W).
        dynamic_batch (bool): Make the batch dimension dynamic.
            Default: True.
        opset_version (int): Default: 17.
        show_tracer_warnings (bool): Let torch's ``TracerWarning``s through
            (see the module docstring). Default: False: they are counted
            and logged in one line; other warnings pass as usual.
        dynamo (bool): Export through ``torch.export`` (the exporter of
            ``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``)
            instead of the TorchScript tracer. Default: False.
        simplify (bool): Rewrite the file by :func:`simplify_onnx` (when
            ``onnxscript`` is installed). Default: True.

    Returns:
        list[str]: output names.
    """
    module.eval()
    if next(_ddf_norm_pairs(module), None) is not None:
        module = copy.deepcopy(module)  # the caller's module stays as it is
        fold_norms_into_ddf(module)
    example = torch.randn(EXAMPLE_BATCH, 3, int(shape[0]), int(shape[1]))
    with torch.no_grad():
        outputs = module(example)
    n_out = len(outputs) if isinstance(outputs, tuple) else 1
    output_names = ['output'
                    ] if n_out == 1 else [f'output{i}' for i in range(n_out)]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: 'batch'} for name in output_names}
        dynamic_axes['input'] = {0: 'batch'}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.onnx.export(
            module, (example, ),
            output_file,
            input_names=['input'],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset_version,
            do_constant_folding=True,
            dynamo=dynamo)
    tracer = [
        w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
    ]
    for w in caught:
        if show_tracer_warnings or w not in tracer:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if tracer and not show_tracer_warnings:
        from mmengine.logging import print_log
        print_log(
            f'{len(tracer)} TracerWarnings of shape checks and path choices '
            'fixed at trace time (input size fixed, batch-independent; see '
            'mmdyn/analysis/onnx_export.py) not shown: '
            'show_tracer_warnings=True / --show-tracer-warnings shows them',
            logger='current')
    if simplify:
        simplify_onnx(output_file)
    return output_names


#: onnxscript rewrite rules :func:`simplify_onnx` applies (names in
#: ``onnxscript.rewriter.rules.common``).
SIMPLIFY_RULES = ('fuse_batchnorm_into_gemm_rule',
                  'fuse_batchnorm_into_conv_rule', 'unsqueeze_unsqueeze_rule',
                  'reshape_reshape_rule', 'no_op_cast_rule', 'div_by_1_rule',
                  'mul_by_1_rule', 'flatten_to_reshape_rule',
                  'no_op_transpose_rule')


def simplify_onnx(onnx_file: str) -> bool:
    """Simplify an exported file in place with onnxscript's optimizer (constant
    folding, dead and identity nodes), the rewrite rules
    :data:`SIMPLIFY_RULES`, :func:`fold_constant_nodes`,
    :func:`fold_norms_into_matmuls` and :func:`keep_batch_in_reshapes`; the
    values computed are unchanged.

    Returns
    False (file untouched) when ``onnxscript`` is not installed.
    """
    try:
        import onnx
        from onnxscript import optimizer, rewriter
        from onnxscript.rewriter.rules import common
    except ImportError:
        return False
    model = optimizer.optimize(onnx.load(onnx_file))
    rules = [
        getattr(common, name) for name in SIMPLIFY_RULES
        if hasattr(common, name)
    ]
    model = optimizer.optimize(
        rewriter.rewrite(model, pattern_rewrite_rules=rules))
    fold_constant_nodes(model)
    fold_norms_into_matmuls(model)
    lp_normalize_divisions(model)
    keep_batch_in_reshapes(model)
    onnx.save(model, onnx_file)
    return True


def fold_constant_nodes(model) -> int:
    """Replace every node whose inputs are all constants (initializers that
    are not graph inputs, outputs of nodes folded before it) by initializers
    of its outputs, evaluated by ``onnx.reference``, in place; the nodes that
    onnxscript's optimizer leaves (large tensors, ``Expand``/``Tile`` of
    weights: the dynamic layers' export-time weight folding). Returns the
    number of nodes folded."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    graph = model.graph
    values = _constant_arrays(graph)
    folded = []
    for node in graph.node:  # topologically sorted
        inputs = [name for name in node.input if name]
        if node.domain not in ('', 'ai.onnx') or \
                (node.op_type != 'Constant' and not inputs) or \
                not all(name in values for name in inputs):
            continue
        try:
            outputs = ReferenceEvaluator(node).run(
                None, {name: values[name]
                       for name in inputs})
        except Exception:  # an op the reference cannot run: keep it
            continue
        values.update(zip(node.output, outputs))
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.node.remove(node)
    needed = _names_read(graph)
    present = {i.name for i in graph.initializer}
    for node in folded:
        for name in node.output:
            if name in needed and name not in present:
                graph.initializer.append(
                    numpy_helper.from_array(values[name], name))
    _drop_unused_initializers(graph, needed)
    return len(folded)


def fold_norms_into_matmuls(model) -> int:
    """Fold each ``BatchNormalization`` of a [B, C] ``MatMul(A, W)``

    (``W`` a constant used once; the attention MLPs of the dynamic layers)
    into one ``Gemm(A, W * s, beta - mean * s)``, ``s = gamma / sqrt(var +
    eps)``, in place. Returns the number folded.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in list(inferred.value_info) + list(inferred.output)
        if v.type.tensor_type.HasField('shape')
    }
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses = _use_counts(graph)
    folded = []
    for node in graph.node:
        matmul = producer.get(node.input[0]) if node.input else None
        if node.op_type != 'BatchNormalization' or matmul is None or \
                matmul.op_type != 'MatMul' or ranks.get(node.input[0]) != 2 \
                or uses.get(node.input[0]) != 1 or \
                matmul.input[1] not in inits or \
                uses.get(matmul.input[1]) != 1 or \
                not all(n in inits for n in node.input[1:5]):
            continue
        gamma, beta, mean, var = (
            numpy_helper.to_array(inits[n]) for n in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == 'epsilon'), 1e-5)
        weight = numpy_helper.to_array(inits[matmul.input[1]])
        scale = gamma / np.sqrt(var + eps)
        inits[matmul.input[1]].CopyFrom(
            numpy_helper.from_array((weight * scale).astype(weight.dtype),
                                    matmul.input[1]))
        bias_name = node.output[0] + '_folded_bias'
        graph.initializer.append(
            numpy_helper.from_array((beta - mean * scale).astype(weight.dtype),
                                    bias_name))
        folded.append((matmul, node,
                       helper.make_node(
                           'Gemm',
                           [matmul.input[0], matmul.input[1], bias_name],
                           list(node.output),
                           name=node.name + '_folded')))
    for matmul, norm, gemm in folded:
        index = list(graph.node).index(matmul)
        graph.node.remove(matmul)
        graph.node.remove(norm)
        graph.node.insert(index, gemm)
    _drop_unused_initializers(graph)
    return len(folded)


#: The largest clamp of a norm :func:`lp_normalize_divisions` rewrites.
LP_NORM_MAX_EPS = 1e-6


def lp_normalize_divisions(model) -> int:
    """Rewrite ``Div(A, Clip(ReduceL2(A, axis, keepdims=1), min=eps))``
    (``eps`` a constant in (0, :data:`LP_NORM_MAX_EPS`], no ``max``; the
    intermediate values read by nothing else) as one ``LpNormalization(A, axis,
    p=2)``, in place. Returns the number rewritten.

    DDF's filter norms (:func:`mmdyn.ops.accel.ddf_export_forms.
    unit_ddf_filters`) export as these three nodes, two per DDF layer. The
    values are equal wherever ``||A|| >= eps``; a zero vector gives zeros
    in both (ONNX Runtime 1.32 and OpenVINO 2026.4). Only vectors whose norm
    lies in (0, eps) differ from ``A / eps``: ONNX Runtime gives the unit
    vector, OpenVINO a vector of about its own tiny clamp's size (measured
    at a norm of 3e-12).
    """
    import numpy as np
    from onnx import helper, numpy_helper
    graph = model.graph
    consts = _constant_arrays(graph)
    for node in graph.node:
        if node.op_type == 'Constant' and node.attribute and \
                node.attribute[0].name == 'value':
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: node for node in graph.node for out in node.output}
    uses = _use_counts(graph)
    # Values also read by a subgraph (If/Loop bodies) or output: kept.
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for sub in _subgraphs(node):
            outputs |= _names_read(sub)

    def single_axis(reduce):
        attrs = {
            a.name: helper.get_attribute_value(a)
            for a in reduce.attribute
        }
        if attrs.get('keepdims', 1) != 1:
            return None
        axes = attrs.get('axes')
        if axes is None and len(reduce.input) > 1 and reduce.input[1]:
            axes = consts.get(reduce.input[1])
            axes = None if axes is None else np.ravel(axes).tolist()
        return int(axes[0]) if axes is not None and len(axes) == 1 else None

    rewrites = []
    for node in graph.node:
        if node.op_type != 'Div' or node.domain not in ('', 'ai.onnx'):
            continue
        clip = producer.get(node.input[1])
        if clip is None or clip.op_type != 'Clip' or len(clip.input) < 2 or \
                (len(clip.input) > 2 and clip.input[2]) or clip.attribute:
            continue
        reduce = producer.get(clip.input[0])
        eps = consts.get(clip.input[1])
        if reduce is None or reduce.op_type != 'ReduceL2' or \
                reduce.input[0] != node.input[0] or eps is None or \
                eps.size != 1 or not 0 < float(eps) <= LP_NORM_MAX_EPS or \
                uses.get(clip.output[0]) != 1 or \
                uses.get(reduce.output[0]) != 1 or \
                {clip.output[0], reduce.output[0]} & outputs:
            continue
        axis = single_axis(reduce)
        if axis is None:
            continue
        rewrites.append((reduce, clip, node,
                         helper.make_node(
                             'LpNormalization', [node.input[0]],
                             list(node.output),
                             name=node.name + '_lp_norm',
                             axis=axis,
                             p=2)))
    for reduce, clip, div, lp_norm in rewrites:
        index = list(graph.node).index(div)
        graph.node.insert(index, lp_norm)
        for old in (reduce, clip, div):
            graph.node.remove(old)
    _drop_unused_initializers(graph)
    return len(rewrites)


def keep_batch_in_reshapes(model) -> int:
    """Name the batch in the reshapes to feature maps that keep it, in place.

    A ``Reshape`` whose shape constant is ``[-1, C, H, W]`` and whose input
    has static dims after the first with the product ``C * H * W`` gets
    ``[0, C, H, W]`` instead (``0``: the input's dim 0). Returns the number
    rewritten.

    Both give the same output. But shape inference cannot name the dim a
    ``-1`` gives when the batch is symbolic: the output's batch becomes a new
    unknown dim, so a runtime can no longer prove that the two inputs of the
    residual ``Add`` after a dynamic layer have one shape. ONNX Runtime then
    fuses neither that ``Add`` nor the ``Relu`` after it into the static
    conv before them (its NCHWc conv with a summed input), which costs a
    pass over the feature map each. The export forms write ``-1`` so that
    no batch size is baked into the graph (see
    :mod:`mmdyn.ops.accel.export_forms`); this pass restores the batch's
    name. Only 4-D targets: rewriting the reshapes of KernelWarehouse's
    kernels and columns as well made its ``MatMul``s 4-8 % slower in ONNX
    Runtime 1.32 (measured, cause not found), the 4-D ones alone cost it
    nothing.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    static_dims = {}
    for value in list(inferred.value_info) + list(inferred.input):
        tensor = value.type.tensor_type
        if tensor.HasField('shape'):
            static_dims[value.name] = [
                dim.dim_value if dim.HasField('dim_value') else None
                for dim in tensor.shape.dim
            ]
    overridable = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer if i.name not in overridable}
    rewritten = 0
    for node in graph.node:
        if node.op_type != 'Reshape' or node.domain not in ('', 'ai.onnx') \
                or len(node.input) < 2 or node.input[1] not in inits or any(
                    a.name == 'allowzero' and a.i for a in node.attribute):
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        dims = static_dims.get(node.input[0])
        if shape.ndim != 1 or shape.size != 4 or shape[0] != -1 or \
                (shape[1:] <= 0).any() or not dims or \
                any(d is None for d in dims[1:]) or \
                int(np.prod(dims[1:])) != int(np.prod(shape[1:])):
            continue
        name = node.input[1] + '_keep_batch'
        if name not in inits:
            kept = shape.copy()
            kept[0] = 0
            inits[name] = numpy_helper.from_array(kept, name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        rewritten += 1
    _drop_unused_initializers(graph)
    return rewritten


def _constant_arrays(graph) -> dict:
    """``{name: ndarray}`` of ``graph``'s initializers that are not also graph
    inputs (those are values a caller may override)."""
    from onnx import numpy_helper
    overridable = {i.name for i in graph.input}
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer if i.name not in overridable
    }


def _drop_unused_initializers(graph, read: Optional[set] = None) -> None:
    """Remove the initializers no node of ``graph`` (or of its subgraphs) reads
    and no output names, in place; those that are also graph inputs (values a
    caller may override) stay.

    ``read`` is :func:`_names_read`'s result when the caller has it.
    """
    read = _names_read(graph) if read is None else read
    inputs = {i.name for i in graph.input}
    for init in [
            i for i in graph.initializer
            if i.name not in read and i.name not in inputs
    ]:
        graph.initializer.remove(init)


def _subgraphs(node) -> list:
    """The graphs ``node`` holds as attributes (If branches, Loop bodies)."""
    from onnx import AttributeProto
    graphs = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _names_read(graph) -> set:
    """The names ``graph``'s nodes read (those of their subgraphs included) and
    its outputs."""
    names = {out.name for out in graph.output}
    for node in graph.node:
        names.update(node.input)
        for sub in _subgraphs(node):
            names |= _names_read(sub)
    return names


def _use_counts(graph) -> collections.Counter:
    """How many times each name is an input of ``graph``'s nodes (not of its
    subgraphs)."""
    return collections.Counter(name for node in graph.node
                               for name in node.input)


def compare_with_onnxruntime(module: nn.Module,
                             onnx_file: str,
                             shape: Sequence[int],
                             batch_sizes: Sequence[int] = (1, 4),
                             seed: int = 0,
                             timings: Optional[list] = None
                             ) -> List[Tuple[int, float]]:
    """Run the exported file with onnxruntime and PyTorch on random inputs.

    Args:
        timings (list, optional): Appended per batch size: (batch size,
            onnxruntime seconds, PyTorch seconds) of one run each, after
            the run compared.

    Returns:
        list[tuple[int, float]]: (batch size, max abs difference over all
        outputs) per batch size.
    """
    import onnxruntime as ort

    from .runtime_benchmark import onnxruntime_session_options

    # Workers that stop spinning when a run returns: spinning, they would
    # take cores from the PyTorch run timed right after it.
    session = ort.InferenceSession(
        onnx_file,
        onnxruntime_session_options(),
        providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    results = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, int(shape[0]), int(shape[1]), generator=gen)
        with torch.no_grad():
            ref = module(x)
        ref = ref if isinstance(ref, tuple) else (ref, )
        got = session.run(None, {'input': x.numpy()})
        if len(got) != len(ref):
            raise RuntimeError(f'onnxruntime gave {len(got)} outputs, '
                               f'PyTorch {len(ref)}')
        diff = max(
            float((torch.from_numpy(g) - r).abs().max())
            for g, r in zip(got, ref))
        results.append((batch, diff))
        if timings is not None:
            start = time.perf_counter()
            session.run(None, {'input': x.numpy()})
            middle = time.perf_counter()
            with torch.no_grad():
                module(x)
            timings.append(
                (batch, middle - start, time.perf_counter() - middle))
    return results


def export_config(config: str,
                  output_file: str,
                  checkpoint: Optional[str] = None,
                  shape: Sequence[int] = (224, 224),
                  backbone_only: bool = False,
                  dynamic_batch: bool = True,
                  cfg_options: Optional[dict] = None,
                  with_neck: bool = False) -> nn.Module:
    """Build a config's model (optionally load a checkpoint) and export it.

    Returns:
        nn.Module: the exported module (for verification).
    """
    from .models import build_model
    model = build_model(config, cfg_options)
    if checkpoint:
        from mmdyn.engine.checkpoint import load_model_weights
        load_model_weights(model, checkpoint)
    module = exportable(model, backbone_only, with_neck)
    export_onnx(module, output_file, shape, dynamic_batch)
    return module
