# DDF-ResNet-50 (spatial x channel filters): the 3x3 conv2 of every Bottleneck
# is a DDFConv2d (combine='mul', se_ratio 0.2, 1 head); everything else is the
# v1.5 ResNet-50 with zero-init of each block's last BN.
# Recipe of the official timm run (README): 120 cosine epochs + timm's 10
# cool-down epochs at the minimum lr (130 in all), 5 linear warm-up epochs from
# lr 1e-4, SGD Nesterov (momentum 0.9) lr 0.4 for batch 1024 (8 x 128), min
# lr 1e-5, wd 1e-4 except on 1-D parameters (BN, biases, DDF filter-norm
# gains), label smoothing 0.1, RandAugment rand-m7-mstd0.5-inc1, random
# erasing 0.4. The official run used AMP: add --amp to tools/train.py.
# Differences from timm (documented, not hidden): mmpretrain's RandomErasing
# erases one rectangle (timm: 1 to 3), the cosine restarts at the end of the
# warm-up (timm evaluates it from epoch 0), and bicubic interpolation replaces
# timm's random bilinear/bicubic choice.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(type='DDFResNet', combine='mul'),
    head=dict(
        loss=dict(
            _delete_=True,
            type='LabelSmoothLoss',
            label_smooth_val=0.1,
            mode='original')))

bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=7,
        magnitude_std=0.5,
        hparams=dict(
            pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(
        type='RandomErasing',
        erase_prob=0.4,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=bgr_mean,
        fill_std=bgr_std),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=128, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(lr=0.4, momentum=0.9, weight_decay=1e-4, nesterov=True),
    paramwise_cfg=dict(flat_decay_mult=0.))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-4 / 0.4,
        by_epoch=True,
        begin=0,
        end=5),
    dict(
        type='CosineAnnealingLR',
        T_max=115,
        eta_min=1e-5,
        by_epoch=True,
        begin=5,
        end=120),
]
# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=130,
    val_interval=1)
auto_scale_lr = dict(base_batch_size=1024)
