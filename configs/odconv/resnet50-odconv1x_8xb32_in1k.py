# ResNet-50 + ODConv (1x, r=1/16): conv1/conv2/conv3 of every Bottleneck are
# ODConv2d; stem, shortcuts and classifier static. Same recipe as mmpretrain's
# ResNet-50 (see resnet18-odconv1x_8xb32_in1k.py).
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

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
