# mmpretrain's stock ResNet-18 classifier with DyConv (4 kernels) in every
# block conv: the DynamicResNet backbone with a DyConv2d layer config.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet', dyconv_cfg=dict(type='DyConv2d', kernel_num=4)))
custom_hooks = [dict(type='DynamicTemperatureHook')]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
