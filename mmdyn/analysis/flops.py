# Copyright (c) mmdyn contributors. All rights reserved.
"""Multiply-add (MAdds) and parameter counting that understands dynamic layers.

Generic counters (fvcore, mmengine's ``get_model_complexity_info``, thop)
trace ``F.conv2d`` calls: a dynamic conv that folds the batch into the
channels, or that builds its kernel with ``bmm``, is miscounted by them. This
counter works per module instead, with forward hooks:

* static ``nn.Conv{1,2,3}d``: ``out_elems * (C_in / g) * prod(k)``;
  ``nn.ConvTranspose{1,2,3}d``: ``in_elems * (C_out / g) * prod(k)``;
  ``nn.Linear``: ``out_elems * in_features``. Everything goes into the
  ``conv`` column. Biases, norms, activations and pooling are not counted.
* any module with a ``madds_per_sample(input_hw)`` method (every mmdyn
  layer): its own numbers, split into ``conv`` / ``att`` / ``agg`` / ``scal``
  (the convention is stated in ``docs/flops.md``), times the number of
  samples it saw. Its submodules (attention convs and linears) are not
  counted again.

Totals are divided by the number of images of the forward pass, so they are
per image even when a layer sees many samples per image (RoI heads).

torch only.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

COLUMNS = ('conv', 'att', 'agg', 'scal')


def _zeros(columns: Sequence[str]) -> Dict[str, int]:
    return dict.fromkeys(columns, 0)


@dataclass
class LayerMAdds:
    """Multiply-adds of one module, summed over all its calls.

    Attributes:
        name (str): Qualified module name in the model.
        type (str): Class name.
        input_shape (tuple): Shape of the input of its first call.
        calls (int): Number of forward calls seen.
        params (int): Parameters held by the module (with its children).
        madds (dict): Total multiply-adds per column over all calls (for the
            whole forward pass, not yet divided by the number of images).
    """
    name: str
    type: str
    input_shape: Tuple[int, ...] = ()
    calls: int = 0
    params: int = 0
    madds: Dict[str, int] = field(default_factory=lambda: _zeros(COLUMNS))

    @property
    def total(self) -> int:
        return sum(self.madds.values())


@dataclass
class MAddsReport:
    """Result of :func:`count_madds`.

    Attributes:
        layers (list[LayerMAdds]): Counted modules in first-call order.
        num_images (int): Images in the forward pass; per-image numbers are
            totals divided by it.
        params (int): All parameters of the model (shared ones once).
        input_shape (tuple): The shape of the input fed to the model.
        num_proposals (int, optional): Proposals per image the RoI heads of
            a two-stage detector were counted on; None for other models.
    """
    layers: List[LayerMAdds]
    num_images: int
    params: int
    input_shape: Tuple[int, ...] = ()
    num_proposals: Optional[int] = None

    def per_image(self) -> Dict[str, float]:
        """Per-image multiply-adds per column, plus ``'total'``."""
        out = {
            c: sum(layer.madds[c] for layer in self.layers) / self.num_images
            for c in COLUMNS
        }
        out['total'] = sum(out[c] for c in COLUMNS)
        return out

    def by_type(self) -> Dict[str, Dict[str, float]]:
        """Per-image multiply-adds summed per module class."""
        out: Dict[str, Dict[str, float]] = OrderedDict()
        for layer in self.layers:
            row = out.setdefault(layer.type, {c: 0.0 for c in COLUMNS})
            for c in COLUMNS:
                row[c] += layer.madds[c] / self.num_images
        return out


def is_dynamic_layer(module: nn.Module) -> bool:
    """Whether ``module`` reports its own cost (``madds_per_sample``)."""
    return callable(getattr(module, 'madds_per_sample', None))


def static_layer_madds(module: nn.Module, inputs: torch.Tensor,
                       output: torch.Tensor) -> Optional[int]:
    """Multiply-adds of one call of a static conv/linear, else None.

    Args:
        module (nn.Module): The layer.
        inputs (Tensor): Its input.
        output (Tensor): Its output.

    Returns:
        int | None: multiply-adds of the call (all samples), or None when
        ``module`` is not a conv or linear layer.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        per_in = (module.out_channels // module.groups) * math.prod(
            module.kernel_size)
        return inputs.numel() * per_in
    if isinstance(module, nn.modules.conv._ConvNd):
        per_out = (module.in_channels // module.groups) * math.prod(
            module.kernel_size)
        return output.numel() * per_out
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return None


