# ResNet-18 + KernelWarehouse (1x), ICML 2024: every block conv and every
# stride-2 shortcut is a KW conv drawing from one warehouse per stage (4
# warehouses, cells 64x64 .. 512x512); stem, norms and classifier are static.
# 11,932,148 parameters.
# Recipe of the KW code base (built on ConvNeXt's): 300 epochs, AdamW lr 4e-3
# for a batch of 4096 (8 GPUs x 128 x 4 accumulation steps), wd 0.05 (not on
# 1-D parameters and biases), 20 warm-up epochs then cosine per iteration to
# 1e-6, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, label
# smoothing 0.1, random erasing 0.25, bicubic resizing; drop path 0.1 (the
# same rate in every block); the KW temperature falls from 1 to 0 over the
# first 20 epochs.
_base_ = [
    'mmpretrain::_base_/models/resnet18.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='KWResNet',
        drop_path_rate=0.1,
        kw_cfg=dict(
            reduction=1 / 16,
            cell_num_ratio=1,
            cell_inplane_ratio=1,
            cell_outplane_ratio=1,
            nonlocal_basis_ratio=1,
            attention_norm='bn_batch1')),
    head=dict(
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(lr=4e-3),
    # 8 GPUs x 128 images x 4 steps = the paper's batch of 4096.
    accumulative_counts=4)

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
        by_epoch=True,
        begin=20,
        end=300,
        convert_to_iter_based=True)
]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=300,
    val_interval=1)

auto_scale_lr = dict(base_batch_size=4096)

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=20)]
