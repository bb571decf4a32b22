# ResNet-101 + ODConv (1x, r=1/16). Same recipe as mmpretrain's ResNet-101.
_base_ = 'mmpretrain::resnet/resnet101_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625)),
    head=dict(type='DropoutLinearClsHead', dropout=0.1))

custom_hooks = [dict(type='DynamicTemperatureHook')]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
