# ResNet-18 classifier trained from scratch on the synthetic demo image
# folders (data/demo_cls: 4 shape classes, 64x64 px, generated on first use).
# Inherits mmpretrain's ImageNet ResNet-18 config; data and schedule are
# replaced for a CPU run of a few minutes.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

# mmdyn's checkpoint hook and training loop (registered by mmdyn.engine).
custom_imports = dict(imports=['mmdyn.engine'], allow_failed_imports=False)

data_root = 'data/demo_cls'
num_classes = 4

model = dict(head=dict(num_classes=num_classes, topk=(1, )))
data_preprocessor = dict(num_classes=num_classes)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=1,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=1,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

max_epochs = 30
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=1e-4))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=max_epochs)
# mmdyn's loop continues an interrupted epoch exactly (ExactResumeHook).
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=max_epochs,
    val_interval=10)
auto_scale_lr = dict(base_batch_size=32)
# A checkpoint every epoch, so that `tools/train.py CONFIG --resume`
# continues an interrupted run.
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(type='AtomicCheckpointHook', interval=1, max_keep_ckpts=1))
randomness = dict(seed=0)
