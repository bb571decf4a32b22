# Copyright (c) mmdyn contributors. All rights reserved.
"""Build a model from an OpenMMLab config and make random inputs for it.

Shared by the FLOPs counter, the benchmark and the ONNX exporter. Two kinds
of models are supported: classifiers (mmpretrain ``ImageClassifier``-like,
``model(inputs, data_samples, mode=...)``) and detectors (mmdet
``BaseDetector``, which have ``_forward(inputs, data_samples)`` and a
``roi_head`` or ``bbox_head``). Only mmengine is imported at module level;
mmpretrain/mmdet are imported when a config asks for them.
"""
import copy
from typing import Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from torch import nn

TASKS = ('classification', 'detection')


def load_config(config, cfg_options: Optional[dict] = None) -> Config:
    """Load ``config`` (a path, a ``package::`` name or a Config), merging
    ``cfg_options``: :func:`mmdyn.engine.config_bases.load_config`, the
    loader of every mmdyn tool."""
    from mmdyn.engine.config_bases import load_config as read_config
    return read_config(config, cfg_options)


def build_model(config,
                cfg_options: Optional[dict] = None,
                device: str = 'cpu') -> nn.Module:
    """Build ``cfg.model`` in the config's default scope (no weights).

    Args:
        config (str | Config): Config path or object.
        cfg_options (dict, optional): Overrides, as ``--cfg-options``.
        device (str): Device to move the model to. Default: 'cpu'.

    Returns:
        nn.Module: the model in eval mode.
    """
    from mmengine.registry import MODELS, init_default_scope
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = copy.deepcopy(cfg.model)
    # As mmengine's Runner: a top-level data_preprocessor (mmpretrain's
    # configs keep num_classes, mean and std there) applies to the model.
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor',
                             copy.deepcopy(cfg.data_preprocessor))
    model = MODELS.build(model_cfg)
    return model.to(device).eval()


def task_of(model: nn.Module) -> str:
    """'detection' for mmdet detectors, else 'classification'."""
    if hasattr(model, '_forward') and (hasattr(model, 'roi_head')
                                       or hasattr(model, 'bbox_head')):
        return 'detection'
    return 'classification'


def default_shape(task: str) -> Tuple[int, int]:
    """(H, W) used when none is given: 224x224, or 800x1333 to detect."""
    return (800, 1333) if task == 'detection' else (224, 224)


def _num_classes(model: nn.Module, default: int = 10) -> int:
    for head_name in ('roi_head', 'bbox_head', 'head'):
        head = getattr(model, head_name, None)
        if head is None:
            continue
        bbox_head = getattr(head, 'bbox_head', head)
        for attr in ('num_classes', ):
            value = getattr(bbox_head, attr, None)
            if isinstance(value, int):
                return value
    return default


def make_batch(model: nn.Module,
               batch_size: int,
               shape: Sequence[int],
               training: bool = False,
               device: str = 'cpu',
               seed: int = 0) -> dict:
    """A random batch passed through the model's ``data_preprocessor``.

    Classifiers get random uint8 images with random labels; detectors get
    mmdet's ``demo_mm_inputs`` (random images, 5 boxes each, masks when the
    model has a mask head).

    Args:
        model (nn.Module): The model.
        batch_size (int): Images.
        shape (sequence[int]): (H, W).
        training (bool): Passed to the preprocessor. Default: False.
        device (str): Default: 'cpu'.
        seed (int): Default: 0.

    Returns:
        dict: ``dict(inputs=Tensor[B, 3, H', W'], data_samples=list)``.
    """
    h, w = int(shape[0]), int(shape[1])
    if task_of(model) == 'detection':
        from mmdet.testing import demo_mm_inputs
        with_mask = bool(
            getattr(getattr(model, 'roi_head', None), 'with_mask', False))
        packed = demo_mm_inputs(
            batch_size=batch_size,
            image_shapes=(3, h, w),
            num_items=[5] * batch_size,
            num_classes=_num_classes(model),
            with_mask=with_mask,
            device=device)
    else:
        from mmpretrain.structures import DataSample
        gen = torch.Generator().manual_seed(seed)
        num_classes = _num_classes(model, default=1000)
        packed = dict(inputs=[
            torch.randint(0, 256, (
                3, h, w), dtype=torch.uint8, generator=gen).to(device)
            for _ in range(batch_size)
        ])
        # Labels only for training: at inference they are not needed, and a
        # preprocessor with batch augments would one-hot encode them.
        packed['data_samples'] = [
            DataSample().set_gt_label(
                int(torch.randint(0, num_classes, (1, ), generator=gen)))
            for _ in range(batch_size)
        ] if training else None
    preprocessor = getattr(model, 'data_preprocessor', None)
    if preprocessor is None:
        inputs = torch.stack(packed['inputs']).float()
        return dict(inputs=inputs, data_samples=packed['data_samples'])
    return preprocessor(packed, training)


def tensor_forward(model: nn.Module, batch: dict):
    """The network forward without post-processing, as counted/benchmarked.

    Classifiers: ``model(inputs, mode='tensor')`` (backbone, neck, head
    logits). Detectors: ``model._forward(inputs, data_samples)`` (backbone,
    neck, RPN with proposal selection, RoI head).
    """
    if task_of(model) == 'detection':
        return model._forward(batch['inputs'], batch['data_samples'])
    return model(batch['inputs'], mode='tensor')


def loss_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """Forward + loss of a training step; returns the summed loss."""
    losses = model(batch['inputs'], batch['data_samples'], mode='loss')
    loss, _ = model.parse_losses(losses)
    return loss
