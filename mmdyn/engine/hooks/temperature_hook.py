# Copyright (c) mmdyn contributors. All rights reserved.
"""Anneals the attention temperature of dynamic convolutions during training.

Each temperature-carrying layer class declares its method's schedule as
``TEMPERATURE_SCHEDULE = dict(start=..., end=..., epochs=...)``: ODConv and
DyConv go from 30 to 1 over 10 epochs, KernelWarehouse from 1 to 0 over 20
(15 in the MobileNetV2 recipes). Both official codes use the same linear
shape, evaluated once per data-loader iteration before the forward pass::

    value(it) = end + max(0, (start - end) * (N - it) / N),
    it = global iteration index + 1,  N = epochs * iterations per epoch

so the last iteration of the annealing period reaches ``end`` exactly and the
value stays there. Before the first iteration the value is ``start``.
"""
import logging
import warnings
from typing import Dict, List, Optional, Tuple

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn


def annealed_value(start: float, end: float, total_iters: int,
                   it: int) -> float:
    """``end + max(0, (start - end) * (N - it) / N)`` with ``N >= 1``."""
    total_iters = max(1, total_iters)
    return end + max(0., (start - end) * (total_iters - it) / total_iters)


def find_temperature_layers(model: nn.Module) -> List[nn.Module]:
    """Modules having both ``update_temperature`` and ``TEMPERATURE_SCHEDULE``,
    in module order (DDP wrappers unwrapped)."""
    if is_model_wrapper(model):
        model = model.module
    return [
        m for m in model.modules() if hasattr(m, 'update_temperature')
        and hasattr(m, 'TEMPERATURE_SCHEDULE')
    ]


@HOOKS.register_module()
class DynamicTemperatureHook(Hook):
    """Set the temperature of every dynamic layer at each train iteration.

    Layers are grouped by class; each group follows its class's
    ``TEMPERATURE_SCHEDULE`` unless ``start``/``end``/``epochs``/``iters``
    are given here, which override it for every group. On resume the value
    is recomputed from the restored iteration, so the schedule continues
    where it stopped. The current value is logged as ``train/temperature``
    (plus ``train/temperature/<Class>`` when several schedules are in use).

    Args:
        start (float, optional): Initial value. Default: the class's.
        end (float, optional): Final value. Default: the class's.
        epochs (int | float, optional): Annealing length in epochs of
            ``len(runner.train_dataloader)`` iterations (also with
            iteration-based loops). Default: the class's.
        iters (int, optional): Annealing length in iterations; overrides
            ``epochs``. Default: None.
    """

    priority = 'NORMAL'

    def __init__(self,
                 start: Optional[float] = None,
                 end: Optional[float] = None,
                 epochs: Optional[float] = None,
                 iters: Optional[int] = None):
        for name, value in (('start', start), ('end', end)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise ValueError(f'{name} must be a number or None, got '
                                 f'{value!r}')
        if epochs is not None and (isinstance(
                epochs, bool) or not isinstance(epochs,
                                                (int, float)) or epochs <= 0):
            raise ValueError(f'epochs must be a positive number or None, '
                             f'got {epochs!r}')
        if iters is not None and (isinstance(iters, bool)
                                  or not isinstance(iters, int) or iters <= 0):
            raise ValueError(f'iters must be a positive int or None, got '
                             f'{iters!r}')
        self.start = start
        self.end = end
        self.epochs = epochs
        self.iters = iters
        # class name -> (layers, start, end, total iterations)
        self._groups: Dict[str, Tuple[List[nn.Module], float, float, int]] = {}

    def _total_iters(self, runner, schedule_epochs: float) -> int:
        if self.iters is not None:
            return self.iters
        epochs = self.epochs if self.epochs is not None else schedule_epochs
        return max(1, round(epochs * len(runner.train_dataloader)))

    def before_train(self, runner) -> None:
        layers = find_temperature_layers(runner.model)
        if not layers:
            message = ('DynamicTemperatureHook: the model has no layer with '
                       '`update_temperature` and `TEMPERATURE_SCHEDULE`; the '
                       'hook does nothing.')
            print_log(message, logger='current', level=logging.WARNING)
            warnings.warn(message, UserWarning)
            self._groups = {}
            return
        groups: Dict[str, list] = {}
        for layer in layers:
            groups.setdefault(type(layer).__name__, []).append(layer)
        self._groups = {}
        for name, members in groups.items():
            schedule = type(members[0]).TEMPERATURE_SCHEDULE
            start = self.start if self.start is not None else \
                schedule['start']
            end = self.end if self.end is not None else schedule['end']
            total = self._total_iters(runner, schedule['epochs'])
            self._groups[name] = (members, float(start), float(end), total)
        # A fresh run starts at `start`; a resumed one at the value the last
        # completed iteration (runner.iter - 1) set, i.e. it = runner.iter.
        self._apply(runner, runner.iter)

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch=None) -> None:
        if self._groups:
            self._apply(runner, runner.iter + 1)

    def _apply(self, runner, it: int) -> None:
        first = True
        for name, (layers, start, end, total) in self._groups.items():
            value = annealed_value(start, end, total, it)
            for layer in layers:
                layer.update_temperature(value)
            if first:
                runner.message_hub.update_scalar('train/temperature', value)
                first = False
            if len(self._groups) > 1:
                runner.message_hub.update_scalar(f'train/temperature/{name}',
                                                 value)
