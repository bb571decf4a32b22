"""ONNX export of classifiers and detection backbones, with a dynamic batch.

Dynamic layers compute one kernel per sample; their per-sample conv switches
to the im2col + batched-matmul path while exporting
(:func:`mmdyn.ops.per_sample_conv.per_sample_conv2d`), whose graph does not
depend on the batch size. The model is traced with the TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``: torch 2.14's default
dynamo exporter needs onnxscript and handles the data-dependent parts of
detectors poorly) and with a batch of 2 example inputs, so that no
batch-size-1 special case (e.g. "one kernel for the whole batch") is baked
into the graph.

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


def exportable(model: nn.Module, backbone_only: bool = False) -> nn.Module:
    """The module to export: classifier logits or backbone features."""
    from .models import task_of
    if backbone_only:
        if not hasattr(model, 'backbone'):
            raise ValueError('backbone_only=True needs a model with a '
                             '.backbone')
        return BackboneFeatures(model.backbone).eval()
    if task_of(model) == 'detection':
        raise ValueError('whole detectors are not exported (their proposal '
                         'selection is data dependent): use '
                         'backbone_only=True (--backbone-only)')
    return ClassifierLogits(model).eval()


def export_onnx(module: nn.Module,
                output_file: str,
                shape: Sequence[int],
                dynamic_batch: bool = True,
                opset_version: int = 17,
                show_tracer_warnings: bool = False,
                dynamo: bool = False) -> List[str]:
    """Export ``module`` (``inputs [B, 3, H, W] -> tensor(s)``) to ONNX.

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

    Returns:
        list[str]: output names.
    """
    module.eval()
    example = torch.randn(EXAMPLE_BATCH, 3, int(shape[0]), int(shape[1]))
    with torch.no_grad():
        outputs = module(example)
    n_out = len(outputs) if isinstance(outputs, tuple) else 1
    output_names = ['output'] if n_out == 1 else [
        f'output{i}' for i in range(n_out)
    ]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: 'batch'} for name in output_names}
        dynamic_axes['input'] = {0: 'batch'}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.onnx.export(
            module,
            (example, ),
            output_file,
            input_names=['input'],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset_version,
            do_constant_folding=True,
            dynamo=dynamo)
    tracer = [w for w in caught if issubclass(w.category,
                                              torch.jit.TracerWarning)]
    for w in caught:
        if show_tracer_warnings or w not in tracer:
            warnings.warn_explicit(w.message, w.category, w.filename,
                                   w.lineno)
    if tracer and not show_tracer_warnings:
        from mmengine.logging import print_log
        print_log(
            f'{len(tracer)} TracerWarnings of shape checks and path choices '
            'fixed at trace time (input size fixed, batch-independent; see '
            'mmdyn/analysis/onnx_export.py) not shown: '
            'show_tracer_warnings=True / --show-tracer-warnings shows them',
            logger='current')
    return output_names


def compare_with_onnxruntime(module: nn.Module,
                             onnx_file: str,
                             shape: Sequence[int],
                             batch_sizes: Sequence[int] = (1, 4),
                             seed: int = 0) -> List[Tuple[int, float]]:
    """Run the exported file with onnxruntime and PyTorch on random inputs.

    Returns:
        list[tuple[int, float]]: (batch size, max abs difference over all
        outputs) per batch size.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    results = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, int(shape[0]), int(shape[1]),
                        generator=gen)
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
    return results


def export_config(config: str,
                  output_file: str,
                  checkpoint: Optional[str] = None,
                  shape: Sequence[int] = (224, 224),
                  backbone_only: bool = False,
                  dynamic_batch: bool = True,
                  cfg_options: Optional[dict] = None) -> nn.Module:
    """Build a config's model (optionally load a checkpoint) and export it.

    Returns:
        nn.Module: the exported module (for verification).
    """
    from .models import build_model
    model = build_model(config, cfg_options)
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    module = exportable(model, backbone_only)
    export_onnx(module, output_file, shape, dynamic_batch)
    return module
