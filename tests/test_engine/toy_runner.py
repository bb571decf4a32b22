# Copyright (c) mmdyn contributors. All rights reserved.
"""A tiny classifier and Runner factory shared by the engine tests.

Not a test module (no ``test_`` prefix). The model optionally uses an
``ODConv2d`` layer so that resume tests cover a temperature buffer.
Like ``tools/train.py``, it applies :func:`mmdyn.compat.apply` and builds
runners with mmdyn's config-chosen components: ``AtomicCheckpointHook``,
the ``ExactResume*TrainLoop`` loops and the checked checkpoint loader for
``load_from``/``resume``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS
from mmengine.runner import Runner
from torch.utils.data import Dataset

import mmdyn.compat
import mmdyn.engine  # noqa: F401  (hooks, loops, checkpoint loader)
from mmdyn.engine.checkpoint import checked_path, find_resume_checkpoint

mmdyn.compat.apply()


class ToyDataset(Dataset):
    """Deterministic 3x8x8 images with 2 classes, a function of the index."""

    def __init__(self, length=32):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        label = index % 2
        img = torch.randn(3, 8, 8, generator=gen) + (1.0 if label else -1.0)
        return dict(inputs=img, labels=torch.tensor(label))


class ToyNet(BaseModel):
    """Conv (static or ODConv) -> BN -> ReLU -> pool -> (dropout) -> linear."""

    def __init__(self,
                 dynamic=False,
                 in_channels=3,
                 kernel_num=4,
                 dropout=0.0):
        super().__init__()
        if dynamic:
            from mmdyn.ops import ODConv2d
            self.conv = ODConv2d(
                in_channels, 8, 3, padding=1, kernel_num=kernel_num)
        else:
            self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        if isinstance(inputs, (list, tuple)):
            inputs = torch.stack(inputs)
        x = F.relu(self.bn(self.conv(inputs)))
        logits = self.fc(self.dropout(x.mean((2, 3))))
        if mode == 'loss':
            if isinstance(labels, (list, tuple)):
                labels = torch.stack(labels)
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


@METRICS.register_module(force=True)
class ToyAccuracy(BaseMetric):
    """Top-1 accuracy of :class:`ToyNet`'s logits, as ``acc``."""

    def process(self, data_batch, data_samples):
        labels = data_batch['labels']
        if isinstance(labels, (list, tuple)):
            labels = torch.stack(labels)
        logits = torch.stack(list(data_samples))  # one row per sample
        self.results.append((int(
            (logits.argmax(1) == labels).sum()), len(labels)))

    def compute_metrics(self, results):
        return dict(
            acc=sum(r[0] for r in results) / sum(r[1] for r in results))


def make_runner(work_dir,
                name,
                max_iters=8,
                ckpt_interval=4,
                dynamic=False,
                resume=False,
                load_from=None,
                custom_hooks=(),
                model=None,
                batch_size=4,
                amp=False,
                dropout=0.0,
                max_epochs=None,
                max_keep_ckpts=-1,
                dataset_length=32,
                exact_resume=True,
                val_interval=None,
                save_best=None):
    """An iteration-based Runner on :class:`ToyDataset` (CPU, seeded).

    With ``max_epochs`` it is epoch-based instead (``DefaultSampler``),
    still checkpointing every ``ckpt_interval`` iterations. Has mmdyn's
    safety hooks, as ``tools/train.py`` adds them. ``resume=True`` without
    ``load_from`` resumes from ``last_checkpoint`` (checked when the runner
    is made, as ``tools/train.py`` does). ``val_interval`` adds
    validation (:class:`ToyAccuracy`) and ``save_best`` passes through to
    the ``CheckpointHook``.
    """
    optim_wrapper = dict(
        optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4))
    if amp:
        optim_wrapper['type'] = 'CPUAmpOptimWrapper'
    hooks = list(custom_hooks)
    if dynamic:
        hooks.append(dict(type='DynamicTemperatureHook', iters=max_iters))
    hooks.append(dict(type='CheckpointShapeCheckHook'))
    hooks.append(dict(type='EmptyDatasetCheckHook'))
    if exact_resume:
        hooks.append(dict(type='ExactResumeHook'))
    if model is None:
        # Runner seeds only after the model exists: seed its init here.
        torch.manual_seed(0)
        model = ToyNet(dynamic=dynamic, dropout=dropout)
    if max_epochs is None:
        sampler = dict(type='InfiniteSampler', shuffle=True)
        train_cfg = dict(
            type='ExactResumeIterBasedTrainLoop', max_iters=max_iters)
    else:
        sampler = dict(type='DefaultSampler', shuffle=True)
        train_cfg = dict(
            type='ExactResumeEpochBasedTrainLoop', max_epochs=max_epochs)
    # What tools/train.py does for --resume and load_from.
    if resume and load_from is None:
        load_from = find_resume_checkpoint(work_dir)
    load_from = checked_path(load_from)
    val = {}
    if val_interval is not None:
        train_cfg['val_interval'] = val_interval
        val = dict(
            val_dataloader=dict(
                dataset=ToyDataset(8),
                batch_size=4,
                num_workers=0,
                sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='default_collate')),
            val_cfg=dict(),
            val_evaluator=dict(type='ToyAccuracy'))
    return Runner(
        model=model,
        work_dir=work_dir,
        experiment_name=name,
        train_dataloader=dict(
            dataset=ToyDataset(dataset_length),
            sampler=sampler,
            batch_size=batch_size,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=optim_wrapper,
        param_scheduler=dict(
            type='MultiStepLR',
            by_epoch=False,
            milestones=[max_iters // 2 + 1],
            gamma=0.5),
        train_cfg=train_cfg,
        default_hooks=dict(
            checkpoint=dict(
                type='AtomicCheckpointHook',
                by_epoch=False,
                interval=ckpt_interval,
                max_keep_ckpts=max_keep_ckpts,
                save_best=save_best,
                rule='greater'),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks,
        randomness=dict(seed=0, deterministic=True),
        resume=resume,
        load_from=load_from,
        default_scope='mmengine',
        **val)