def _spatial_size(module: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """The ``input_hw`` passed to ``madds_per_sample``.

    Conv-like layers: [B, C, H, W] gives (H, W), [B, C, L] gives (1, L).
    Linear-like layers (with ``in_features``, channels last): (1, number of
    tokens per sample), i.e. (1, 1) for a [B, C] input.
    """
    if hasattr(module, 'in_features'):
        return 1, math.prod(int(d) for d in x.shape[1:-1])
    if x.dim() >= 4:
        return int(x.shape[-2]), int(x.shape[-1])
    if x.dim() == 3:
        return 1, int(x.shape[-1])
    return 1, 1


def _first_tensor(inputs) -> Optional[torch.Tensor]:
    for item in inputs:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def count_madds(model: nn.Module,
                run: Callable[[], object],
                num_images: int = 1,
                input_shape: Tuple[int, ...] = ()) -> MAddsReport:
    """Count the multiply-adds of one forward pass.

    Args:
        model (nn.Module): The model (put it in the mode you want counted,
            usually ``eval()``).
        run (callable): Runs the forward pass, e.g.
            ``lambda: model(x, mode='tensor')``.
        num_images (int): Images in that forward pass. Default: 1.
        input_shape (tuple): Recorded in the report. Default: ().

    Returns:
        MAddsReport: per-layer records and totals.
    """
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    records: Dict[str, LayerMAdds] = OrderedDict()
    handles = []
    inside_dynamic = set()
    for name, module in model.named_modules():
        if id(module) in inside_dynamic:
            continue
        if is_dynamic_layer(module):
            # Its attention convs/linears are already in its own numbers.
            for sub in module.modules():
                if sub is not module:
                    inside_dynamic.add(id(sub))
        elif not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        handles.append(
            module.register_forward_hook(_make_hook(name, module, records)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return MAddsReport(
        layers=list(records.values()),
        num_images=num_images,
        params=count_params(model),
        input_shape=tuple(input_shape))


def _make_hook(name: str, module: nn.Module, records: Dict[str, LayerMAdds]):
    dynamic = is_dynamic_layer(module)

    def hook(mod, inputs, output):
        x = _first_tensor(inputs)
        if x is None:
            return
        record = records.get(name)
        if record is None:
            record = LayerMAdds(
                name=name,
                type=type(mod).__name__,
                input_shape=tuple(x.shape),
                params=_own_params(mod))
            records[name] = record
        record.calls += 1
        if dynamic:
            costs = mod.madds_per_sample(_spatial_size(mod, x))
            missing = set(COLUMNS) - set(costs)
            if missing:
                raise ValueError(
                    f'{type(mod).__name__}.madds_per_sample must return the '
                    f'keys {COLUMNS}; {sorted(missing)} missing')
            samples = int(x.shape[0])
            for c in COLUMNS:
                record.madds[c] += int(costs[c]) * samples
        else:
            out = output if isinstance(output,
                                       torch.Tensor) else _first_tensor(output)
            record.madds['conv'] += static_layer_madds(mod, x, out)

    return hook


def format_number(value: float, unit: float = 1e6, digits: int = 1) -> str:
    """``value / unit`` with ``digits`` decimals, blank for zero."""
    if not value:
        return ''
    return f'{value / unit:.{digits}f}'


def format_report(report: MAddsReport,
                  per_layer: bool = False,
                  title: str = '') -> str:
    """Human-readable summary (and optionally the per-layer table).

    Numbers are per image, in millions (M) of multiply-adds.
    """
    lines = []
    if title:
        lines.append(title)
    if report.input_shape:
        lines.append(f'input shape: {tuple(report.input_shape)} '
                     f'({report.num_images} image(s)); MAdds per image')
    if report.num_proposals is not None:
        lines.append(f'RoI heads on {report.num_proposals} proposals per '
                     'image (mask heads on the first 100)')
    if per_layer:
        header = (f'{"layer":<48} {"type":<16} {"input":<20} {"calls":>5} '
                  f'{"params":>10} ' + ' '.join(f'{c + " (M)":>10}'
                                                for c in COLUMNS))
        lines.append(header)
        lines.append('-' * len(header))
        for layer in report.layers:
            lines.append(
                f'{layer.name:<48} {layer.type:<16} '
                f'{"x".join(map(str, layer.input_shape)):<20} '
                f'{layer.calls:>5} {layer.params:>10} ' + ' '.join(
                    f'{format_number(layer.madds[c] / report.num_images, digits=3):>10}'  # noqa: E501
                    for c in COLUMNS))
        lines.append('')
        lines.append('per layer type (M):')
        for kind, row in report.by_type().items():
            lines.append(f'  {kind:<24} ' +
                         ' '.join(f'{c}={row[c] / 1e6:.2f}'
                                  for c in COLUMNS if row[c]))
    totals = report.per_image()
    columns = ', '.join(f'{c} {totals[c] / 1e6:.2f}' for c in COLUMNS)
    lines.append(f'MAdds (M): {columns}, total {totals["total"] / 1e6:.1f} '
                 f'({totals["total"] / 1e9:.3f} G)')
    lines.append(f'Params: {report.params:,} ({report.params / 1e6:.2f} M)')
    return '\n'.join(lines)


# Detectors: the RoI heads are counted on a fixed number of proposals, not on
# whatever a randomly initialised RPN keeps, so that two detectors that
# differ only in their heads (Faster vs Mask R-CNN) differ by those heads.
DEFAULT_PROPOSALS = 1000  # mmdet's two-stage test_cfg.rpn.max_per_img


def is_two_stage(model: nn.Module) -> bool:
    """Whether ``model`` is a detector with an RPN and a RoI head."""
    return getattr(model, 'rpn_head', None) is not None and \
        getattr(model, 'roi_head', None) is not None


def detector_proposals(model: nn.Module) -> int:
    """The proposals per image a two-stage detector's RoI head is counted
    on: its ``test_cfg.rpn.max_per_img`` (1000 in mmdet's COCO configs,
    the papers' convention), else :data:`DEFAULT_PROPOSALS`."""
    test_cfg = getattr(model, 'test_cfg', None) or {}
    rpn_cfg = test_cfg.get('rpn') if hasattr(test_cfg, 'get') else None
    value = rpn_cfg.get('max_per_img') if rpn_cfg else None
    return int(value) if value else DEFAULT_PROPOSALS


def fixed_proposals(batch: dict, num_proposals: int, seed: int = 0) -> list:
    """``num_proposals`` random boxes inside each image of ``batch``, as the
    ``InstanceData`` list an RPN returns (the counts do not depend on where the
    boxes are)."""
    from mmengine.structures import InstanceData
    gen = torch.Generator().manual_seed(seed)
    device = batch['inputs'].device
    proposals = []
    for sample in batch['data_samples']:
        h, w = sample.metainfo.get('img_shape',
                                   tuple(batch['inputs'].shape[-2:]))
        xy = torch.rand(
            num_proposals, 2, generator=gen) * torch.tensor([w * 0.9, h * 0.9])
        wh = 8 + torch.rand(
            num_proposals, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat([xy,
                           torch.minimum(xy + wh, torch.tensor([w, h]))],
                          dim=1)
        result = InstanceData()
        result.bboxes = boxes.to(device)
        result.scores = torch.ones(num_proposals, device=device)
        proposals.append(result)
    return proposals


def detector_forward(model: nn.Module,
                     batch: dict,
                     num_proposals: Optional[int] = None):
    """A detector's network forward as counted.

    Two-stage detectors with an RPN: backbone, neck, the RPN head's convs,
    and ``roi_head.forward`` on ``num_proposals`` fixed boxes per image
    (default :func:`detector_proposals`); mmdet's ``roi_head.forward`` runs
    the box head on all of them and a mask head on the first 100 (the
    ``test_cfg.rcnn.max_per_img`` detections it would see at test time).
    Other detectors: ``model._forward`` (backbone, neck, dense head).
    """
    if not is_two_stage(model):
        return model._forward(batch['inputs'], batch['data_samples'])
    if num_proposals is None:
        num_proposals = detector_proposals(model)
    x = model.extract_feat(batch['inputs'])
    model.rpn_head(x)
    proposals = fixed_proposals(batch, num_proposals)
    return model.roi_head.forward(x, proposals, batch['data_samples'])


def count_config_madds(config,
                       shape: Optional[Sequence[int]] = None,
                       cfg_options: Optional[dict] = None,
                       model: Optional[nn.Module] = None,
                       num_proposals: Optional[int] = None) -> MAddsReport:
    """Build a config's model and count one image of size ``shape``.

    Classifiers run ``model(inputs, mode='tensor')``; detectors run
    :func:`detector_forward` (backbone, neck, RPN and the RoI head on a
    fixed number of proposals) on an image padded by the model's data
    preprocessor (e.g. 800x1333 -> 800x1344).

    Args:
        config (str | Config): Config path or object.
        shape (sequence[int], optional): (H, W). Default: 224x224 for
            classifiers, 800x1333 for detectors.
        cfg_options (dict, optional): Config overrides.
        model (nn.Module, optional): An already built model of that config.
        num_proposals (int, optional): Proposals per image of two-stage
            detectors. Default: the config's ``test_cfg.rpn.max_per_img``
            (1000 for mmdet's COCO configs).

    Returns:
        MAddsReport: counts for one image.
    """
    from .models import (build_model, default_shape, make_batch, task_of,
                         tensor_forward)
    if model is None:
        model = build_model(config, cfg_options)
    model.eval()
    task = task_of(model)
    if shape is None:
        shape = default_shape(task)
    batch = make_batch(model, 1, shape, training=False)
    two_stage = task == 'detection' and is_two_stage(model)
    if task == 'detection':
        if two_stage and num_proposals is None:
            num_proposals = detector_proposals(model)

        def run():
            return detector_forward(model, batch, num_proposals)
    else:

        def run():
            return tensor_forward(model, batch)

    report = count_madds(
        model, run, num_images=1, input_shape=tuple(batch['inputs'].shape))
    report.num_proposals = num_proposals if two_stage else None
    return report
